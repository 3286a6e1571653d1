//! The response-head parser on arbitrary bytes, under an arbitrary length
//! limit: offsets stay inside the head, the View accessors agree with the
//! bytes, Content-Length follows its rule, a head split across reads
//! parses the same, and the head written back as the proxy writes answers
//! (status line with put_number, fields with put_field) parses to the same
//! head.
#![no_main]

use imds_proxy::fuzzing::{self as h1, HeadError, MAX_HEADERS, ResponseHead, View};
use imds_proxy_fuzz::{check_view, expected_content_length, inside, raw_fields};
use libfuzzer_sys::fuzz_target;

fn parse(buf: &[u8], max_len: usize) -> Result<Option<(ResponseHead, Vec<h1::Field>)>, HeadError> {
    let mut fields = Vec::new();
    h1::parse_response(buf, &mut fields, max_len).map(|h| h.map(|h| (h, fields)))
}

type Summary = (u16, u8, Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>);

fn summary(buf: &[u8], head: &ResponseHead, fields: &[h1::Field]) -> Summary {
    (
        head.code,
        head.minor,
        buf[head.reason_range()].to_vec(),
        fields
            .iter()
            .map(|f| (buf[f.name_range()].to_vec(), buf[f.value_range()].to_vec()))
            .collect(),
    )
}

fuzz_target!(|data: &[u8]| {
    let [len_byte, buf @ ..] = data else {
        return;
    };
    let max_len = if *len_byte == 255 {
        64 * 1024
    } else {
        usize::from(*len_byte) * 8
    };
    let (head, fields) = match parse(buf, max_len) {
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
    assert!(fields.len() <= MAX_HEADERS, "more fields than allowed");
    assert!(head.minor <= 1, "HTTP/1.{}", head.minor);
    let reason = head.reason_range();
    inside(&reason, head.len, "reason");

    let after = if reason.is_empty() { 0 } else { reason.end };
    let raw = raw_fields(buf, head.len, after, &fields);
    let view = View::new(&buf[..head.len], &fields);
    assert_eq!(view.reason(&head), &buf[reason]);
    check_view(&view, &raw);
    assert_eq!(
        h1::content_length(&view),
        expected_content_length(&raw),
        "content_length of {raw:?}"
    );

    let whole = summary(buf, &head, &fields);
    let (alone, alone_fields) = parse(&buf[..head.len], max_len)
        .expect("the head alone parses")
        .expect("the head alone is complete");
    assert_eq!(alone.len, head.len);
    assert_eq!(summary(buf, &alone, &alone_fields), whole);
    for cut in [head.len - 1, head.len / 2] {
        assert!(
            matches!(parse(&buf[..cut], max_len), Ok(None)),
            "the first {cut} bytes of a {}-byte head are not just incomplete",
            head.len
        );
    }

    let mut out = Vec::new();
    out.extend_from_slice(b"HTTP/1.");
    h1::put_number(&mut out, u64::from(head.minor));
    out.push(b' ');
    h1::put_number(&mut out, u64::from(head.code));
    out.push(b' ');
    out.extend_from_slice(view.reason(&head));
    out.extend_from_slice(b"\r\n");
    for (name, value) in view.fields() {
        h1::put_field(&mut out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    let (again, again_fields) = match parse(&out, usize::MAX) {
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
