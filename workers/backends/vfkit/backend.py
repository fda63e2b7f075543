"""The vfkit backend: macOS Virtualization.framework through vfkit (crc-org/vfkit).

Boot is direct: vfkit loads the guest's kernel (the uncompressed arm64 Image) and initrd (no EFI,
no bootloader on a disk). The initrd it gets is the guest's with the keys cpio appended
(<runtimeDir>/initrd.img, remade at each boot), as the guest contract in image/README.md says:
the Mac's default guest is the lock's aarch64 Debian guest. The guest gets these devices, in
this order:

* `virtio-blk` <stateDir>/disk.raw: the persistent data disk (/dev/vda), the guest's Nix store.
  A sparse raw file, created on first boot, grown in place when diskSize grows, never shrunk.
* `virtio-blk` guest.disk, read-only, when set (the opt-in NixOS guest): its store image.
* `virtio-net,nat` with a locally administered MAC made once per install (<stateDir>/mac), so
  the guest keeps its DHCP lease across boots.
* `virtio-fs` tag `virby-keys`, only for a guest that reads it (the opt-in NixOS guest, which
  has a store image): <stateDir>/guest-keys (host key, authorized_keys, user name, the shares to
  mount, a rosetta flag). The Debian guest gets its keys appended to its initrd instead.
* `virtio-fs` per shared directory (the guest mounts each at /mnt/virtiofs/<tag>); `rosetta`
  when enabled.
* `virtio-serial` to <logDir>/console.log (the guest's hvc0, its console).
* `virtio-serial,pty`: the guest agent's port (hvc1), a host pty whose path `GET /vm/inspect`
  reports. The host speaks the agent's line protocol through it (workers/agent.py, the client
  QEMU's backend uses too): the guest announces "virby-ready <ip>", the host sets the clock after
  each resume and asks for "poweroff" (VZ's own stop request reaches an arm64 guest as a GPIO
  power key, which the Debian cloud kernel does not build).
* `virtio-rng`, `virtio-balloon` (the guest loads virtio_balloon).
* REST API on a unix socket in the runtime dir (never TCP: no other user may pause or stop us).

No `--pidfile`: our PidRecord (pid, create time, command line) identifies vfkit more strictly
than vfkit's own pid file would, and one record is one source of truth. No `--timesync`: it acts
only on host wake-ups (not on our pauses), holds its agent connection for good, and needs
qemu-guest-agent. The agent sets the clock after our resumes; the guest follows its RTC (VZ keeps
it at host time) for the host's own sleeps.

No suspend to disk: vfkit has no save/restore endpoint (vfkit#449), so `can_suspend()` stays
false (the base class default) and the vm worker's stop is a clean shutdown. How to turn it on:
docs/operations.md, "Suspend to disk".

Resource handling: the backend owns the vfkit process (started or adopted), the agent channel
(the pty) and the pid/ip files; `shutdown`/`kill` release all of them, `close` only the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import time
from typing import Any

from virby.core import machost
from virby.core.config import Config
from virby.core.files import write_atomic
from virby.core.keys import KeyPaths
from virby.core.logtail import tail_lines
from virby.core.machost import cpu_brand
from virby.core.machost import host_macos_version as macos_version
from virby.core.protocol import PAUSED, RUNNING, STOPPED, VmState
from virby.core.watchers import LOGS
from virby.workers import agent
from virby.workers.backends.base import (
    Backend,
    BackendError,
    Endpoint,
    require_binary,
    require_file,
)
from virby.workers.backends.disk import ensure_disk
from virby.workers.backends.initrd import build_keyed_initrd
from virby.workers.backends.process import HypervisorProcess
from virby.workers.backends.vfkit import leases
from virby.workers.backends.vfkit.provision import ensure_mac, fill_guest_keys
from virby.workers.backends.vfkit.rest import VfkitRest

log = logging.getLogger(__name__)

KEYS_TAG = "virby-keys"
ROSETTA_TAG = "rosetta"
SSH_PORT = 22
ARM64_IMAGE_MAGIC = (56, b"ARM\x64")  # offset and magic of an arm64 Linux Image header

REST_START_TIMEOUT = 15.0  # vfkit itself gives the VM 5 s to reach Running
AGENT_GRACE = 1.0  # the agent answers a hello within this once it runs: then it decides
LEASE_BUDGET = 45.0  # while the agent is silent, poll the lease file and port 22 this long
REST_STOP_WAIT = 10.0  # after the agent's poweroff: VZ's stop request, then a hard stop
HARD_STOP_WAIT = 5.0
STATE_SETTLE = 5.0  # a Pause/Resume the REST API accepted shows in /vm/state within this


def nested_supported(brand: str | None, macos: machost.MacVersion | None = None) -> bool:
    """Virtualization.framework offers nested virtualization from M3 on, and macOS 15."""
    return machost.nested_problem(brand, macos) is None


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _parse_ip(text: str) -> str | None:
    try:
        ip = ipaddress.IPv4Address(text)
    except ValueError:
        return None
    return None if ip.is_unspecified or ip.is_multicast else str(ip)


class VfkitBackend(Backend):
    name = "vfkit"

    def __init__(self, config: Config, keys: KeyPaths) -> None:
        super().__init__(config, keys)
        self.rest = VfkitRest(self.rest_socket)
        self.leases_path = leases.LEASES_PATH
        self.process = HypervisorProcess("vfkit", self.pid_path)
        self._guest_ip: str | None = None
        self._agent: agent.AgentChannel | None = None

    # -- files -----------------------------------------------------------------------------------

    @property
    def disk_path(self) -> str:
        return self.config.state("disk.raw")

    @property
    def mac_path(self) -> str:
        return self.config.state("mac")

    @property
    def guest_keys_dir(self) -> str:
        return self.config.state("guest-keys")

    # No ".sock" suffix on vfkit's own sockets: `virby run` clears *.sock from the runtime dir
    # at start, and a vfkit left running must stay reachable for adoption.
    @property
    def rest_socket(self) -> str:
        return self.config.runtime("vfkit.rest")

    @property
    def pid_path(self) -> str:
        return self.config.runtime("vfkit.pid")

    @property
    def boot_initrd(self) -> str:
        """The guest's initrd with the per-install keys appended (remade at every boot)."""
        return self.config.runtime("initrd.img")

    @property
    def ip_path(self) -> str:
        return self.config.runtime("guest-ip")

    @property
    def vfkit_log(self) -> str:
        return os.path.join(self.config.log_dir, LOGS["vfkit"])

    @property
    def mac(self) -> str:
        return ensure_mac(self.mac_path)

    def check(self) -> None:
        c, g = self.config, self.config.guest
        require_binary("vfkit", c.hypervisor)
        require_file("guest kernel", g.kernel)
        require_file("guest initrd", g.initrd)
        with open(g.kernel, "rb") as f:
            head = f.read(64)
        offset, magic = ARM64_IMAGE_MAGIC
        if head[:2] == b"\x1f\x8b":
            raise BackendError(f"guest kernel is gzip-compressed: {g.kernel} (vfkit needs "
                               "an uncompressed arm64 Image)")
        if head[offset:offset + len(magic)] != magic:
            raise BackendError(f"guest kernel is not an arm64 Image: {g.kernel} (vfkit's "
                               "--bootloader linux needs the uncompressed arm64 Image)")
        if g.disk is not None:
            require_file("guest store image", g.disk)
        if '"' in g.cmdline:
            raise BackendError("guest.cmdline must not contain '\"' (vfkit quotes it with them)")
        for what, path in [("guest kernel", g.kernel), ("guest initrd", g.initrd),
                           ("guest store image", g.disk or ""), ("stateDir", c.stateDir),
                           *((f"shared directory {t}", p) for t, p in c.sharedDirectories.items())]:
            if "," in path:  # vfkit splits device and bootloader options at commas
                raise BackendError(f"{what} path contains a comma, which vfkit cannot take: {path}")
        for tag, path in c.sharedDirectories.items():
            if not os.path.isdir(path):
                raise BackendError(f"shared directory {tag} is not a directory: {path}")
        for what, path in [("SSH host key", self.keys.host_key),
                           ("SSH client public key", self.keys.client_pub)]:
            require_file(what, path)
        if c.rosetta and (rosetta := machost.host_rosetta_problem()):
            raise BackendError(str(rosetta))
        if c.nestedVirtualization and (nested := machost.nested_problem(cpu_brand(), macos_version())):
            log.warning("nestedVirtualization is on, but %s; starting without it", nested.detail)

    @property
    def reads_key_share(self) -> bool:
        """The opt-in NixOS guest (a store image) reads its keys from a share; the Debian
        guest from its initrd."""
        return self.config.guest.disk is not None

    def command(self) -> list[str]:
        c, g = self.config, self.config.guest
        dev = []
        dev.append(f"virtio-blk,path={self.disk_path}")
        if g.disk is not None:
            dev.append(f"virtio-blk,path={g.disk},readonly")
        dev.append(f"virtio-net,nat,mac={self.mac}")
        if self.reads_key_share:
            dev.append(f"virtio-fs,sharedDir={self.guest_keys_dir},mountTag={KEYS_TAG}")
        for tag, path in sorted(c.sharedDirectories.items()):
            dev.append(f"virtio-fs,sharedDir={path},mountTag={tag}")
        if c.rosetta:
            dev.append(f"rosetta,mountTag={ROSETTA_TAG}")
        dev.append(f"virtio-serial,logFilePath={self.console_log}")  # hvc0: the console
        dev.append("virtio-serial,pty")  # hvc1: the agent
        dev.append("virtio-rng")
        dev.append("virtio-balloon")
        argv = [
            c.hypervisor,
            "--cpus", str(c.cores),
            "--memory", str(c.memory),
            # vfkit keeps commas inside the quotes and strips the quotes themselves.
            "--bootloader",
            f'linux,kernel={g.kernel},initrd={self.boot_initrd},cmdline="{g.cmdline}"',
        ]
        for d in dev:
            argv += ["--device", d]
        argv += ["--restful-uri", f"unix://{self.rest_socket}"]
        if c.nestedVirtualization and nested_supported(cpu_brand(), macos_version()):
            argv.append("--nested")
        if c.debug:
            argv += ["--log-level", "debug"]
        return argv

    def prepare(self) -> None:
        """Create what the command line names: dirs, data disk, MAC, the guest's key share."""
        c = self.config
        for d in (c.stateDir, c.log_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        os.makedirs(c.runtimeDir, mode=0o700, exist_ok=True)
        ensure_disk(self.disk_path, c.diskSize)
        ensure_mac(self.mac_path)
        if self.reads_key_share:
            fill_guest_keys(self.guest_keys_dir, self.keys, c)
        # vfkit refuses to bind a socket path that exists; any left here are stale.
        for path in (self.rest_socket, self.ip_path):
            _unlink(path)

    # -- lifecycle ---------------------------------------------------------------------------

    async def boot(self) -> None:
        self.check()
        self.prepare()
        # Tens of MB copied and fsynced: off the event loop.
        await asyncio.to_thread(build_keyed_initrd, self.config, self.keys,
                                    self.boot_initrd)
        argv = self.command()
        log.info("starting vfkit: %s", " ".join(argv))
        # If it dies at once, _wait_rest reports why.
        await self.process.start(argv, log_path=self.vfkit_log, cwd=self.config.stateDir)
        await self._wait_rest()
        await self._open_agent()

    async def _wait_rest(self) -> None:
        """Until the REST API answers (the VM exists), or vfkit exits, or a deadline passes."""
        child = self.process.child
        assert child is not None
        exited = asyncio.ensure_future(child.wait())
        deadline = time.monotonic() + REST_START_TIMEOUT
        try:
            while not exited.done():
                try:
                    await self.rest.state()
                    return
                except BackendError as e:
                    last = str(e)
                if time.monotonic() > deadline:
                    await self.kill()
                    raise BackendError(f"vfkit's REST API did not answer within "
                                       f"{REST_START_TIMEOUT:g}s: {last}")
                # Wakes at once if vfkit exits; otherwise a short retry interval.
                await asyncio.wait({exited}, timeout=0.05)
        finally:
            exited.cancel()
        await self._forget()
        raise BackendError(f"vfkit exited with status {child.returncode} at start: "
                           f"{self._vfkit_tail() or '(no output)'}")

    def _vfkit_tail(self, lines: int = 5) -> str:
        return " | ".join(line.strip() for line in tail_lines(self.vfkit_log, lines) if line.strip())

    async def _open_agent(self) -> None:
        """The agent's pty, as vfkit reports it; hello until the agent answers. Without it the
        boot still goes on: the lease fallback finds a guest whose agent is silent."""
        await self._close_agent()
        try:
            path = await self.rest.agent_pty()
            self._agent = await agent.open_pty(path)
        except (BackendError, OSError) as e:
            log.warning("no channel to the guest agent (%s): readiness from the DHCP lease, "
                        "stops through vfkit only", e)
            return
        self._agent.start_greeting()

    async def _close_agent(self) -> None:
        if self._agent is not None:
            await self._agent.close()
            self._agent = None

    def _agent_open(self) -> bool:
        return self._agent is not None and not self._agent.closed.is_set()

    def _set_guest_ip(self, ip: str) -> None:
        self._guest_ip = ip
        # A worker that replaces us reads it back at adoption: the guest announces only once.
        write_atomic(self.ip_path, (ip + "\n").encode(), 0o600)

    async def wait_announced(self) -> None:
        if self.process.proc is None:
            raise BackendError("vfkit is not running")
        waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(self.wait_exit())}
        exited = next(iter(waiters))
        ready = None
        if self._agent is not None:
            ready = asyncio.ensure_future(self._agent.ready.wait())
            waiters.add(ready)
        fallback = asyncio.ensure_future(self._lease_fallback())
        waiters.add(fallback)
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if ready is not None and ready in done:
            assert self._agent is not None
            ip = self._agent.address or leases.lookup(self.mac, self.leases_path)
            if ip is None:
                raise BackendError("the guest agent announced sshd without an address, and "
                                   f"{self.leases_path} has no lease for MAC {self.mac}")
            self._set_guest_ip(ip)
            return
        if fallback in done:
            self._set_guest_ip(fallback.result())  # raises its BackendError if it gave up
            return
        assert exited in done
        status = self.process.returncode
        raise BackendError(f"vfkit exited (status {status}) before the guest announced itself: "
                           f"{self._vfkit_tail() or '(no output)'}")

    async def _lease_fallback(self) -> str:
        """Find the guest by its DHCP lease and an open port 22 while the agent is silent (an
        older image, or no pty): from the first second, not after a long grace period. Once the
        agent has spoken its announcement is the event, and this waits for it. Bounded; raises
        with the reason."""
        mac = self.mac
        if self._agent is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._agent.heard.wait(), AGENT_GRACE)
        deadline = time.monotonic() + LEASE_BUDGET
        ip = None
        while time.monotonic() < deadline:
            if self._agent is not None and self._agent.heard.is_set():
                await asyncio.Future()  # the agent's word decides
            ip = leases.lookup(mac, self.leases_path)
            if ip is not None and await _port_open(ip, SSH_PORT):
                log.warning("the guest agent is silent; found the guest at %s through its DHCP "
                            "lease in %s", ip, self.leases_path)
                return ip
            await asyncio.sleep(0.5)
        found = f"a lease for {ip} but nothing listening on port {SSH_PORT}" if ip else "no lease"
        raise BackendError(
            f"the guest agent said nothing within {LEASE_BUDGET:g}s, and polling "
            f"{self.leases_path} for MAC {mac} found {found}; see {self.console_log}")

    def endpoint(self) -> Endpoint:
        if self._guest_ip is None:
            raise BackendError("the guest's address is not known: it has not announced itself")
        return Endpoint(self._guest_ip, SSH_PORT)

    async def pause(self) -> None:
        await self._change("Pause", PAUSED)

    async def resume(self) -> None:
        await self._change("Resume", RUNNING)

    async def _change(self, action: str, want: str) -> None:
        if self.process.proc is None:
            raise BackendError(f"cannot {action.lower()}: vfkit is not running")
        if (await self.rest.state()).state == want:
            return
        await self.rest.change_state(action)
        deadline = time.monotonic() + STATE_SETTLE
        while (state := (await self.rest.state()).state) != want:
            if time.monotonic() > deadline:
                raise BackendError(f"vfkit accepted {action} but the VM is still {state} "
                                   f"after {STATE_SETTLE:g}s")
            await asyncio.sleep(0.05)

    async def shutdown(self, timeout: float) -> None:
        """The agent's poweroff first (the guest syncs and unmounts its store); then VZ's stop
        request, which an arm64 Debian guest cannot hear; then a hard stop; then a kill."""
        if not self.process.alive():
            await self._forget()
            return
        with contextlib.suppress(BackendError):
            if (await self.rest.state()).state == PAUSED:
                await self.rest.change_state("Resume")  # a paused guest cannot hear anything
        if self._agent_open():
            assert self._agent is not None
            self._agent.send("poweroff")
            if await self.process.exits_within(timeout):
                await self._forget()
                return
            log.warning("the guest did not power off within %gs of the agent's poweroff; asking "
                        "vfkit to stop it", timeout)
            timeout = REST_STOP_WAIT
        try:
            await self.rest.change_state("Stop")
        except BackendError as e:
            # vfkit's own SIGTERM handler asks the guest to stop, then forces it after 5 s.
            log.warning("cannot ask the guest to stop over REST (%s); sending vfkit SIGTERM", e)
            self.process.send_signal(signal.SIGTERM)
        if await self.process.exits_within(timeout):
            await self._forget()
            return
        log.warning("the guest did not power off within %gs of vfkit's stop request; stopping "
                    "it hard", timeout)
        with contextlib.suppress(BackendError):
            await self.rest.change_state("HardStop")
        if await self.process.exits_within(HARD_STOP_WAIT):
            await self._forget()
            return
        await self.kill()

    async def kill(self) -> None:
        await self.process.kill()
        await self._forget()

    async def _forget(self) -> None:
        """The process is gone: drop every file and channel that described it."""
        await self._close_agent()
        self.process.forget()
        for path in (self.ip_path, self.rest_socket, self.boot_initrd):
            _unlink(path)
        self._guest_ip = None

    async def status(self) -> VmState:
        if not self.process.alive():
            return STOPPED
        return (await self.rest.state()).state

    async def wait_exit(self) -> None:
        await self.process.wait_exit()

    def stopped(self) -> bool:
        return self.process.stopped()

    async def adopt(self) -> bool:
        if not self.process.adopt():
            for path in (self.ip_path, self.rest_socket):
                _unlink(path)
            return False
        pid = self.process.pid
        try:
            await self.rest.state()
        except BackendError as e:
            # A vfkit we cannot control still holds the data disk: end it, or the next boot
            # would start a second VM on the same disk. The disk's contents survive.
            log.warning("vfkit pid %d from an earlier worker cannot be controlled (%s); "
                        "killing it", pid, e)
            await self.kill()
            return False
        # The agent's pty again: a running guest answers the hello with its address, a guest
        # still booting announces when sshd listens. The address a previous worker learnt
        # stands meanwhile.
        try:
            with open(self.ip_path) as f:
                self._guest_ip = _parse_ip(f.read().strip())
        except OSError:
            self._guest_ip = None
        await self._open_agent()
        log.info("adopted vfkit pid %s (guest %s)", pid, self._guest_ip or "not announced yet")
        return True

    async def sync_clock(self) -> None:
        """Set the guest clock to ours (after a resume: a paused guest's clock stood still),
        through the agent. Without it the guest's RTC-follower corrects the clock later."""
        if not self._agent_open():
            log.warning("no channel to the guest agent: the clock is left to the guest's RTC")
            return
        assert self._agent is not None
        self._agent.set_clock()

    async def close(self) -> None:
        await self._close_agent()

    def pid(self) -> int | None:
        return self.process.pid


async def _port_open(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
