//! `proxyctl-cni`: the CNI plugin (chained after the network plugin) that
//! installs a pod's redirect policies before its containers start.
//! The runtime runs it with `CNI_*` in the environment and the network
//! configuration on stdin; see proxyctl_cni for the configuration.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

pub fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let env = proxyctl_cni::CniEnv::from_process();
    // Always drain stdin (the runtime writes the configuration even for
    // VERSION, and exiting unread would break its pipe), unless a person
    // runs us from a terminal.
    let input = std::io::stdin();
    if !input.is_terminal() && input.lock().read_to_end(&mut stdin).is_err() {
        stdin.clear();
    }
    let (out, code) = match proxyctl_cni::run(&env, &stdin) {
        Ok(Some(result)) => (Some(result), ExitCode::SUCCESS),
        Ok(None) => (None, ExitCode::SUCCESS),
        Err(err) => {
            eprintln!("proxyctl-cni: {} {}: {err}", env.command, env.container_id);
            (
                Some(err.to_json(&proxyctl_cni::error_version(&stdin))),
                ExitCode::FAILURE,
            )
        }
    };
    if let Some(json) = out {
        let mut stdout = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut stdout, &json);
        let _ = stdout.write_all(b"\n");
    }
    code
}
