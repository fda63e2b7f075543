#!/usr/bin/env bash
# Build Virby's Linux test guest from Debian packages only: the Debian cloud kernel plus a gzip
# initramfs with busybox (init, shell, acpid), dropbear (sshd) and the virtio/ACPI modules.
# No disk, no bootloader, no root needed to build or boot. The image holds no keys: the host
# appends them at boot as a second cpio archive (see image/README.md for the guest contract).
#
# Usage: build-test-guest.sh [OUTDIR]
#   OUTDIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/virby/guest (guest-nix with WITH_NIX=1).
#   WITH_NIX=1 also copies the host's Debian nix-bin (and its library closure) into the guest.
# Output: OUTDIR/vmlinuz OUTDIR/initrd.img OUTDIR/stamp (hash of every input). If the stamp
# already matches, the script exits at once. OUTDIR/debs keeps the downloaded packages.
# Progress: on a terminal, one status line per step (spinner, bar where the step can count,
# elapsed time); otherwise (tests, CI, pipes) plain lines, one per step. NO_PROGRESS=1 forces
# plain lines.
# Needs: apt-get (a Debian 12 mirror), dpkg-deb, cpio, gzip, flock; WITH_NIX=1 needs nix-bin.
set -euo pipefail
umask 022  # the modes in the image must not depend on the caller's umask

WITH_NIX=${WITH_NIX:-0}
case $WITH_NIX in
  0) variant=guest ;;
  1) variant=guest-nix ;;
  *) echo "WITH_NIX must be 0 or 1, not '$WITH_NIX'" >&2; exit 2 ;;
esac
OUT=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/virby/$variant}
SELF=$(readlink -f "${BASH_SOURCE[0]}")
t0=$(date +%s.%N)

for tool in apt-get apt-cache dpkg-deb cpio gzip sha256sum flock; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install cpio util-linux)" >&2; exit 1; }
done
if [ "$WITH_NIX" = 1 ] && [ ! -x /usr/bin/nix ]; then
  echo "WITH_NIX=1 needs Debian's nix-bin on the host: apt-get install -y --no-install-recommends nix-bin" >&2
  exit 1
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# --- progress ---------------------------------------------------------------------------------
# The work stays in the foreground (it sets variables, and `set -e` must stop the script); a
# background loop, ended by its pid, redraws the status line. Bars: `tick DONE TOTAL` from the
# work, or the spinner counts files matching a glob (downloads).
if [ -t 1 ] && [ "${TERM:-dumb}" != dumb ] && [ -z "${NO_PROGRESS:-}" ]; then TTY=1; else TTY=0; fi
SPIN_PID='' SPIN_LABEL='' SPIN_T0='' PROGRESS=$OUT/.progress
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
bar() {  # bar DONE TOTAL -> [########------------] 4/10
  awk -v d="$1" -v t="$2" 'BEGIN{ if (t < 1) exit; n = int(20 * d / t); if (n > 20) n = 20
    s = "["; for (i = 0; i < 20; i++) s = s (i < n ? "#" : "-"); printf "%s] %d/%d", s "", d, t }'
}
say() {  # a line of its own, above the status line
  if [ -n "$SPIN_PID" ]; then printf '\r\033[K'; fi
  printf '%s\n' "$*"
}
spin_start() {  # spin_start LABEL [TOTAL [GLOB]]
  spin_stop
  SPIN_LABEL=$1 SPIN_T0=$(now)
  if [ "$TTY" = 0 ]; then echo "$1…"; return 0; fi
  local total=${2:-} glob=${3:-} parent=$$
  rm -f "$PROGRESS"
  (
    exec 9>&-  # not the build lock: only the script holds it
    frames="|/-\\" i=0
    while kill -0 "$parent" 2>/dev/null; do
      done_=
      if [ -n "$glob" ]; then
        done_=$(compgen -G "$glob" | wc -l)
      elif [ -n "$total" ] && [ -s "$PROGRESS" ]; then
        read -r done_ _ < "$PROGRESS" || done_=
      fi
      progress=
      if [ -n "$done_" ]; then progress=" $(bar "$done_" "$total")"; fi
      printf '\r\033[K%s %s%s %ss' "${frames:i++%4:1}" "$SPIN_LABEL" "$progress" "$(elapsed "$SPIN_T0")"
      sleep 0.1
    done
  ) &
  SPIN_PID=$!
}
spin_stop() {  # spin_stop [ok|fail]
  [ -n "$SPIN_PID" ] || return 0
  kill "$SPIN_PID" 2>/dev/null || true
  # (bash may have reaped it already and warns "No record of process": the group silences that)
  { wait "$SPIN_PID" || true; } 2>/dev/null
  SPIN_PID=
  local mark='✓'
  if [ "${1:-ok}" != ok ]; then mark='✗'; fi
  printf '\r\033[K%s %s (%ss)\n' "$mark" "$SPIN_LABEL" "$(elapsed "$SPIN_T0")"
}
tick() { if [ "$TTY" = 1 ]; then echo "$1 $2" > "$PROGRESS"; fi; }
# on any exit: end the spinner first (a failing step is marked), then remove the build dir
W=
cleanup() {
  local rc=$?
  if [ "$rc" = 0 ]; then spin_stop ok; else spin_stop fail; fi
  rm -f "$PROGRESS"
  if [ -n "$W" ]; then rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM  # so cleanup sees a failure
# Two builds into one OUTDIR (parallel test workers) would race: the second waits, then finds
# the stamp up to date.
exec 9>"$OUT/.lock"
flock 9
rm -rf "$OUT"/.build.*  # left by a build that was killed (we hold the lock: nobody else builds)

# --- 1. resolve the inputs -------------------------------------------------------------------
# The kernel package name changes with security updates (linux-image-6.1.0-NN-cloud-amd64), so
# it is resolved through the metapackage. --print-uris names the exact .deb and its sha256
# without downloading anything: that is what the stamp hashes.
resolve() {
  KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  [ -n "$KPKG" ] || return 1
  KVER=${KPKG#linux-image-}
  PKGS="$KPKG busybox-static dropbear-bin libc6 libcrypt1 libtomcrypt1 libtommath1 libgmp10 zlib1g"
  # shellcheck disable=SC2086
  URIS=$(apt-get download --print-uris $PKGS 2>/dev/null) || return 1
  [ "$(printf '%s\n' "$URIS" | grep -c .)" = "$(echo "$PKGS" | wc -w)" ]
}
apt_update() {
  echo "package lists are missing or stale: apt-get update"
  if [ "$(id -u)" != 0 ]; then
    echo "apt-get update needs root: run 'sudo apt-get update' and try again" >&2
    exit 1
  fi
  spin_stop
  apt-get update -qq
  spin_start "resolving packages"
}
if [ "$TTY" = 1 ]; then spin_start "resolving packages"; fi
resolve || { apt_update; resolve; } || { echo "cannot resolve the guest packages" >&2; exit 1; }

nix_inputs() {
  # the host's nix and every library it loads: a host upgrade of any of them rebuilds the guest
  dpkg-query -W -f '${Package} ${Version}\n' nix-bin 2>/dev/null || true
  { echo /usr/bin/nix; nix_libs; } | xargs sha256sum
}
nix_libs() {
  ldd /usr/bin/nix | awk '/=> \//{print $3}'
  for l in libnss_dns.so.2 libnss_files.so.2; do
    [ -e "/lib/x86_64-linux-gnu/$l" ] && echo "/lib/x86_64-linux-gnu/$l"
  done
  return 0
}
stamp() {
  {
    echo "script $(sha256sum < "$SELF" | cut -d' ' -f1)"
    echo "with_nix $WITH_NIX"
    printf '%s\n' "$URIS" | awk '{print $2, $4}' | LC_ALL=C sort
    if [ "$WITH_NIX" = 1 ]; then nix_inputs; fi
  } | sha256sum | cut -d' ' -f1
}
STAMP=$(stamp)
spin_stop

if [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.img" ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$STAMP" ]; then
  echo "guest up to date: $OUT"
  exit 0
fi

# --- 2. download (only the .debs not already in OUTDIR/debs with the right sha256) -------------
echo "kernel package: $KPKG"
D=$OUT/debs
mkdir -p "$D"
wanted=$(printf '%s\n' "$URIS" | awk '{print $2}')
for f in "$D"/*.deb; do
  [ -e "$f" ] || continue
  printf '%s\n' "$wanted" | grep -qxF "$(basename "$f")" || rm -f "$f"
done
missing=$(printf '%s\n' "$URIS" | while read -r _ file _ hash; do
  if [ ! -f "$D/$file" ] || [ "$(sha256sum < "$D/$file" | cut -d' ' -f1)" != "${hash#SHA256:}" ]; then
    rm -f "$D/$file"; echo "$file"
  fi
done)
download() {
  # as root, apt warns that it cannot drop privileges to _apt for a user-owned dir: harmless
  # shellcheck disable=SC2086
  ( cd "$D" && apt-get download $PKGS 2>&1 ) | { grep -v '^W: Download is performed unsandboxed' || true; } |
    if [ "$TTY" = 1 ]; then cat > "$OUT/.apt.log"; else cat; fi
  for file in $(printf '%s\n' "$URIS" | awk '{print $2}'); do [ -f "$D/$file" ] || return 1; done
}
npkgs=$(echo "$PKGS" | wc -w)
if [ -n "$missing" ]; then
  spin_start "downloading $(printf '%s\n' "$missing" | wc -l) of $npkgs packages" "$npkgs" "$D/*.deb"
  # stale package lists make the mirror answer 404: update once and resolve again
  if ! download; then
    if [ -s "$OUT/.apt.log" ]; then say "$(cat "$OUT/.apt.log")"; fi
    apt_update
    spin_start "downloading packages" "$npkgs" "$D/*.deb"
    if ! { resolve && download; }; then echo "apt-get download failed" >&2; exit 1; fi
    STAMP=$(stamp)
  fi
fi
rm -f "$OUT/.apt.log"
spin_stop
t_dl=$(date +%s.%N)

# --- 3. assemble the root tree ------------------------------------------------------------------
W=$(mktemp -d "$OUT/.build.XXXXXX")
X=$W/extract R=$W/root
mkdir -p "$X" "$R"
spin_start "extracting packages" "$npkgs"
n=0
for f in $(printf '%s\n' "$URIS" | awk '{print $2}'); do
  dpkg-deb -x "$D/$f" "$X"
  n=$((n + 1)); tick "$n" "$npkgs"
done
spin_stop
spin_start "assembling the root tree$([ "$WITH_NIX" = 1 ] && echo ' (with Nix)')"
cp "$X/boot/vmlinuz-$KVER" "$W/vmlinuz"

mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc/virby,etc/acpi,proc,sys,dev,run,tmp,var/log,root,home/builder}
mkdir -p "$R"/{lib/x86_64-linux-gnu,lib64,lib/modules}
ln -s ../run "$R/var/run"
chmod 700 "$R/root"
chmod 1777 "$R/tmp"

cp "$X/bin/busybox" "$R/bin/busybox"
for a in $("$R/bin/busybox" --list-full); do
  [ -e "$R/$a" ] || [ -L "$R/$a" ] || ln -s /bin/busybox "$R/$a"
done
cp "$X/usr/sbin/dropbear" "$R/usr/sbin/dropbear"

# Copy what the packaged ld.so resolves for dropbear in the extracted tree, transitively
# (libtomcrypt pulls in libgmp). Every library must come from the tree, never from the host.
XLD=$X/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
copy_closure() {  # copy_closure ROOT_OF_LIBS BINARY...
  local from=$1; shift
  local lp="$from/lib/x86_64-linux-gnu:$from/usr/lib/x86_64-linux-gnu"
  local bin name path
  for bin in "$@"; do
    "$XLD" --library-path "$lp" --list "$bin" | awk '$2 == "=>" {print $1, $3}' |
    while read -r name path; do
      case $path in "$from"/*) ;; *) echo "$bin: $name resolves outside $from ($path)" >&2; exit 1 ;; esac
      case $name in
        /*) mkdir -p "$R$(dirname "$name")"; cp -L "$path" "$R$name" ;;
        *) [ -e "$R/lib/x86_64-linux-gnu/$name" ] || cp -L "$path" "$R/lib/x86_64-linux-gnu/$name" ;;
      esac
    done
  done
}
copy_closure "$X" "$R/usr/sbin/dropbear"
[ -f "$R/lib64/ld-linux-x86-64.so.2" ] || cp -L "$XLD" "$R/lib64/ld-linux-x86-64.so.2"

# The cloud kernel builds virtio as modules. No kmod/depmod in the guest, just insmod in this
# order, which is checked below against each module's depends=.
MODS="drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko drivers/virtio/virtio_pci_modern_dev.ko
 drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci.ko drivers/virtio/virtio_mmio.ko
 net/core/failover.ko drivers/net/net_failover.ko drivers/net/virtio_net.ko
 drivers/char/hw_random/virtio-rng.ko drivers/input/evdev.ko drivers/acpi/button.ko
 net/vmw_vsock/vsock.ko net/vmw_vsock/vmw_vsock_virtio_transport_common.ko
 net/vmw_vsock/vmw_vsock_virtio_transport.ko"
KM=$X/lib/modules/$KVER
: > "$R/etc/modules.order"
for m in $MODS; do
  if [ -f "$KM/kernel/$m" ]; then
    cp "$KM/kernel/$m" "$R/lib/modules/"
    basename "$m" >> "$R/etc/modules.order"
  elif grep -qxF "kernel/$m" "$KM/modules.builtin"; then
    :  # built into this kernel
  else
    echo "kernel $KVER has no module $m" >&2; exit 1
  fi
done
seen=" "
while read -r k; do
  for d in $(grep -a -o 'depends=[A-Za-z0-9_,-]*' "$R/lib/modules/$k" | head -1 | sed 's/^depends=//' | tr ',' ' '); do
    case $seen in *" $d "*) ;; *) echo "module order error: $k needs $d first" >&2; exit 1 ;; esac
  done
  seen="$seen${k%.ko} "
done < "$R/etc/modules.order"

# --- 4. configuration and the guest's scripts ------------------------------------------------------
cat > "$R/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
builder:x:1000:1000:Virby builder:/home/builder:/bin/sh
EOF
printf 'root:x:0:\nbuilder:x:1000:\n' > "$R/etc/group"
# '*': no password can ever match (dropbear -s refuses password logins anyway); not '!' (locked),
# which would refuse public-key logins too
printf 'root:*:19000:0:99999:7:::\nbuilder:*:19000:0:99999:7:::\n' > "$R/etc/shadow"
chmod 600 "$R/etc/shadow"
printf '/bin/sh\n/bin/ash\n' > "$R/etc/shells"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' > "$R/etc/nsswitch.conf"
echo virby-vm > "$R/etc/hostname"
printf '127.0.0.1 localhost\n10.0.2.15 virby-vm\n' > "$R/etc/hosts"

cat > "$R/etc/inittab" <<'EOF'
::sysinit:/etc/rc
::respawn:/sbin/virby-sshd
::respawn:/sbin/virby-agent
::respawn:/bin/busybox acpid -f -a /etc/acpid.conf
::ctrlaltdel:/sbin/poweroff
::shutdown:/bin/echo virby-guest: shutting down
EOF
# busybox acpid: power button (QMP system_powerdown) -> power off. Everything lives in the
# initramfs (no disk to flush), so after a sync the guest powers off at once (-f) instead of
# init's TERM, one-second wait, KILL sequence: the hypervisor is gone ~2 s sooner. The
# action path is relative to /etc/acpi
echo 'PWRF power.sh' > "$R/etc/acpid.conf"
# (-f skips init's ::shutdown line, so the script says it itself: the console contract)
printf '#!/bin/sh\necho "virby-guest: shutting down" > /dev/console\nsync\nexec /sbin/poweroff -f\n' \
  > "$R/etc/acpi/power.sh"

cat > "$R/etc/rc" <<'EOF'
#!/bin/sh
# sysinit: runs to completion before init starts sshd, the agent and acpid.
log() { echo "virby-guest: $*" > /dev/console; }
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
hostname -F /etc/hostname
while read -r m; do insmod "/lib/modules/$m" || log "insmod $m failed"; done < /etc/modules.order

# Keys arrive in a cpio archive the host appends to the initrd: /etc/virby/{ssh_host_ed25519_key,
# authorized_keys,user}. Install authorized_keys for the login user before sshd starts.
V=/etc/virby
user=builder
[ -s $V/user ] && read -r user < $V/user
case $user in ''|*[!a-z0-9_-]*) log "bad user name in $V/user: '$user'"; user=builder ;; esac
chown 1000:1000 /home/builder
entry=$(grep "^$user:" /etc/passwd) || log "no user $user in /etc/passwd"
if [ -n "$entry" ] && [ -s $V/authorized_keys ]; then
  uid=$(echo "$entry" | cut -d: -f3); gid=$(echo "$entry" | cut -d: -f4); home=$(echo "$entry" | cut -d: -f6)
  mkdir -p "$home/.ssh"
  cp $V/authorized_keys "$home/.ssh/authorized_keys"
  chown "$uid:$gid" "$home/.ssh" "$home/.ssh/authorized_keys"
  chmod 700 "$home/.ssh"
  chmod 600 "$home/.ssh/authorized_keys"
else
  log "no $V/authorized_keys: nobody can log in"
fi
[ -f $V/ssh_host_ed25519_key ] && chmod 600 $V/ssh_host_ed25519_key
# single-user Nix store owned by builder (the archive is packed as root)
[ -d /nix ] && chown -R 1000:1000 /nix

ip link set lo up
# QEMU user-mode networking (slirp): guest 10.0.2.15/24, gateway 10.0.2.2
IF=
for n in /sys/class/net/*; do
  case ${n##*/} in lo) ;; *) IF=${n##*/}; break ;; esac
done
if [ -n "$IF" ]; then
  ip addr add 10.0.2.15/24 dev "$IF" && ip link set "$IF" up && ip route add default via 10.0.2.2
else
  log "no network interface"
fi
log "up in $(cut -d' ' -f1 /proc/uptime)s"
EOF

cat > "$R/sbin/virby-sshd" <<'EOF'
#!/bin/sh
# Respawned by init. With virby.noready on the kernel command line sshd never starts (a test
# guest that never becomes ready); without a host key it cannot start: both sleep rather than
# let init respawn a failing command in a tight loop.
K=/etc/virby/ssh_host_ed25519_key
if grep -qw virby.noready /proc/cmdline; then exec sleep 2147483647; fi
if [ ! -s $K ]; then
  echo "virby-guest: no $K, sshd not started" > /dev/console
  exec sleep 2147483647
fi
exec /usr/sbin/dropbear -F -E -s -p 22 -r $K
EOF

cat > "$R/sbin/virby-agent" <<'EOF'
#!/bin/sh
# Line protocol with the host on the second serial port (QEMU's second -serial), lines end in \n.
#   guest -> host: "virby-ready" once sshd listens on :22 (not with virby.noready)
#   host -> guest: "hello"      -> "virby-ready" if sshd listens, else "virby-booting"
#                  "time <epoch[.frac]>" -> sets the clock -> "virby-time-ok" ("virby-error time")
#                  "seed <hex>" -> mixed into /dev/urandom -> "virby-seed-ok" ("virby-error seed")
#                  anything else -> "virby-error unknown"
T=/dev/ttyS1
if ! stty -F $T raw -echo 2>/dev/null; then
  echo "virby-guest: no agent port $T" > /dev/console
  exec sleep 2147483647
fi
exec 0<>$T 1>&0 2>/dev/console
stty raw -echo
listening() {
  grep -qE ': [0-9A-F]+:0016 [0-9A-F]+:0000 0A ' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
if ! grep -qw virby.noready /proc/cmdline; then
  # double fork: init, not this shell (blocked in read), reaps the watcher when it is done
  ( ( until listening; do usleep 50000; done; echo virby-ready ) & )
fi
CR=$(printf '\r')
while IFS= read -r line; do
  line=${line%"$CR"}
  case $line in
    hello) if listening; then echo virby-ready; else echo virby-booting; fi ;;
    "time "*)
      t=${line#time }; t=${t%%.*}
      case $t in
        ''|*[!0-9]*) echo "virby-error time" ;;
        *) if date -s "@$t" >/dev/null 2>&1; then echo virby-time-ok; else echo "virby-error time"; fi ;;
      esac ;;
    # virby-suspend (issue 14): host entropy for a guest restored from a snapshot. Any write to
    # /dev/urandom is mixed into the input pool (the text carries the seed's bits as well as
    # the bytes would); it reaches the CRNG at the kernel's next reseed.
    "seed "*)
      s=${line#seed }
      case $s in
        ''|*[!0-9a-f]*) echo "virby-error seed" ;;
        *) if printf %s "$s" > /dev/urandom; then echo virby-seed-ok; else echo "virby-error seed"; fi ;;
      esac ;;
    *) echo "virby-error unknown" ;;
  esac
done
EOF
chmod 755 "$R/etc/rc" "$R/etc/acpi/power.sh" "$R/sbin/virby-sshd" "$R/sbin/virby-agent"

# --- 4b. optional Nix (the guest as a remote builder: ssh-ng runs `nix-daemon --stdio`, ssh://
#     runs `nix-store --serve --write`, both as builder from dropbear's PATH /usr/bin:/bin) ------
if [ "$WITH_NIX" = 1 ]; then
  cp /usr/bin/nix "$R/usr/bin/nix"
  for l in nix-build nix-channel nix-collect-garbage nix-copy-closure nix-daemon nix-env nix-hash \
           nix-instantiate nix-prefetch-url nix-shell nix-store; do ln -s nix "$R/usr/bin/$l"; done
  mkdir -p "$R/usr/libexec/nix"
  ln -s ../../bin/nix "$R/usr/libexec/nix/build-remote"
  # the host's library closure; the packaged libc (already in the tree) wins
  nix_libs | while read -r lib; do
    mkdir -p "$R$(dirname "$lib")"
    [ -e "$R$lib" ] || [ -e "$R/lib/x86_64-linux-gnu/$(basename "$lib")" ] || cp -L "$lib" "$R$lib"
  done
  mkdir -p "$R/etc/nix" "$R/nix/store" "$R/nix/var/nix"
  # single-user store owned by builder (chown at boot in /etc/rc), no nixbld group, no binary
  # cache (no network); no sandbox: rootfs cannot be pivot_root'ed ("cannot pivot old root")
  cat > "$R/etc/nix/nix.conf" <<'EOF'
build-users-group =
substituters =
trusted-users = root builder
sandbox = false
experimental-features = nix-command
EOF
fi

# sanity, without chroot: every library resolves inside the tree, and the binaries run
# (every library dir in the tree: nix's RUNPATH /usr/lib/nix would otherwise find the host's)
RLP=$(find "$R" -name '*.so*' -type f -printf '%h\n' | LC_ALL=C sort -u | paste -sd:)
check_bins="$R/usr/sbin/dropbear"
[ "$WITH_NIX" = 1 ] && check_bins="$check_bins $R/usr/bin/nix"
for bin in $check_bins; do
  bad=$("$R/lib64/ld-linux-x86-64.so.2" --library-path "$RLP" --list "$bin" |
        awk -v r="$R/" '/not found/ || ($2 == "=>" && index($3, r) != 1)') || true
  [ -z "$bad" ] || { echo "$bin: libraries missing from the image: $bad" >&2; exit 1; }
done
v=$("$R/lib64/ld-linux-x86-64.so.2" --library-path "$RLP" "$R/usr/sbin/dropbear" -V 2>&1 | head -1)
say "$v"
if [ "$WITH_NIX" = 1 ]; then
  v=$("$R/lib64/ld-linux-x86-64.so.2" --library-path "$RLP" "$R/usr/bin/nix" --version)
  say "$v"
fi
spin_stop

# --- 5. pack: sorted names, fixed mtimes and inode numbers, gzip -n: same inputs, same bytes --
spin_start "packing initramfs"
ln -s /bin/busybox "$R/init"  # the kernel runs /init = busybox init, which reads /etc/inittab
find "$R" -exec touch -h -d @0 {} +
( cd "$R" && find . -print0 | LC_ALL=C sort -z |
  cpio --null -o -H newc -R 0:0 --reproducible --quiet ) | gzip -6 -n > "$W/initrd.img"
spin_stop

# replace atomically; the stamp goes last, so an interrupted build is redone next time
rm -f "$OUT/stamp"
mv -f "$W/vmlinuz" "$OUT/vmlinuz"
mv -f "$W/initrd.img" "$OUT/initrd.img"
echo "$STAMP" > "$W/stamp"
mv -f "$W/stamp" "$OUT/stamp"
t1=$(date +%s.%N)
awk -v a="$t0" -v b="$t_dl" -v c="$t1" 'BEGIN{printf "built in %.1fs (download %.1fs)\n", c-a, b-a}'
echo "guest: $OUT (vmlinuz $(stat -c %s "$OUT/vmlinuz") bytes, initrd.img $(stat -c %s "$OUT/initrd.img") bytes)"
