#!/usr/bin/env bash
# From a fresh Debian/Ubuntu machine to commands run inside the builder VM:
#   installs QEMU, Nix and Virby (./install.sh), builds the guest (`virby guest build`),
#   starts the arbiter (`virby run`, in the background here; launchd runs it on macOS),
#   makes sure the VM is stopped, then connects through the forwarder: the connection boots the
#   VM, waits for its sshd and runs `uname -a` in it. Prints the cold-start time, then has Nix
#   build a derivation in the VM (--max-jobs 0: the host cannot build it itself).
# Usage: ./quickstart.sh       (Virby keeps running afterwards; it tells you how to stop it)
set -euo pipefail
cd "$(dirname "$0")"
REPO=$PWD
./install.sh
export PATH="$REPO/.venv/bin:$PATH"

# the builder guest (Debian 13 packages from image/guest.lock.json, Nix 2.26, store on a disk)
GUEST=$(virby guest build --arch x86_64 --variant nix)

export VIRBY_CONFIG=${VIRBY_CONFIG:-${XDG_CONFIG_HOME:-$HOME/.config}/virby/config.json}
if [ ! -f "$VIRBY_CONFIG" ]; then
  mkdir -p "$(dirname "$VIRBY_CONFIG")"
  cat > "$VIRBY_CONFIG" <<JSON
{
  "memory": "512MiB",
  "guest": {"kernel": "$GUEST/vmlinuz", "initrd": "$GUEST/initrd.img"},
  "onDemand": {"enable": true, "pauseAfter": 60, "stopAfter": 600}
}
JSON
  echo "wrote $VIRBY_CONFIG"
fi

if ! virby status >/dev/null 2>&1; then
  state=$(virby env | sed -n "s/^export VIRBY_STATE_DIR=//p" | tr -d "'")
  mkdir -p "$state/logs"
  nohup virby run > "$state/logs/virby-run.out" 2>&1 &
  echo "started the arbiter (pid $!): virby run --config $VIRBY_CONFIG"
  for _ in $(seq 100); do virby status >/dev/null 2>&1 && break; sleep 0.2; done
fi
virby status >/dev/null || { echo "the arbiter did not come up; see: virby logs"; exit 1; }
virby stop --cold >/dev/null   # start from a stopped VM: the connection below boots it

ssh_config=$(virby env | sed -n "s/^export VIRBY_RUNTIME_DIR=//p" | tr -d "'")/ssh_config
virby ssh-config > "$ssh_config"
echo "+ ssh -F $ssh_config virby-vm uname -a     (VM stopped: this connection boots it)"
t0=$(date +%s.%N)
ssh -F "$ssh_config" virby-vm uname -a
t1=$(date +%s.%N)
awk -v a="$t0" -v b="$t1" 'BEGIN { printf "cold start through the forwarder: %.2f s (boot, sshd, login, command)\n", b - a }'
virby status

echo
virby stop >/dev/null   # suspend to disk: the first build's connection restores the VM
image/nix-build-demo.sh "$VIRBY_CONFIG"
echo
echo "Virby keeps running. Try: virby status | virby ssh -- uname -a | virby logs -f"
echo "(export VIRBY_CONFIG=$VIRBY_CONFIG first). Stop it all with: kill \$(cat $(virby env | sed -n "s/^export VIRBY_RUNTIME_DIR=//p" | tr -d "'")/circusd.pid)"
