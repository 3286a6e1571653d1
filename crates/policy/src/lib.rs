//! The redirect-policy model every proxyctl backend shares.
//!
//! One [`Policy`] says: traffic of these kinds, except these, goes to this
//! proxy. The model is a superset of what the Linux (nftables) and Windows
//! (HNS `L4WFPPROXY`) backends can express; a backend that cannot express a
//! field must refuse the policy with an error naming that field, never drop it.
//!
//! This crate owns the types, their validation and their parsing from CLI
//! strings and from JSON/YAML files. It does no I/O beyond reading a policy
//! file the caller names, so every backend and test can rely on the same rules.

mod error;
mod model;
mod parse;
mod validate;

pub use error::PolicyError;
pub use model::{
    DEFAULT_POLICY_NAME, DestinationProxy, Exceptions, Exclusions, Family, MAX_NAME_LEN, Match,
    Policy, PortRange, Protocol,
};
pub use parse::{
    FileFormat, parse_cidrs, parse_family, parse_gids, parse_port, parse_port_ranges,
    parse_protocols, parse_socket_addr, parse_uids, policies_from_file, policies_from_str,
};
pub use validate::loopback_nets;
