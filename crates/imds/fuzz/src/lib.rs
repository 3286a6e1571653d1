//! Checks shared by the imds-proxy fuzz targets. Each is written apart from
//! the code under test, from what RFC 9110/9112 or the proxy's documented
//! rules say, so that a disagreement between the two is a finding rather
//! than the same mistake made twice.

use std::ops::Range;

use imds_proxy::fuzzing::{self as h1, Field, HeadError, View};

/// Fields that never leave the hop they arrived on (RFC 9110 7.6.1, plus
/// the pre-standard Keep-Alive and Proxy-Connection).
pub const HOP_BY_HOP: [&str; 9] = [
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

/// Upstream bodies up to this length are read whole before the answer's
/// head goes out (the proxy's `BUFFER_BODY_BELOW`); longer ones stream and
/// may legitimately end short when the upstream does.
pub const WHOLE_BODY_MAX: u64 = 64 * 1024;

/// The head-length limit a fuzz byte picks: 0 to 2032 bytes in steps of
/// 8, or `top` for 255.
pub fn length_limit(byte: u8, top: usize) -> usize {
    if byte == 255 {
        top
    } else {
        usize::from(byte) * 8
    }
}

/// A head parser's outcome on `buf_len` bytes under the length limit
/// `max_len`, checked against that limit (an incomplete head is shorter
/// than it, a TooLarge one is not); the parsed head, if any.
pub fn parsed_within<T>(
    got: Result<Option<T>, HeadError>,
    buf_len: usize,
    max_len: usize,
) -> Option<T> {
    match got {
        Ok(Some(parsed)) => Some(parsed),
        Ok(None) => {
            assert!(buf_len < max_len, "incomplete at the limit, not TooLarge");
            None
        }
        Err(HeadError::TooLarge) => {
            assert!(buf_len >= max_len, "TooLarge below the limit");
            None
        }
        Err(_) => None,
    }
}

/// Checks a parsed head's length (not empty, within the buffer and the
/// limit) and version (HTTP/1.0 or 1.1).
pub fn check_head(len: usize, minor: u8, buf_len: usize, max_len: usize) {
    assert!(
        len > 0 && len <= buf_len && len <= max_len,
        "head length {len} (buffer {buf_len}, limit {max_len})"
    );
    assert!(minor <= 1, "HTTP/1.{minor}");
}

/// What a target's parser gives for checking heads against each other:
/// `parse(bytes, max_len)` is the head's length and a summary of its parts.
pub type Summarised<S> = Result<Option<(usize, S)>, HeadError>;

/// Checks that the head at the start of `buf` (`head_len` bytes, summarised
/// as `whole`) parses the same alone, so the bytes after it play no part,
/// and that its prefixes are only incomplete, so a head arriving in pieces
/// is never refused before its end came (the proxy parses after every
/// read).
pub fn check_split<S: PartialEq + std::fmt::Debug>(
    buf: &[u8],
    head_len: usize,
    max_len: usize,
    whole: &S,
    parse: impl Fn(&[u8], usize) -> Summarised<S>,
) {
    let (alone_len, alone) = parse(&buf[..head_len], max_len)
        .expect("the head alone parses")
        .expect("the head alone is complete");
    assert_eq!(alone_len, head_len);
    assert_eq!(&alone, whole);
    for cut in [head_len - 1, head_len / 2] {
        assert!(
            matches!(parse(&buf[..cut], max_len), Ok(None)),
            "the first {cut} bytes of a {head_len}-byte head are not just incomplete"
        );
    }
}

/// Checks that `out`, the head written back as the proxy writes heads,
/// parses whole (with no length limit) to the same parts as `whole`.
pub fn check_written_back<S: PartialEq + std::fmt::Debug>(
    out: &[u8],
    whole: &S,
    parse: impl Fn(&[u8], usize) -> Summarised<S>,
) {
    let (again_len, again) = match parse(out, usize::MAX) {
        Ok(Some(parsed)) => parsed,
        other => panic!(
            "the written-back head {:?} does not parse: {other:?}",
            String::from_utf8_lossy(out)
        ),
    };
    assert_eq!(again_len, out.len(), "written-back head length");
    assert_eq!(&again, whole, "written-back head");
}

/// Checks that every field lies inside the head, after `after` (the end of
/// the start line's parts), in order and without overlap; returns the
/// fields' bytes as the offsets say.
pub fn raw_fields<'a>(
    buf: &'a [u8],
    head_len: usize,
    after: usize,
    fields: &[Field],
) -> Vec<(&'a [u8], &'a [u8])> {
    assert!(head_len <= buf.len(), "head longer than the buffer");
    let mut last = after;
    fields
        .iter()
        .map(|f| {
            let (name, value) = (f.name_range(), f.value_range());
            inside(&name, head_len, "field name");
            inside(&value, head_len, "field value");
            assert!(!name.is_empty(), "empty field name at {name:?}");
            assert!(
                last <= name.start && name.end <= value.start,
                "field {name:?}: {value:?} overlaps what precedes it (up to {last})"
            );
            last = value.end;
            (&buf[name], &buf[value])
        })
        .collect()
}

/// Panics unless `r` is a forward range ending within `len`.
pub fn inside(r: &Range<usize>, len: usize, what: &str) {
    assert!(
        r.start <= r.end && r.end <= len,
        "{what} at {r:?} outside the head (length {len})"
    );
}

/// `value` split at commas, each part without surrounding SP / HTAB
/// (RFC 9110 5.6.1), empty parts dropped.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b',').filter_map(|t| {
        let start = t.iter().position(|b| !matches!(b, b' ' | b'\t'))?;
        let end = t.iter().rposition(|b| !matches!(b, b' ' | b'\t'))?;
        Some(&t[start..=end])
    })
}

/// Checks the `View` accessors against the fields' own bytes: listing,
/// case-insensitive lookup, Connection-listed tokens and hop-by-hop
/// classification.
pub fn check_view(view: &View<'_>, raw: &[(&[u8], &[u8])]) {
    let listed: Vec<(&[u8], &[u8])> = view.fields().map(|(n, v)| (n.as_bytes(), v)).collect();
    assert_eq!(listed, raw, "View::fields differs from the offsets");

    let mut names: Vec<String> = raw
        .iter()
        .map(|(n, _)| String::from_utf8(n.to_vec()).expect("field names are tokens, hence ASCII"))
        .collect();
    names.extend(
        [
            "content-length",
            "transfer-encoding",
            "connection",
            "x-absent",
        ]
        .map(String::from),
    );
    for name in &names {
        let expected: Vec<&[u8]> = raw
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(
            view.values(name).collect::<Vec<_>>(),
            expected,
            "values({name:?})"
        );
        let upper = name.to_ascii_uppercase();
        assert_eq!(view.has(&upper), !expected.is_empty(), "has({upper:?})");
    }

    let connection: Vec<&[u8]> = raw
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, v)| tokens(v))
        .collect();
    for token in &connection {
        // A token that is not UTF-8 cannot name a field (names are ASCII).
        let Ok(token) = std::str::from_utf8(token) else {
            continue;
        };
        assert!(
            view.lists("connection", token),
            "Connection lists {token:?}"
        );
        assert!(
            h1::is_hop_by_hop(view, token),
            "{token:?}, listed in Connection, stays on this hop"
        );
    }
    for name in &names {
        let expected = HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
            || connection
                .iter()
                .any(|t| t.eq_ignore_ascii_case(name.as_bytes()));
        assert_eq!(
            h1::is_hop_by_hop(view, name),
            expected,
            "is_hop_by_hop({name:?})"
        );
    }
}

/// The proxy's Content-Length rule, as its doc states it: no field is no
/// length; exactly one field of 1 to 19 decimal digits is that number
/// (19: the proxy's cap, 10^19 bytes being no real body); anything else
/// (repeated, empty, signed, listed, padded inside) is an error.
pub fn expected_content_length(raw: &[(&[u8], &[u8])]) -> Result<Option<u64>, ()> {
    let mut values = raw
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"content-length"))
        .map(|(_, v)| *v);
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() || value.is_empty() || value.len() > 19 {
        return Err(());
    }
    value
        .iter()
        .try_fold(0u64, |n, b| {
            b.is_ascii_digit()
                .then(|| n * 10 + u64::from(b - b'0'))
                .ok_or(())
        })
        .map(Some)
}

/// What a strict reading of a chunked body (as the proxy writes it: hex
/// sizes, no extensions, no trailers) found.
#[derive(Debug, PartialEq, Eq)]
pub enum Dechunked {
    /// The body ended; this many bytes were used.
    Complete(usize),
    /// A valid beginning of a chunked body that stops early.
    Truncated,
    Malformed(String),
}

pub fn dechunk(b: &[u8]) -> Dechunked {
    let is_size = |d: &[u8]| d.len() <= 16 && d.iter().all(u8::is_ascii_hexdigit);
    let mut pos = 0;
    loop {
        let Some(eol) = b[pos..].windows(2).position(|w| w == b"\r\n") else {
            // No whole size line left: what there is must begin one.
            let part = &b[pos..];
            return if is_size(part.strip_suffix(b"\r").unwrap_or(part)) {
                Dechunked::Truncated
            } else {
                Dechunked::Malformed(format!("chunk size line {part:?}"))
            };
        };
        let line = &b[pos..pos + eol];
        if line.is_empty() || !is_size(line) {
            return Dechunked::Malformed(format!("chunk size line {line:?}"));
        }
        let size = u64::from_str_radix(std::str::from_utf8(line).unwrap(), 16).unwrap();
        pos += eol + 2;
        let Some(data_end) = usize::try_from(size).ok().and_then(|s| pos.checked_add(s)) else {
            return Dechunked::Truncated;
        };
        let crlf = &b[data_end.min(b.len())..data_end.saturating_add(2).min(b.len())];
        if !b"\r\n".starts_with(crlf) {
            return Dechunked::Malformed(format!("chunk data not followed by CRLF at {data_end}"));
        }
        if crlf.len() < 2 {
            return Dechunked::Truncated;
        }
        pos = data_end + 2;
        if size == 0 {
            return Dechunked::Complete(pos);
        }
    }
}

/// The methods of the requests in `caller`, in order, as far as their
/// boundaries are unambiguous (a single valid Content-Length or none, no
/// Transfer-Encoding, the whole body present).
pub fn request_methods(caller: &[u8]) -> Vec<String> {
    let mut methods = Vec::new();
    let mut rest = caller;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 256];
        let mut req = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(len)) = req.parse(rest) else {
            return methods;
        };
        let Some(method) = req.method else {
            return methods;
        };
        methods.push(method.to_owned());
        if req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
        {
            return methods;
        }
        let raw: Vec<(&[u8], &[u8])> = req
            .headers
            .iter()
            .map(|h| (h.name.as_bytes(), h.value))
            .collect();
        let Ok(body) = expected_content_length(&raw) else {
            return methods;
        };
        let Some(end) = usize::try_from(body.unwrap_or(0))
            .ok()
            .and_then(|b| len.checked_add(b))
            .filter(|e| *e <= rest.len())
        else {
            return methods;
        };
        rest = &rest[end..];
    }
}

/// Checks what the proxy wrote to a caller that sent `caller`: a sequence
/// of well-formed HTTP/1.1 responses, each framed so that a client finds
/// the next one where it starts (no body on HEAD, 204 or 304 answers; a
/// whole Content-Length body or a valid chunked one), none after a
/// `connection: close`, and only the proxy's own `100 Continue` as interim
/// answer. `whole`: the connection ended cleanly, so nothing was lost; a
/// reset may cut the bytes anywhere.
pub fn check_answers(caller: &[u8], out: &[u8], whole: bool) {
    let methods = request_methods(caller);
    let mut pos = 0;
    let mut answered = 0;
    while pos < out.len() {
        let mut headers = [httparse::EMPTY_HEADER; 256];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(&out[pos..]) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if !whole => return,
            other => panic!(
                "answer {answered} at byte {pos} is not a response head ({other:?}): {:?}",
                String::from_utf8_lossy(&out[pos..])
            ),
        };
        let code = resp.code.unwrap();
        assert_eq!(resp.version, Some(1), "the proxy answers in HTTP/1.1");
        let at = pos;
        pos += len;
        if code == 100 {
            continue;
        }
        assert!(
            code >= 200,
            "interim {code} reached the caller (only the proxy's 100 may)"
        );
        let named = |name: &str| {
            resp.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
                .collect::<Vec<_>>()
        };
        let (lengths, codings) = (named("content-length"), named("transfer-encoding"));
        let closes = named("connection")
            .iter()
            .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case(b"close")));
        assert!(
            lengths.is_empty() || codings.is_empty(),
            "answer at {at} has both Content-Length and Transfer-Encoding"
        );
        let Some(method) = methods.get(answered) else {
            // Which request this answers is not known for sure (the
            // request stream was ambiguous): its head was checked, the
            // framing of what follows cannot be.
            return;
        };
        answered += 1;
        if method == "HEAD" || code == 204 || code == 304 {
            // No body, whatever the fields say (RFC 9112 6.3, rule 1).
        } else if !codings.is_empty() {
            assert!(
                codings.len() == 1 && codings[0].eq_ignore_ascii_case(b"chunked"),
                "answer at {at}: Transfer-Encoding {codings:?}"
            );
            match dechunk(&out[pos..]) {
                Dechunked::Complete(n) => pos += n,
                // The bytes ran out: a reset, or the upstream's body broke
                // off and the proxy could only close.
                Dechunked::Truncated => return,
                Dechunked::Malformed(why) => panic!(
                    "answer at {at}: bad chunked body ({why}): {:?}",
                    String::from_utf8_lossy(&out[pos..])
                ),
            }
        } else if !lengths.is_empty() {
            let n = match expected_content_length(&[(b"content-length", lengths[0])]) {
                Ok(Some(n)) if lengths.len() == 1 => n,
                _ => panic!("answer at {at}: Content-Length {lengths:?}"),
            };
            let left = (out.len() - pos) as u64;
            if left < n {
                assert!(
                    !whole || n > WHOLE_BODY_MAX,
                    "answer at {at} promised {n} body bytes and sent {left}"
                );
                return;
            }
            pos += n as usize;
        } else {
            assert!(
                closes,
                "answer at {at} has a body delimited by the close without saying connection: close"
            );
            return;
        }
        if closes {
            assert_eq!(
                pos,
                out.len(),
                "bytes after an answer that said connection: close"
            );
        }
    }
}
