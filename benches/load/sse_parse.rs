//! The client's incremental parser: the HTTP/1.0 response header, then
//! SSE lines, keeping only what the harness measures (`id:`, the `"t":`
//! timestamp in `data:`, whether the event was named). Only an incomplete
//! trailing line is buffered between reads.

/// One complete event (a blank line ended it).
pub(crate) struct Event {
    pub(crate) id: Option<u64>,
    /// Publish time (unix nanos) from the payload.
    pub(crate) t: Option<u64>,
    /// It had an `event:` line (relay control events carry no id).
    pub(crate) named: bool,
}

/// Incremental parser state of one connection.
#[derive(Default)]
pub(crate) struct ConnState {
    pub(crate) header_done: bool,
    /// The last `retry:` hint (ms): how long a browser would wait to reconnect.
    pub(crate) retry_ms: Option<u64>,
    /// An incomplete line (or the header while it is incomplete).
    pending: Vec<u8>,
    id: Option<u64>,
    t: Option<u64>,
    named: bool,
}

impl ConnState {
    pub(crate) fn feed(
        &mut self,
        mut data: &[u8],
        on: &mut impl FnMut(Event),
    ) -> Result<(), String> {
        if !self.header_done {
            self.pending.extend_from_slice(data);
            let Some(end) = find(&self.pending, b"\r\n\r\n") else {
                return Ok(());
            };
            let head = String::from_utf8_lossy(&self.pending[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.0 200") && !head.starts_with("http/1.1 200") {
                let line = head.lines().next().unwrap_or("").to_string();
                return Err(format!("status: {line}"));
            }
            if head.contains("transfer-encoding: chunked") {
                return Err("chunked response to an HTTP/1.0 request".into());
            }
            self.header_done = true;
            let body = self.pending.split_off(end + 4);
            self.pending.clear();
            return self.feed(&body, on);
        }
        if !self.pending.is_empty() {
            let Some(pos) = data.iter().position(|&b| b == b'\n') else {
                self.pending.extend_from_slice(data);
                return Ok(());
            };
            let mut line = std::mem::take(&mut self.pending);
            line.extend_from_slice(&data[..pos]);
            self.line(&line, on);
            data = &data[pos + 1..];
        }
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            self.line(&data[..pos], on);
            data = &data[pos + 1..];
        }
        if !data.is_empty() {
            self.pending.extend_from_slice(data);
        }
        Ok(())
    }

    fn line(&mut self, line: &[u8], on: &mut impl FnMut(Event)) {
        if line.is_empty() {
            on(Event {
                id: self.id.take(),
                t: self.t.take(),
                named: std::mem::take(&mut self.named),
            });
        } else if let Some(v) = line.strip_prefix(b"id: ") {
            self.id = parse_u64(v);
        } else if let Some(v) = line.strip_prefix(b"data: ") {
            if self.t.is_none() {
                self.t = find(v, b"\"t\":").and_then(|p| parse_u64(&v[p + 4..]));
            }
        } else if let Some(v) = line.strip_prefix(b"retry: ") {
            self.retry_ms = parse_u64(v);
        } else if line.starts_with(b"event: ") {
            self.named = true;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_u64(v: &[u8]) -> Option<u64> {
    let digits = v.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&v[..digits]).ok()?.parse().ok()
}
