#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Encryption at rest: the AES-GCM frame checked against frames made by
//! LMCache 0.5.6's own serializer (`tests/fixtures/lmcache_aesgcm.json`), the
//! AAD binding (contract, epoch, model, chunk key), tampering, and the
//! per-contract, per-epoch data keys.

use hkdf::Hkdf;
use kvgate_auth::{AuthConfig, ContractRegistry, KeyRef};
use kvgate_store::crypto::{
    open, open_with_aad, seal, seal_with_nonce, Binding, DataKey, IntegrityError,
};
use serde_json::Value;
use sha2::Sha256;
use zeroize::Zeroizing;

fn hex32(s: &str) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(hex::decode(s).unwrap().try_into().unwrap())
}

#[test]
fn frames_are_lmcaches_for_the_same_key_and_nonce() {
    let v: Value = serde_json::from_str(include_str!("fixtures/lmcache_aesgcm.json")).unwrap();
    let master = hex::decode(v["master_key_hex"].as_str().unwrap()).unwrap();
    let plaintext = hex::decode(v["plaintext_hex"].as_str().unwrap()).unwrap();
    let iv: [u8; 12] = hex::decode(v["iv_hex"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let mut checked = 0;
    for case in v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["aes_bits"] == 256)
    {
        // LMCache's KDF, to reproduce its key for the vector.
        let info = format!(
            "lmcache-l2-aesgcm-v1{}",
            case["cache_salt"].as_str().unwrap()
        );
        let mut k = [0u8; 32];
        Hkdf::<Sha256>::new(None, &master)
            .expand(info.as_bytes(), &mut k)
            .unwrap();
        assert_eq!(hex::encode(k), case["derived_key_hex"].as_str().unwrap());
        let key = DataKey::new(Zeroizing::new(k));
        let frame = seal_with_nonce(&key, iv, None, &plaintext);
        assert_eq!(hex::encode(&frame), case["frame_hex"].as_str().unwrap());
        assert_eq!(*open_with_aad(&key, None, &frame).unwrap(), plaintext);
        checked += 1;
    }
    assert_eq!(checked, 2);
}

#[test]
fn a_frame_opens_only_where_it_was_sealed() {
    let key = DataKey::new(hex32(&"11".repeat(32)));
    let other_key = DataKey::new(hex32(&"22".repeat(32)));
    let at = Binding {
        contract: "acme",
        epoch: 3,
        model: "/models/tiny",
        chunk_key: "/models/tiny@1@0@ab@bfloat16",
    };
    let chunk = vec![7u8; 4096];
    let frame = seal(&key, &at, &chunk);
    assert_eq!(frame.len(), 1 + 12 + 4096 + 16);
    assert_ne!(frame, seal(&key, &at, &chunk), "a fresh nonce per write");
    assert!(
        !frame.windows(64).any(|w| w == &chunk[..64]),
        "no plaintext in the frame"
    );
    assert_eq!(*open(&key, &at, &frame).unwrap(), chunk);

    let moved = [
        Binding {
            contract: "globex",
            ..at
        },
        Binding { epoch: 4, ..at },
        Binding {
            model: "/models/other",
            ..at
        },
        Binding {
            chunk_key: "/models/tiny@1@0@ac@bfloat16",
            ..at
        },
    ];
    for b in &moved {
        assert_eq!(open(&key, b, &frame), Err(IntegrityError::Tag));
    }
    assert_eq!(open(&other_key, &at, &frame), Err(IntegrityError::Tag));
    let mut flipped = frame.clone();
    flipped[40] ^= 1;
    assert_eq!(open(&key, &at, &flipped), Err(IntegrityError::Tag));
    assert_eq!(open(&key, &at, &frame[..20]), Err(IntegrityError::Short));
    let mut v2 = frame.clone();
    v2[0] = 2;
    assert_eq!(open(&key, &at, &v2), Err(IntegrityError::Version(2)));
}

#[test]
fn data_keys_are_per_contract_and_epoch_and_agree_across_holders() {
    let dir = tempfile::tempdir().unwrap();
    let master = dir.path().join("master.key");
    std::fs::write(&master, "data key test master key material").unwrap();
    let cfg = AuthConfig::for_api_keys(&[("ka", "acme"), ("kg", "globex")], KeyRef::File(master));
    let (gateway, store) = (
        ContractRegistry::new(&cfg).unwrap(),
        ContractRegistry::new(&cfg).unwrap(),
    );
    let acme = gateway.get("acme").unwrap();
    let k0 = acme.data_key(0);
    assert_eq!(
        *k0,
        *store.get("acme").unwrap().data_key(0),
        "same config, same key"
    );
    assert_ne!(*k0, *acme.data_key(1));
    assert_ne!(*k0, *gateway.get("globex").unwrap().data_key(0));
    // Neither the salt nor the keyed ids are the data key.
    assert_ne!(
        hex::encode(*k0).get(..32),
        Some(acme.cache_salt(None).as_str())
    );
}
