//! The request-head parser on arbitrary bytes, under arbitrary limits:
//! offsets stay inside the head, the View accessors agree with the bytes,
//! Content-Length follows its rule, a head split across reads parses the
//! same, and a head written back with put_field parses to the same head
//! (which is how the proxy forwards fields).
#![no_main]

use imds_proxy::fuzzing::{self as h1, HeadError, MAX_HEADERS, RequestHead, View};
use imds_proxy_fuzz::{
    Summarised, check_head, check_split, check_view, check_written_back, expected_content_length,
    inside, length_limit, parsed_within, raw_fields,
};
use libfuzzer_sys::fuzz_target;

fn parse(
    buf: &[u8],
    max_fields: usize,
    max_len: usize,
) -> Result<Option<(RequestHead, Vec<h1::Field>)>, HeadError> {
    let mut fields = Vec::new();
    h1::parse_request(buf, &mut fields, max_fields, max_len).map(|h| h.map(|h| (h, fields)))
}

type Summary = (Vec<u8>, Vec<u8>, u8, Vec<(Vec<u8>, Vec<u8>)>);

/// The parts that matter of a parsed head, as bytes.
fn summary(buf: &[u8], head: &RequestHead, fields: &[h1::Field]) -> Summary {
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
    let max_len = length_limit(*len_byte, 16 * 1024);
    let Some((head, fields)) = parsed_within(parse(buf, max_fields, max_len), buf.len(), max_len)
    else {
        return;
    };
    check_head(head.len, head.minor, buf.len(), max_len);
    assert!(
        fields.len() <= max_fields.min(MAX_HEADERS),
        "more fields than allowed"
    );
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

    let summarised = |b: &[u8], limit: usize| -> Summarised<Summary> {
        let parsed = parse(b, max_fields, limit)?;
        Ok(parsed.map(|(h, f)| (h.len, summary(b, &h, &f))))
    };
    let whole = summary(buf, &head, &fields);
    check_split(buf, head.len, max_len, &whole, summarised);

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
    check_written_back(&out, &whole, summarised);
});
