#!/usr/bin/env bash
# Install what Virby needs on a Debian/Ubuntu machine: QEMU and friends from the distribution,
# the Python package (and its test tools) into ./.venv. Idempotent: a second run is quick.
# Usage: ./install.sh            (as root, or with sudo available)
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(
  qemu-system-x86 qemu-utils   # the hypervisor (TCG or KVM)
  qemu-system-arm              # boots the aarch64 guest (-M virt) on this host too
  qemu-system-common           # /usr/lib/qemu/virtiofsd: shared directories (virtio-fs)
  e2fsprogs                    # e2fsck: tests check the guest's store disk after a stop
  cpio openssh-client          # tests list archives with GNU cpio; ssh to the builder
  dropbear-bin busybox-static  # tests check the guest's key format with dropbearkey
  nix-bin                      # Nix builds through the builder (issue: remote builds)
  socat                        # the throughput benchmark's baseline
  python3 python3-venv python3-pip
  procps iproute2
  mount                        # reliability tests mount small tmpfs file systems (as root)
  debootstrap                  # tests/py313.sh: the tiers on Debian 13's Python 3.13
)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  # --no-install-recommends: qemu-system-x86 would otherwise pull in GTK and GStreamer.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
if ! .venv/bin/python -c "import virby.supervisor.cli, virby.core.config, pytest, circus" 2>/dev/null \
   || [ setup.cfg -nt .venv/.installed ]; then
  # (grep: this machine's pip.conf may name local mirrors that do not exist; say nothing of it)
  { .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
    .venv/bin/python -m pip install -q -e '.[test]'; } 2> >(grep -v "is ignored: it is neither" >&2)
  touch .venv/.installed
fi
echo "ready: $(.venv/bin/virby --help | head -1 | cut -c1-60)…  (.venv/bin/virby)"
