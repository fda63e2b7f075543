"""QEMU backend: Linux hosts (KVM when it works, TCG otherwise) and macOS (HVF).

Direct kernel boot; user-mode networking with the guest's port 22 forwarded to a loopback port
QEMU picks (`hostfwd=tcp:127.0.0.1:0-:22`, read back with `info usernet`: no race for a free
port); QMP on a unix socket through qemu.qmp; the guest agent on a virtio console (a unix socket
in the standard layout, a pty in vfkit's: workers/agent.py speaks to both) announces sshd, sets
the clock after a resume and powers the guest off. Shared directories through virtiofsd.

Resources: the QEMU process is our child (never `-daemonize`: its pid and exit must stay ours) in its own
session so a kill -9 of the worker leaves it running for the next worker to adopt. The backend
owns the QMP connection, the agent channel and the virtiofsd processes; `close()` drops the
connections, `kill()`/`shutdown()` also end the processes and remove the pid files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from virby.core.logtail import last_line
from virby.core.protocol import FAILED, PAUSED, RUNNING, STOPPED, VmState
from virby.core.watchers import LOGS
from virby.workers import agent
from virby.workers.backends.base import (
    Backend,
    BackendError,
    Endpoint,
    describe,
    require_binary,
    require_file,
)
from virby.workers.backends.disk import ensure_disk
from virby.workers.backends.initrd import build_keyed_initrd
from virby.workers.backends.process import HypervisorProcess
from virby.workers.backends.qemu import launch, virtiofs
from virby.workers.backends.qemu import machine as qemu_machine
from virby.workers.backends.qemu import migration as qmp_migration
from virby.workers.backends.qemu.accel import KVM_PROBE_TIMEOUT, AccelProbe

log = logging.getLogger("virby.qemu")

def netdev_arg(guest_network: str) -> str:
    """User-mode networking with sshd forwarded to a loopback port QEMU picks. "nat": the guest
    reaches the network through slirp (substitutes, fixed-output fetches), and slirp maps its
    gateway 10.0.2.2 to the host's loopback (QEMU gives no way to turn that off); "none":
    restrict=on, the guest reaches nothing and only the forward reaches it."""
    restrict = ",restrict=on" if guest_network == "none" else ""
    return f"user,id=n0{restrict},hostfwd=tcp:127.0.0.1:0-:22"


_TB_SIZE_MIB = 128  # cap the TCG translation cache (its 1 GiB default inflates RSS)
QMP_TIMEOUT = 5.0  # one QMP command; a healthy QEMU answers in milliseconds
SAVE_TIMEOUT = 60.0  # the idle monitor's stop request waits 60 s
LOAD_TIMEOUT = 30.0  # the vm worker's own restore deadline is shorter
# QEMU run states in which the process lives on but the guest is lost: `failed`, not `running`.
_BROKEN_STATES = frozenset({"guest-panicked", "internal-error", "io-error"})
_STATE_EVENTS = ("STOP", "GUEST_PANICKED", "BLOCK_IO_ERROR")
# query-migrate states of an outgoing migration still copying
_SAVE_UNDER_WAY = frozenset({"setup", "active", "device", "pre-switchover", "wait-unplug",
                             "cancelling"})
# QMP query-status run states (QEMU's words, the keys) as the backend contract's states.
_RUN_STATES: dict[str, VmState] = {"running": RUNNING, "paused": PAUSED, "prelaunch": PAUSED}


class QemuBackend(Backend):
    name = "qemu"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.process = HypervisorProcess("qemu", self.pid_path)
        self._qmp: QMPClient | None = None
        self._agent: agent.AgentChannel | None = None
        self._shares = virtiofs.processes(self.config)
        self._port: int | None = None
        self.probe = AccelProbe(self.config)

    # -- paths ----------------------------------------------------------------------------------

    @property
    def qmp_path(self) -> str:
        return self.config.runtime("qmp.sock")

    @property
    def agent_path(self) -> str:
        return self.config.runtime("agent.sock")

    @property
    def pid_path(self) -> str:
        return self.config.runtime("qemu.pid.json")

    @property
    def qemu_log(self) -> str:
        return os.path.join(self.config.log_dir, LOGS["qemu"])

    @property
    def boot_initrd(self) -> str:
        """The base initrd with the per-install keys appended (rebuilt at every boot)."""
        return self.config.runtime("initrd.img")

    # -- pure parts -----------------------------------------------------------------------------

    def accel(self) -> str:
        """The accelerator: a setting, or for "auto" the KVM probe's record (accel.py)."""
        return self.probe.accel()

    def command(self) -> list[str]:
        c = self.config
        m = qemu_machine.machine_for(c.arch)
        accel = self.accel()
        accel_arg = f"tcg,tb-size={_TB_SIZE_MIB}" if accel == "tcg" else accel
        argv = [
            c.hypervisor,
            "-name", "virby-vm",
            "-accel", accel_arg,
            "-M", m.machine,
            "-m", str(c.memory),
            "-smp", str(c.cores),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", c.guest.kernel,
            "-initrd", self.boot_initrd,
            "-append", c.guest.cmdline,
            "-netdev", netdev_arg(c.guestNetwork),
            "-device", "virtio-net-pci,netdev=n0,romfile=",
            "-device", "virtio-rng-pci",
            *qemu_machine.layout_device_args(c.qemuDevices, m),
            *qemu_machine.console_and_agent_args(c.qemuDevices, self.console_log, self.agent_path),
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *virtiofs.memory_args(c),
        ]
        argv += qemu_machine.cpu_args(m, accel)
        # the data disk first (/dev/vda: the guest's Nix store), then the optional image disk
        argv += ["-drive", f"file={c.state('disk.raw')},if=virtio,format=raw,cache=writeback"]
        if c.guest.disk:
            argv += ["-drive", f"file={c.guest.disk},if=virtio,format=raw,cache=writeback"]
        return argv + virtiofs.device_args(c)

    def check(self) -> None:
        require_binary("hypervisor", self.config.hypervisor)
        require_file("guest kernel (guest.kernel)", self.config.guest.kernel)
        require_file("guest initrd (guest.initrd)", self.config.guest.initrd)
        if self.config.guest.disk:
            require_file("guest disk (guest.disk)", self.config.guest.disk)
        if self.accel() == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise BackendError("accel is kvm but /dev/kvm is not accessible")
        for tag, path in self.config.sharedDirectories.items():
            if not os.path.isdir(path):
                raise BackendError(f"shared directory {tag} is not a directory: {path}")
        if self.config.sharedDirectories:
            virtiofs.require_virtiofsd(self.config)

    # -- lifecycle ------------------------------------------------------------------------------

    async def boot(self) -> None:
        if self.probe.needs_probe():
            try:
                await self._start()
                await asyncio.wait_for(self.wait_announced(), KVM_PROBE_TIMEOUT)
                self.probe.record("kvm", "the guest announced itself under KVM")
                log.info("KVM probe: usable; recorded in %s", self.probe.path)
                return  # keep this VM: the probe was the boot
            except (TimeoutError, BackendError) as e:
                detail = str(e) or f"no announcement within {KVM_PROBE_TIMEOUT:g}s"
                self.probe.record("tcg", detail)
                log.warning("KVM probe: /dev/kvm cannot run this guest (%s); using TCG from now "
                            "on (recorded in %s)", detail, self.probe.path)
                await self.kill()
        await self._start()

    async def _start(self, extra: tuple[str, ...] = (), hello: bool = True) -> None:
        self.check()
        ensure_disk(self.config.state("disk.raw"), self.config.diskSize)  # refuses to shrink
        os.makedirs(self.config.log_dir, exist_ok=True)
        # Tens of MB copied and fsynced: off the event loop, which keeps answering wakes. A
        # restore reuses the one a suspend left (QEMU reads it at start; the guest never does).
        if not (extra and os.path.exists(self.boot_initrd)):
            await asyncio.to_thread(build_keyed_initrd, self.config, self.keys,
                                    self.boot_initrd)
        self._shares = await virtiofs.start(self.config, self.config.log_dir)
        try:
            await self._attach(await launch.start(self, extra), hello)
        except BackendError:
            await self.kill()
            raise
        log.info("qemu started, pid %s, accel %s", self.process.pid, self.accel())

    @property
    def agent_on_socket(self) -> bool:
        return self.config.qemuDevices != "vfkit"

    async def _attach(self, control: launch.Control, hello: bool = True) -> None:
        """Hold QEMU's QMP connection and SSH port, and open the agent's channel."""
        self._qmp, self._port = control.qmp, control.port
        try:
            if self.agent_on_socket:
                self._agent = await agent.open_socket(self.agent_path)
            else:
                self._agent = await agent.open_pty(await self._agent_pty())
        except OSError as e:
            raise BackendError(f"cannot open the guest agent's port: {e}") from e
        if hello:  # not into a machine that is still loading its state: it would be garbled
            self._agent.start_greeting()  # an adopted guest answers too

    async def _agent_pty(self) -> str:
        """The host pty QEMU made for the agent's console (`pty:/dev/pts/N` in query-chardev)."""
        assert self._qmp is not None
        chardevs = await self._qmp.execute("query-chardev")
        for dev in chardevs if isinstance(chardevs, list) else []:
            if isinstance(dev, dict) and dev.get("label") == "agent":
                name = str(dev.get("filename", ""))
                if name.startswith("pty:"):
                    return name.removeprefix("pty:")
        raise BackendError(f"qemu reports no pty for the agent: {chardevs!r}")

    async def wait_announced(self) -> None:
        if self._agent is None:
            raise BackendError("no channel to the guest agent")
        ready = asyncio.create_task(self._agent.ready.wait())
        exited = asyncio.create_task(self.wait_exit())
        try:
            done, _ = await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        if ready not in done:
            raise BackendError(f"qemu exited during boot: {last_line(self.qemu_log)}")

    def endpoint(self) -> Endpoint:
        if self._port is None:
            raise BackendError("the VM is not running")
        return Endpoint("127.0.0.1", self._port)

    async def _execute(self, cmd: str, timeout: float = QMP_TIMEOUT) -> object:
        if self._qmp is None:
            raise BackendError("no QMP connection to qemu")
        try:
            return await asyncio.wait_for(self._qmp.execute(cmd), timeout)
        except (QMPError, OSError, TimeoutError) as e:
            raise BackendError(f"QMP {cmd} failed: {describe(e, timeout)}{self.stopped_hint()}") from e

    def stopped(self) -> bool:
        return self.process.stopped()

    async def ping(self, timeout: float) -> None:
        """query-status with its own deadline: QMP is served by QEMU's main loop, which a hung
        or stopped QEMU no longer runs."""
        await self._execute("query-status", timeout)

    async def pause(self) -> None:
        await self._execute("stop")

    async def resume(self) -> None:
        await self._execute("cont")

    async def sync_clock(self) -> None:
        """The guest clock stands still while paused (TCG has no catch-up): set it."""
        if self._agent is not None:
            self._agent.set_clock()

    # -- suspend to disk --------------------------------------------------------------------------

    def can_suspend(self) -> bool:
        # A mounted 9p export blocks migration in QEMU: such a VM is stopped instead.
        return not self.config.sharedDirectories

    async def suspend(self, path: str) -> None:
        if self._qmp is None:
            raise BackendError("no QMP connection to qemu")
        await qmp_migration.save(self._qmp, path, SAVE_TIMEOUT, self.process.alive)
        await self._quit_after_save()

    async def _quit_after_save(self) -> None:
        with contextlib.suppress(BackendError):  # it may be gone before it answers
            await self._execute("quit")
        if not await self.process.exits_within(10):
            log.warning("qemu did not quit within 10s of the save; killing it")
            await self.process.kill()
        await self._cleanup(keep_initrd=True)

    async def adopted_save(self) -> str | None:
        """query-migrate says how the last migration went; the run state tells an outgoing
        save (`finish-migrate`, `postmigrate`, or a save still copying) from a restore this
        QEMU completed (also "completed", but then the guest runs or is paused)."""
        reply = await self._execute("query-migrate")
        migration = str(reply.get("status")) if isinstance(reply, dict) and reply.get("status") else None
        run = await self._execute("query-status")
        run_state = str(run.get("status")) if isinstance(run, dict) else ""
        if migration in _SAVE_UNDER_WAY or run_state in ("finish-migrate", "postmigrate"):
            return "saving"
        if migration in ("failed", "cancelled") and run_state == "paused":  # QMP's words
            return FAILED
        return None

    async def finish_suspend(self, timeout: float) -> None:
        if self._qmp is None:
            raise BackendError("no QMP connection to qemu")
        await qmp_migration.wait_saved(self._qmp, timeout, self.process.alive)
        await self._quit_after_save()

    async def restore(self, path: str) -> None:
        await self._start(("-incoming", "defer"), hello=False)
        assert self._qmp is not None
        try:
            await qmp_migration.load(self._qmp, path, LOAD_TIMEOUT, self.process.alive)
        except BackendError as e:
            raise BackendError(f"{e}: {last_line(self.qemu_log)}") from e

    async def sync_guest(self, seed: bytes) -> None:
        """The agent handles lines in order: the clock and the entropy are in place before its
        `virby-ready` answer to the hello."""
        if self._agent is None:
            raise BackendError("no channel to the guest agent")
        self._agent.sync(seed)

    async def status(self) -> VmState:
        if not self.process.alive():
            return STOPPED
        reply = await self._execute("query-status")
        status = str(reply.get("status") if isinstance(reply, dict) else None)
        if status in _BROKEN_STATES:
            tail = " | ".join(line.strip() for line in self.console_tail(3).splitlines() if line.strip())
            self.failure = f"qemu reports {status}" + (f"; console: {tail}" if tail else "")
            return FAILED
        return _RUN_STATES.get(status, STOPPED if status in ("shutdown", "postmigrate", "inmigrate")
                               else RUNNING)

    async def wait_broken(self) -> str:
        """QEMU announces each of these with an event (STOP for internal and I/O errors): then
        ask its run state."""
        if self._qmp is None:
            return await super().wait_broken()
        with self._qmp.listener(_STATE_EVENTS) as events:
            if await self.status() == FAILED:
                return self.failure or "the guest is broken"
            async for _event in events:
                if await self.status() == FAILED:
                    return self.failure or "the guest is broken"
        raise BackendError("the QMP event stream ended")

    async def shutdown(self, timeout: float) -> None:
        if self.process.alive() and timeout > 0:
            try:
                if await self.status() == PAUSED:
                    await self._execute("cont")  # a paused guest cannot hear the power button
                await self._power_off()
            except BackendError as e:
                log.warning("cannot ask the guest to power off (%s); killing qemu", e)
            else:
                if not await self.process.exits_within(timeout):
                    log.warning("the guest did not power off within %gs of being asked; killing "
                                "qemu", timeout)
        await self.kill()

    async def _power_off(self) -> None:
        """The agent first (the guest syncs and unmounts its store, then powers off); the
        power button where the machine has one and the agent is gone."""
        if self._agent is not None and not self._agent.closed.is_set():
            self._agent.send("poweroff")
        elif qemu_machine.machine_for(self.config.arch).power_button:
            await self._execute("system_powerdown")
        else:
            raise BackendError("no channel to the guest agent and no power button")

    async def kill(self) -> None:
        await self.process.kill()
        await virtiofs.stop(self._shares)
        await self._cleanup()

    async def _cleanup(self, keep_initrd: bool = False) -> None:
        await self.close()
        self.process.forget()
        self._port = None
        for path in (self.qmp_path, self.agent_path, *(() if keep_initrd else (self.boot_initrd,))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def close(self) -> None:
        if self._agent is not None:
            await self._agent.close()
            self._agent = None
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._qmp.disconnect(), 2)
            self._qmp = None

    async def wait_exit(self) -> None:
        await self.process.wait_exit()

    async def adopt(self) -> bool:
        had_record = os.path.exists(self.pid_path)
        if not self.process.adopt():
            if had_record:
                log.info("stale qemu pid file (the process is gone or not ours); removing")
            # the keyed initrd stays: a save that finished before its worker died is restored
            # with it (a cold boot writes a new one)
            await self._cleanup(keep_initrd=True)
            return False
        pid = self.process.pid
        for share in self._shares:  # they end with QEMU; adopted so that a kill can end them
            share.adopt()
        try:
            await self._attach(await launch.connect(self))
        except (BackendError, OSError) as e:
            log.warning("cannot re-attach to qemu pid %s (%s); killing it", pid, e)
            await self.kill()
            return False
        log.info("adopted running qemu, pid %s", pid)
        return True

    def pid(self) -> int | None:
        return self.process.pid

