# Sourced by /etc/rc. x86_64-linux through Rosetta: when the host shares its `rosetta` virtiofs
# tag (vfkit --device rosetta), x86_64 ELF binaries run through the share's `rosetta` binary.
# The flags: F opens the interpreter now, so it also works in other mount namespaces (Nix's
# sandbox) and after the share changes; C takes credentials from the binary (Apple's
# documented `update-binfmts --credentials yes --fix-binary yes`). The magic is the ELF header
# of an x86_64 executable or shared object (ELFCLASS64, little endian, e_machine 0x3e);
# tests/unit/test_rosetta.py parses this line the way the kernel does.
# A test stand-in interpreter may already sit at /mnt/rosetta/rosetta (appended to the initrd).
mkdir -p /mnt/rosetta
if mount -t virtiofs -o ro rosetta /mnt/rosetta 2>/dev/null || [ -x /mnt/rosetta/rosetta ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null
  if printf '%s' ':rosetta:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00:\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/mnt/rosetta/rosetta:CF' \
      > /proc/sys/fs/binfmt_misc/register; then
    # the builder now serves x86_64-linux too (the host lists it in its machines line)
    [ -f /etc/nix/nix.conf ] && echo 'extra-platforms = x86_64-linux' >> /etc/nix/nix.conf
    log "rosetta: x86_64 binaries run through /mnt/rosetta/rosetta"
  else
    log "rosetta: binfmt_misc registration failed"
  fi
fi
