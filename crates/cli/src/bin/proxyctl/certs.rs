//! `proxyctl certs`: writes the certificate tree of upstream's `make certs`.

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// Directory that receives `certs/master`, `certs/frontend` and `certs/agent`.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// The agent-facing server address put into its certificate (upstream's PROXY_SERVER_IP).
    #[arg(
        long = "proxy-server-ip",
        env = "PROXY_SERVER_IP",
        default_value = "127.0.0.1"
    )]
    pub proxy_server_ip: String,
}

pub fn run(args: &CertsArgs) -> anyhow::Result<()> {
    for path in konnectivity::certs::write_make_certs(&args.out, &args.proxy_server_ip)? {
        println!("{path}");
    }
    Ok(())
}
