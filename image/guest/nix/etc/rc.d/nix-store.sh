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
# single-user store owned by builder (a new filesystem, or the RAM store, starts as root's)
mkdir -p /nix/store /nix/var/nix
chown 1000:1000 /nix /nix/store /nix/var /nix/var/nix
