//! Wire types generated from `proto/` (upstream field numbers, no package)
//! and small constructors so the rest of the crate never builds payloads by hand.

#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/_.rs"));

use bytes::Bytes;
pub use packet::Payload;

/// The agent link's one method (upstream's proto has no package).
pub const AGENT_CONNECT_PATH: &str = "/AgentService/Connect";

/// Metadata keys, lowercase as they travel on the wire.
pub mod headers {
    pub const AGENT_ID: &str = "agentid";
    pub const AGENT_IDENTIFIERS: &str = "agentidentifiers";
    pub const SERVER_ID: &str = "serverid";
    pub const SERVER_COUNT: &str = "servercount";
    pub const AUTHORIZATION: &str = "authorization";
    /// Extension: the per-connection window (bytes) a peer offers; flow
    /// control is on only when both sides sent it.
    pub const FLOW_WINDOW: &str = "proxyctl-flow-window";
    /// Extension: the most (bytes) a peer lets that window grow to; the
    /// window stays fixed unless both sent it.
    pub const FLOW_WINDOW_MAX: &str = "proxyctl-flow-window-max";
    /// Extension: how many links (connections, each with its own Connect
    /// stream) the agent keeps to each server; a server that reads it
    /// spreads dials over that many of the agent's streams instead of
    /// using only its first, and answers with the number it will use (at
    /// most the agent's). An agent keeps one link to a server that does
    /// not answer it (upstream's would leave the others idle).
    pub const LINKS: &str = "proxyctl-links";
    /// Extension: an agent with several links may move a streaming
    /// connection's packets toward the server onto another link (marking
    /// the move with DATA_MOVED on the old one), so dials can all go to
    /// one link and streams still spread; the server answers it when it
    /// takes such packets. Needs the flow-control extension.
    pub const MOVE_STREAMS: &str = "proxyctl-move-streams";
}

impl Packet {
    fn with(kind: PacketType, payload: Payload) -> Self {
        Packet {
            r#type: kind as i32,
            payload: Some(payload),
        }
    }
    pub fn dial_req(protocol: &str, address: &str, random: i64) -> Self {
        Self::with(
            PacketType::DialReq,
            Payload::DialRequest(DialRequest {
                protocol: protocol.to_string(),
                address: address.to_string(),
                random,
            }),
        )
    }
    pub fn dial_rsp(random: i64, connect_id: i64, error: impl Into<String>) -> Self {
        Self::with(
            PacketType::DialRsp,
            Payload::DialResponse(DialResponse {
                error: error.into(),
                connect_id,
                random,
            }),
        )
    }
    pub fn data(connect_id: i64, data: Bytes) -> Self {
        Self::with(
            PacketType::Data,
            Payload::Data(Data {
                connect_id,
                error: String::new(),
                data,
            }),
        )
    }
    pub fn close_req(connect_id: i64) -> Self {
        Self::with(
            PacketType::CloseReq,
            Payload::CloseRequest(CloseRequest { connect_id }),
        )
    }
    pub fn close_rsp(connect_id: i64, error: impl Into<String>) -> Self {
        Self::with(
            PacketType::CloseRsp,
            Payload::CloseResponse(CloseResponse {
                error: error.into(),
                connect_id,
            }),
        )
    }
    pub fn dial_cls(random: i64) -> Self {
        Self::with(
            PacketType::DialCls,
            Payload::CloseDial(CloseDial { random }),
        )
    }
    pub fn data_ack(connect_id: i64, bytes: usize) -> Self {
        Self::with(
            PacketType::DataAck,
            Payload::DataAck(DataAck {
                connect_id,
                bytes: bytes as i64,
            }),
        )
    }
    pub fn data_moved(connect_id: i64) -> Self {
        Self::with(
            PacketType::DataMoved,
            Payload::DataMoved(DataMoved { connect_id }),
        )
    }
    pub fn drain() -> Self {
        Self::with(PacketType::Drain, Payload::Drain(Drain {}))
    }

    /// Bytes this packet holds in memory (for queue accounting).
    /// The `packet_type` label: Go's `PacketType.String()` (the enum
    /// name; the number for a value the enum lacks).
    pub fn kind_name(&self) -> std::borrow::Cow<'static, str> {
        match PacketType::try_from(self.r#type) {
            Ok(t) => t.as_str_name().into(),
            Err(_) => self.r#type.to_string().into(),
        }
    }

    pub fn weight(&self) -> usize {
        match &self.payload {
            Some(Payload::Data(d)) => d.data.len() + 64,
            _ => 64,
        }
    }

    /// The packet checked for consistency: a known type whose payload is the
    /// matching variant. Upstream dispatches on `type` and reads the payload
    /// through nil-safe getters; we refuse the mismatch instead of guessing.
    pub fn checked(self) -> Result<Checked, &'static str> {
        let kind = PacketType::try_from(self.r#type).map_err(|_| "unknown packet type")?;
        let payload = self.payload.ok_or("packet without payload")?;
        Ok(match (kind, payload) {
            (PacketType::DialReq, Payload::DialRequest(p)) => Checked::DialReq(p),
            (PacketType::DialRsp, Payload::DialResponse(p)) => Checked::DialRsp(p),
            (PacketType::CloseReq, Payload::CloseRequest(p)) => Checked::CloseReq(p),
            (PacketType::CloseRsp, Payload::CloseResponse(p)) => Checked::CloseRsp(p),
            (PacketType::Data, Payload::Data(p)) => Checked::Data(p),
            (PacketType::DialCls, Payload::CloseDial(p)) => Checked::DialCls(p),
            (PacketType::Drain, Payload::Drain(_)) => Checked::Drain,
            (PacketType::DataAck, Payload::DataAck(p)) => Checked::DataAck(p),
            (PacketType::DataMoved, Payload::DataMoved(p)) => Checked::DataMoved(p),
            _ => return Err("payload does not match packet type"),
        })
    }
}

/// A packet whose type and payload agree.
#[derive(Debug)]
pub enum Checked {
    DialReq(DialRequest),
    DialRsp(DialResponse),
    CloseReq(CloseRequest),
    CloseRsp(CloseResponse),
    Data(Data),
    DialCls(CloseDial),
    Drain,
    DataAck(DataAck),
    DataMoved(DataMoved),
}

impl Checked {
    /// The packet again, as it came (a reader that must wait with it).
    pub fn into_packet(self) -> Packet {
        let (kind, payload) = match self {
            Checked::DialReq(p) => (PacketType::DialReq, Payload::DialRequest(p)),
            Checked::DialRsp(p) => (PacketType::DialRsp, Payload::DialResponse(p)),
            Checked::CloseReq(p) => (PacketType::CloseReq, Payload::CloseRequest(p)),
            Checked::CloseRsp(p) => (PacketType::CloseRsp, Payload::CloseResponse(p)),
            Checked::Data(p) => (PacketType::Data, Payload::Data(p)),
            Checked::DialCls(p) => (PacketType::DialCls, Payload::CloseDial(p)),
            Checked::Drain => (PacketType::Drain, Payload::Drain(Drain {})),
            Checked::DataAck(p) => (PacketType::DataAck, Payload::DataAck(p)),
            Checked::DataMoved(p) => (PacketType::DataMoved, Payload::DataMoved(p)),
        };
        Packet::with(kind, payload)
    }
    /// Upstream's packet type name, for metric labels.
    pub fn type_name(&self) -> &'static str {
        match self {
            Checked::DialReq(_) => "DIAL_REQ",
            Checked::DialRsp(_) => "DIAL_RSP",
            Checked::CloseReq(_) => "CLOSE_REQ",
            Checked::CloseRsp(_) => "CLOSE_RSP",
            Checked::Data(_) => "DATA",
            Checked::DialCls(_) => "DIAL_CLS",
            Checked::Drain => "DRAIN",
            Checked::DataAck(_) => "DATA_ACK",
            Checked::DataMoved(_) => "DATA_MOVED",
        }
    }
}

/// prost codec with small initial buffers: tonic's default 8 KiB encode and
/// decode buffers per stream would be most of an idle tunnelled connection
/// on the gRPC frontend (one stream per dial). Buffers still grow on demand.
pub struct LeanCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(std::marker::PhantomData)
    }
}

fn lean_buffers() -> tonic::codec::BufferSettings {
    tonic::codec::BufferSettings::new(1024, 32 * 1024)
}

impl<T, U> tonic::codec::Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(lean_buffers())
    }
    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(lean_buffers())
    }
}
