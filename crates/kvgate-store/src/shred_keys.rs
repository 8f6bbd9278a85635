//! Crypto-shred for the disk tier. A contract's data key is derived from its
//! key material (`Contract::data_key`), which outlives any shred: anyone who
//! kept a copy of a sealed file and can read the key material (a Kubernetes
//! Secret) could open it again. So the disk key also takes a random 256-bit
//! salt per contract and epoch, kept in `<dir>/keys.state` and nowhere else:
//! a shred deletes the contract's salts (the state file is rewritten and
//! synced before the files go), and a new epoch deletes the older epochs'.
//! Without the salt no copy of a file opens, whoever holds the key material.
//!
//! The salts are not secret on their own (they are useless without the key
//! material), which is why they may sit in a file; what matters is that they
//! can be destroyed. The file is replaced atomically (temporary file, fsync,
//! rename, fsync of the directory), so a crash leaves the old or the new
//! state, never a torn one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::crypto::DataKey;
use crate::disk::DiskError;

/// The state file's name, inside the disk tier's directory.
pub const STATE_FILE: &str = "keys.state";
/// Each tier derives its own keys (HKDF info), so no frame moves between tiers.
pub(crate) const DISK_KEY_INFO: &[u8] = b"kvgate-store disk key v1";
pub(crate) const REDIS_KEY_INFO: &[u8] = b"kvgate-store redis key v1";

type Salt = Zeroizing<[u8; 32]>;

/// Each contract directory's salts, by epoch.
pub(crate) struct ShredKeys {
    path: PathBuf,
    salts: BTreeMap<String, BTreeMap<u64, Salt>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StateFile {
    version: u32,
    /// Contract directory -> epoch -> salt (hex).
    salts: BTreeMap<String, BTreeMap<u64, String>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, why: &str) -> DiskError {
    DiskError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string()),
    }
}

impl ShredKeys {
    /// Reads `<dir>/keys.state` (none yet: no salts).
    pub(crate) fn load(dir: &Path) -> Result<Self, DiskError> {
        let path = dir.join(STATE_FILE);
        let mut salts = BTreeMap::new();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let state: StateFile = serde_json::from_slice(&bytes)
                    .map_err(|_| corrupt(&path, "not a kvgate key state file"))?;
                for (contract, epochs) in state.salts {
                    let mut out = BTreeMap::new();
                    for (epoch, hex_salt) in epochs {
                        let mut salt = Zeroizing::new([0u8; 32]);
                        hex::decode_to_slice(&hex_salt, salt.as_mut_slice())
                            .map_err(|_| corrupt(&path, "a salt is not 32 hex bytes"))?;
                        out.insert(epoch, salt);
                    }
                    salts.insert(contract, out);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        Ok(Self { path, salts })
    }

    /// The salt of `contract_dir` at `epoch`. With `create`, a missing one is
    /// made (and the contract's older epochs' salts are shredded) and saved
    /// before it is returned; without, a missing one is None.
    pub(crate) fn salt(
        &mut self,
        contract_dir: &str,
        epoch: u64,
        create: bool,
    ) -> Result<Option<Salt>, DiskError> {
        if let Some(s) = self.salts.get(contract_dir).and_then(|e| e.get(&epoch)) {
            return Ok(Some(s.clone()));
        }
        if !create {
            return Ok(None);
        }
        let mut salt = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(salt.as_mut_slice());
        let epochs = self.salts.entry(contract_dir.to_string()).or_default();
        // Epochs only move forward: an older epoch's chunks can never be
        // read again, so its salt goes.
        epochs.retain(|e, _| *e > epoch);
        epochs.insert(epoch, salt.clone());
        self.save()?;
        Ok(Some(salt))
    }

    /// Shreds every salt of `contract_dir`; saved before this returns.
    pub(crate) fn forget(&mut self, contract_dir: &str) -> Result<(), DiskError> {
        if self.salts.remove(contract_dir).is_some() {
            self.save()?;
        }
        Ok(())
    }

    /// Keeps only the salts of these contract directories.
    pub(crate) fn retain(&mut self, dirs: &[String]) -> Result<(), DiskError> {
        let before = self.salts.len();
        self.salts.retain(|d, _| dirs.contains(d));
        if self.salts.len() != before {
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> Result<(), DiskError> {
        let state = StateFile {
            version: 1,
            salts: self
                .salts
                .iter()
                .map(|(d, e)| {
                    let epochs = e
                        .iter()
                        .map(|(n, s)| (*n, hex::encode(s.as_slice())))
                        .collect();
                    (d.clone(), epochs)
                })
                .collect(),
        };
        let bytes = Zeroizing::new(
            serde_json::to_vec(&state).map_err(|_| corrupt(&self.path, "cannot encode"))?,
        );
        let tmp = self.path.with_extension("state.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        if let Some(dir) = self.path.parent() {
            // The rename itself is durable only once the directory is synced.
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        Ok(())
    }
}

/// A tier's key: the contract's data key for the epoch, salted by the
/// shreddable salt, for the tier named by `info`.
pub(crate) fn salted_key(data_key: &[u8; 32], salt: &[u8; 32], info: &[u8]) -> DataKey {
    let hk = Hkdf::<Sha256>::new(Some(salt), data_key);
    let mut out = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit: cannot fail.
    let _ = hk.expand(info, out.as_mut_slice());
    DataKey::new(out)
}
