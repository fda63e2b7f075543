#!/usr/bin/env bash
# Build a tiny derivation in Virby's VM with the host's Nix, and say where it ran and how long it took.
#
# Usage: image/nix-build-demo.sh CONFIG
#   CONFIG is the config file of a running Virby (`virby run --config CONFIG`) whose guest has
#   Nix inside (`virby guest build --variant nix`). The VM may be stopped: the first build's
#   SSH connection boots it. Two builds run, each of a fresh derivation (a nonce), so neither is
#   ever already in /nix/store; `--max-jobs 0` forbids building on the host.
# Prints, for each build: its wall time, the VM state before it, and the hostname and kernel it
#   saw. Exits 1 if a build failed or did not run in the VM.
# Host Nix settings come from the environment only: NIX_CONFIG (if you did not set one, no
#   nixbld group, no binary cache), NIX_SSHOPTS=-F <the `virby ssh-config` block, absolute path>.
# Needs: nix-build (Debian's nix-bin 2.8 is enough), python3, and `virby` on PATH, or
#   VIRBY="python3 -m virby.supervisor.cli".
set -euo pipefail

if [ $# != 1 ] || [ ! -f "$1" ]; then
  sed -n '4,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
CONFIG=$(readlink -f "$1")
read -r -a VIRBY <<< "${VIRBY:-virby}"
vb() { "${VIRBY[@]}" "$@" --config "$CONFIG"; }
command -v nix-build >/dev/null || { echo "no nix-build: apt-get install -y --no-install-recommends nix-bin" >&2; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/virby-demo.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

status_json() { vb status --json; }
field() {  # field JSON EXPR: a value of `virby status --json`, e.g. field "$st" "['vm']['boots']"
  python3 -c "import json, sys; print(json.loads(sys.argv[1])$2)" "$1"
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }

st=$(status_json) || exit 1  # virby prints why (not running, bad config)

# Nix runs ssh from its own working directory: every path it is handed must be absolute.
vb ssh-config > "$TMP/ssh_config"
export NIX_SSHOPTS="-F $TMP/ssh_config"
export NIX_CONFIG="${NIX_CONFIG-$'build-users-group =\nsubstituters =\nexperimental-features = nix-command'}"
builders=$(vb nix-machines)

cat > "$TMP/where.nix" <<'EOF'
{ nonce }:
derivation {
  name = "virby-where-${builtins.substring 0 8 nonce}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  inherit nonce;
  args = [ "-c" ''
    read -r h < /proc/sys/kernel/hostname
    read -r k < /proc/sys/kernel/osrelease
    echo "$h $k" > "$out"
  '' ];
}
EOF

echo "Virby:    $CONFIG (VM $(field "$st" "['vm']['state']"), $(field "$st" "['vm']['boots']") boots so far)"
echo "builders: ${builders%% *} (virby nix-machines)"
echo "host:     $(hostname) (kernel $(uname -r))"
failed=0
for n in 1 2; do
  before=$(field "$(status_json)" "['vm']['state']")
  nonce=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  t0=$(now)
  if out=$(nix-build "$TMP/where.nix" --argstr nonce "$nonce" --no-out-link \
             --max-jobs 0 --builders "$builders" 2>"$TMP/build.log"); then
    took=$(since "$t0")
    read -r h k < "$out"
    boots=$(field "$(status_json)" "['vm']['boots']")
    printf 'build %s: %ss with the VM %s before -> ran on %s (kernel %s); VM boots %s\n' \
      "$n" "$took" "$before" "$h" "$k" "$boots"
    [ "$h" = virby-vm ] || { echo "  that is not the VM" >&2; failed=1; }
    nix-store --delete "$out" "$(nix-store --query --deriver "$out")" >/dev/null 2>&1 || true
  else
    echo "build $n: FAILED after $(since "$t0")s with the VM $before before; nix-build said:" >&2
    sed 's/^/  /' "$TMP/build.log" | tail -n 25 >&2
    echo "(docs/nix-builds.md explains Nix's messages; 'virby logs vm' shows Virby's side)" >&2
    exit 1
  fi
done
exit "$failed"
