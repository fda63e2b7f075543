"""Virby's configuration: one JSON document (TOML for hand-written files), validated at load.

Every key is checked when the file is read. A bad value raises `ConfigError` naming the key,
the value and what was expected; unknown keys are errors too. The CLI turns that into exit
status 2 before anything starts. Files the VM needs (kernel, initrd, hypervisor) are *not*
checked here: the arbiter must run before a guest exists, so the vm worker checks them when a
boot is asked for and reports a missing one as a failed VM state.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import re
import sys
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from virby.core.protocol import ENDPOINTS

DEFAULT_PORT = 31222
# macOS limits unix socket paths to 104 bytes; the longest name Virby binds in the runtime dir
# is one of the bus endpoints (the hypervisors' qmp.sock, agent.sock and vfkit.rest are shorter).
LONGEST_SOCKET_NAME = max((f"/{e}.sock" for e in ENDPOINTS), key=len)
UNIX_PATH_MAX = 104


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the key, the value and the rule."""


@dataclass(frozen=True)
class OnDemand:
    enable: bool = True
    pauseAfter: float | None = 60.0  # seconds without a connection before pausing
    stopAfter: float | None = 600.0  # seconds without a connection before stopping


@dataclass(frozen=True)
class Guest:
    kernel: str
    initrd: str
    cmdline: str
    disk: str | None = None


@dataclass(frozen=True)
class Config:
    backend: str
    port: int
    cores: int
    memory: int  # MiB
    diskSize: int  # bytes
    onDemand: OnDemand
    stateDir: str
    runtimeDir: str
    guest: Guest
    sshUser: str
    rosetta: bool
    nestedVirtualization: bool
    sharedDirectories: dict[str, str]
    debug: bool
    readyTimeout: float
    accel: str
    hypervisor: str
    arch: str  # the guest's: "x86_64" or "aarch64"
    name: str = "virby-vm"  # the builder's ssh Host alias (one per builder when several run)
    # QEMU only: "standard" (a serial console, the agent on a socket-backed virtio console, a
    # fixed address) or "vfkit" (the devices vfkit gives the guest, so the Mac's contract runs
    # under QEMU: console on hvc0, the agent on a pty-backed hvc1, DHCP, virtio-fs shares).
    qemuDevices: str = "standard"
    # The guest's Nix: binary caches it substitutes from, and the keys it trusts (written into
    # its nix.conf at every boot: workers/guestconf.py). No cache unless one is named.
    substituters: tuple[str, ...] = ()
    trustedPublicKeys: tuple[str, ...] = ()
    # "nat": the guest reaches the network (substitutes, fixed-output fetches); "none": nothing
    # but Virby's ssh forward reaches it and it reaches nothing (QEMU's restrict=on).
    guestNetwork: str = "nat"
    source: str | None = field(default=None, compare=False)

    # Paths derived from the two directories; every process computes them the same way.
    def runtime(self, name: str) -> str:
        return os.path.join(self.runtimeDir, name)

    def state(self, *parts: str) -> str:
        return os.path.join(self.stateDir, *parts)

    @property
    def log_dir(self) -> str:
        return self.state("logs")

    def endpoint(self, name: str) -> str:
        """A ZeroMQ ipc endpoint in the runtime dir (`ctl`, `events`, `vm.pub`, ...)."""
        return "ipc://" + self.runtime(name + ".sock")

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("source")
        return json.dumps(data, sort_keys=True)


def default_platform_backend() -> str:
    return "vfkit" if sys.platform == "darwin" else "qemu"


def _xdg(var: str, fallback: str) -> str:
    value = os.environ.get(var)
    return value if value and os.path.isabs(value) else os.path.expanduser(fallback)


def default_state_dir() -> str:
    if sys.platform == "darwin":
        return "/var/lib/virby"
    return os.path.join(_xdg("XDG_STATE_HOME", "~/.local/state"), "virby")


def default_runtime_dir(state_dir: str | None = None) -> str:
    if sys.platform == "darwin":
        # /var/run is emptied at boot and root-only: keep sockets under the state dir.
        return os.path.join(state_dir or default_state_dir(), "run")
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base) and os.path.isdir(base):
        return os.path.join(base, "virby")
    return f"/tmp/virby-{os.getuid()}"


def default_guest_dir(arch: str | None = None) -> str:
    """Where `virby guest build` puts the builder guest (the `nix` variant, of `arch`: the
    config's, else this host's)."""
    arch = arch or ("aarch64" if platform.machine().lower() in ("arm64", "aarch64") else "x86_64")
    return os.path.join(_xdg("XDG_CACHE_HOME", "~/.cache"), "virby", "guests", f"{arch}-nix")


DEFAULT_CMDLINES = {
    "qemu": "console=ttyS0 quiet panic=-1",
    "vfkit": "console=hvc0 quiet panic=-1 virby.net=dhcp",  # virtio console; NAT hands out addresses
}
# qemu -M virt's first serial port is a PL011 (built into arm64 kernels, so early messages show)
QEMU_AARCH64_CMDLINE = "console=ttyAMA0 quiet panic=-1"
ARCHES = ("x86_64", "aarch64")


def host_arch() -> str:
    """The host's CPU as Nix and QEMU spell it (macOS says arm64, Debian amd64)."""
    machine = os.uname().machine
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine)


QEMU_DEVICE_LAYOUTS = ("standard", "vfkit")


def default_cmdline(backend: str, arch: str, qemu_devices: str = "standard") -> str:
    if backend == "qemu" and qemu_devices == "vfkit":
        return DEFAULT_CMDLINES["vfkit"]
    if backend == "qemu" and arch == "aarch64":
        return QEMU_AARCH64_CMDLINE
    return DEFAULT_CMDLINES[backend]

_TOP_KEYS = {
    "backend", "port", "cores", "memory", "diskSize", "onDemand", "stateDir", "runtimeDir",
    "guest", "sshUser", "rosetta", "nestedVirtualization", "sharedDirectories", "debug",
    "readyTimeout", "accel", "hypervisor", "arch", "name", "qemuDevices", "substituters",
    "trustedPublicKeys", "guestNetwork",
}
_ON_DEMAND_KEYS = {"enable", "pauseAfter", "stopAfter"}
_GUEST_KEYS = {"kernel", "initrd", "cmdline", "disk"}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_HOST_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,35}$")


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config key '{key}': got {json.dumps(value, default=str)}, expected {expected}")


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, value, "true or false")
    return value


def _int(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, value, f"a whole number from {lo} to {hi}")
    if not lo <= value <= hi:
        raise _fail(key, value, f"a whole number from {lo} to {hi}")
    return value


def _seconds(key: str, value: Any, *, nullable: bool, lo: float = 0.0) -> float | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        what = "a number of seconds" + (" or null to disable" if nullable else "")
        raise _fail(key, value, what)
    if value <= lo or value > 365 * 86400:
        raise _fail(key, value, f"more than {lo:g} seconds and at most a year")
    return float(value)


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(key, value, "a non-empty string")
    return value


def _abs_path(key: str, value: Any, base: str | None) -> str:
    text = _str(key, value)
    if "\0" in text:
        raise _fail(key, value, "a path without NUL bytes")
    path = os.path.expanduser(text)
    if not os.path.isabs(path):
        if base is None:
            raise _fail(key, value, "an absolute path")
        path = os.path.join(base, path)
    return os.path.normpath(path)


def parse_size(key: str, value: Any, *, default_unit: str) -> int:
    """Bytes from 4096, "6GiB", "512M", "1.5 GiB" (whole numbers use `default_unit`)."""
    if isinstance(value, bool):
        raise _fail(key, value, 'a size such as 6144 or "6GiB"')
    if isinstance(value, int):
        return value * _SIZE_UNITS[default_unit]
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            unit = m.group(2).lower() or default_unit
            return int(float(m.group(1)) * _SIZE_UNITS[unit])
    raise _fail(key, value, 'a size such as 6144 or "6GiB" (units B, K, M, G, T, KiB, MiB, GiB, TiB)')


def _check_keys(where: str, data: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _fail(where or "(top level)", data, "an object of keys")
    for key in data:
        if key not in allowed:
            name = f"{where}.{key}" if where else key
            raise ConfigError(
                f"config key '{name}': unknown key (known: {', '.join(sorted(allowed))})"
            )
    return data


def _on_demand(raw: Any) -> OnDemand:
    data = _check_keys("onDemand", raw, _ON_DEMAND_KEYS)
    d = OnDemand()
    enable = _bool("onDemand.enable", data.get("enable", d.enable))
    pause = _seconds("onDemand.pauseAfter", data.get("pauseAfter", d.pauseAfter), nullable=True)
    stop = _seconds("onDemand.stopAfter", data.get("stopAfter", d.stopAfter), nullable=True)
    if pause is not None and stop is not None and stop <= pause:
        raise _fail("onDemand.stopAfter", data.get("stopAfter", stop),
                    f"more than onDemand.pauseAfter ({pause:g}) or null")
    return OnDemand(enable=enable, pauseAfter=pause, stopAfter=stop)


def _guest(raw: Any, base: str | None, backend: str, arch: str, qemu_devices: str) -> Guest:
    data = _check_keys("guest", raw, _GUEST_KEYS)
    gdir = default_guest_dir(arch)
    kernel = _abs_path("guest.kernel", data.get("kernel", os.path.join(gdir, "vmlinuz")), base)
    initrd = _abs_path("guest.initrd", data.get("initrd", os.path.join(gdir, "initrd.img")), base)
    cmdline = data.get("cmdline", default_cmdline(backend, arch, qemu_devices))
    if not isinstance(cmdline, str) or "\n" in cmdline or len(cmdline) > 2048:
        raise _fail("guest.cmdline", cmdline, "one line of kernel arguments (at most 2048 characters)")
    disk = data.get("disk")
    disk = None if disk is None else _abs_path("guest.disk", disk, base)
    return Guest(kernel=kernel, initrd=initrd, cmdline=cmdline, disk=disk)


def _shared_dirs(raw: Any, base: str | None) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise _fail("sharedDirectories", raw, "an object of tag -> absolute host path")
    out: dict[str, str] = {}
    for tag, path in raw.items():
        if not _TAG_RE.match(tag):
            raise _fail(f"sharedDirectories.{tag}", tag,
                        "a tag of letters, digits, '_', '.', '-' (at most 36 characters)")
        out[tag] = _abs_path(f"sharedDirectories.{tag}", path, base)
    return out


_SUBSTITUTER_RE = re.compile(r"^(https?|file|s3|ssh|ssh-ng)://[^\s\"']+$")
_PUBLIC_KEY_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*(-[0-9]+)?):([A-Za-z0-9+/]{43}=)$")


def _substituters(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise _fail("substituters", raw, 'a list of binary cache URLs such as ["https://cache.example.org"]')
    for i, url in enumerate(raw):
        if not isinstance(url, str) or not _SUBSTITUTER_RE.match(url):
            raise _fail(f"substituters[{i}]", url, "a binary cache URL (http://, https://, file://, "
                        "s3://, ssh:// or ssh-ng://, no spaces or quotes)")
    return tuple(raw)


def _public_keys(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise _fail("trustedPublicKeys", raw, 'a list of keys such as ["cache.example.org-1:<base64>"]')
    for i, key in enumerate(raw):
        m = _PUBLIC_KEY_RE.match(key) if isinstance(key, str) else None
        if m is None or len(base64.b64decode(m.group(3))) != 32:
            raise _fail(f"trustedPublicKeys[{i}]", key, "a Nix signing key NAME:BASE64 (an ed25519 "
                        "public key, as nix-store --generate-binary-cache-key writes it)")
    return tuple(raw)


def from_dict(data: Any, *, source: str | None = None) -> Config:
    """Validate a parsed document. Relative paths are resolved against the file's folder."""
    data = _check_keys("", data, _TOP_KEYS)
    base = os.path.dirname(os.path.abspath(source)) if source else None

    backend = data.get("backend", default_platform_backend())
    if backend not in ("qemu", "vfkit"):
        raise _fail("backend", backend, '"qemu" or "vfkit"')
    port = _int("port", data.get("port", DEFAULT_PORT), 1024, 65535)
    cores = _int("cores", data.get("cores", 1), 1, 256)
    memory = parse_size("memory", data.get("memory", 512), default_unit="mib") // (1 << 20)
    if not 128 <= memory <= 1 << 20:
        raise _fail("memory", data.get("memory"), "from 128 MiB to 1 TiB")
    disk_size = parse_size("diskSize", data.get("diskSize", "20GiB"), default_unit="b")
    if not 1 << 30 <= disk_size <= 1 << 44:
        raise _fail("diskSize", data.get("diskSize"), "from 1GiB to 16TiB")

    state_dir = _abs_path("stateDir", data.get("stateDir", default_state_dir()), base)
    runtime_dir = _abs_path("runtimeDir", data.get("runtimeDir", default_runtime_dir(state_dir)), base)
    if len(runtime_dir) + len(LONGEST_SOCKET_NAME) >= UNIX_PATH_MAX:
        raise _fail("runtimeDir", runtime_dir,
                    f"a path shorter than {UNIX_PATH_MAX - len(LONGEST_SOCKET_NAME)} characters "
                    "(unix socket paths are limited to 104 bytes on macOS)")

    ssh_user = data.get("sshUser", "builder")
    if not isinstance(ssh_user, str) or not _USER_RE.match(ssh_user):
        raise _fail("sshUser", ssh_user, "a user name such as \"builder\"")
    ready_timeout = _seconds("readyTimeout", data.get("readyTimeout", 60), nullable=False)
    assert ready_timeout is not None

    accel = data.get("accel", "auto")
    if accel not in ("auto", "kvm", "tcg", "hvf"):
        raise _fail("accel", accel, '"auto", "kvm", "tcg" or "hvf"')
    arch = data.get("arch", host_arch())
    if arch not in ARCHES:
        raise _fail("arch", arch, '"x86_64" or "aarch64" (the guest\'s CPU)')
    default_hv = "vfkit" if backend == "vfkit" else f"qemu-system-{arch}"
    hypervisor = _str("hypervisor", data.get("hypervisor", default_hv))
    name = data.get("name", "virby-vm")
    if not isinstance(name, str) or not _HOST_ALIAS_RE.match(name):
        raise _fail("name", name, 'an ssh Host alias of letters, digits, "." and "-", such as "virby-arm"')
    qemu_devices = data.get("qemuDevices", "standard")
    if qemu_devices not in QEMU_DEVICE_LAYOUTS:
        raise _fail("qemuDevices", qemu_devices, '"standard" or "vfkit"')
    if qemu_devices != "standard" and backend != "qemu":
        raise _fail("qemuDevices", qemu_devices, '"standard" with the vfkit backend (it is QEMU\'s '
                    "choice of devices; vfkit always gives its own)")
    guest_network = data.get("guestNetwork", "nat")
    if guest_network not in ("nat", "none"):
        raise _fail("guestNetwork", guest_network, '"nat" or "none"')
    if guest_network == "none" and backend != "qemu":
        raise _fail("guestNetwork", guest_network, '"nat" with the vfkit backend (its NAT cannot be '
                    "restricted)")

    return Config(
        backend=backend,
        port=port,
        cores=cores,
        memory=memory,
        diskSize=disk_size,
        onDemand=_on_demand(data.get("onDemand", {})),
        stateDir=state_dir,
        runtimeDir=runtime_dir,
        guest=_guest(data.get("guest", {}), base, backend, arch, qemu_devices),
        sshUser=ssh_user,
        rosetta=_bool("rosetta", data.get("rosetta", False)),
        nestedVirtualization=_bool("nestedVirtualization", data.get("nestedVirtualization", False)),
        sharedDirectories=_shared_dirs(data.get("sharedDirectories", {}), base),
        debug=_bool("debug", data.get("debug", False)),
        readyTimeout=ready_timeout,
        accel=accel,
        hypervisor=hypervisor,
        arch=arch,
        name=name,
        qemuDevices=qemu_devices,
        substituters=_substituters(data.get("substituters", [])),
        trustedPublicKeys=_public_keys(data.get("trustedPublicKeys", [])),
        guestNetwork=guest_network,
        source=source,
    )


def load(path: str | Path | None) -> Config:
    """Load and validate the config file at `path`; no file means all defaults."""
    if path is None:
        return from_dict({})
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from e
    try:
        data = tomllib.loads(raw.decode("utf-8")) if path.endswith(".toml") else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        kind = "TOML" if path.endswith(".toml") else "JSON"
        raise ConfigError(f"config file {path}: not valid {kind}: {e}") from e
    return from_dict(data, source=os.path.abspath(path))


def load_builders(path: str | Path) -> list[Config]:
    """Several builders side by side: a directory with one config file per builder (`*.json`,
    `*.toml`, in name order), each run by its own `virby run`; or one file, one builder. They
    must not share a port, an ssh alias or a directory: that would be one builder twice."""
    path = str(path)
    if not os.path.isdir(path):
        return [load(path)]
    files = sorted(f for f in os.listdir(path) if f.endswith((".json", ".toml")))
    if not files:
        raise ConfigError(f"config directory {path}: no builder config (*.json or *.toml) in it")
    configs = [load(os.path.join(path, f)) for f in files]
    for key in ("name", "port", "stateDir", "runtimeDir"):
        seen: dict[object, str] = {}
        for c in configs:
            value = getattr(c, key)
            if value in seen:
                raise ConfigError(f"config key '{key}': {json.dumps(value)} in both {seen[value]} and "
                                  f"{c.source}; each builder needs its own")
            seen[value] = str(c.source)
    return configs


ENV_VAR = "VIRBY_CONFIG"
# Keys the running arbiter is built from (its listening port, the dirs of its sockets, state and
# logs, the builder's name): a reload cannot change them, only a new `virby run`.
ARBITER_KEYS = ("port", "stateDir", "runtimeDir", "name")


def load_for_worker() -> Config:
    """Workers get the config path from the environment circusd hands them."""
    return load(os.environ.get(ENV_VAR) or None)
