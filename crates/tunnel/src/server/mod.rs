//! The proxy server: frontends (gRPC `ProxyService` and HTTP-CONNECT) on one
//! side, agents (`AgentService`) on the other, and the state between them:
//! backends per agent stream, pending dials keyed by `random`, established
//! connections keyed by (agent stream, connectID).
//!
//! Flow control: the reader of an agent stream never waits on a frontend. It
//! pushes into the frontend's bounded [`PacketQueue`]; if that queue passes
//! its byte limit the one connection is closed (CLOSE_REQ to the agent,
//! CLOSE_RSP with an error to the client) and counted in
//! `konnectivity_network_proxy_server_queue_overflow_total`. Frontend-to-agent
//! data waits on the agent stream's bounded channel, which only slows the
//! frontend that is sending.

mod connect;
mod grpc_front;
mod listen;
mod state;

pub use listen::{FrontendListen, FrontendMode, RunningServer, ServerLaunch, launch};
pub(crate) use state::MAX_DEFERRED_CONTROL;
pub use state::{DEFAULT_MAX_QUEUED_BYTES, ProxyServer, ServerOptions, Strategy, random_dial_id};
#[doc(hidden)]
pub use state::{fuzzing, pick_bench};
