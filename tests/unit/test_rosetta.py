"""The guest's Rosetta registration (image/guest/common/etc/rc.d/rosetta.sh), read the way the
kernel's binfmt_misc reads `register`: it must match x86_64 ELF executables and shared objects,
and nothing the aarch64 guest runs natively."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from testing.harness import REPO

HOOK = REPO / "image" / "guest" / "common" / "etc" / "rc.d" / "rosetta.sh"

EM_X86_64, EM_AARCH64, EM_386 = 0x3E, 0xB7, 0x03
ET_EXEC, ET_DYN, ET_REL = 2, 3, 1


@dataclass(frozen=True)
class Registration:
    name: str
    kind: str
    offset: int
    magic: bytes
    mask: bytes
    interpreter: str
    flags: str

    def matches(self, header: bytes) -> bool:
        window = header[self.offset:self.offset + len(self.magic)]
        return len(window) == len(self.magic) and all(
            (b & m) == (g & m) for b, m, g in zip(window, self.mask, self.magic, strict=True))


def _unescape(field: str) -> bytes:
    # binfmt_misc turns \xHH into a byte (and leaves other characters as they are)
    return re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), field.encode())


def registration_line() -> str:
    m = re.search(r"printf '%s' '([^']*)'", HOOK.read_text())
    assert m, f"no registration line in {HOOK}"
    return m.group(1)


def parse(line: str) -> Registration:
    sep = line[0]  # the first character is the separator
    fields = line[1:].split(sep)
    assert len(fields) == 7, fields
    name, kind, offset, magic, mask, interpreter, flags = fields
    return Registration(name, kind, int(offset or 0), _unescape(magic), _unescape(mask), interpreter, flags)


def elf_header(machine: int, etype: int = ET_EXEC, *, klass: int = 2, osabi: int = 0) -> bytes:
    ident = b"\x7fELF" + bytes([klass, 1, 1, osabi]) + bytes(8)
    return ident + struct.pack("<HHI", etype, machine, 1) + bytes(44)


def test_the_line_is_the_documented_rosetta_registration() -> None:
    assert registration_line() == (
        r":rosetta:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00"
        r":\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
        r":/mnt/rosetta/rosetta:CF")


def test_it_parses_as_binfmt_misc_does() -> None:
    r = parse(registration_line())
    assert (r.name, r.kind, r.offset) == ("rosetta", "M", 0)
    assert len(r.magic) == len(r.mask) == 20  # the kernel refuses a mask of another length
    assert r.interpreter == "/mnt/rosetta/rosetta"
    # F: the interpreter is opened at registration, so builds in Nix's sandbox find it too
    assert "F" in r.flags and set(r.flags) <= set("POCF")


def test_x86_64_executables_and_shared_objects_go_to_rosetta() -> None:
    r = parse(registration_line())
    assert r.matches(elf_header(EM_X86_64, ET_EXEC))
    assert r.matches(elf_header(EM_X86_64, ET_DYN))  # PIE executables and ld.so
    assert r.matches(elf_header(EM_X86_64, ET_EXEC, osabi=3))  # ELFOSABI_GNU (Linux)


def test_native_and_other_binaries_do_not() -> None:
    r = parse(registration_line())
    assert not r.matches(elf_header(EM_AARCH64))  # the guest's own binaries
    assert not r.matches(elf_header(EM_386, klass=1))  # 32-bit x86: Rosetta does not run it
    assert not r.matches(elf_header(EM_X86_64, ET_REL))  # an object file is not run
    assert not r.matches(b"#!/bin/sh\n" + bytes(20))


def test_a_real_x86_64_binary_matches_when_the_host_has_one() -> None:
    with open("/bin/sh", "rb") as f:
        header = f.read(64)
    host_x86_64 = header[:4] == b"\x7fELF" and struct.unpack_from("<H", header, 18)[0] == EM_X86_64
    assert parse(registration_line()).matches(header) == host_x86_64
