//! HTTP/1.1 framing for the proxy's request path: request and response
//! heads parsed once (by httparse, the parser hyper uses) into offsets of
//! the connection's read buffer, and the chunked body decoder.
//!
//! Why not hyper here: the proxy forwards tiny requests, and at 16
//! connections on 2 CPUs hyper's server and client dispatchers, header
//! maps, body channels and per-request timers were a third of the proxy's
//! CPU per request, 1.2x nginx's (measured with the imds bench's CPU
//! column; the system calls per request were the same). This module keeps
//! the strict parsing (httparse refuses obs-fold, bad tokens and control
//! bytes) and leaves the policy (which framings are refused) to the caller.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

/// Upper bound of header fields in one head (the parser's array lives on
/// the stack of a plain function, never in a connection's future).
pub const MAX_HEADERS: usize = 128;

/// Why a head could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP/1.x, or not well formed.
    Malformed(&'static str),
    /// The head is longer than allowed.
    TooLarge,
    /// More header fields than allowed.
    TooManyFields,
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeadError::Malformed(why) => write!(f, "malformed head: {why}"),
            HeadError::TooLarge => f.write_str("head too large"),
            HeadError::TooManyFields => f.write_str("too many header fields"),
        }
    }
}

/// One header field, as offsets into the buffer the head was parsed from.
#[derive(Debug, Clone)]
pub struct Field {
    name: Range<usize>,
    value: Range<usize>,
}

/// A parsed request head; its parts are read back from the same buffer.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// Bytes of the head, final empty line included.
    pub len: usize,
    method: Range<usize>,
    target: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
}

/// A parsed response head.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub len: usize,
    pub code: u16,
    reason: Range<usize>,
    pub minor: u8,
}

// The proxy reads a head's parts only through `View`; the fuzz targets
// (`crate::fuzzing`) check the offsets themselves, so they see them raw.
impl Field {
    pub fn name_range(&self) -> Range<usize> {
        self.name.clone()
    }

    pub fn value_range(&self) -> Range<usize> {
        self.value.clone()
    }
}

impl RequestHead {
    pub fn method_range(&self) -> Range<usize> {
        self.method.clone()
    }

    pub fn target_range(&self) -> Range<usize> {
        self.target.clone()
    }
}

impl ResponseHead {
    pub fn reason_range(&self) -> Range<usize> {
        self.reason.clone()
    }
}

fn offset(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

fn head_error(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyFields,
        httparse::Error::HeaderName => HeadError::Malformed("bad header name"),
        httparse::Error::HeaderValue => HeadError::Malformed("bad header value"),
        httparse::Error::NewLine => HeadError::Malformed("bad line ending"),
        httparse::Error::Status => HeadError::Malformed("bad status"),
        httparse::Error::Token => HeadError::Malformed("bad token"),
        httparse::Error::Version => HeadError::Malformed("not HTTP/1.x"),
    }
}

fn record_fields(buf: &[u8], headers: &[httparse::Header<'_>], fields: &mut Vec<Field>) {
    fields.clear();
    fields.extend(headers.iter().map(|h| Field {
        name: offset(buf, h.name.as_bytes()),
        value: offset(buf, h.value),
    }));
}

/// Parses the request head at the start of `buf` into `fields`.
/// `Ok(None)`: incomplete so far (more bytes may complete it).
pub fn parse_request(
    buf: &[u8],
    fields: &mut Vec<Field>,
    max_fields: usize,
    max_len: usize,
) -> Result<Option<RequestHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers[..max_fields.min(MAX_HEADERS)]);
    match req.parse(buf).map_err(head_error)? {
        httparse::Status::Partial => incomplete(buf, max_len),
        httparse::Status::Complete(len) => {
            if len > max_len {
                return Err(HeadError::TooLarge);
            }
            let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version)
            else {
                return Err(HeadError::Malformed("incomplete request line"));
            };
            record_fields(buf, req.headers, fields);
            Ok(Some(RequestHead {
                len,
                method: offset(buf, method.as_bytes()),
                target: offset(buf, target.as_bytes()),
                minor,
            }))
        }
    }
}

/// An incomplete head: wait for more bytes, unless it already fills
/// `max_len`.
fn incomplete<T>(buf: &[u8], max_len: usize) -> Result<Option<T>, HeadError> {
    if buf.len() >= max_len {
        Err(HeadError::TooLarge)
    } else {
        Ok(None)
    }
}

/// Parses the response head at the start of `buf` into `fields`.
pub fn parse_response(
    buf: &[u8],
    fields: &mut Vec<Field>,
    max_len: usize,
) -> Result<Option<ResponseHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf).map_err(head_error)? {
        httparse::Status::Partial => incomplete(buf, max_len),
        httparse::Status::Complete(len) => {
            if len > max_len {
                return Err(HeadError::TooLarge);
            }
            let (Some(code), Some(minor)) = (resp.code, resp.version) else {
                return Err(HeadError::Malformed("incomplete status line"));
            };
            // httparse takes any three digits; below 100 is no status code
            // (RFC 9110 15), and the answer to the caller could not carry
            // it in three digits either.
            if code < 100 {
                return Err(HeadError::Malformed("bad status"));
            }
            // httparse gives a missing reason, or one with obs-text, as a
            // static "" that is no part of `buf`: no offset to take there.
            let reason = resp
                .reason
                .filter(|r| !r.is_empty())
                .map_or(0..0, |r| offset(buf, r.as_bytes()));
            record_fields(buf, resp.headers, fields);
            Ok(Some(ResponseHead {
                len,
                code,
                reason,
                minor,
            }))
        }
    }
}

/// A parsed head read back from its buffer.
#[derive(Clone, Copy)]
pub struct View<'a> {
    buf: &'a [u8],
    fields: &'a [Field],
}

impl<'a> View<'a> {
    pub fn new(buf: &'a [u8], fields: &'a [Field]) -> Self {
        View { buf, fields }
    }

    fn text(&self, r: &Range<usize>) -> &'a str {
        // httparse checked these bytes are tokens / URI characters (ASCII).
        std::str::from_utf8(&self.buf[r.clone()]).unwrap_or("")
    }

    pub fn method(&self, head: &RequestHead) -> &'a str {
        self.text(&head.method)
    }

    /// The request target as sent (origin-form: path and query).
    pub fn target(&self, head: &RequestHead) -> &'a str {
        self.text(&head.target)
    }

    pub fn reason(&self, head: &ResponseHead) -> &'a [u8] {
        &self.buf[head.reason.clone()]
    }

    /// Every field as (name, value), in order.
    pub fn fields(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        let (buf, fields) = (self.buf, self.fields);
        fields.iter().map(move |f| {
            (
                std::str::from_utf8(&buf[f.name.clone()]).unwrap_or(""),
                &buf[f.value.clone()],
            )
        })
    }

    /// Values of the fields named `name` (ASCII case-insensitive).
    pub fn values(&self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub fn has(&self, name: &str) -> bool {
        self.fields().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// Whether a comma-separated field (Connection, Transfer-Encoding) lists
    /// `token`.
    pub fn lists(&self, name: &'a str, token: &str) -> bool {
        self.values(name).any(|v| {
            v.split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    }
}

/// Hop-by-hop fields: never forwarded in either direction (RFC 9110 7.6.1),
/// nor are fields the message's own Connection field names.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether a field of the message seen through `view` stays on this hop.
pub fn is_hop_by_hop(view: &View<'_>, name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name)) || view.lists("connection", name)
}

/// The single Content-Length of a message: `Ok(None)` without one, an
/// error when it is repeated or not a plain decimal number.
pub fn content_length(view: &View<'_>) -> Result<Option<u64>, ()> {
    let mut values = view.values("content-length");
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() || first.is_empty() || first.len() > 19 {
        return Err(());
    }
    if !first.iter().all(u8::is_ascii_digit) {
        return Err(());
    }
    std::str::from_utf8(first)
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or(())
}

/// Appends `name: value\r\n`.
pub fn put_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends a decimal number.
pub fn put_number(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// One step of the chunked decoder.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Bytes of body data.
    Data(Bytes),
    /// More input is needed.
    NeedMore,
    /// The last chunk and the trailer section were read.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// Decodes a chunked body from a buffer that the caller keeps filling.
/// Trailer fields are read and dropped (the proxy forwards none).
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    trailer_bytes: usize,
}

/// Most bytes of chunk-size lines and trailers tolerated.
const MAX_CHUNK_META: usize = 16 * 1024;

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
            trailer_bytes: 0,
        }
    }
}

impl ChunkedDecoder {
    /// Consumes what it can of `buf`; call again after `Data`, read more
    /// after `NeedMore`.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Chunk, &'static str> {
        loop {
            match self.state {
                ChunkState::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        let _ = buf.split_to(used);
                        self.state = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_META => {
                        return Ok(Chunk::NeedMore);
                    }
                    _ => return Err("bad chunk size line"),
                },
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Chunk::NeedMore);
                    }
                    let take = (buf.len() as u64).min(left) as usize;
                    let data = buf.split_to(take).freeze();
                    self.state = if take as u64 == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - take as u64)
                    };
                    return Ok(Chunk::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Chunk::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF");
                    }
                    let _ = buf.split_to(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
                        if self.trailer_bytes + buf.len() > MAX_CHUNK_META {
                            return Err("trailer section too large");
                        }
                        return Ok(Chunk::NeedMore);
                    };
                    self.trailer_bytes += eol + 2;
                    if self.trailer_bytes > MAX_CHUNK_META {
                        return Err("trailer section too large");
                    }
                    let _ = buf.split_to(eol + 2);
                    if eol == 0 {
                        self.state = ChunkState::Done;
                    }
                }
                ChunkState::Done => return Ok(Chunk::End),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Result<Option<(RequestHead, Vec<Field>)>, HeadError> {
        let mut fields = Vec::new();
        parse_request(text.as_bytes(), &mut fields, 64, 8192).map(|h| h.map(|h| (h, fields)))
    }

    #[test]
    fn request_heads_are_read_back_from_offsets() {
        let text = "GET /metadata/instance?api-version=1 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n\r\nrest";
        let (head, fields) = request(text).unwrap().unwrap();
        let view = View::new(text.as_bytes(), &fields);
        assert_eq!(view.method(&head), "GET");
        assert_eq!(view.target(&head), "/metadata/instance?api-version=1");
        assert_eq!(head.minor, 1);
        assert_eq!(&text[head.len..], "rest");
        assert_eq!(view.values("METADATA").collect::<Vec<_>>(), [b"true"]);
        assert!(view.lists("connection", "keep-alive"));
        assert!(is_hop_by_hop(&view, "x-drop"));
        assert!(is_hop_by_hop(&view, "Transfer-Encoding"));
        assert!(!is_hop_by_hop(&view, "metadata"));
    }

    #[test]
    fn incomplete_oversized_and_malformed_heads() {
        assert!(request("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        assert_eq!(
            request(&format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000))).unwrap_err(),
            HeadError::TooLarge
        );
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            (0..70).map(|i| format!("X-{i}: v\r\n")).collect::<String>()
        );
        assert_eq!(request(&many).unwrap_err(), HeadError::TooManyFields);
        for bad in [
            "GET / HTTP/1.1\r\nX: a\r\n  folded\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "G(T / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: v\r\n\r\n",
            "\x16\x03\x01\x02\x00 not http\r\n\r\n",
        ] {
            assert!(
                matches!(request(bad), Err(HeadError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn content_length_must_be_single_and_decimal() {
        let cl = |fields: &str| {
            let text = format!("POST / HTTP/1.1\r\n{fields}\r\n");
            let (_, f) = request(&text).unwrap().unwrap();
            content_length(&View::new(text.as_bytes(), &f))
        };
        assert_eq!(cl(""), Ok(None));
        assert_eq!(cl("Content-Length: 12\r\n"), Ok(Some(12)));
        assert_eq!(cl("Content-Length: 1\r\nContent-Length: 1\r\n"), Err(()));
        assert_eq!(cl("Content-Length: +1\r\n"), Err(()));
        assert_eq!(cl("Content-Length: 1,1\r\n"), Err(()));
        assert_eq!(cl("Content-Length: 99999999999999999999\r\n"), Err(()));
    }

    #[test]
    fn response_heads_keep_code_and_reason() {
        let text = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        let mut fields = Vec::new();
        let head = parse_response(text, &mut fields, 8192).unwrap().unwrap();
        let view = View::new(text, &fields);
        assert_eq!((head.code, head.minor, head.len), (404, 1, text.len()));
        assert_eq!(view.reason(&head), b"Not Found");
        assert_eq!(content_length(&view), Ok(Some(0)));
    }

    #[test]
    fn response_heads_over_the_limit_are_too_large_even_when_complete() {
        // The whole head can arrive in one read that takes the buffer from
        // below the limit to past it.
        let text = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(100));
        let mut fields = Vec::new();
        assert_eq!(
            parse_response(text.as_bytes(), &mut fields, 64).unwrap_err(),
            HeadError::TooLarge
        );
        let head = parse_response(text.as_bytes(), &mut fields, text.len()).unwrap();
        assert_eq!(head.map(|h| h.len), Some(text.len()));
    }

    #[test]
    fn status_codes_below_100_are_malformed() {
        for text in [&b"HTTP/1.1 013 X\r\n\r\n"[..], b"HTTP/1.1 000 X\r\n\r\n"] {
            let mut fields = Vec::new();
            assert!(
                matches!(
                    parse_response(text, &mut fields, 8192),
                    Err(HeadError::Malformed(_))
                ),
                "{text:?}"
            );
        }
        let mut fields = Vec::new();
        let head = parse_response(b"HTTP/1.1 100 Continue\r\n\r\n", &mut fields, 8192);
        assert_eq!(head.unwrap().map(|h| h.code), Some(100));
    }

    #[test]
    fn responses_without_a_usable_reason_have_an_empty_one() {
        // No reason at all, no space before the line end, and a reason
        // with obs-text (which httparse does not hand out).
        for text in [
            &b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n"[..],
            b"HTTP/1.0 213\n\n",
            b"HTTP/1.1 200 \xe9t\xe9\r\nX: y\r\n\r\n",
        ] {
            let mut fields = Vec::new();
            let head = parse_response(text, &mut fields, 8192).unwrap().unwrap();
            assert_eq!(head.len, text.len());
            assert_eq!(View::new(text, &fields).reason(&head), b"");
        }
    }

    #[test]
    fn chunked_bodies_decode_across_reads() {
        let wire = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        // Fed one byte at a time, the decoder yields the same data.
        let mut dec = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut fed = 0;
        loop {
            match dec.step(&mut buf).unwrap() {
                Chunk::Data(d) => data.extend_from_slice(&d),
                Chunk::NeedMore => {
                    buf.extend_from_slice(&wire[fed..fed + 1]);
                    fed += 1;
                }
                Chunk::End => break,
            }
        }
        assert_eq!(data, b"hello world");
        assert_eq!(&buf[..], b"" as &[u8]);
        assert_eq!(&wire[fed..], b"NEXT");
    }

    #[test]
    fn bad_chunk_framing_is_an_error() {
        for wire in [&b"zz\r\nab\r\n"[..], b"2\r\nabXX0\r\n\r\n"] {
            let mut dec = ChunkedDecoder::default();
            let mut buf = BytesMut::from(wire);
            let outcome = loop {
                match dec.step(&mut buf) {
                    Ok(Chunk::Data(_)) => continue,
                    other => break other,
                }
            };
            assert!(outcome.is_err(), "{wire:?}: {outcome:?}");
        }
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0u64, 7, 10, 65_536, u64::MAX] {
            let mut out = Vec::new();
            put_number(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }
}
