//! The HTTP/2 frame layer of the gRPC frontend (RFC 9113): frame heads,
//! padding, SETTINGS, and the few header blocks a gRPC server sends.
//! Pure functions over bytes; [`crate::server::grpc_front`] drives them
//! and the `h2_frontend` fuzz target reaches them through it.
//!
//! Header blocks we send need no HPACK encoder state: every field is either
//! a static-table index or a literal "without indexing", which any decoder
//! accepts and which leaves both dynamic tables untouched. Decoding what
//! clients send needs the full HPACK (Huffman, dynamic table): that is
//! [`HeaderDecoder`]'s job.

use bytes::{BufMut, Bytes, BytesMut};

/// What every client sends first.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of a frame head.
pub const HEAD_LEN: usize = 9;
/// The window every stream and the connection start with.
pub const DEFAULT_WINDOW: i64 = 65_535;
/// Frame size every peer accepts before SETTINGS say otherwise.
pub const DEFAULT_MAX_FRAME: usize = 16_384;
/// The largest window flow control allows.
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

/// Frame types.
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// Error codes (RST_STREAM, GOAWAY).
pub mod code {
    pub const NO_ERROR: u32 = 0x0;
    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const INTERNAL_ERROR: u32 = 0x2;
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    pub const STREAM_CLOSED: u32 = 0x5;
    pub const FRAME_SIZE_ERROR: u32 = 0x6;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const COMPRESSION_ERROR: u32 = 0x9;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
}

/// SETTINGS identifiers.
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// A connection error: the connection ends with GOAWAY carrying `code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("HTTP/2 connection error {code:#x}: {reason}")]
pub struct ConnError {
    pub code: u32,
    pub reason: &'static str,
}

pub(crate) fn conn_error(code: u32, reason: &'static str) -> ConnError {
    ConnError { code, reason }
}

fn protocol(reason: &'static str) -> ConnError {
    conn_error(code::PROTOCOL_ERROR, reason)
}

/// The HPACK decoder of one connection (RFC 7541): its dynamic table
/// follows the client's encoder, so every header block passes through it,
/// in order. Written here because the HPACK crates on crates.io fell short:
/// loona-hpack builds a Huffman HashMap per string (~40% of the server's CPU
/// per dial) and httlib-hpack panics on truncated input (found by the
/// `grpc_frontend` fuzz target). Huffman strings are httlib-huffman's job.
pub struct HeaderDecoder {
    /// SETTINGS_MAX_HEADER_LIST_SIZE we advertise: a block whose decoded
    /// fields (name + value + 32 octets each, RFC 9113 section 6.5.2) pass
    /// it is refused as soon as they do, so a small block that names one
    /// large table entry many times never expands into its full size.
    max_list: usize,
    table: std::collections::VecDeque<TableEntry>,
    /// Sum of entry sizes (name + value + 32 each, RFC 7541 section 4.1).
    size: usize,
    /// Current limit; `None` until the client sets one: the 4096-octet
    /// default, as we never advertise SETTINGS_HEADER_TABLE_SIZE.
    limit: Option<usize>,
}

/// A dynamic-table entry: name, value.
type TableEntry = (Box<[u8]>, Box<[u8]>);

/// SETTINGS_HEADER_TABLE_SIZE's default, the most a client may use with us.
const HPACK_TABLE_MAX: usize = 4096;

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

fn compression(reason: &'static str) -> ConnError {
    conn_error(code::COMPRESSION_ERROR, reason)
}

/// An HPACK integer with an `n`-bit prefix: (value, octets used).
fn hpack_read_int(b: &[u8], n: u32) -> Result<(usize, usize), ConnError> {
    let max = (1usize << n) - 1;
    let first = *b.first().ok_or(compression("truncated integer"))?;
    let mut value = first as usize & max;
    if value < max {
        return Ok((value, 1));
    }
    for (i, &byte) in b.iter().enumerate().skip(1) {
        let shift = 7 * (i - 1);
        if shift > 28 {
            return Err(compression("integer too large"));
        }
        value += ((byte & 0x7f) as usize) << shift;
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(compression("truncated integer"))
}

/// An HPACK string literal: (octets, octets used).
fn hpack_read_string(b: &[u8]) -> Result<(std::borrow::Cow<'_, [u8]>, usize), ConnError> {
    let huffman = b.first().is_some_and(|f| f & 0x80 != 0);
    let (len, n) = hpack_read_int(b, 7)?;
    let end = n
        .checked_add(len)
        .filter(|end| *end <= b.len())
        .ok_or(compression("string past the end of the block"))?;
    let raw = &b[n..end];
    if !huffman {
        return Ok((std::borrow::Cow::Borrowed(raw), end));
    }
    let mut out = Vec::with_capacity(raw.len() * 8 / 5 + 1);
    httlib_huffman::decode(raw, &mut out, httlib_huffman::DecoderSpeed::FiveBits)
        .map_err(|_| compression("invalid Huffman string"))?;
    if !huffman_padding_is_eos_prefix(raw, &out) {
        return Err(compression("Huffman string not padded with the EOS prefix"));
    }
    Ok((std::borrow::Cow::Owned(out), end))
}

/// RFC 7541 §5.2: the bits after the last symbol must be fewer than 8 and
/// all ones (the most significant bits of EOS); anything else is a decoding
/// error. httlib-huffman's decoder accepts any padding, so the padding's
/// length is worked out from the decoded symbols' code lengths.
fn huffman_padding_is_eos_prefix(raw: &[u8], decoded: &[u8]) -> bool {
    let table = &httlib_huffman::encoder::table::ENCODE_TABLE;
    let symbol_bits: usize = decoded.iter().map(|&c| table[c as usize].0 as usize).sum();
    let Some(padding) = (raw.len() * 8).checked_sub(symbol_bits) else {
        return false;
    };
    let ones = (1u16 << padding.min(8)) - 1;
    padding < 8 && raw.last().map_or(0, |&b| u16::from(b)) & ones == ones
}

impl Default for HeaderDecoder {
    fn default() -> Self {
        HeaderDecoder::new(MAX_HEADER_LIST)
    }
}

/// The decoded header-list size we accept by default (64 KiB).
pub const MAX_HEADER_LIST: usize = 64 << 10;

impl HeaderDecoder {
    /// A decoder refusing header lists over `max_list` decoded octets.
    pub fn new(max_list: usize) -> Self {
        HeaderDecoder {
            max_list,
            table: Default::default(),
            size: 0,
            limit: None,
        }
    }

    fn limit(&self) -> usize {
        self.limit.unwrap_or(HPACK_TABLE_MAX)
    }

    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), ConnError> {
        match index {
            0 => Err(compression("index 0")),
            1..=61 => {
                let (n, v) = STATIC_TABLE[index - 1];
                Ok((n.as_bytes(), v.as_bytes()))
            }
            _ => self
                .table
                .get(index - 62)
                .map(|(n, v)| (&n[..], &v[..]))
                .ok_or(compression("index past the dynamic table")),
        }
    }

    fn evict_to(&mut self, room: usize) {
        while self.size > room {
            let (n, v) = self.table.pop_back().expect("size counts the entries");
            self.size -= n.len() + v.len() + 32;
        }
    }

    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = name.len() + value.len() + 32;
        if size > self.limit() {
            // An entry larger than the table empties it (section 4.4).
            self.evict_to(0);
            return;
        }
        self.evict_to(self.limit() - size);
        self.table.push_front((name.into(), value.into()));
        self.size += size;
    }

    /// Calls `field` with each name and value of a complete header block.
    pub fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), ConnError> {
        let mut rest = block;
        let mut fields = 0;
        let mut list_size = 0usize;
        let max_list = self.max_list;
        let mut charge = |name: &[u8], value: &[u8]| {
            list_size += name.len() + value.len() + 32;
            if list_size > max_list {
                Err(conn_error(
                    code::ENHANCE_YOUR_CALM,
                    "decoded header list over SETTINGS_MAX_HEADER_LIST_SIZE",
                ))
            } else {
                Ok(())
            }
        };
        while let Some(&first) = rest.first() {
            if first & 0x80 != 0 {
                let (index, n) = hpack_read_int(rest, 7)?;
                rest = &rest[n..];
                let (name, value) = self.entry(index)?;
                charge(name, value)?;
                field(name, value);
            } else if first & 0xe0 == 0x20 {
                // Size updates come before the block's first field.
                if fields > 0 {
                    return Err(compression("table size update after a field"));
                }
                let (size, n) = hpack_read_int(rest, 5)?;
                rest = &rest[n..];
                if size > HPACK_TABLE_MAX {
                    return Err(compression("table size above SETTINGS_HEADER_TABLE_SIZE"));
                }
                self.limit = Some(size);
                self.evict_to(size);
                continue;
            } else {
                let indexing = first & 0x40 != 0;
                let (index, n) = hpack_read_int(rest, if indexing { 6 } else { 4 })?;
                rest = &rest[n..];
                let name = if index == 0 {
                    let (name, n) = hpack_read_string(rest)?;
                    rest = &rest[n..];
                    name.into_owned()
                } else {
                    self.entry(index)?.0.to_vec()
                };
                let (value, n) = hpack_read_string(rest)?;
                rest = &rest[n..];
                charge(&name, &value)?;
                field(&name, &value);
                if indexing {
                    self.insert(&name, &value);
                }
            }
            fields += 1;
        }
        Ok(())
    }
}

/// A frame head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    /// The head at the start of `b`, if all nine bytes are there.
    pub fn parse(b: &[u8]) -> Option<Head> {
        let b: &[u8; HEAD_LEN] = b.get(..HEAD_LEN)?.try_into().ok()?;
        Some(Head {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize,
            kind: b[3],
            flags: b[4],
            // The reserved bit is ignored on receipt.
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        })
    }

    pub fn write(&self, out: &mut BytesMut) {
        debug_assert!(self.len < 1 << 24);
        out.put_slice(&(self.len as u32).to_be_bytes()[1..]);
        out.put_u8(self.kind);
        out.put_u8(self.flags);
        out.put_u32(self.stream & 0x7fff_ffff);
    }
}

/// The payload without its padding (DATA, HEADERS with PADDED).
pub fn unpad(flags: u8, mut payload: Bytes) -> Result<Bytes, ConnError> {
    if flags & flag::PADDED == 0 {
        return Ok(payload);
    }
    let Some(&pad) = payload.first() else {
        return Err(conn_error(
            code::FRAME_SIZE_ERROR,
            "padded frame without pad length",
        ));
    };
    let pad = pad as usize;
    if pad >= payload.len() {
        return Err(protocol("padding as long as the frame"));
    }
    payload.truncate(payload.len() - pad);
    Ok(payload.slice(1..))
}

/// A HEADERS payload reduced to its header block fragment.
pub fn header_fragment(flags: u8, payload: Bytes) -> Result<Bytes, ConnError> {
    let payload = unpad(flags, payload)?;
    if flags & flag::PRIORITY == 0 {
        return Ok(payload);
    }
    if payload.len() < 5 {
        return Err(conn_error(
            code::FRAME_SIZE_ERROR,
            "HEADERS too short for its priority",
        ));
    }
    Ok(payload.slice(5..))
}

/// SETTINGS a client sent, validated as RFC 9113 section 6.5.2 asks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PeerSettings {
    pub initial_window: Option<u32>,
    pub max_frame: Option<u32>,
}

pub fn parse_settings(payload: &[u8]) -> Result<PeerSettings, ConnError> {
    if !payload.len().is_multiple_of(6) {
        return Err(conn_error(
            code::FRAME_SIZE_ERROR,
            "SETTINGS length not a multiple of 6",
        ));
    }
    let mut out = PeerSettings::default();
    for entry in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([entry[0], entry[1]]);
        let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
        match id {
            setting::ENABLE_PUSH if value > 1 => return Err(protocol("ENABLE_PUSH above 1")),
            setting::INITIAL_WINDOW_SIZE if i64::from(value) > MAX_WINDOW => {
                return Err(conn_error(
                    code::FLOW_CONTROL_ERROR,
                    "INITIAL_WINDOW_SIZE above 2^31-1",
                ));
            }
            setting::INITIAL_WINDOW_SIZE => out.initial_window = Some(value),
            setting::MAX_FRAME_SIZE if !(16_384..1 << 24).contains(&value) => {
                return Err(protocol("MAX_FRAME_SIZE out of range"));
            }
            setting::MAX_FRAME_SIZE => out.max_frame = Some(value),
            // Our header blocks never use the dynamic table, so its size
            // does not matter to us; unknown settings must be ignored.
            _ => {}
        }
    }
    Ok(out)
}

pub fn settings(out: &mut BytesMut, entries: &[(u16, u32)]) {
    Head {
        len: entries.len() * 6,
        kind: kind::SETTINGS,
        flags: 0,
        stream: 0,
    }
    .write(out);
    for (id, value) in entries {
        out.put_u16(*id);
        out.put_u32(*value);
    }
}

pub fn settings_ack(out: &mut BytesMut) {
    Head {
        len: 0,
        kind: kind::SETTINGS,
        flags: flag::ACK,
        stream: 0,
    }
    .write(out);
}

pub fn window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    Head {
        len: 4,
        kind: kind::WINDOW_UPDATE,
        flags: 0,
        stream,
    }
    .write(out);
    out.put_u32(increment & 0x7fff_ffff);
}

pub fn ping(out: &mut BytesMut, ack: bool, opaque: [u8; 8]) {
    Head {
        len: 8,
        kind: kind::PING,
        flags: if ack { flag::ACK } else { 0 },
        stream: 0,
    }
    .write(out);
    out.put_slice(&opaque);
}

pub fn rst_stream(out: &mut BytesMut, stream: u32, error: u32) {
    Head {
        len: 4,
        kind: kind::RST_STREAM,
        flags: 0,
        stream,
    }
    .write(out);
    out.put_u32(error);
}

pub fn goaway(out: &mut BytesMut, last_stream: u32, error: u32) {
    Head {
        len: 8,
        kind: kind::GOAWAY,
        flags: 0,
        stream: 0,
    }
    .write(out);
    out.put_u32(last_stream & 0x7fff_ffff);
    out.put_u32(error);
}

/// HPACK integer with an `n`-bit prefix whose upper bits are `first`.
fn hpack_int(out: &mut BytesMut, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.put_u8(first | value as u8);
        return;
    }
    out.put_u8(first | max as u8);
    value -= max;
    while value >= 128 {
        out.put_u8((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.put_u8(value as u8);
}

fn hpack_string(out: &mut BytesMut, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.put_slice(s);
}

/// Literal without indexing, name from the static table.
fn field_indexed_name(out: &mut BytesMut, index: usize, value: &[u8]) {
    hpack_int(out, 0, 4, index);
    hpack_string(out, value);
}

/// Literal without indexing, literal name.
fn field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_u8(0);
    hpack_string(out, name);
    hpack_string(out, value);
}

/// A gRPC client's request head for `path` (`:method POST`, `:scheme http`,
/// `:path`, `content-type: application/grpc`), for tests and the fuzz
/// harness: the client side of what the frontend decodes.
pub fn request_block(path: &[u8]) -> Vec<u8> {
    let mut block = BytesMut::new();
    block.put_slice(&[0x80 | 3, 0x80 | 6]); // static: :method POST, :scheme http
    field_indexed_name(&mut block, STATIC_PATH, path);
    field_indexed_name(&mut block, STATIC_CONTENT_TYPE, b"application/grpc");
    block.to_vec()
}

/// Static table: `:status: 200` (8), `:status` (name, 8), `content-type` (31).
const STATIC_STATUS_200: u8 = 0x80 | 8;
const STATIC_STATUS: usize = 8;
const STATIC_CONTENT_TYPE: usize = 31;
const STATIC_PATH: usize = 4;

fn header_block(out: &mut BytesMut, stream: u32, end_stream: bool, block: &[u8]) {
    Head {
        len: block.len(),
        kind: kind::HEADERS,
        flags: flag::END_HEADERS | if end_stream { flag::END_STREAM } else { 0 },
        stream,
    }
    .write(out);
    out.put_slice(block);
}

fn grpc_head(block: &mut BytesMut) {
    block.put_u8(STATIC_STATUS_200);
    field_indexed_name(block, STATIC_CONTENT_TYPE, b"application/grpc");
}

/// The response head of an accepted gRPC call.
pub fn grpc_response_headers(out: &mut BytesMut, stream: u32) {
    let mut block = BytesMut::with_capacity(32);
    grpc_head(&mut block);
    header_block(out, stream, false, &block);
}

/// Longest grpc-message we send: keeps every header block in one frame.
const MAX_GRPC_MESSAGE: usize = 1024;

/// The trailers that end a call (`trailers_only`: no response head was
/// sent, so this block carries it too).
pub fn grpc_trailers(
    out: &mut BytesMut,
    stream: u32,
    trailers_only: bool,
    status: u32,
    message: &str,
) {
    let mut block = BytesMut::with_capacity(64 + message.len());
    if trailers_only {
        grpc_head(&mut block);
    }
    field(&mut block, b"grpc-status", status.to_string().as_bytes());
    if !message.is_empty() {
        field(&mut block, b"grpc-message", &percent_encode(message));
    }
    header_block(out, stream, true, &block);
}

/// A non-gRPC refusal (405, 415): an HTTP status and nothing else.
pub fn http_status(out: &mut BytesMut, stream: u32, status: u16) {
    let mut block = BytesMut::with_capacity(8);
    field_indexed_name(&mut block, STATIC_STATUS, status.to_string().as_bytes());
    header_block(out, stream, true, &block);
}

/// grpc-message encoding (gRPC over HTTP/2): bytes outside printable ASCII
/// and `%` become `%XX`.
fn percent_encode(message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len().min(MAX_GRPC_MESSAGE));
    for &b in message.as_bytes() {
        if out.len() + 3 > MAX_GRPC_MESSAGE {
            break;
        }
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header block decoded by a fresh decoder, as strings.
    pub(crate) fn decode(block: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        HeaderDecoder::default()
            .decode(block, |n, v| {
                out.push((
                    String::from_utf8(n.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                ))
            })
            .unwrap();
        out
    }

    fn only_frame(out: &BytesMut) -> (Head, &[u8]) {
        let head = Head::parse(out).unwrap();
        assert_eq!(out.len(), HEAD_LEN + head.len, "exactly one frame");
        (head, &out[HEAD_LEN..])
    }

    /// Blocks from an independent encoder (httlib-hpack's): Huffman or
    /// plain, indexed, never indexed, a shrunken table that evicts.
    #[test]
    fn header_decoder_follows_an_independent_encoder() {
        use httlib_hpack::Encoder;
        let mut enc = Encoder::default();
        let mut dec = HeaderDecoder::default();
        let field = |n: &str, v: &str| (n.as_bytes().to_vec(), v.as_bytes().to_vec());
        let blocks = [
            vec![
                field(":method", "POST"),
                field(":path", "/ProxyService/Proxy"),
                field("content-type", "application/grpc"),
            ],
            vec![
                field("user-agent", "grpc-go/1.60.1"),
                field("te", "trailers"),
                field("x-long", &"v".repeat(300)),
            ],
            vec![
                field(":path", "/ProxyService/Proxy"),
                field("user-agent", "grpc-go/1.60.1"),
                field("grpc-timeout", "5S"),
            ],
        ];
        let flag_sets = [
            Encoder::BEST_FORMAT
                | Encoder::WITH_INDEXING
                | Encoder::HUFFMAN_NAME
                | Encoder::HUFFMAN_VALUE,
            Encoder::BEST_FORMAT | Encoder::WITH_INDEXING,
            Encoder::NEVER_INDEXED | Encoder::HUFFMAN_VALUE,
            Encoder::BEST_FORMAT,
        ];
        for round in 0..3 {
            for flags in flag_sets {
                for block in &blocks {
                    let mut wire = Vec::new();
                    if round == 1 {
                        // Shrink the table: later entries evict earlier ones.
                        enc.update_max_dynamic_size(120, &mut wire).unwrap();
                    }
                    for (n, v) in block {
                        enc.encode((n.clone(), v.clone(), flags), &mut wire)
                            .unwrap();
                    }
                    let mut got = Vec::new();
                    dec.decode(&wire, |n, v| got.push((n.to_vec(), v.to_vec())))
                        .unwrap();
                    assert_eq!(&got, block, "round {round} flags {flags:#x}");
                    assert!(dec.size <= dec.limit());
                }
            }
        }
        assert_eq!(dec.limit(), 120);
    }

    #[test]
    fn header_decoder_refuses_malformed_blocks() {
        let bad: [&[u8]; 9] = [
            &[0x80],                                     // index 0
            &[0xbf, 0x80],                               // truncated integer
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], // integer too large
            &[0xc0 | 62],                                // empty dynamic table
            &[0x00, 0x05, b'a'],                         // name past the end
            &[0x00],                                     // no name at all
            &[0x04],                                     // no value at all
            &[0x3f, 0xe2, 0x1f],                         // size update to 4097
            &[0x82, 0x20],                               // size update after a field
        ];
        for b in bad {
            let r = HeaderDecoder::default().decode(b, |_, _| {});
            assert_eq!(r.unwrap_err().code, code::COMPRESSION_ERROR, "{b:?}");
        }
        // An invalid Huffman string (EOS padding of more than 7 bits).
        let r = HeaderDecoder::default().decode(&[0x04, 0x82, 0xff, 0xff], |_, _| {});
        assert!(r.is_err());
    }

    #[test]
    fn huffman_padding_must_be_the_eos_prefix() {
        // "a" is the 5-bit code 00011: padded with three ones it is 0x1f,
        // with three zeros 0x18 (RFC 7541 §5.2: a decoding error).
        let literal = |huffman: &[u8]| {
            let mut b = vec![0x00, 0x01, b'x', 0x80 | huffman.len() as u8];
            b.extend_from_slice(huffman);
            b
        };
        let mut seen = Vec::new();
        HeaderDecoder::default()
            .decode(&literal(&[0x1f]), |n, v| {
                seen.push((n.to_vec(), v.to_vec()))
            })
            .unwrap();
        assert_eq!(seen, [(b"x".to_vec(), b"a".to_vec())]);
        for bad in [&[0x18][..], &[0x1e], &[0x1f, 0xff]] {
            let r = HeaderDecoder::default().decode(&literal(bad), |_, _| {});
            assert_eq!(r.unwrap_err().code, code::COMPRESSION_ERROR, "{bad:?}");
        }
        // No padding at all: eight 'a'-length codes fill five octets exactly.
        let mut exact = Vec::new();
        httlib_huffman::encode(b"aaaaaaaa", &mut exact).unwrap();
        assert_eq!(exact.len(), 5);
        let mut seen = Vec::new();
        HeaderDecoder::default()
            .decode(&literal(&exact), |_, v| seen.push(v.to_vec()))
            .unwrap();
        assert_eq!(seen, [b"aaaaaaaa".to_vec()]);
    }

    #[test]
    fn heads_round_trip_and_ignore_the_reserved_bit() {
        let head = Head {
            len: 0x12_3456,
            kind: kind::DATA,
            flags: flag::END_STREAM,
            stream: 7,
        };
        let mut out = BytesMut::new();
        head.write(&mut out);
        assert_eq!(Head::parse(&out), Some(head));
        out[5] |= 0x80;
        assert_eq!(Head::parse(&out).unwrap().stream, 7);
        assert_eq!(Head::parse(&out[..8]), None);
    }

    #[test]
    fn header_blocks_decode_with_an_independent_hpack_decoder() {
        // (httlib-hpack: written apart from our encoder)
        let mut out = BytesMut::new();
        grpc_response_headers(&mut out, 1);
        let (head, block) = only_frame(&out);
        assert_eq!(head.flags, flag::END_HEADERS);
        assert_eq!(
            decode(block),
            [
                (":status".into(), "200".into()),
                ("content-type".into(), "application/grpc".into())
            ]
        );

        let mut out = BytesMut::new();
        grpc_trailers(&mut out, 3, true, 12, "unknown method /x 100%\n");
        let (head, block) = only_frame(&out);
        assert_eq!(head.flags, flag::END_HEADERS | flag::END_STREAM);
        assert_eq!(head.stream, 3);
        assert_eq!(
            decode(block),
            [
                (":status".into(), "200".into()),
                ("content-type".into(), "application/grpc".into()),
                ("grpc-status".into(), "12".into()),
                ("grpc-message".into(), "unknown method /x 100%25%0A".into()),
            ]
        );

        let mut out = BytesMut::new();
        http_status(&mut out, 5, 415);
        assert_eq!(
            decode(only_frame(&out).1),
            [(":status".into(), "415".into())]
        );

        // Long values need multi-byte HPACK integers.
        let long = "x".repeat(300);
        let mut out = BytesMut::new();
        grpc_trailers(&mut out, 1, false, 13, &long);
        assert_eq!(decode(only_frame(&out).1)[1].1, long);
        let huge = "y".repeat(5000);
        let mut out = BytesMut::new();
        grpc_trailers(&mut out, 1, false, 13, &huge);
        assert!(decode(only_frame(&out).1)[1].1.len() <= MAX_GRPC_MESSAGE);
    }

    #[test]
    fn padding_and_priority_are_stripped_or_refused() {
        let padded = Bytes::from_static(&[2, b'a', b'b', 0, 0]);
        assert_eq!(unpad(flag::PADDED, padded.clone()).unwrap(), &b"ab"[..]);
        assert_eq!(unpad(0, padded).unwrap().len(), 5);
        assert!(unpad(flag::PADDED, Bytes::from_static(&[4, 1, 2, 3])).is_err());
        assert!(unpad(flag::PADDED, Bytes::new()).is_err());
        let prio = Bytes::from_static(&[0, 0, 0, 1, 16, 0x88]);
        assert_eq!(header_fragment(flag::PRIORITY, prio).unwrap(), &[0x88][..]);
        assert!(header_fragment(flag::PRIORITY, Bytes::from_static(&[1, 2])).is_err());
    }

    #[test]
    fn settings_are_validated() {
        let entry = |id: u16, v: u32| {
            let mut b = id.to_be_bytes().to_vec();
            b.extend_from_slice(&v.to_be_bytes());
            b
        };
        let ok = [entry(4, 1 << 20), entry(5, 1 << 17), entry(0x99, 7)].concat();
        assert_eq!(
            parse_settings(&ok).unwrap(),
            PeerSettings {
                initial_window: Some(1 << 20),
                max_frame: Some(1 << 17)
            }
        );
        assert_eq!(
            parse_settings(&entry(4, 1 << 31)).unwrap_err().code,
            code::FLOW_CONTROL_ERROR
        );
        assert_eq!(
            parse_settings(&entry(5, 100)).unwrap_err().code,
            code::PROTOCOL_ERROR
        );
        assert_eq!(
            parse_settings(&entry(2, 2)).unwrap_err().code,
            code::PROTOCOL_ERROR
        );
        assert_eq!(
            parse_settings(&[0; 5]).unwrap_err().code,
            code::FRAME_SIZE_ERROR
        );
    }
}
