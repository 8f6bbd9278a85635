//! ZMQ framing around the event payloads: the PUB multipart and the
//! DEALER/ROUTER replay exchange a subscriber uses to fill gaps in `seq`.
//!
//! Frames are taken as `&[T]` with `T: AsRef<[u8]>` so callers can pass
//! whatever their ZMQ binding hands out (`&[u8]`, `Vec<u8>`, `Bytes`).

use super::WireError;

/// The `seq` of the replay end marker (eight 0xff bytes).
pub const REPLAY_END_SEQ: i64 = -1;

/// One PUB multipart: `[topic, seq (8-byte big-endian), payload]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubFrame {
    pub topic: Vec<u8>,
    pub seq: i64,
    pub payload: Vec<u8>,
}

/// Which replay-reply layout the engine speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayReplyGeneration {
    /// vLLM >= 0.26: `[b"", topic, seq, payload]`.
    WithTopic,
    /// vLLM <= 0.25: `[b"", seq, payload]`.
    NoTopic,
}

/// One replay reply as the DEALER receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayReply {
    /// A buffered batch; `topic` is `None` for [`ReplayReplyGeneration::NoTopic`].
    Batch {
        topic: Option<Vec<u8>>,
        seq: i64,
        payload: Vec<u8>,
    },
    /// The end marker: every buffered batch from the requested seq was sent.
    End,
}

fn framing(msg: String) -> WireError {
    WireError::Framing(msg)
}

fn seq_of(frame: &[u8]) -> Result<i64, WireError> {
    let bytes: [u8; 8] = frame
        .try_into()
        .map_err(|_| framing(format!("seq frame has {} bytes, expected 8", frame.len())))?;
    Ok(i64::from_be_bytes(bytes))
}

fn expect_empty(frame: &[u8], what: &str) -> Result<(), WireError> {
    if frame.is_empty() {
        Ok(())
    } else {
        Err(framing(format!(
            "{what}: first frame must be the empty delimiter, got {} bytes",
            frame.len()
        )))
    }
}

/// Splits a PUB multipart into topic, seq and payload.
pub fn parse_pub_frames<T: AsRef<[u8]>>(frames: &[T]) -> Result<PubFrame, WireError> {
    let [topic, seq, payload] = frames else {
        return Err(framing(format!(
            "publish has {} frames, expected 3",
            frames.len()
        )));
    };
    Ok(PubFrame {
        topic: topic.as_ref().to_vec(),
        seq: seq_of(seq.as_ref())?,
        payload: payload.as_ref().to_vec(),
    })
}

/// Builds a PUB multipart.
pub fn encode_pub_frames(topic: &[u8], seq: i64, payload: &[u8]) -> Vec<Vec<u8>> {
    vec![topic.to_vec(), seq.to_be_bytes().to_vec(), payload.to_vec()]
}

/// The DEALER's replay request: `[b"", start_seq]`.
pub fn encode_replay_request(start_seq: i64) -> Vec<Vec<u8>> {
    vec![Vec::new(), start_seq.to_be_bytes().to_vec()]
}

/// Parses a replay request as the ROUTER holds it once the identity frame is
/// stripped: `[b"", start_seq]`.
pub fn decode_replay_request<T: AsRef<[u8]>>(frames: &[T]) -> Result<i64, WireError> {
    let [delim, seq] = frames else {
        return Err(framing(format!(
            "replay request has {} frames, expected 2",
            frames.len()
        )));
    };
    expect_empty(delim.as_ref(), "replay request")?;
    seq_of(seq.as_ref())
}

/// Builds one replay reply as the ROUTER sends it (identity frame not
/// included). `topic` is dropped for [`ReplayReplyGeneration::NoTopic`].
pub fn encode_replay_reply(
    generation: ReplayReplyGeneration,
    topic: &[u8],
    seq: i64,
    payload: &[u8],
) -> Vec<Vec<u8>> {
    let seq = seq.to_be_bytes().to_vec();
    match generation {
        ReplayReplyGeneration::WithTopic => {
            vec![Vec::new(), topic.to_vec(), seq, payload.to_vec()]
        }
        ReplayReplyGeneration::NoTopic => vec![Vec::new(), seq, payload.to_vec()],
    }
}

/// The end marker of a replay: seq [`REPLAY_END_SEQ`], empty topic and payload.
pub fn encode_replay_end(generation: ReplayReplyGeneration) -> Vec<Vec<u8>> {
    encode_replay_reply(generation, b"", REPLAY_END_SEQ, b"")
}

/// Parses a replay reply as the DEALER receives it, either generation: four
/// frames carry a topic (vLLM >= 0.26), three do not (older). A reply with
/// seq [`REPLAY_END_SEQ`] is the end marker whatever else it carries.
pub fn decode_replay_reply<T: AsRef<[u8]>>(frames: &[T]) -> Result<ReplayReply, WireError> {
    let (delim, topic, seq, payload) = match frames {
        [d, t, s, p] => (d, Some(t), s, p),
        [d, s, p] => (d, None, s, p),
        _ => {
            return Err(framing(format!(
                "replay reply has {} frames, expected 3 or 4",
                frames.len()
            )))
        }
    };
    expect_empty(delim.as_ref(), "replay reply")?;
    let seq = seq_of(seq.as_ref())?;
    if seq == REPLAY_END_SEQ {
        return Ok(ReplayReply::End);
    }
    Ok(ReplayReply::Batch {
        topic: topic.map(|t| t.as_ref().to_vec()),
        seq,
        payload: payload.as_ref().to_vec(),
    })
}
