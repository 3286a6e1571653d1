#!/usr/bin/env bash
# Installs what proxyctl's tests and demo need, only what is missing.
set -euo pipefail

debian_packages=(
  nftables iptables iproute2 curl
  containerd runc containernetworking-plugins busybox-static
  openssh-server openssh-client haproxy nginx-light
  dnsmasq-base squid shadowsocks-libev faketime
)
missing=()
for p in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing Debian packages (${missing[*]}); run as root to install them" >&2
    exit 1
  fi
  echo "== apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# kustomize renders deploy/'s Kustomize set-up in the deploy_manifests test
# (the same engine kubectl embeds). Neither is in Debian's archive; Go builds
# the pinned release from the module proxy once.
kustomize_version=v5.8.1
if ! kustomize version 2>/dev/null | grep -q "$kustomize_version"; then
  echo "== go install kustomize $kustomize_version"
  GOBIN=/usr/local/bin go install "sigs.k8s.io/kustomize/kustomize/v5@$kustomize_version"
fi

# Python tools the tests drive (validators, independent protocol peers).
# Cloud SDKs run unmodified inside the imds-proxy tests' stand-in pods.
python_packages=(kubernetes-validate azure-identity boto3)
missing_py=()
for p in "${python_packages[@]}"; do
  python3 -m pip show -q "$p" >/dev/null 2>&1 || missing_py+=("$p")
done
if [ ${#missing_py[@]} -gt 0 ]; then
  echo "== pip install ${missing_py[*]}"
  python3 -m pip install -q --root-user-action=ignore "${missing_py[@]}"
fi

# Python gRPC (independent stack for the Konnectivity wire-interop tests).
if ! python3 -c "import grpc, grpc_tools" >/dev/null 2>&1; then
  echo "== pip install grpcio grpcio-tools"
  python3 -m pip install -q --root-user-action=ignore grpcio grpcio-tools
fi

# moto's server: a real STS (AssumeRole, GetCallerIdentity) on loopback for
# the imds-proxy AWS identity tests. pip show does not take extras, so ask
# for the server's own imports.
if ! python3 -c "import moto.server, flask, flask_cors" >/dev/null 2>&1; then
  echo "== pip install moto[server]"
  python3 -m pip install -q --root-user-action=ignore "moto[server]"
fi

# Go peers for the tunnel's interop tests and benches (test-only, never
# shipped): upstream apiserver-network-proxy's server and agent, a
# konnectivity-client / egress-selector client and h2spec, built from the
# pinned module in crates/cli/tests/go-peers into target/go-peers. Rebuilt
# only when that module's sources change (a fresh build downloads ~120
# modules and compiles for a few minutes on 2 CPUs).
go_src=crates/cli/tests/go-peers
go_out=target/go-peers
if ! command -v go >/dev/null 2>&1; then
  echo "install-deps: go is not installed; the Go interop peers need Go >= 1.26" >&2
  exit 1
fi
go_stamp=$( (cd "$go_src" && find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) | sort | xargs sha256sum; go version) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$go_out/stamp" 2>/dev/null)" != "$go_stamp" ]; then
  echo "== go build (Go interop peers, $go_src)"
  mkdir -p "$go_out"
  rm -f "$go_out/stamp"
  (cd "$go_src" && GOFLAGS=-mod=readonly go build -trimpath -o "$OLDPWD/$go_out/" \
    ./upstream-server ./upstream-agent ./konn-client github.com/summerwind/h2spec/cmd/h2spec)
  echo "$go_stamp" > "$go_out/stamp"
fi
