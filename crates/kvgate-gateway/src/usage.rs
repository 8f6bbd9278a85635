//! What a response says it produced, read as its bytes stream past: the last
//! `"completion_tokens":N` (the usage object of a JSON response, or of the
//! final SSE chunk when the client asked for it) and, failing that, the
//! number of SSE data events (about one token each). Charged to the
//! contract's token bucket and written to the audit record.

const KEY: &[u8] = b"\"completion_tokens\":";

#[derive(Debug, Default)]
pub(crate) struct UsageScan {
    completion_tokens: Option<u64>,
    sse_events: u64,
}

impl UsageScan {
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        self.sse_events += count(chunk, b"data:") as u64;
        self.sse_events = self
            .sse_events
            .saturating_sub(count(chunk, b"data: [DONE]") as u64);
        let mut at = 0;
        while let Some(i) = find(&chunk[at..], KEY) {
            let rest = &chunk[at + i + KEY.len()..];
            let digits: Vec<u8> = rest
                .iter()
                .skip_while(|b| **b == b' ')
                .take_while(|b| b.is_ascii_digit())
                .copied()
                .collect();
            if let Some(n) = std::str::from_utf8(&digits)
                .ok()
                .and_then(|d| d.parse().ok())
            {
                self.completion_tokens = Some(n);
            }
            at += i + KEY.len();
        }
    }

    /// Output tokens: as reported, else estimated from the stream.
    pub(crate) fn output_tokens(&self) -> u64 {
        self.completion_tokens.unwrap_or(self.sse_events)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_usage_or_counts_events() {
        let mut u = UsageScan::default();
        u.feed(
            br#"{"id":"x","usage":{"prompt_tokens":5,"completion_tokens": 17,"total_tokens":22}}"#,
        );
        assert_eq!(u.output_tokens(), 17);
        let mut s = UsageScan::default();
        s.feed(b"data: {\"a\":1}\n\ndata: {\"a\":2}\n\n");
        s.feed(b"data: {\"a\":3}\n\ndata: [DONE]\n\n");
        assert_eq!(s.output_tokens(), 3);
        s.feed(b"data: {\"usage\":{\"completion_tokens\":9}}\n\n");
        assert_eq!(s.output_tokens(), 9, "a usage chunk wins over the count");
    }
}
