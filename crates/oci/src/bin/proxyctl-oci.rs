//! `proxyctl-oci`: build one OCI image archive from local files (used by
//! scripts/images.sh and the tests that run our images in containerd).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use proxyctl_oci::{ImageConfig, Layer, write_archive};

#[derive(Debug, Parser)]
#[command(
    name = "proxyctl-oci",
    version,
    about = "Write a reproducible OCI image archive (oci-archive tar) from local files, without a container engine."
)]
struct Args {
    /// Fully qualified image name, e.g. ghcr.io/org/imds-proxy:0.1.0.
    #[arg(long)]
    name: String,
    /// HOST_PATH:IMAGE_PATH to copy into the image (repeatable).
    #[arg(long = "add", value_name = "SRC:DEST")]
    add: Vec<String>,
    /// Also copy the shared libraries each added executable needs (ldd).
    #[arg(long)]
    with_libs: bool,
    /// Entrypoint argv, one flag per element.
    #[arg(long = "entrypoint", allow_hyphen_values = true)]
    entrypoint: Vec<String>,
    /// Default args, one flag per element.
    #[arg(long = "cmd", allow_hyphen_values = true)]
    cmd: Vec<String>,
    /// KEY=VALUE environment (repeatable).
    #[arg(long = "env")]
    env: Vec<String>,
    /// uid[:gid] the image runs as by default.
    #[arg(long, default_value = "")]
    user: String,
    /// KEY=VALUE label, also a manifest annotation (repeatable).
    #[arg(long = "label")]
    label: Vec<String>,
    /// Timestamp of every file and of the config (unix seconds); defaults
    /// to SOURCE_DATE_EPOCH, else 0, so builds are reproducible.
    #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
    created: u64,
    /// The archive to write.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut layer = Layer::new();
    layer.base_files()?;
    for spec in &args.add {
        let (src, dest) = spec
            .split_once(':')
            .with_context(|| format!("--add {spec:?}: expected SRC:DEST"))?;
        let src = PathBuf::from(src);
        layer.copy(&src, dest)?;
        if args.with_libs {
            layer.copy_libraries_of(&src)?;
        }
    }
    let mut labels = BTreeMap::new();
    for l in &args.label {
        let Some((k, v)) = l.split_once('=') else {
            bail!("--label {l:?}: expected KEY=VALUE");
        };
        labels.insert(k.to_owned(), v.to_owned());
    }
    let config = ImageConfig {
        entrypoint: args.entrypoint,
        cmd: args.cmd,
        env: args.env,
        user: args.user,
        working_dir: "/".into(),
        labels,
        created: args.created,
    };
    let w = write_archive(&args.out, &args.name, &layer, &config)?;
    println!(
        "{} {} {} bytes manifest {}",
        args.out.display(),
        args.name,
        w.size,
        w.manifest_digest
    );
    Ok(())
}
