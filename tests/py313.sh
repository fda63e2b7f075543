#!/usr/bin/env bash
# The unit and integration tiers on Debian 13's Python 3.13 (nixpkgs' python3 on the Mac is 3.13
# too), in a Debian 13 root made with debootstrap and kept in the cache (reused when complete).
# The checkout is copied in (tracked and untracked files, not .venv or build output) and
# install.sh runs inside, as on a fresh Debian 13 machine.
# Usage: tests/py313.sh [pytest args...]     (as root: debootstrap, chroot and mounts need it)
# Env: PY313_ROOT (default ${XDG_CACHE_HOME:-$HOME/.cache}/virby/trixie-root)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ROOT=${PY313_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/virby/trixie-root}
SUITE=trixie
t0=$(date +%s)
stamp() { echo "py313: $1 in $(( $(date +%s) - $2 ))s"; }

if [ "$(id -u)" != 0 ]; then echo "py313.sh needs root (debootstrap, chroot, mounts)" >&2; exit 1; fi
command -v debootstrap >/dev/null || { echo "missing debootstrap (./install.sh installs it)" >&2; exit 1; }

# The mirror is the host's own (never written into this file): the first URI of its apt sources.
mirror() {
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources
  elif [ -f /etc/apt/sources.list ]; then
    awk '$1 == "deb" && $2 !~ /^\[/ {print $2; exit} $1 == "deb" {print $3; exit}' /etc/apt/sources.list
  fi
}
MIRROR=$(mirror)
[ -n "$MIRROR" ] || { echo "py313.sh: no Debian mirror in the host's apt sources" >&2; exit 1; }

MOUNTS=()
cleanup() {
  local i
  for (( i=${#MOUNTS[@]}-1; i>=0; i-- )); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() {  # bind HOST_PATH: the same path inside the root
  mkdir -p "$ROOT$1"
  mount --bind "$1" "$ROOT$1"
  MOUNTS+=("$ROOT$1")
}

# --- 1. the root (cached) ----------------------------------------------------------------------
if [ ! -f "$ROOT/.virby-complete" ]; then
  t=$(date +%s)
  rm -rf "$ROOT"
  mkdir -p "$(dirname "$ROOT")"
  debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv,sudo \
    "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 \
    || { tail -20 "$ROOT.debootstrap.log" >&2; exit 1; }
  touch "$ROOT/.virby-complete"
  stamp "debootstrap $SUITE" "$t"
fi
# Sources from the host's mirror, rewritten on every run (the mirror may change).
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$ROOT/etc/apt/sources.list"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
if [ -f /etc/pip.conf ]; then cp /etc/pip.conf "$ROOT/etc/pip.conf"; fi
# The host's local CAs (a proxy's) too, or pip cannot reach the index from inside.
LOCAL_CAS=()
if [ -d /usr/local/share/ca-certificates ]; then
  mapfile -t LOCAL_CAS < <(find /usr/local/share/ca-certificates -name '*.crt')
fi

# --- 2. the checkout, copied in -----------------------------------------------------------------
SRC=/src/virby
mkdir -p "$ROOT$SRC"
# keep the root's .venv: install.sh reuses it while setup.cfg is unchanged
find "$ROOT$SRC" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard \
  | tar -c --null --ignore-failed-read -T - 2>/dev/null | tar -x -C "$ROOT$SRC"

for p in /proc /sys /dev /dev/pts /tmp; do bind "$p"; done

# --- 3. install.sh and the two tiers inside -----------------------------------------------------
in_root() {
  # A clean environment: the host's venv and paths mean nothing inside.
  chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
    PATH=$SRC/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CI="${CI:-}" PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-60}" \
    ${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} \
    bash -c "cd $SRC && $1" _ "${@:2}"
}
t=$(date +%s)
if [ ${#LOCAL_CAS[@]} -gt 0 ]; then
  cp "${LOCAL_CAS[@]}" "$ROOT/usr/local/share/ca-certificates/"
  in_root 'update-ca-certificates >/dev/null'
fi
in_root ./install.sh >"$ROOT.install.log" 2>&1 || { tail -30 "$ROOT.install.log" >&2; exit 1; }
tail -1 "$ROOT.install.log"
stamp "install.sh" "$t"
in_root 'python --version'
t=$(date +%s)
in_root 'python -m pytest -p no:cacheprovider -ra tests/unit tests/integration "$@"' "$@"
stamp "unit + integration tiers" "$t"
stamp "total" "$t0"
