# Sourced by /etc/rc. The Nix store lives on the first virtio disk (/dev/vda, the host's
# <stateDir>/disk.raw) so builds survive a cold boot: formatted ext4 on first boot (only when
# its first 64 KiB are all zero: a disk nobody wrote), grown with resize2fs when the host grew
# the file. Anything else on the disk is left alone. Without a disk the store is in RAM.
D=/dev/vda
ext_magic() { [ "$(dd if=$D bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 53ef ]; }
blank() { [ "$(dd if=$D bs=65536 count=1 2>/dev/null | tr -d '\000' | wc -c)" = 0 ]; }
mkdir -p /nix
if [ -b $D ]; then
  if ! ext_magic; then
    if blank; then
      log "formatting $D for the Nix store (first boot)"
      mkfs.ext4 -q -F -L virby-nix -m 0 -E lazy_itable_init=1,lazy_journal_init=1 $D ||
        log "mkfs.ext4 $D failed"
    else
      log "$D holds something that is not ext4: not touching it"
    fi
  fi
  if ext_magic && mount -t ext4 -o noatime $D /nix; then
    before=$(df -k /nix | awk 'NR==2 {print $2}')
    resize2fs $D >/dev/null 2>&1 || log "resize2fs $D failed"
    after=$(df -k /nix | awk 'NR==2 {print $2}')
    [ "$before" = "$after" ] || log "grew the Nix store from ${before}k to ${after}k"
  else
    log "cannot mount $D: the Nix store is in RAM"
  fi
else
  log "no $D: the Nix store is in RAM"
fi
# Multi-user store: root owns it (a disk from the single-user guest had it owned by builder:
# taken back here, so the login user's Nix joins the daemon instead of opening it directly),
# builds run as the nixbld users, one per build at a time: twice the CPUs, at least 32.
mkdir -p /nix/store /nix/var/nix /var/empty
n=$(grep -c '^processor' /proc/cpuinfo)
n=$((n * 2)); [ "$n" -ge 32 ] || n=32
i=1 members=
while [ $i -le $n ]; do
  echo "nixbld$i:x:$((30000 + i)):30000:Nix build user $i:/var/empty:/bin/false" >> /etc/passwd
  echo "nixbld$i:*:19000:0:99999:7:::" >> /etc/shadow
  members="$members${members:+,}nixbld$i"
  i=$((i + 1))
done
echo "nixbld:x:30000:$members" >> /etc/group
chown 0:0 /nix /nix/var /nix/var/nix
chown 0:30000 /nix/store && chmod 1775 /nix/store
# the host's settings for this guest's Nix (caches, keys, min-free…): readable by every user's
# Nix, unlike the rest of /etc/virby
[ -f $V/nix.conf ] && cp $V/nix.conf /etc/nix/virby.conf
# the login user (/etc/virby/user) may import paths and set build options: Nix trusts it
[ "$user" = builder ] || echo "extra-trusted-users = $user" >> /etc/nix/nix.conf
