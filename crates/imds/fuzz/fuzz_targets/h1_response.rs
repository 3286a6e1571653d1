//! The response-head parser on arbitrary bytes, under an arbitrary length
//! limit: offsets stay inside the head, the View accessors agree with the
//! bytes, Content-Length follows its rule, a head split across reads
//! parses the same, and the head written back as the proxy writes answers
//! (status line with put_number, fields with put_field) parses to the same
//! head.
#![no_main]

use imds_proxy::fuzzing::{self as h1, HeadError, MAX_HEADERS, ResponseHead, View};
use imds_proxy_fuzz::{
    Summarised, check_head, check_split, check_view, check_written_back, expected_content_length,
    inside, length_limit, parsed_within, raw_fields,
};
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
    let max_len = length_limit(*len_byte, 64 * 1024);
    let Some((head, fields)) = parsed_within(parse(buf, max_len), buf.len(), max_len) else {
        return;
    };
    check_head(head.len, head.minor, buf.len(), max_len);
    assert!(fields.len() <= MAX_HEADERS, "more fields than allowed");
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

    let summarised = |b: &[u8], limit: usize| -> Summarised<Summary> {
        let parsed = parse(b, limit)?;
        Ok(parsed.map(|(h, f)| (h.len, summary(b, &h, &f))))
    };
    let whole = summary(buf, &head, &fields);
    check_split(buf, head.len, max_len, &whole, summarised);

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
    check_written_back(&out, &whole, summarised);
});
