//! proxyctl's Linux backend: redirect policies as an nftables ruleset in a
//! network namespace.
//!
//! Everything lives in table `inet proxyctl` of the target namespace; no
//! other table is ever touched. Every change (add, replace, apply, clear)
//! is ONE nf_tables netlink batch that rebuilds the whole table, so the
//! kernel applies all of it or none of it: a refused batch leaves the
//! previous ruleset exactly as it was. `list` reads the table back from the
//! kernel and reconstructs the policies from the rules and set elements
//! (see [`ruleset`] for the layout) — there is no state file.
//!
//! # Why a hand-written nf_tables encoder
//! The candidates were weighed (see the project's research notes):
//! - `nftnl` (libnftnl FFI) has no `redir` or `tproxy` expression, both of
//!   which this backend needs, and adds a C dependency;
//! - `rustables` is GPL-3.0 and supports only snat/dnat among NAT forms;
//! - the `nftables` crate drives the `nft -j` binary: one process per change
//!   (too slow for the apply-time targets, and fails where nft lacks JSON);
//! - `neli` and `netlink-packet-*` have no nf_tables message builder.
//!
//! The nf_tables netlink ABI is stable, and this backend needs only a small
//! part of it: table/chain/set/element/rule messages and ten expressions
//! (meta, cmp, payload, bitwise, lookup, immediate, redir, nat, tproxy,
//! counter). So
//! [`netlink`] and [`expr`] encode and decode exactly those over a raw
//! NETLINK_NETFILTER socket; `nft list table inet proxyctl` serves tests as
//! an independent check of what the kernel holds.
//!
//! UDP is redirected with tproxy (so the proxy learns the original
//! destination via IP_RECVORIGDSTADDR), which needs policy routing in the
//! namespace ([`route`], raw rtnetlink); DNS capture (`dns_port`) and
//! destination proxies use NAT for UDP as for TCP. `conntrack` deletes the
//! conntrack entries of redirected connections after a change (ctnetlink,
//! encoded by hand like the rest).

pub(crate) mod conntrack;
mod error;
pub mod expr;
pub mod netlink;
pub mod probe;
pub mod route;
pub mod ruleset;
mod target;
pub mod verify;

use std::io;

use proxyctl_policy::{Policy, PolicyError, Protocol};

pub use error::NftError;
pub use target::Target;
pub use verify::{VerifyReport, VerifyRow};

use netlink::{Socket, errno_of};
use ruleset::{Batch, KernelTable, ResolvedPolicy};

/// How often `add`/`clear` re-read and retry when another writer changed
/// the ruleset between our read and our write (the batch carries the
/// generation it was computed from, and the kernel refuses it if stale).
const GENERATION_RETRIES: usize = 16;
const ERESTART: i32 = 85;

/// Adds `policy`, or atomically replaces the policy of the same name.
pub fn add(target: &Target, policy: &Policy) -> Result<(), NftError> {
    add_all(target, std::slice::from_ref(policy))
}

/// Adds several policies (replacing those of the same names) in one batch.
pub fn add_all(target: &Target, policies: &[Policy]) -> Result<(), NftError> {
    add_with(target, policies, Options::default()).map(|_| ())
}

/// What `add`/`clear` do beyond the ruleset.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// After the change, delete the conntrack entries of connections the
    /// replaced or removed policies redirected (module `conntrack`), so they
    /// stop reaching the old proxy.
    pub flush_conntrack: bool,
}

/// What an `add` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddReport {
    /// Names of the policies that replaced one of the same name.
    pub replaced: Vec<String>,
    /// Conntrack entries deleted (with [`Options::flush_conntrack`]).
    pub flushed: usize,
}

/// [`add_all`], saying which policies were replaced, and optionally
/// flushing the conntrack entries of connections they redirected.
pub fn add_with(
    target: &Target,
    policies: &[Policy],
    options: Options,
) -> Result<AddReport, NftError> {
    let new = prepare_all(policies)?;
    let [sock, route] = target.sockets([libc::NETLINK_NETFILTER, libc::NETLINK_ROUTE])?;
    let (old, replaced) = retry_on_stale(|| {
        let (mut all, base) = read_policies(&sock)?;
        let old = all.clone();
        let replaced: Vec<String> = new
            .iter()
            .filter(|n| all.iter().any(|p| p.policy.name == n.policy.name))
            .map(|n| n.policy.name.clone())
            .collect();
        all.retain(|p| !new.iter().any(|n| n.policy.name == p.policy.name));
        all.extend(new.iter().cloned());
        commit_policies(&sock, &route, &all, base, false)?;
        Ok((old, replaced))
    })?;
    let mut report = AddReport {
        replaced,
        flushed: 0,
    };
    if options.flush_conntrack {
        // Changed = replaced by something different; an identical
        // re-add changes nothing and resets nothing.
        let (changed, kept): (Vec<_>, Vec<_>) = old.into_iter().partition(|o| {
            new.iter()
                .any(|n| n.policy.name == o.policy.name && n.policy != o.policy)
        });
        report.flushed = flush(&sock, &changed, kept.iter().chain(new.iter()))?;
    }
    Ok(report)
}

/// After a change to the policies `changed`, deletes the conntrack entries
/// of every NATed connection except those NATed to a port of a policy the
/// change left untouched (`kept`): a connection redirected under any earlier
/// version of a changed policy is re-evaluated, the rest keep going.
fn flush<'a>(
    sock: &netlink::Socket,
    changed: &[ResolvedPolicy],
    kept: impl Iterator<Item = &'a ResolvedPolicy>,
) -> Result<usize, NftError> {
    if changed.is_empty() {
        return Ok(0);
    }
    let spared: std::collections::BTreeSet<u16> = kept
        .filter(|p| !changed.iter().any(|c| c.policy.name == p.policy.name))
        .flat_map(|p| nat_ports(&p.policy))
        .collect();
    conntrack::flush_nat_except(sock, &spared)
        .map_err(|e| NftError::kernel("flushing conntrack", &e))
}

/// The ports a policy's NAT rules rewrite destinations to.
fn nat_ports(p: &Policy) -> Vec<u16> {
    let mut ports: Vec<u16> = [p.outbound_port, p.inbound_port, p.dns_port]
        .into_iter()
        .flatten()
        .collect();
    ports.extend(p.destination_proxy.map(|d| d.proxy.port()));
    ports
}

/// Makes the namespace hold exactly `policies`, atomically.
pub fn apply(target: &Target, policies: &[Policy]) -> Result<(), NftError> {
    let prepared = prepare_all(policies)?;
    let [sock, route] = target.sockets([libc::NETLINK_NETFILTER, libc::NETLINK_ROUTE])?;
    retry_on_stale(|| commit_policies(&sock, &route, &prepared, table_base(&sock)?, false))
}

/// Bench-only: like [`apply`], returning how long it took until the kernel
/// acknowledged the batch (the new rules in force), which excludes the
/// wait at socket close for the old rules to be freed.
#[doc(hidden)]
pub fn apply_timed(target: &Target, policies: &[Policy]) -> Result<std::time::Duration, NftError> {
    let start = std::time::Instant::now();
    let prepared = prepare_all(policies)?;
    let [sock, route] = target.sockets([libc::NETLINK_NETFILTER, libc::NETLINK_ROUTE])?;
    retry_on_stale(|| commit_policies(&sock, &route, &prepared, table_base(&sock)?, false))?;
    Ok(start.elapsed())
}

/// Test-only: like [`apply`], but the batch ends with a message the kernel
/// refuses (a rule for a chain that does not exist), so the kernel aborts
/// the whole transaction. Proves that a failed batch changes nothing.
#[doc(hidden)]
pub fn apply_with_kernel_fault(target: &Target, policies: &[Policy]) -> Result<(), NftError> {
    let prepared = prepare_all(policies)?;
    let [sock, route] = target.sockets([libc::NETLINK_NETFILTER, libc::NETLINK_ROUTE])?;
    commit_policies(&sock, &route, &prepared, table_base(&sock)?, true)
}

/// The policies the kernel holds in the namespace, reconstructed from the
/// rules and sets; in evaluation order (priority, then name).
pub fn list(target: &Target) -> Result<Vec<Policy>, NftError> {
    let [sock] = target.sockets([libc::NETLINK_NETFILTER])?;
    let (mut policies, _base) = read_policies(&sock)?;
    ruleset::evaluation_order(&mut policies);
    Ok(policies.into_iter().map(|p| p.policy).collect())
}

/// Removes all our policies (the whole table) or the one named; returns how
/// many were removed. Other tables are never touched.
pub fn clear(target: &Target, name: Option<&str>) -> Result<usize, NftError> {
    clear_with(target, name, Options::default()).map(|(removed, _)| removed)
}

/// [`clear`], optionally flushing the conntrack entries of connections the
/// removed policies redirected; returns (policies removed, entries deleted).
pub fn clear_with(
    target: &Target,
    name: Option<&str>,
    options: Options,
) -> Result<(usize, usize), NftError> {
    let [sock, route] = target.sockets([libc::NETLINK_NETFILTER, libc::NETLINK_ROUTE])?;
    // What was in force, for the flush: a table that cannot be read back
    // as policies is removed all the same, but then nothing is flushed.
    let before = if options.flush_conntrack {
        read_policies(&sock).map(|(p, _)| p).unwrap_or_default()
    } else {
        Vec::new()
    };
    let removed = clear_inner(&sock, &route, name)?;
    let mut flushed = 0;
    if options.flush_conntrack && removed > 0 {
        let (changed, kept): (Vec<_>, Vec<_>) = before
            .into_iter()
            .partition(|p| name.is_none_or(|n| p.policy.name == n));
        flushed = flush(&sock, &changed, kept.iter())?;
    }
    Ok((removed, flushed))
}

fn clear_inner(
    sock: &netlink::Socket,
    route: &netlink::Socket,
    name: Option<&str>,
) -> Result<usize, NftError> {
    retry_on_stale(|| {
        if name.is_none() {
            // Removing everything must work even when the table cannot be
            // read back as policies (someone edited it): that is how a
            // user gets back to a clean state.
            let (table, genid) = read_table(sock)?;
            let base = Base {
                genid,
                exists: table.is_some(),
            };
            let count = table
                .as_ref()
                .map_or(0, |t| match ruleset::decode_policies(t) {
                    Ok(p) => p.len(),
                    Err(_) => ruleset::policy_names(t).len(),
                });
            commit_policies(sock, route, &[], base, false)?;
            return Ok(count);
        }
        let (mut policies, base) = read_policies(sock)?;
        let before = policies.len();
        match name {
            Some(n) => policies.retain(|p| p.policy.name != n),
            None => policies.clear(),
        }
        let removed = before - policies.len();
        if removed == 0 && name.is_some() {
            return Ok(0);
        }
        commit_policies(sock, route, &policies, base, false)?;
        Ok(removed)
    })
}

/// Probes the namespace's redirection: see [`verify::verify`].
pub fn verify(target: &Target) -> Result<VerifyReport, NftError> {
    verify::verify(target)
}

/// The ruleset as `nft list table inet proxyctl` prints it, read by the
/// `nft` binary inside the namespace (an independent view of the kernel's
/// state, for humans). Empty when the table does not exist.
pub fn render(target: &Target) -> Result<String, NftError> {
    let [sock] = target.sockets([libc::NETLINK_NETFILTER])?;
    if read_table(&sock)?.0.is_none() {
        return Ok(String::new());
    }
    let out = target.run_in(|| {
        std::process::Command::new("nft")
            .args(["list", "table", "inet", ruleset::TABLE])
            .output()
            .map_err(|e| NftError::io("running nft list table", e))
    })?;
    if !out.status.success() {
        return Err(NftError::io(
            "nft list table",
            io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Checks that this backend can program `policy` (the model's validation,
/// plus what Linux cannot express, plus user lookups); changes nothing.
pub fn validate(policy: &Policy) -> Result<(), NftError> {
    prepare(policy).map(|_| ())
}

/// Validates a policy for this backend and resolves user names to uids.
fn prepare(policy: &Policy) -> Result<ResolvedPolicy, NftError> {
    let policy = policy.clone().checked()?;
    if !policy.exclude.sids.is_empty() {
        return Err(NftError::Unsupported {
            field: "usersid",
            message: "Windows SIDs have no meaning on Linux; exclude the proxy with \
                      --exclude-uid, --exclude-gid or --exclude-user instead"
                .into(),
        });
    }
    let outbound = policy.redirects_outbound() || policy.destination_proxy.is_some();
    let ex = &policy.exclude;
    let excludes = !(ex.uids.is_empty() && ex.gids.is_empty() && ex.users.is_empty());
    if !outbound && excludes {
        return Err(NftError::Unsupported {
            field: "exclude-uid",
            message: "excluded identities apply to outbound traffic (inbound packets have no \
                      local socket owner yet); they need --outbound-port, --dns-port or \
                      --destination-proxy"
                .into(),
        });
    }
    let mut users = Vec::new();
    for name in &policy.exclude.users {
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| NftError::io("looking up users", io::Error::from(e)))?
            .ok_or_else(|| NftError::UnknownUser(name.clone()))?;
        users.push((name.clone(), user.uid.as_raw()));
    }
    Ok(ResolvedPolicy { policy, users })
}

fn prepare_all(policies: &[Policy]) -> Result<Vec<ResolvedPolicy>, NftError> {
    let mut out: Vec<ResolvedPolicy> = Vec::new();
    for p in policies {
        let rp = prepare(p)?;
        if out.iter().any(|o| o.policy.name == rp.policy.name) {
            return Err(NftError::Policy(PolicyError::invalid(
                "name",
                format!("two policies are named `{}`", rp.policy.name),
            )));
        }
        out.push(rp);
    }
    Ok(out)
}

fn retry_on_stale<T>(mut f: impl FnMut() -> Result<T, NftError>) -> Result<T, NftError> {
    let mut attempt = 0;
    loop {
        match f() {
            Err(NftError::Kernel { errno, .. })
                if errno == ERESTART && attempt < GENERATION_RETRIES =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn genid(sock: &Socket) -> Result<u32, NftError> {
    let replies = sock
        .request(&ruleset::genid_request())
        .map_err(|e| NftError::kernel("reading the ruleset generation", &e))?;
    ruleset::genid_of(&replies).ok_or_else(|| NftError::Decode("no generation id in reply".into()))
}

/// Reads the whole table consistently: the generation id must be the same
/// before and after the dumps. `None` when the table does not exist.
pub(crate) fn read_table(sock: &Socket) -> Result<(Option<KernelTable>, u32), NftError> {
    loop {
        let before = genid(sock)?;
        let table = read_table_once(sock)?;
        if genid(sock)? == before {
            return Ok((table, before));
        }
    }
}

fn read_table_once(sock: &Socket) -> Result<Option<KernelTable>, NftError> {
    use netlink::{NLM_F_ACK, NLM_F_DUMP};
    use ruleset::*;
    let get = request(MSG_GETTABLE, NLM_F_ACK, &[(TABLE_NAME_ATTR, TABLE)]);
    match sock.request(&get) {
        Ok(_) => {}
        Err(e) if errno_of(&e) == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(NftError::kernel("reading table inet proxyctl", &e)),
    }
    let dump = |msg, attr| {
        sock.dump(&request(msg, NLM_F_DUMP, &[(attr, TABLE)]))
            .map_err(|e| NftError::kernel("dumping table inet proxyctl", &e))
    };
    let mut table = KernelTable {
        chains: decode_chains(&dump(MSG_GETCHAIN, CHAIN_TABLE_ATTR)?),
        rules: decode_rules(&dump(MSG_GETRULE, RULE_TABLE_ATTR)?),
        sets: Default::default(),
    };
    for (name, key) in decode_sets(&dump(MSG_GETSET, SET_TABLE_ATTR)?) {
        let req = request(
            MSG_GETSETELEM,
            NLM_F_DUMP,
            &[(SETELEM_TABLE_ATTR, TABLE), (SETELEM_SET_ATTR, &name)],
        );
        let elems = sock
            .dump(&req)
            .map_err(|e| NftError::kernel("dumping set elements", &e))?;
        table.sets.insert(name, (key, decode_elements(&elems)));
    }
    Ok(Some(table))
}

/// What a batch is computed against: the generation it was read at (the
/// kernel refuses the batch if the ruleset changed since) and whether our
/// table exists.
#[derive(Debug, Clone, Copy)]
struct Base {
    genid: u32,
    exists: bool,
}

fn read_policies(sock: &Socket) -> Result<(Vec<ResolvedPolicy>, Base), NftError> {
    let (table, genid) = read_table(sock)?;
    let exists = table.is_some();
    let policies = match table {
        Some(t) => ruleset::decode_policies(&t).map_err(NftError::Decode)?,
        None => Vec::new(),
    };
    Ok((policies, Base { genid, exists }))
}

/// Whether the table exists, without reading it.
fn table_base(sock: &Socket) -> Result<Base, NftError> {
    use ruleset::*;
    let genid = genid(sock)?;
    let get = request(
        MSG_GETTABLE,
        netlink::NLM_F_ACK,
        &[(TABLE_NAME_ATTR, TABLE)],
    );
    let exists = match sock.request(&get) {
        Ok(_) => true,
        Err(e) if errno_of(&e) == Some(libc::ENOENT) => false,
        Err(e) => return Err(NftError::kernel("reading table inet proxyctl", &e)),
    };
    Ok(Base { genid, exists })
}

/// One batch that makes the table hold exactly `policies` (no table at all
/// when there are none), plus the UDP policy routing around it.
fn commit_policies(
    sock: &Socket,
    route: &Socket,
    policies: &[ResolvedPolicy],
    base: Base,
    inject_fault: bool,
) -> Result<(), NftError> {
    let udp = policies
        .iter()
        .any(|p| p.policy.has_protocol(Protocol::Udp));
    if udp {
        // Before the batch: the routes only act on packets the new rules
        // mark, so installing them first never changes current traffic.
        route::ensure(route).map_err(|e| NftError::kernel("adding UDP policy routing", &e))?;
    }
    let mut batch = Batch::new(Some(base.genid));
    let new = (!policies.is_empty()).then(|| ruleset::build(policies));
    batch.replace_table(base.exists, new.as_ref());
    if inject_fault {
        batch.rule(&ruleset::RuleSpec {
            chain: "no-such-chain".into(),
            exprs: vec![expr::Expr::Counter],
            comment: "fault injection".into(),
        });
    }
    if batch.is_empty() && !inject_fault {
        // No table before and none wanted: nothing for the kernel to do.
    } else if let Err(e) = send_batch(sock, &batch.finish()) {
        if udp {
            // The routing went in first; keep it only if what the kernel
            // still holds (the old ruleset) marks UDP.
            let old_udp = read_policies(sock)
                .is_ok_and(|(old, _)| old.iter().any(|p| p.policy.has_protocol(Protocol::Udp)));
            if !old_udp {
                let _ = route::remove(route);
            }
        }
        return Err(e);
    }
    if !udp {
        route::remove(route).map_err(|e| NftError::kernel("removing UDP policy routing", &e))?;
    }
    Ok(())
}

/// Sends a batch and collects the kernel's verdict on every message. The
/// kernel processes a batch synchronously inside sendmsg, so every ack or
/// error is queued by the time send returns.
fn send_batch(sock: &Socket, msg: &netlink::MsgBuf) -> Result<(), NftError> {
    sock.send(&msg.buf)
        .map_err(|e| NftError::kernel("sending the nf_tables batch", &e))?;
    let expected = msg.messages.len().saturating_sub(2);
    let mut acked = 0;
    let mut first_error: Option<NftError> = None;
    loop {
        let nonblocking = acked >= expected || first_error.is_some();
        let Some(replies) = sock
            .recv(nonblocking)
            .map_err(|e| NftError::kernel("reading the batch result", &e))?
        else {
            break;
        };
        for m in replies {
            let Some((errno, text)) = m.error() else {
                continue;
            };
            acked += 1;
            if errno != 0 && first_error.is_none() {
                let what = describe_message(msg, m.seq);
                first_error = Some(NftError::Kernel {
                    op: format!("applying the ruleset ({what})"),
                    errno,
                    message: netlink::KernelError { errno, text }.to_string(),
                });
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn describe_message(msg: &netlink::MsgBuf, seq: u32) -> String {
    let Some(&(_, offset)) = msg.messages.iter().find(|(s, _)| *s == seq) else {
        return format!("message {seq}");
    };
    let ty = u16::from_ne_bytes([msg.buf[offset + 4], msg.buf[offset + 5]]) & 0xff;
    let name = match ty {
        ruleset::MSG_NEWTABLE => "new table",
        ruleset::MSG_DELTABLE => "delete table",
        ruleset::MSG_NEWCHAIN => "new chain",
        ruleset::MSG_NEWRULE => "new rule",
        ruleset::MSG_NEWSET => "new set",
        ruleset::MSG_NEWSETELEM => "new set elements",
        _ => "message",
    };
    format!("{name}, message {seq}")
}
