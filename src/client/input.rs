//! Reading the input: lines with a length limit (every byte hashed for the checkpoint), validated with
//! the server's rules, given their ids and written into request bodies.

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use super::state::PrefixHash;
use crate::event::{Event, EventKind};

/// `line` (a valid event, as read) with `"id":"<producer>-<line_no>",` after its opening brace, unless
/// it has an id of its own: the line as it was sent.
pub(super) fn with_id(line: &[u8], own_id: bool, producer: &str, line_no: u64) -> Vec<u8> {
    let Some(brace) = line.iter().position(|&b| b == b'{').filter(|_| !own_id) else { return line.to_vec() };
    let mut out = Vec::with_capacity(line.len() + 40);
    out.extend_from_slice(&line[..=brace]);
    out.extend_from_slice(format!("\"id\":\"{producer}-{line_no}\",").as_bytes());
    out.extend_from_slice(&line[brace + 1..]);
    out
}

/// Validates one line and appends it to a batch body, with its id: a line without one gets
/// `"id":"<producer>-<line>",` inserted after its opening brace, so the rest of the line is sent as
/// written. True if the line has an id of its own.
pub(super) fn prepare_line(line: &[u8], line_no: u64, producer: &str, body: &mut Vec<u8>) -> Result<bool, String> {
    let event = crate::event::EventRef::parse_request(line).map_err(|e| e.to_string())?;
    // A valid event is a JSON object with at least one field: its first non-blank byte is `{`.
    let brace = line.iter().position(|&b| b == b'{').ok_or("an event must be a JSON object")?;
    let line = &line[brace..];
    let own_id = event.id().is_some();
    if own_id {
        body.extend_from_slice(line);
    } else {
        body.push(b'{');
        body.extend_from_slice(format!("\"id\":\"{producer}-{line_no}\",").as_bytes());
        body.extend_from_slice(&line[1..]);
    }
    body.push(b'\n');
    Ok(own_id)
}

/// Validates one line and builds the body to send (and whether the line has an id of its own), or
/// says why the line is invalid.
pub(super) fn prepare(line: &[u8], line_no: u64, producer: &str) -> Result<(Vec<u8>, bool), String> {
    let event = Event::parse_request(line).map_err(|e| e.to_string())?;
    let id = match event.id() {
        Some(id) => id.to_owned(),
        None => format!("{producer}-{line_no}"),
    };
    Ok((body(&event, &id)?, event.id().is_some()))
}

/// `{"userId":..,"name":..,"value":<decimal text>,"id":..}`.
pub(super) fn body(event: &Event, id: &str) -> Result<Vec<u8>, String> {
    #[derive(Serialize)]
    struct Body<'a> {
        #[serde(rename = "userId")]
        user_id: &'a str,
        name: EventKind,
        value: &'a RawValue,
        id: &'a str,
    }
    // A Decimal's Display is digits with an optional '.', which is a JSON number.
    let value = RawValue::from_string(event.value().normalize().to_string())
        .map_err(|e| format!("value {} cannot be written as JSON: {e}", event.value()))?;
    let body = Body { user_id: event.user_id(), name: event.kind(), value: &value, id };
    serde_json::to_vec(&body).map_err(|e| format!("cannot serialise the event: {e}"))
}

/// One line as read: how many bytes it took from the file, and whether it was cut short.
pub(super) struct LineRead {
    pub(super) bytes: u64,
    pub(super) too_long: bool,
}

/// Reads the next line (without its `\n`) into `buf`, keeping at most `max` bytes of it; the rest of
/// a longer line is skipped. Every byte taken from the reader goes into `hash`. `None` at the end of
/// the input.
pub(super) async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
    hash: &mut PrefixHash,
) -> std::io::Result<Option<LineRead>> {
    buf.clear();
    let mut read = LineRead { bytes: 0, too_long: false };
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok((read.bytes > 0).then_some(read));
        }
        let (chunk, used, end) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], i + 1, true),
            None => (available, available.len(), false),
        };
        if !read.too_long {
            if buf.len() + chunk.len() > max {
                read.too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        hash.write(&available[..used]);
        read.bytes += used as u64;
        reader.consume(used);
        if end {
            return Ok(Some(read));
        }
    }
}

pub(super) fn trim_line(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use tokio::io::BufReader;

    use super::*;

    #[tokio::test]
    async fn lines_are_read_with_a_length_limit() {
        let data = b"abc\r\n\xEF\xBB\xBFx\n0123456789\nlast".to_vec();
        let mut reader = BufReader::with_capacity(4, data.as_slice());
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        let mut hash = PrefixHash::default();
        while let Some(read) = read_line(&mut reader, &mut buf, 8, &mut hash).await.unwrap() {
            lines.push((trim_line(&buf).to_vec(), read.bytes, read.too_long));
        }
        let mut whole = PrefixHash::default();
        whole.write(&data);
        assert_eq!(hash.hex(), whole.hex(), "every byte read, skipped ones included, is hashed");
        assert_eq!(
            lines,
            vec![
                (b"abc".to_vec(), 5, false),
                (b"\xEF\xBB\xBFx".to_vec(), 5, false),
                (Vec::new(), 11, true),
                (b"last".to_vec(), 4, false),
            ]
        );
    }
}
