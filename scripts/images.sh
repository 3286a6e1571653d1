#!/usr/bin/env bash
# Builds the OCI images of every deployable from release binaries, without a
# container engine, into target/images/NAME.tar (OCI image layout archives:
# `ctr -n k8s.io images import target/images/imds-proxy.tar`, or push with
# `skopeo copy oci-archive:target/images/imds-proxy.tar docker://REGISTRY/...`
# / `crane push`). Images are reproducible: every timestamp is
# SOURCE_DATE_EPOCH (default: the last commit's time).
#
#   IMAGE_PREFIX   name prefix (default localhost/proxyctl); images are
#                  $IMAGE_PREFIX/{proxyctl,imds-proxy,proxy-server,proxy-agent}:VERSION
#   PROFILE        cargo profile whose binaries go in (default release)
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=${IMAGE_PREFIX:-localhost/proxyctl}
profile=${PROFILE:-release}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
source_url=$(sed -n 's/^repository = "\(.*\)"/\1/p' Cargo.toml | head -1)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
out=target/images
bins=target/$profile
[ "$profile" = dev ] && bins=target/debug

cargo build --profile "$profile" -p proxyctl-cli -p proxyctl-oci \
    --bin proxyctl --bin proxyctl-cni --bin imds-proxy \
    --bin proxy-server --bin proxy-agent --bin proxyctl-oci
mkdir -p "$out" "$out/bin"
# The release profile keeps debug info (for perf); images carry the
# binaries without it (objcopy from binutils).
for b in proxyctl proxyctl-cni imds-proxy proxy-server proxy-agent; do
    objcopy --strip-debug "$bins/$b" "$out/bin/$b"
done
tool=$bins/proxyctl-oci

# image NAME TITLE USER ENTRYPOINT [--add SRC:DEST ...]
image() {
    local name=$1 title=$2 user=$3 entry=$4
    shift 4
    "$tool" --name "$prefix/$name:$version" --out "$out/$name.tar" \
        --with-libs --user "$user" --entrypoint "$entry" \
        --label "org.opencontainers.image.title=$title" \
        --label "org.opencontainers.image.version=$version" \
        --label "org.opencontainers.image.revision=$revision" \
        --label "org.opencontainers.image.source=$source_url" \
        --label "org.opencontainers.image.licenses=Apache-2.0" \
        "$@"
}

# proxyctl + proxyctl-cni: `proxyctl cni-install` copies the plugin onto the
# node and `proxyctl watch` sets up pods; both need root on the node.
image proxyctl "proxyctl (watch, cni-install, proxyctl-cni)" 0:0 /usr/local/bin/proxyctl \
    --add "$out/bin/proxyctl:/usr/local/bin/proxyctl" \
    --add "$out/bin/proxyctl-cni:/usr/local/bin/proxyctl-cni"
# imds-proxy enters pod network namespaces (CAP_SYS_ADMIN): root.
image imds-proxy "imds-proxy" 0:0 /usr/local/bin/imds-proxy \
    --add "$out/bin/imds-proxy:/usr/local/bin/imds-proxy"
# The Konnectivity binaries sit at / as in upstream's images, so upstream's
# manifests (command: ["/proxy-server"]) work unchanged; they need no root.
image proxy-server "proxy-server (Konnectivity)" 65532:65532 /proxy-server \
    --add "$out/bin/proxy-server:/proxy-server"
image proxy-agent "proxy-agent (Konnectivity)" 65532:65532 /proxy-agent \
    --add "$out/bin/proxy-agent:/proxy-agent"
rm -r "$out/bin"
ls -l "$out"
