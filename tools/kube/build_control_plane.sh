#!/usr/bin/env bash
# Builds a real Kubernetes control plane (kube-apiserver, kube-scheduler, kube-controller-manager, kubectl) from
# Debian's `kubernetes` source package, offline from its vendored Go modules, once into the user cache; installs
# Debian's etcd-server beside it. No package registry ships these binaries (../shared/notes/kubernetes-control-plane.md).
# Used by the chart's scheduling test (tests/integration/test_chart_scheduling.py); `make kube-tools` runs it.
set -euo pipefail
CACHE=${KUBE_CACHE:-$HOME/.cache/inference-mesh/kubernetes}
VERSION=1.20.5+really1.20.2-1.1+deb12u1  # Debian bookworm(-security)
BIN=$CACHE/$VERSION/bin
TOOLS="kube-apiserver kube-scheduler kube-controller-manager kubectl"

have_all() { for t in $TOOLS; do [ -x "$BIN/$t" ] || return 1; done; command -v etcd >/dev/null; }
if have_all; then echo "kubernetes $VERSION control plane: $BIN"; exit 0; fi

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "the chart's scheduling test needs a Kubernetes $VERSION control plane in $BIN and etcd:" >&2
  echo "run this script as root on Debian bookworm (it builds them from Debian's kubernetes source package)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -q -y -o DPkg::Lock::Timeout=600)
# Source packages: the same archives as the binary ones.
SRC=/etc/apt/sources.list.d/inference-mesh-deb-src.sources
if [ ! -f "$SRC" ]; then
  sed -n '/^Types: deb$/,/^$/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | sed 's/^Types: deb$/Types: deb-src/' > "$SRC"
  [ -s "$SRC" ] || printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > "$SRC"
fi
"${APT[@]}" update >/dev/null
"${APT[@]}" install --no-install-recommends golang-go etcd-server rsync dpkg-dev >/dev/null

work=$(mktemp -d /tmp/kube-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get source -q --download-only "kubernetes=$VERSION" >/dev/null
dpkg-source -q -x kubernetes_*.dsc src >/dev/null
# The vendored reflect2 1.0.1 segfaults under Go 1.19: Debian's 1.0.2 replaces it.
apt-get download -q golang-github-modern-go-reflect2-dev >/dev/null
dpkg -x golang-github-modern-go-reflect2-dev_*.deb reflect2
rm -f src/vendor/github.com/modern-go/reflect2/*.go
cp reflect2/usr/share/gocode/src/github.com/modern-go/reflect2/*.go src/vendor/github.com/modern-go/reflect2/
cd src
echo "building kubernetes $VERSION ($TOOLS) from Debian's source, once (about 5 minutes on 2 cores) ..."
GOFLAGS=-mod=vendor GOPROXY=off CGO_ENABLED=0 GO111MODULE=on \
  make WHAT="cmd/kube-apiserver cmd/kube-scheduler cmd/kube-controller-manager cmd/kubectl" >build.log 2>&1 || {
  tail -40 build.log >&2; exit 1; }
mkdir -p "$BIN.partial"
for t in $TOOLS; do cp "_output/bin/$t" "$BIN.partial/"; done
rm -rf "$BIN" && mv "$BIN.partial" "$BIN"
echo "kubernetes $VERSION control plane: $BIN"
