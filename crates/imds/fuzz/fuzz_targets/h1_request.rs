//! The request-head parser on arbitrary bytes, under arbitrary limits:
//! offsets stay inside the head, the View accessors agree with the bytes,
//! Content-Length follows its rule, a head split across reads parses the
//! same, and a head written back with put_field parses to the same head
//! (which is how the proxy forwards fields).
#![no_main]

use imds_proxy::fuzzing::{self as h1, HeadError, MAX_HEADERS, RequestHead, View};
use imds_proxy_fuzz::{check_view, expected_content_length, inside, raw_fields};
use libfuzzer_sys::fuzz_target;

fn parse(
    buf: &[u8],
    max_fields: usize,
    max_len: usize,
) -> Result<Option<(RequestHead, Vec<h1::Field>)>, HeadError> {
    let mut fields = Vec::new();
    h1::parse_request(buf, &mut fields, max_fields, max_len).map(|h| h.map(|h| (h, fields)))
}

/// The parts that matter of a parsed head, as bytes.
fn summary(
    buf: &[u8],
    head: &RequestHead,
    fields: &[h1::Field],
) -> (Vec<u8>, Vec<u8>, u8, Vec<(Vec<u8>, Vec<u8>)>) {
    (
        buf[head.method_range()].to_vec(),
        buf[head.target_range()].to_vec(),
        head.minor,
        fields
            .iter()
            .map(|f| (buf[f.name_range()].to_vec(), buf[f.value_range()].to_vec()))
            .collect(),
    )
}

fuzz_target!(|data: &[u8]| {
    let [fields_byte, len_byte, buf @ ..] = data else {
        return;
    };
    // Limits below, at and above what the buffer needs (0 included, and
    // field counts past MAX_HEADERS, which the parser clamps).
    let max_fields = usize::from(*fields_byte) % (MAX_HEADERS + 8);
    let max_len = if *len_byte == 255 {
        16 * 1024
    } else {
        usize::from(*len_byte) * 8
    };
    let (head, fields) = match parse(buf, max_fields, max_len) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            assert!(buf.len() < max_len, "incomplete at the limit, not TooLarge");
            return;
        }
        Err(HeadError::TooLarge) => {
            assert!(buf.len() >= max_len, "TooLarge below the limit");
            return;
        }
        Err(_) => return,
    };
    assert!(
        head.len > 0 && head.len <= buf.len() && head.len <= max_len,
        "head length {} (buffer {}, limit {max_len})",
        head.len,
        buf.len()
    );
    assert!(
        fields.len() <= max_fields.min(MAX_HEADERS),
        "more fields than allowed"
    );
    assert!(head.minor <= 1, "HTTP/1.{}", head.minor);
    let (method, target) = (head.method_range(), head.target_range());
    inside(&method, head.len, "method");
    inside(&target, head.len, "target");
    assert!(
        !method.is_empty() && !target.is_empty() && method.end < target.start,
        "request line parts {method:?} {target:?}"
    );

    let raw = raw_fields(buf, head.len, target.end, &fields);
    let view = View::new(&buf[..head.len], &fields);
    assert_eq!(view.method(&head).as_bytes(), &buf[method]);
    assert_eq!(view.target(&head).as_bytes(), &buf[target]);
    check_view(&view, &raw);
    assert_eq!(
        h1::content_length(&view),
        expected_content_length(&raw),
        "content_length of {raw:?}"
    );

    // The bytes after the head play no part, and a head arriving in pieces
    // is never refused before its end came (the proxy parses after every
    // read).
    let whole = summary(buf, &head, &fields);
    let (alone, alone_fields) = parse(&buf[..head.len], max_fields, max_len)
        .expect("the head alone parses")
        .expect("the head alone is complete");
    assert_eq!(alone.len, head.len);
    assert_eq!(summary(buf, &alone, &alone_fields), whole);
    for cut in [head.len - 1, head.len / 2] {
        assert!(
            matches!(parse(&buf[..cut], max_fields, max_len), Ok(None)),
            "the first {cut} bytes of a {}-byte head are not just incomplete",
            head.len
        );
    }

    // Written back as the proxy writes heads upstream, the head reads the
    // same.
    let mut out = Vec::new();
    out.extend_from_slice(view.method(&head).as_bytes());
    out.push(b' ');
    out.extend_from_slice(view.target(&head).as_bytes());
    out.extend_from_slice(b" HTTP/1.");
    h1::put_number(&mut out, u64::from(head.minor));
    out.extend_from_slice(b"\r\n");
    for (name, value) in view.fields() {
        h1::put_field(&mut out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    let (again, again_fields) = match parse(&out, max_fields, usize::MAX) {
        Ok(Some(parsed)) => parsed,
        other => panic!(
            "the written-back head {:?} does not parse: {:?}",
            String::from_utf8_lossy(&out),
            other.map(|o| o.map(|(h, _)| h))
        ),
    };
    assert_eq!(again.len, out.len(), "written-back head length");
    assert_eq!(
        summary(&out, &again, &again_fields),
        whole,
        "written-back head"
    );
});
