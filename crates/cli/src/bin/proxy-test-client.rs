//! `proxy-test-client`: upstream's test client. Sends `--test-requests` GET
//! requests through the proxy (gRPC tunnel or HTTP-CONNECT), prints each
//! response body, exits non-zero on failure.

mod tunnel_common;

use std::time::Duration;

use clap::Parser;
use konnectivity::client::{self, ProxyAddr};
use konnectivity::tls::{self, TlsOptions};
use tunnel_common::{KlogArgs, bad_flag};

#[derive(Parser, Debug)]
#[command(
    name = "proxy-test-client",
    version,
    // Like Go's pflag: a repeated flag takes its last value.
    args_override_self = true,
    about = "Konnectivity test client (apiserver-network-proxy compatible)."
)]
struct Args {
    /// If non-empty secure communication with this cert.
    #[arg(long = "client-cert", default_value = "")]
    client_cert: String,
    /// If non-empty secure communication with this key.
    #[arg(long = "client-key", default_value = "")]
    client_key: String,
    /// If non-empty the CAs we use to validate clients.
    #[arg(long = "ca-cert", default_value = "")]
    ca_cert: String,
    /// The protocol for the request to send through the proxy.
    #[arg(long = "request-proto", default_value = "http")]
    request_proto: String,
    /// The url request to send through the proxy.
    #[arg(long = "request-path", default_value = "success")]
    request_path: String,
    /// The host of the request server.
    #[arg(long = "request-host", default_value = "localhost")]
    request_host: String,
    /// The port the request server is listening on.
    #[arg(long = "request-port", default_value_t = 8000)]
    request_port: u16,
    /// The host of the proxy server.
    #[arg(long = "proxy-host", default_value = "localhost")]
    proxy_host: String,
    /// The port the proxy server is listening on.
    #[arg(long = "proxy-port", default_value_t = 8090)]
    proxy_port: u16,
    /// The UDS name to connect to.
    #[arg(long = "proxy-uds", default_value = "")]
    proxy_uds: String,
    /// Mode can be either 'grpc' or 'http-connect'.
    #[arg(long, default_value = "grpc")]
    mode: String,
    /// User agent to pass to the proxy server.
    #[arg(long = "user-agent", default_value = "test-client")]
    user_agent: String,
    /// The number of times to send the request.
    #[arg(long = "test-requests", default_value_t = 1)]
    test_requests: u32,
    /// The delay in seconds between sending requests.
    #[arg(long = "test-delay", default_value_t = 0)]
    test_delay: u64,
    /// The delay in seconds after sending requests.
    #[arg(long = "after-delay", default_value_t = 0)]
    after_delay: u64,
    /// Accepted for compatibility, no effect: every request uses its own tunnel here.
    #[arg(long = "close-idle-conn", default_value = "true", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    close_idle_conn: bool,
    /// Accepted for compatibility, no effect.
    #[arg(long = "enable-http2-healthchecks", default_value = "true", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    enable_http2_healthchecks: bool,
    #[command(flatten)]
    klog: KlogArgs,
}

fn main() {
    let args = Args::parse();
    args.klog.init("proxy-test-client", 0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    std::process::exit(runtime.block_on(run(args)));
}

async fn run(a: Args) -> i32 {
    if a.request_proto != "http" {
        bad_flag(
            "--request-proto",
            "only http is supported by this test client",
        );
    }
    let grpc = match a.mode.as_str() {
        "grpc" => true,
        "http-connect" => false,
        other => bad_flag("--mode", format!("{other:?}: must be grpc or http-connect")),
    };
    let addr = if !a.proxy_uds.is_empty() {
        if a.proxy_port != 0 {
            bad_flag("--proxy-port", "must be 0 when --proxy-uds is set");
        }
        ProxyAddr::Uds(a.proxy_uds.clone().into())
    } else {
        let tls = if a.ca_cert.is_empty() && a.client_cert.is_empty() {
            None
        } else {
            if a.ca_cert.is_empty() {
                bad_flag("--ca-cert", "required with --client-cert");
            }
            let identity = if a.client_cert.is_empty() {
                None
            } else {
                Some((a.client_cert.as_ref(), a.client_key.as_ref()))
            };
            Some(
                tls::client_config(a.ca_cert.as_ref(), identity, &TlsOptions::default(), &[])
                    .unwrap_or_else(|e| bad_flag("--client-cert", e)),
            )
        };
        ProxyAddr::Tcp {
            host: a.proxy_host.clone(),
            port: a.proxy_port,
            tls,
        }
    };
    let target = if a.request_host.contains(':') {
        format!("[{}]:{}", a.request_host, a.request_port)
    } else {
        format!("{}:{}", a.request_host, a.request_port)
    };
    let path = format!("/{}", a.request_path.trim_start_matches('/'));
    for i in 0..a.test_requests {
        if i > 0 && a.test_delay > 0 {
            tokio::time::sleep(Duration::from_secs(a.test_delay)).await;
        }
        let result = async {
            let mut io: Box<dyn client::Io> = if grpc {
                let channel = client::grpc_channel(&addr).await?;
                Box::new(client::grpc_dial(channel, &target).await?)
            } else {
                client::http_connect(&addr, &target, &a.user_agent).await?
            };
            client::http_get(&mut *io, &target, &path).await
        }
        .await;
        match result {
            Ok((status, body)) => {
                tracing::info!(status, bytes = body.len(), "response");
                println!("{}", String::from_utf8_lossy(&body));
                if !(200..300).contains(&status) {
                    eprintln!("proxy-test-client: request {} got HTTP {status}", i + 1);
                    return 1;
                }
            }
            Err(e) => {
                eprintln!("proxy-test-client: request {} failed: {e}", i + 1);
                return 1;
            }
        }
    }
    if a.after_delay > 0 {
        tokio::time::sleep(Duration::from_secs(a.after_delay)).await;
    }
    0
}
