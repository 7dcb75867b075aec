//! The event: the one type every part of eps agrees on.
//!
//! "Parse, don't validate": an [`Event`] can only be built by [`Event::parse_request`] (the strict HTTP
//! and client-file rules) or [`EventRef::parse_log_line`] (the lenient log rules, which accept extra
//! fields written by other programs). After this boundary an event is always valid: a non-empty `userId`
//! of at most 255 bytes, a known `name`, and a `value` that is an exact, non-negative decimal.
//!
//! Money never passes through floating point: the `value` is read from the JSON number's own text
//! (serde_json's `RawValue`) straight into a [`Decimal`], and written back as decimal text.

use std::borrow::Cow;
use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Longest accepted `userId`, in bytes (the seed's `VARCHAR(255)`).
pub const MAX_USER_ID_BYTES: usize = 255;
/// Longest accepted event `id`, in bytes.
pub const MAX_EVENT_ID_BYTES: usize = 128;
/// Most significant digits a `value` may carry (what an exact 96-bit decimal holds everywhere).
pub const MAX_SIGNIFICANT_DIGITS: usize = 28;

/// What an event does to the user's revenue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum EventKind {
    #[serde(rename = "add_revenue")]
    AddRevenue,
    #[serde(rename = "subtract_revenue")]
    SubtractRevenue,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::AddRevenue => "add_revenue",
            EventKind::SubtractRevenue => "subtract_revenue",
        }
    }
}

/// A validated event, owned. `id` is the optional idempotency key (see ARCHITECTURE.md). Its fields
/// are private: the parsers are the only way to make one, so every `Event` keeps the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    user_id: UserId<'static>,
    kind: EventKind,
    value: Decimal,
    id: Option<String>,
}

/// A validated event borrowed from a buffer: the processor's hot path, no allocation for plain ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRef<'a> {
    user_id: UserId<'a>,
    kind: EventKind,
    value: Decimal,
    id: Option<Cow<'a, str>>,
}

/// Why an input is not an event. The message is written for the person who sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("body is not valid JSON: {0}")]
    Json(String),
    #[error("invalid event: {0}")]
    Invalid(String),
}

impl EventError {
    fn invalid(msg: impl Into<String>) -> Self {
        EventError::Invalid(msg.into())
    }
}

impl Event {
    pub fn user_id(&self) -> &str {
        self.user_id.as_str()
    }

    pub fn kind(&self) -> EventKind {
        self.kind
    }

    pub fn value(&self) -> Decimal {
        self.value
    }

    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The signed change this event makes to the user's revenue.
    pub fn delta(&self) -> Decimal {
        signed(self.kind, self.value)
    }

    /// Parses one event sent by a client (HTTP body or a line of the client's input file).
    ///
    /// Strict: fields other than `userId`, `name`, `value` and `id` are refused, so a typo such as
    /// `userID` is an error and not a silently different event.
    pub fn parse_request(bytes: &[u8]) -> Result<Event, EventError> {
        EventRef::parse_request(bytes).map(EventRef::into_owned)
    }

    /// The event borrowed, e.g. to write it with [`EventRef::write_log_line`].
    pub fn as_ref(&self) -> EventRef<'_> {
        EventRef {
            user_id: self.user_id.borrowed(),
            kind: self.kind,
            value: self.value,
            id: self.id.as_deref().map(Cow::Borrowed),
        }
    }

    /// Writes the event as one log line (without the trailing newline); see [`EventRef::write_log_line`].
    pub fn write_log_line(&self, ts_millis: u64, out: &mut Vec<u8>) {
        self.as_ref().write_log_line(ts_millis, out)
    }
}

impl<'a> EventRef<'a> {
    pub fn user_id(&self) -> &str {
        self.user_id.as_str()
    }

    pub fn kind(&self) -> EventKind {
        self.kind
    }

    pub fn value(&self) -> Decimal {
        self.value
    }

    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The user id, borrowed from the buffer when it had no escapes (the processor's hot path).
    pub fn into_user_id(self) -> Cow<'a, str> {
        self.user_id.into_cow()
    }

    /// [`Event::parse_request`] without copying: strings borrow from `bytes` unless they hold escapes.
    pub fn parse_request(bytes: &'a [u8]) -> Result<EventRef<'a>, EventError> {
        require_object(bytes)?;
        let raw: RequestBody<'a> = serde_json::from_slice(bytes).map_err(|e| json_error(e, bytes))?;
        let user_id = check_user_id(raw.user_id)?;
        let id = match raw.id {
            None => None,
            Some(id) => Some(check_event_id(id)?),
        };
        let value = parse_value(raw.value)?;
        Ok(EventRef { user_id, kind: raw.name, value, id })
    }

    /// Writes the event as one log line (without the trailing newline): the seed's fields first, in the
    /// seed's order, then the idempotency `id` and the receive time `ts` (Unix milliseconds):
    /// `{"userId":"user1","name":"add_revenue","value":100,"id":"9f2c-1","ts":1764000000000}`.
    ///
    /// Written by hand (this is the ingest hot path); strings are escaped by serde_json, the value is
    /// the normalised decimal text, which is always a valid JSON number (digits, optional '.').
    pub fn write_log_line(&self, ts_millis: u64, out: &mut Vec<u8>) {
        use std::io::Write as _;
        out.extend_from_slice(b"{\"userId\":");
        write_json_string(out, self.user_id.as_str());
        out.extend_from_slice(b",\"name\":\"");
        out.extend_from_slice(self.kind.as_str().as_bytes());
        out.extend_from_slice(b"\",\"value\":");
        write!(out, "{}", self.value.normalize()).expect("writing to a Vec cannot fail");
        if let Some(id) = &self.id {
            out.extend_from_slice(b",\"id\":");
            write_json_string(out, id);
        }
        out.extend_from_slice(b",\"ts\":");
        write!(out, "{ts_millis}}}").expect("writing to a Vec cannot fail");
    }

    /// Parses a line in exactly the form the server writes ([`EventRef::write_log_line`]), without
    /// serde: the processor's hot path. `None` for any other form (escapes, other fields or field
    /// order, whitespace, non-ASCII text): the caller then uses [`EventRef::parse_log_line`]. Whenever
    /// this gives `Some`, `parse_log_line` gives the same event (a property test checks it).
    pub fn parse_canonical_log_line(line: &'a [u8]) -> Option<EventRef<'a>> {
        let rest = line.strip_prefix(b"{\"userId\":\"")?;
        let (user_id, rest) = plain_string(rest, MAX_USER_ID_BYTES)?;
        let rest = rest.strip_prefix(b",\"name\":\"")?;
        let (kind, rest) = if let Some(rest) = rest.strip_prefix(b"add_revenue\",\"value\":") {
            (EventKind::AddRevenue, rest)
        } else {
            (EventKind::SubtractRevenue, rest.strip_prefix(b"subtract_revenue\",\"value\":")?)
        };
        let value_len = rest.iter().position(|&b| b == b',' || b == b'}')?;
        let (value_text, rest) = rest.split_at(value_len);
        if !json_plain_number(value_text) {
            return None;
        }
        let value = parse_plain_decimal(value_text)?;
        let (id, rest) = match rest.strip_prefix(b",\"id\":\"") {
            Some(rest) => {
                let (id, rest) = plain_string(rest, MAX_EVENT_ID_BYTES)?;
                (Some(Cow::Borrowed(id)), rest)
            }
            None => (None, rest),
        };
        let rest = match rest.strip_prefix(b",\"ts\":") {
            Some(rest) => {
                let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
                if digits == 0 || digits > 20 || (digits > 1 && rest[0] == b'0') {
                    return None;
                }
                &rest[digits..]
            }
            None => rest,
        };
        // `plain_string` took 1 to 255 bytes of printable ASCII: a userId by the rule, as it stands.
        let user_id = UserId(Cow::Borrowed(user_id));
        (rest == b"}").then_some(EventRef { user_id, kind, value, id })
    }

    /// Parses one line of the log. Lenient about extra fields (the log may be written by other
    /// programs); strict about the three the seed defines.
    pub fn parse_log_line(line: &'a [u8]) -> Result<EventRef<'a>, EventError> {
        require_object(line)?;
        let raw: LogLine<'a> = serde_json::from_slice(line).map_err(|e| json_error(e, line))?;
        let user_id = check_user_id(raw.user_id)?;
        let value = parse_value(raw.value)?;
        let id = match raw.id {
            None => None,
            Some(id) => Some(check_event_id(id)?),
        };
        Ok(EventRef { user_id, kind: raw.name, value, id })
    }

    pub fn delta(&self) -> Decimal {
        signed(self.kind, self.value)
    }

    pub fn into_owned(self) -> Event {
        Event {
            user_id: self.user_id.into_owned(),
            kind: self.kind,
            value: self.value,
            id: self.id.map(Cow::into_owned),
        }
    }
}

/// The text of a JSON string that needs no unescaping and passes the userId/id checks: 1 to `max`
/// bytes of printable ASCII other than `"` and `\`, up to the closing quote. Returns it and what follows
/// the quote.
fn plain_string(bytes: &[u8], max: usize) -> Option<(&str, &[u8])> {
    let end = bytes.iter().position(|&b| b == b'"')?;
    let text = &bytes[..end];
    if text.is_empty() || text.len() > max || !text.iter().all(|&b| (0x20..0x7f).contains(&b) && b != b'\\') {
        return None;
    }
    // Printable ASCII is UTF-8.
    Some((std::str::from_utf8(text).ok()?, &bytes[end + 1..]))
}

/// `0` or a digit string without leading zero, optionally `.` and at least one digit: the JSON number
/// grammar without sign or exponent.
fn json_plain_number(text: &[u8]) -> bool {
    let (int_part, frac_part) = match text.iter().position(|&b| b == b'.') {
        Some(dot) => (&text[..dot], Some(&text[dot + 1..])),
        None => (text, None),
    };
    let int_ok =
        !int_part.is_empty() && int_part.iter().all(u8::is_ascii_digit) && (int_part.len() == 1 || int_part[0] != b'0');
    int_ok && frac_part.is_none_or(|f| !f.is_empty() && f.iter().all(u8::is_ascii_digit))
}

/// An event is a JSON object. (serde's derived structs would also take an array of the field values
/// in order, `["user1","add_revenue",100]`, which is not an event of the seed's format.)
fn require_object(bytes: &[u8]) -> Result<(), EventError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        Some(b'[') => Err(EventError::invalid("an event must be a JSON object, not an array")),
        // Let serde_json describe whatever else it is (a number, a string, not JSON at all).
        _ => Ok(()),
    }
}

fn write_json_string(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(out, text).expect("writing to a Vec cannot fail");
}

fn signed(kind: EventKind, value: Decimal) -> Decimal {
    match kind {
        EventKind::AddRevenue => value,
        EventKind::SubtractRevenue => -value,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestBody<'a> {
    #[serde(rename = "userId", borrow)]
    user_id: Cow<'a, str>,
    name: EventKind,
    #[serde(borrow)]
    value: &'a RawValue,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct LogLine<'a> {
    #[serde(rename = "userId", borrow)]
    user_id: Cow<'a, str>,
    name: EventKind,
    #[serde(borrow)]
    value: &'a RawValue,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
}

/// Longest error message echoed back: messages quote the offending value, which may be 1 MiB long.
const MAX_ERROR_CHARS: usize = 300;

/// `text`, cut to a length fit for an error message.
fn shorten(text: &str) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(64) {
        Some((cut, _)) => format!("{}…", &text[..cut]).into(),
        None => text.into(),
    }
}

fn json_error(e: serde_json::Error, input: &[u8]) -> EventError {
    use serde_json::error::Category;
    let mut message = e.to_string();
    if message.chars().count() > MAX_ERROR_CHARS {
        message = message.chars().take(MAX_ERROR_CHARS).chain("…".chars()).collect();
    }
    match e.classify() {
        // Data errors are about the shape of a well-formed document: say "invalid event".
        Category::Data => EventError::Invalid(message),
        // serde_json reports some type errors (`"name": 1`) as syntax errors; only call the body
        // malformed when it really is not JSON.
        Category::Syntax if serde_json::from_slice::<serde::de::IgnoredAny>(input).is_ok() => {
            EventError::Invalid(message)
        }
        Category::Syntax | Category::Eof | Category::Io => EventError::Json(message),
    }
}

/// Why a text is not a `userId`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserIdError {
    #[error("userId must not be empty")]
    Empty,
    #[error("userId must not contain control characters")]
    ControlCharacter,
    #[error("userId is {0} bytes long, the limit is {MAX_USER_ID_BYTES}")]
    TooLong(usize),
}

/// A `userId` that keeps the one rule ([`UserId::parse`]), borrowed from the buffer it was read from
/// (the hot paths: no allocation) or owned. Events hold one; `GET /userEvents/{userId}` parses its path
/// into one.
#[derive(Clone, PartialEq, Eq)]
pub struct UserId<'a>(Cow<'a, str>);

impl<'a> UserId<'a> {
    /// The one rule for a `userId`, wherever it comes from: an event's field (HTTP body, client file,
    /// log line) or a URL path (`GET /userEvents/{userId}`). 1 to [`MAX_USER_ID_BYTES`] bytes of UTF-8
    /// and no control character (Unicode category Cc: U+0000 to U+001F and U+007F to U+009F). The NUL
    /// it refuses is also the one character PostgreSQL's TEXT cannot hold: a userId that passes can
    /// always be stored and looked up on both stores.
    pub fn parse(user_id: impl Into<Cow<'a, str>>) -> Result<UserId<'a>, UserIdError> {
        let user_id = user_id.into();
        if user_id.is_empty() {
            return Err(UserIdError::Empty);
        }
        if user_id.chars().any(char::is_control) {
            return Err(UserIdError::ControlCharacter);
        }
        if user_id.len() > MAX_USER_ID_BYTES {
            return Err(UserIdError::TooLong(user_id.len()));
        }
        Ok(UserId(user_id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The text, still borrowed when it was (what [`EventRef::into_user_id`] gives).
    pub fn into_cow(self) -> Cow<'a, str> {
        self.0
    }

    pub fn into_string(self) -> String {
        self.0.into_owned()
    }

    pub fn into_owned(self) -> UserId<'static> {
        UserId(Cow::Owned(self.0.into_owned()))
    }

    /// The same id, borrowed from this one.
    pub fn borrowed(&self) -> UserId<'_> {
        UserId(Cow::Borrowed(&self.0))
    }
}

/// Shown as its text (`"user1"`), as the `String` it replaced was.
impl fmt::Debug for UserId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq<&str> for UserId<'_> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for UserId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn check_user_id(user_id: Cow<'_, str>) -> Result<UserId<'_>, EventError> {
    UserId::parse(user_id).map_err(|e| EventError::invalid(e.to_string()))
}

fn check_event_id(id: Cow<'_, str>) -> Result<Cow<'_, str>, EventError> {
    if id.is_empty() || id.len() > MAX_EVENT_ID_BYTES {
        return Err(EventError::invalid(format!("id must be 1 to {MAX_EVENT_ID_BYTES} bytes long")));
    }
    Ok(id)
}

/// Reads a JSON value as an exact, non-negative decimal.
fn parse_value(raw: &RawValue) -> Result<Decimal, EventError> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'-' | b'0'..=b'9') => parse_decimal_number(text),
        Some(b'"') => Err(EventError::invalid("value must be a JSON number, not a string")),
        _ => Err(EventError::invalid(format!("value must be a number, got {}", shorten(text)))),
    }
}

/// Parses the text of a JSON number (already checked by serde_json's grammar) into an exact decimal.
pub fn parse_decimal_number(text: &str) -> Result<Decimal, EventError> {
    if let Some(value) = parse_plain_decimal(text.as_bytes()) {
        return Ok(value);
    }
    let err = |m: &str| EventError::invalid(format!("value {}: {m}", shorten(text)));
    if text.starts_with('-') {
        return Err(err("must not be negative"));
    }
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => {
            let exp: i64 = text[i + 1..].parse().map_err(|_| err("exponent out of range"))?;
            (&text[..i], exp)
        }
        None => (text, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int_part.is_empty() || !int_part.bytes().chain(frac_part.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(err("not a decimal number"));
    }
    // value = digits * 10^(exponent - frac_len); strip zeros that carry no value.
    let mut digits: String = int_part.chars().chain(frac_part.chars()).collect();
    let mut exp = exponent - frac_part.len() as i64;
    let leading = digits.bytes().take_while(|&b| b == b'0').count();
    digits.drain(..leading);
    while digits.ends_with('0') {
        digits.pop();
        exp += 1;
    }
    if digits.is_empty() {
        return Ok(Decimal::ZERO);
    }
    if digits.len() > MAX_SIGNIFICANT_DIGITS {
        return Err(err(&format!("more than {MAX_SIGNIFICANT_DIGITS} significant digits")));
    }
    let out_of_range = || err("out of the exact decimal range (at most 28 digits, magnitude below 7.9e28)");
    let mantissa: i128 = digits.parse().map_err(|_| out_of_range())?;
    if exp >= 0 {
        let scaled = u32::try_from(exp)
            .ok()
            .and_then(|e| 10i128.checked_pow(e))
            .and_then(|p| mantissa.checked_mul(p))
            .ok_or_else(out_of_range)?;
        Decimal::try_from_i128_with_scale(scaled, 0).map_err(|_| out_of_range())
    } else {
        let scale = u32::try_from(-exp).map_err(|_| out_of_range())?;
        if scale > 28 {
            return Err(err("more than 28 decimal places"));
        }
        Decimal::try_from_i128_with_scale(mantissa, scale).map_err(|_| out_of_range())
    }
}

/// The common case without allocating: `digits[.digits]`, at most 28 significant digits and 28 decimal
/// places. `None` for anything else (the general path then decides, with its error messages).
fn parse_plain_decimal(text: &[u8]) -> Option<Decimal> {
    let (int_part, frac_part) = match text.iter().position(|&b| b == b'.') {
        Some(dot) => (&text[..dot], &text[dot + 1..]),
        None => (text, &[][..]),
    };
    if int_part.is_empty() || frac_part.len() > MAX_SIGNIFICANT_DIGITS {
        return None;
    }
    let mut mantissa: i128 = 0;
    let mut significant = 0;
    for &b in int_part.iter().chain(frac_part) {
        if !b.is_ascii_digit() {
            return None;
        }
        if mantissa != 0 || b != b'0' {
            significant += 1;
            if significant > MAX_SIGNIFICANT_DIGITS {
                return None;
            }
        }
        mantissa = mantissa * 10 + i128::from(b - b'0');
    }
    // At most 28 digits: below 10^28 < 2^96, and a scale of at most 28, so this cannot fail.
    Decimal::try_from_i128_with_scale(mantissa, frac_part.len() as u32).ok()
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.user_id, self.kind.as_str(), self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn parses_the_seed_events() {
        let e = Event::parse_request(br#"{"userId": "user1", "name": "add_revenue", "value": 100}"#).unwrap();
        assert_eq!(e.user_id, "user1");
        assert_eq!(e.delta(), dec("100"));
        let e = Event::parse_request(br#"{"userId": "user1", "name": "subtract_revenue", "value": 50}"#).unwrap();
        assert_eq!(e.delta(), dec("-50"));
    }

    #[test]
    fn values_are_exact_decimals() {
        assert_eq!(parse_decimal_number("0.1").unwrap(), dec("0.1"));
        assert_eq!(parse_decimal_number("1e3").unwrap(), dec("1000"));
        assert_eq!(parse_decimal_number("1.5E-2").unwrap(), dec("0.015"));
        assert_eq!(parse_decimal_number("0.000").unwrap(), Decimal::ZERO);
        let ten_tenths = (0..10).map(|_| parse_decimal_number("0.1").unwrap()).sum::<Decimal>();
        assert_eq!(ten_tenths, dec("1"));
        // 28 significant digits are fine, 29 are not.
        assert!(parse_decimal_number("1234567890123456789012345678").is_ok());
        assert!(parse_decimal_number("12345678901234567890123456789").is_err());
    }

    #[test]
    fn plain_and_general_decimal_paths_agree() {
        for text in [
            "0",
            "7",
            "100",
            "0.1",
            "1.50",
            "0.000",
            "12345678901234567890.12345678",
            "1234567890123456789012345678",
            "0.0000000000000000000000000001",
            "000123.4500",
        ] {
            let fast = parse_plain_decimal(text.as_bytes()).unwrap_or_else(|| panic!("{text} is plain"));
            assert_eq!(fast, dec(text), "{text}");
        }
        // Not plain: exponents, 29 significant digits, 29 places; the general path decides those.
        for text in ["1e3", "12345678901234567890123456789", "1.00000000000000000000000000000", "-1", ".5"] {
            assert_eq!(parse_plain_decimal(text.as_bytes()), None, "{text}");
        }
        assert_eq!(parse_decimal_number("1.00000000000000000000000000000").unwrap(), dec("1"));
    }

    #[test]
    fn the_canonical_fast_path_agrees_with_serde_or_declines() {
        let e =
            Event::parse_request(br#"{"userId":"user 7","name":"subtract_revenue","value":12.50,"id":"r-9"}"#).unwrap();
        let mut line = Vec::new();
        e.write_log_line(1764000000000, &mut line);
        let fast = EventRef::parse_canonical_log_line(&line).expect("the writer's own form");
        assert_eq!(fast, EventRef::parse_log_line(&line).unwrap());
        for line in [
            r#"{"userId":"u","name":"add_revenue","value":0}"#,
            r#"{"userId":"u","name":"add_revenue","value":1.5,"ts":0}"#,
            r#"{"userId":"u","name":"add_revenue","value":1.5,"id":"x"}"#,
        ] {
            let fast = EventRef::parse_canonical_log_line(line.as_bytes()).unwrap_or_else(|| panic!("{line}"));
            assert_eq!(fast, EventRef::parse_log_line(line.as_bytes()).unwrap(), "{line}");
        }
        // Declined: the general parser decides (some of these are valid, some are not).
        for line in [
            r#"{"userId": "u","name":"add_revenue","value":1}"#,
            r#"{"userId":"u\"v","name":"add_revenue","value":1}"#,
            r#"{"userId":"é","name":"add_revenue","value":1}"#,
            r#"{"userId":"","name":"add_revenue","value":1}"#,
            r#"{"userId":"u","name":"add_revenue","value":01}"#,
            r#"{"userId":"u","name":"add_revenue","value":1.}"#,
            r#"{"userId":"u","name":"add_revenue","value":1e3}"#,
            r#"{"userId":"u","name":"add_revenue","value":-1}"#,
            r#"{"userId":"u","name":"add_revenue","value":1,"userId":"v"}"#,
            r#"{"userId":"u","name":"add_revenue","value":1,"ts":01}"#,
            r#"{"userId":"u","name":"add_revenue","value":1,"id":""}"#,
            r#"{"userId":"u","name":"add_revenue","value":1} "#,
            r#"{"userId":"u","name":"refund","value":1}"#,
        ] {
            assert_eq!(EventRef::parse_canonical_log_line(line.as_bytes()), None, "{line}");
        }
    }

    #[test]
    fn an_array_of_the_field_values_is_not_an_event() {
        let array = br#"["user1","add_revenue",100]"#;
        assert!(matches!(Event::parse_request(array), Err(EventError::Invalid(m)) if m.contains("object")));
        assert!(EventRef::parse_log_line(array).is_err());
    }

    #[test]
    fn rejects_values_that_are_not_exact_non_negative_decimals() {
        for bad in ["-1", "-0", "1e400", "1e-400", "1e29", "0.00000000000000000000000000001"] {
            assert!(parse_decimal_number(bad).is_err(), "{bad} should be rejected");
        }
        for body in [
            r#"{"userId":"u","name":"add_revenue","value":"10"}"#,
            r#"{"userId":"u","name":"add_revenue","value":null}"#,
            r#"{"userId":"u","name":"add_revenue","value":[1]}"#,
            r#"{"userId":"u","name":"add_revenue","value":true}"#,
        ] {
            assert!(matches!(Event::parse_request(body.as_bytes()), Err(EventError::Invalid(_))), "{body}");
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let cases: &[(&str, bool)] = &[
            (r#"{"userId":"u","name":"add_revenue","value":1"#, true),
            (r#"not json"#, true),
            (r#"{"userId":"","name":"add_revenue","value":1}"#, false),
            (r#"{"userId":"a\u0000b","name":"add_revenue","value":1}"#, false),
            (r#"{"userId":"u","name":"refund","value":1}"#, false),
            (r#"{"userId":"u","name":1,"value":1}"#, false),
            (r#"{"userId":"u","value":1}"#, false),
            (r#"{"userId":5,"name":"add_revenue","value":1}"#, false),
            (r#"{"userId":"u","name":"add_revenue","value":1,"extra":1}"#, false),
            (r#"{"userId":"u","userId":"v","name":"add_revenue","value":1}"#, false),
        ];
        for (body, is_json_error) in cases {
            match Event::parse_request(body.as_bytes()) {
                Err(EventError::Json(_)) => assert!(is_json_error, "{body} should be an invalid event"),
                Err(EventError::Invalid(_)) => assert!(!is_json_error, "{body} should be a JSON error"),
                Ok(e) => panic!("{body} was accepted as {e:?}"),
            }
        }
    }

    #[test]
    fn the_user_id_rule_is_one_for_events_and_paths() {
        assert_eq!(UserId::parse("user 1").unwrap().as_str(), "user 1");
        assert_eq!(UserId::parse(""), Err(UserIdError::Empty));
        for bad in ["\0", "a\0b", "\u{1}", "a\nb", "\u{7f}", "\u{85}"] {
            assert_eq!(UserId::parse(bad), Err(UserIdError::ControlCharacter), "{bad:?}");
            let body = serde_json::json!({"userId": bad, "name": "add_revenue", "value": 1}).to_string();
            let refused = Event::parse_request(body.as_bytes()).unwrap_err();
            assert_eq!(refused, EventError::Invalid(UserIdError::ControlCharacter.to_string()), "{body}");
        }
        assert_eq!(UserId::parse("é".repeat(128)), Err(UserIdError::TooLong(256)));
    }

    #[test]
    fn user_id_length_is_counted_in_bytes() {
        let ok = format!(r#"{{"userId":"{}","name":"add_revenue","value":1}}"#, "a".repeat(255));
        assert!(Event::parse_request(ok.as_bytes()).is_ok());
        let too_long = format!(r#"{{"userId":"{}","name":"add_revenue","value":1}}"#, "é".repeat(128));
        assert!(Event::parse_request(too_long.as_bytes()).is_err());
    }

    #[test]
    fn log_line_round_trips_and_tolerates_extra_fields() {
        let e =
            Event::parse_request(br#"{"userId":"a\"b","name":"subtract_revenue","value":1.50,"id":"r-1"}"#).unwrap();
        let mut line = Vec::new();
        e.write_log_line(42, &mut line);
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            r#"{"userId":"a\"b","name":"subtract_revenue","value":1.5,"id":"r-1","ts":42}"#
        );
        let back = EventRef::parse_log_line(&line).unwrap().into_owned();
        assert_eq!(back, Event { value: dec("1.5"), ..e });
        let seed_line = br#"{"userId": "user2", "name": "add_revenue", "value": 200, "source": "other"}"#;
        assert_eq!(EventRef::parse_log_line(seed_line).unwrap().delta(), dec("200"));
    }
}
