"""The vm worker: the VM's state machine and its one owner.

    stopped -> starting -> running <-> paused -> stopping -> stopped
                       \\-> failed (with the reason; the next boot waits out a backoff)
    running/paused -> suspending -> suspended -> starting (restore, else a cold boot) -> running

Suspend (issue 14): the idle monitor's stop and `virby stop` (unless `cold`) save the whole
machine to a file when the backend can (`Backend.can_suspend`), and the hypervisor exits; the
next wake restores it, sets the guest clock and reseeds its entropy, proves SSH, then
publishes `running`. The snapshot rules (what invalidates it, restored at most once) live in
`workers/snapshot.py`. Anything wrong with a snapshot or its restore costs a cold boot in the
same wake, never the client's connection. `boots` counts cold boots, `restores` restores.

Every transition runs under one lock, so the backend is only ever driven by one task. Wake
requests during `starting` all wait for the same boot: one boot, however many connections
arrive. A pause or stop that the idle monitor asks for is refused while the forwarders report
open connections, or when a wake came in after the idle time the request was based on.

If this process is killed, the hypervisor keeps running and the next worker adopts it. On
SIGTERM the worker asks circusd why (workers/stop_intent.py): when the arbiter is going away
(`circusctl quit`, SIGTERM to `virby run`, launchd) or our watcher is stopped for good
(`circusctl stop vm`), the guest is shut down cleanly with a deadline; when only the watcher is
restarted or reloaded, a running or paused VM is left as it is for the next worker to adopt. A
guest still starting has nothing to lose and is killed at once. If circusd vanishes, the VM is
ended at once so that the next `virby run` starts from a clean slate.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import time
from typing import Any

from virby.core.config import Config, ConfigError, load
from virby.core.files import write_json
from virby.core.keys import KeyPaths, ensure_keys
from virby.core.protocol import (
    BOOTING,
    COUNTERS_FILE,
    FAILED,
    PAUSED,
    PROVING,
    RESTORING,
    RUNNING,
    STARTING,
    STOPPED,
    STOPPING,
    SUSPENDED,
    SUSPENDING,
    VM_STATES,
    BootPhase,
    VmState,
    VmStateData,
    as_forwarder_state,
    legal,
)
from virby.core.sshcheck import SSHNotReady, prove_ssh
from virby.core.timeouts import VM_SHUTDOWN_TIMEOUT
from virby.workers import bus, reconfig, runtime, stop_intent
from virby.workers.activity import Activity
from virby.workers.backends import make_backend
from virby.workers.backends.base import Backend, BackendError, describe
from virby.workers.runtime import run_worker
from virby.workers.snapshot import SnapshotInvalid, SnapshotStore, dependencies

log = logging.getLogger("virby.vm")

FAILURE_BACKOFF_MAX = 60.0
WAKE_WAIT_MAX = 10.0  # longest a single wake request is held before it is answered
SAVE_TIMEOUT = 60.0  # a save a killed worker left under way (the idle monitor's stop waits 60 s)
RESTORE_TIMEOUT = 15.0  # a restore takes ~1 s here (TCG); past this, boot cold instead
SEED_BYTES = 32  # host entropy mixed into a restored guest's pool
BOOTED_CONFIG_FILE = "vm.booted.json"  # the config the running hypervisor was started with
PROVEN_FILE = "vm.proven.json"  # the hypervisor pid this worker saw `running` (proven)
# Liveness while running or paused: the hypervisor must answer a status query within
# LIVENESS_TIMEOUT, asked every LIVENESS_INTERVAL; two misses in a row (one, when its process is
# stopped) and it is declared unresponsive: killed, `failed` with the reason, and booted cold at
# the next wake without a backoff. Worst case from the freeze to `failed`: ~9 s.
LIVENESS_INTERVAL = 1.0
LIVENESS_TIMEOUT = 4.0
LIVENESS_MISSES = 2
# How long a new worker proves an adopted guest before it goes on the bus (see main()).
ADOPT_QUIET = 2.0


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


class VMWorker:
    def __init__(self, config: Config, backend: Backend, keys: KeyPaths, node: bus.Node) -> None:
        self.config = config
        self.backend = backend
        self.keys = keys
        self.node = node
        self.activity = Activity()
        self.state: VmState = STOPPED
        self.phase: BootPhase = BOOTING  # what `starting` does (published only then)
        self._adopting = False  # adopt() takes on whatever state a previous worker left
        self.since = time.time()
        self.reason: str | None = None
        self.boots = 0
        self.last_boot_seconds: float | None = None
        self.restores = 0
        self.last_restore_seconds: float | None = None
        self.snapshots = SnapshotStore(config.stateDir)
        self._woken_at = 0.0
        self.failures = 0
        self.retry_at = 0.0  # wall time before which a failed VM is not booted again
        self._lock = asyncio.Lock()
        self._boot: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        # The config file as last re-read (issue 20): what was refused, and what waits for
        # the VM's next boot (the backend keeps the config its hypervisor was started with).
        self.reread: reconfig.Reread = runtime.started_with or reconfig.Reread(config)
        self.reread_at = time.time()
        self.pending: list[str] = []
        node.use_state(self.snapshot)

    # -- state ----------------------------------------------------------------------------------

    def snapshot(self) -> VmStateData:
        endpoint = None
        if self.state in (RUNNING, PAUSED):
            with contextlib.suppress(BackendError):
                ep = self.backend.endpoint()
                endpoint = [ep.host, ep.port]
        return {
            "state": self.state, "phase": self.phase if self.state == STARTING else None,
            "since": self.since, "reason": self.reason,
            "backend": self.backend.name, "pid": self.backend.pid(), "endpoint": endpoint,
            "boots": self.boots, "last_boot_seconds": self.last_boot_seconds,
            "restores": self.restores, "last_restore_seconds": self.last_restore_seconds,
            "snapshot": self.snapshots.info(), "can_suspend": self.backend.can_suspend(),
            "woken_at": self.woken_at, "retry_at": self.retry_at if self.state == FAILED else None,
            "connections": self.activity.open_connections(),
            "last_activity": self.activity.last_activity(),
            "forwarders": self.activity.forwarders(),
            "on_demand": self.config.onDemand.enable,
            "forwarder": as_forwarder_state(self.node.peers["forwarder"].state),
            "config": {"source": self.reread.source, "reread_at": self.reread_at,
                       "pending": self.pending, "refused": self.reread.refused,
                       "error": self.reread.error},
        }

    @property
    def woken_at(self) -> float:
        return self._woken_at

    @woken_at.setter
    def woken_at(self, t: float) -> None:
        # the idle monitor must not act on an idle time a wake has just ended
        self._woken_at = t
        self.node.changed()

    def _set(self, state: VmState, reason: str | None = None, *, phase: BootPhase | None = None) -> None:
        assert state in VM_STATES
        if not self._adopting and not legal(self.state, state):
            # Allowed all the same: refusing could leave a user with a VM stuck in a state
            # that no longer tells the truth. The error says which table entry is missing.
            log.error("illegal VM state transition %s -> %s%s", self.state, state,
                      f" ({reason})" if reason else "")
        if state != self.state:
            log.info("vm %s -> %s%s", self.state, state, f" ({reason})" if reason else "")
            self.since = time.time()
        self.state, self.reason = state, reason
        if phase is not None:
            self.phase = phase
        self._record_proven()
        self._update_pending()
        self.node.changed()
        self._persist()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- config reload ----------------------------------------------------------------------------

    @property
    def _booted_path(self) -> str:
        return self.config.runtime(BOOTED_CONFIG_FILE)

    def reload(self) -> None:
        """SIGHUP, and before every boot: re-read the config file. What the VM cannot take
        while it exists waits for its next boot (listed as pending); a saved VM from the old
        config is not restored."""
        result = reconfig.reread(self.config)
        reconfig.report(result, "vm")
        self.config, self.reread, self.reread_at = result.config, result, time.time()
        if self.backend.pid() is None and self.state not in (STARTING, SUSPENDING, STOPPING):
            self._use_config_for_next_boot()
        self._set(self.state, self.reason)

    def _use_config_for_next_boot(self) -> None:
        """No hypervisor runs: the next one starts from the current config."""
        if self.backend.config != self.config:
            log.info("the next boot uses the re-read config")
            self.backend = make_backend(self.config, self.keys)

    def _update_pending(self) -> None:
        """Config changes the VM has not taken yet: the running one's since its boot, the
        saved one's since its save (that snapshot will not be restored: a cold boot)."""
        now = reconfig.as_data(self.config)
        if self.state == SUSPENDED:
            rec = self.snapshots.record() or {}
            saved = (rec.get("depends") or {}).get("config")
            self.pending = reconfig.diff(saved, now) if isinstance(saved, dict) else []
        elif self.state in (STARTING, RUNNING, PAUSED, STOPPING, SUSPENDING):
            self.pending = reconfig.diff(reconfig.as_data(self.backend.config), now)
        else:
            self.pending = []

    @property
    def _proven_path(self) -> str:
        return self.config.runtime(PROVEN_FILE)

    def _record_proven(self) -> None:
        """Which hypervisor this worker has proven (it was `running`): the next worker adopts
        that one as it is, without proving it again. Any other state drops the record, so a
        hypervisor adopted half-booted, half-restored or mid-save is never taken for it."""
        pid = self.backend.pid() if self.state in (RUNNING, PAUSED) else None
        try:
            if pid is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._proven_path)
            elif self._proven_pid() != pid:
                write_json(self._proven_path, {"pid": pid})
        except OSError as e:
            log.warning("cannot record the proven hypervisor: %s", e)

    def _proven_pid(self) -> int | None:
        try:
            with open(self._proven_path) as f:
                pid = json.load(f).get("pid")
        except (OSError, ValueError, AttributeError):
            return None
        return pid if isinstance(pid, int) else None

    def _record_booted_config(self) -> None:
        try:
            write_json(self._booted_path, reconfig.as_data(self.backend.config))
        except OSError as e:
            log.warning("cannot record the booted config: %s", e)

    @property
    def _counters_path(self) -> str:
        return self.config.runtime(COUNTERS_FILE)

    def _persist(self) -> None:
        """Boot counters outlive a worker restart (they count since the arbiter started)."""
        data = {"boots": self.boots, "last_boot_seconds": self.last_boot_seconds,
                "restores": self.restores, "last_restore_seconds": self.last_restore_seconds}
        try:
            write_json(self._counters_path, data)
        except OSError as e:  # a full disk costs us the counters, never the VM
            log.warning("cannot save counters: %s", e)

    def restore_counters(self) -> None:
        try:
            with open(self._counters_path) as f:
                data = json.load(f)
            self.boots = int(data.get("boots", 0))
            lbs = data.get("last_boot_seconds")
            self.last_boot_seconds = float(lbs) if lbs is not None else None
            self.restores = int(data.get("restores", 0))
            lrs = data.get("last_restore_seconds")
            self.last_restore_seconds = float(lrs) if lrs is not None else None
        except (OSError, ValueError, TypeError, AttributeError):
            pass

    async def wait_for(self, states: tuple[str, ...], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.state not in states:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

    # -- commands -------------------------------------------------------------------------------

    async def handle(self, cmd: str, args: dict[str, Any]) -> tuple[bool, str | None, VmStateData]:
        if cmd == "status":
            return True, None, self.snapshot()
        if cmd in ("wake", "start"):
            return await self._wake(args)
        if cmd == "resume":
            try:
                await self._resume()
            except BackendError as e:
                log.warning("resume failed: %s", e)
                return False, f"could not resume: {e}", self.snapshot()
            return True, None, self.snapshot()
        if cmd in ("pause", "stop"):
            refusal = self._idle_refusal(args)
            if refusal:
                return False, refusal, self.snapshot()
            try:
                await (self._pause(args) if cmd == "pause" else self._stop(args))
            except BackendError as e:
                log.warning("%s failed: %s", cmd, e)
                return False, f"could not {cmd}: {e}", self.snapshot()
            ok = self.state in ((PAUSED, STOPPED, SUSPENDED, FAILED) if cmd == "pause"
                                else (STOPPED, SUSPENDED, FAILED))
            return ok, None if ok else f"could not {cmd}: VM is {self.state}", self.snapshot()
        return False, f"unknown command {cmd}", self.snapshot()

    def _idle_refusal(self, args: dict[str, Any]) -> str | None:
        if not args.get("if_idle"):
            return None
        open_ = self.activity.open_connections()
        if open_:
            return f"busy: {open_} connection(s) open"
        idle_since = args.get("idle_since")
        if isinstance(idle_since, int | float) and self.woken_at > idle_since:
            return "busy: woken since the idle period began"
        return None

    async def _wake(self, args: dict[str, Any]) -> tuple[bool, str | None, VmStateData]:
        self.woken_at = time.time()
        wait = args.get("wait", 0)
        wait = min(float(wait), WAKE_WAIT_MAX) if isinstance(wait, int | float) else 0.0
        if self.state in (STOPPING, SUSPENDING):
            await self.wait_for((STOPPED, SUSPENDED, FAILED), wait)
        if self.state == PAUSED:
            try:
                await self._resume()
            except BackendError as e:
                log.warning("resume failed: %s", e)
                return False, f"could not resume: {e}", self.snapshot()
        elif self.state in (STOPPED, SUSPENDED, FAILED):
            if self.state == FAILED and time.time() < self.retry_at:
                wait_s = self.retry_at - time.time()
                return False, f"boot failed: {self.reason} (next try in {wait_s:.0f}s)", self.snapshot()
            self.ensure_boot()
        if wait > 0:  # (`stopped` again: the boot was cancelled, this worker is ending)
            await self.wait_for((RUNNING, FAILED, STOPPED), wait)
        if self.state == FAILED:
            return False, f"boot failed: {self.reason}", self.snapshot()
        return self.state == RUNNING, None, self.snapshot()

    def ensure_boot(self) -> None:
        """Start a boot unless one is under way. The state turns `starting` before this returns,
        so every wake that comes in meanwhile waits for this same boot."""
        if self._boot is not None and not self._boot.done():
            return
        phase: BootPhase = RESTORING if self.snapshots.present() else BOOTING
        if phase == RESTORING:
            reason: str | None = "restoring the saved VM"
        elif self.state == FAILED and self.reason:
            reason = f"booting again after: {self.reason}"  # the cause stays in `virby status`
        else:
            reason = None
        self._set(STARTING, reason, phase=phase)
        self._boot = asyncio.create_task(self._run_boot())

    async def _run_boot(self) -> None:
        async with self._lock:
            if self.state not in (STARTING,):
                return
            await self._do_boot()

    def _dependencies(self) -> dict[str, Any]:
        # the backend's config: the one its hypervisor was started with
        return dependencies(self.backend.config, self.backend.command(),
                            self.backend.snapshot_inputs())

    async def _do_boot(self) -> None:
        # every boot starts from the file as it is now, even without a reload (`virby stop`,
        # then a connection): an edit is never silently left out
        self.reload()
        self._use_config_for_next_boot()
        self._record_booted_config()
        self._update_pending()
        if self.snapshots.present():
            try:
                if await self._restore():
                    return
            except asyncio.CancelledError:
                await self._kill_quietly()
                self._set(STOPPED, "boot cancelled")
                raise
        if self.snapshots.discard():
            log.info("a cold boot invalidates the saved VM: deleted")
        t0 = time.monotonic()
        deadline = t0 + self.config.readyTimeout
        # paramiko is imported lazily (10 MiB an idle worker need not carry); load it while the
        # guest boots, so the SSH proof does not pay for the import on the cold-start path.
        preload = asyncio.get_running_loop().run_in_executor(None, importlib.import_module, "paramiko")
        try:
            self.keys = ensure_keys(self.config.stateDir)
            await self.backend.boot()
            await asyncio.wait_for(self.backend.wait_announced(), deadline - time.monotonic())
            announced = time.monotonic()
            await preload
            await self._prove_ssh(deadline)
            log.info("guest announced sshd after %.2fs; the SSH proof took %.2fs",
                     announced - t0, time.monotonic() - announced)
        except asyncio.CancelledError:
            await self._kill_quietly()
            self._set(STOPPED, "boot cancelled")
            raise
        except Exception as e:  # any failure, a bug included, must end in `failed`
            await self._boot_failed(e, t0)
            return
        self.boots += 1
        self.failures = 0
        self.last_boot_seconds = round(time.monotonic() - t0, 3)
        log.info("guest ready in %.2fs (boot %d)", self.last_boot_seconds, self.boots)
        self._set(RUNNING)
        self._watch_exit()

    async def _restore(self) -> bool:
        """Restore the saved VM; True when it runs and SSH is proven. False (the snapshot is
        deleted, the reason logged, the hypervisor ended) when a cold boot must follow."""
        t0 = time.monotonic()
        deadline = t0 + min(RESTORE_TIMEOUT, self.config.readyTimeout)
        # as for a cold boot: paramiko (for the SSH proof) loads while the state does
        preload = asyncio.get_running_loop().run_in_executor(None, importlib.import_module, "paramiko")
        try:
            deps = await asyncio.to_thread(self._dependencies)
            with self.snapshots.take(deps) as taken:
                # sha256 of the file alongside the load; checked before a vCPU runs
                verified = asyncio.create_task(asyncio.to_thread(taken.verify))
                try:
                    await asyncio.wait_for(self.backend.restore(taken.path), deadline - time.monotonic())
                except BaseException:
                    verified.cancel()  # its answer no longer matters (the thread just ends)
                    raise
                await asyncio.wait_for(verified, max(1.0, deadline - time.monotonic()))
            loaded = time.monotonic()
            await self.backend.resume()
            await self.backend.sync_guest(os.urandom(SEED_BYTES))
            await asyncio.wait_for(self.backend.wait_announced(), deadline - time.monotonic())
            await preload
            await self._prove_ssh(deadline)
        except Exception as e:  # whatever went wrong (a bug included), the client gets a cold boot
            if isinstance(e, TimeoutError):
                reason = f"not ready within {deadline - t0:g}s"
            elif isinstance(e, SnapshotInvalid | BackendError | OSError):
                reason = one_line(str(e)) or type(e).__name__
            else:
                log.error("unexpected error during the restore", exc_info=e)
                reason = f"{type(e).__name__}: {one_line(str(e))}".rstrip(": ")
            log.warning("the saved VM was not restored (%s); booting cold", reason)
            await self._kill_quietly()
            self.snapshots.discard()
            self._set(STARTING, f"cold boot (the restore failed: {reason})", phase=BOOTING)
            return False
        self.restores += 1
        self.failures = 0
        self.last_restore_seconds = round(time.monotonic() - t0, 3)
        log.info("guest restored in %.2fs (state loaded in %.2fs; restore %d)",
                 self.last_restore_seconds, loaded - t0, self.restores)
        self._set(RUNNING)
        self._watch_exit()
        return True

    async def _prove_ssh(self, deadline: float) -> None:
        ep = self.backend.endpoint()
        while True:
            remaining = deadline - time.monotonic()
            try:
                await asyncio.to_thread(prove_ssh, ep.host, ep.port, self.keys,
                                        max(0.5, min(5.0, remaining)))
                return
            except SSHNotReady as e:
                if remaining <= 0.5:
                    raise BackendError(f"sshd announced but the SSH check failed: {e}") from e
                log.info("ssh not ready yet: %s", e)
                await asyncio.sleep(0.2)

    async def _boot_failed(self, error: BaseException, t0: float) -> None:
        if isinstance(error, TimeoutError):
            reason = f"guest not ready within {self.config.readyTimeout:g}s"
        elif isinstance(error, BackendError | OSError):
            reason = one_line(str(error)) or type(error).__name__
        else:  # not foreseen (psutil.NoSuchProcess, a ValueError from a damaged file…): a bug
            log.error("unexpected error during the boot", exc_info=error)
            reason = f"{type(error).__name__}: {one_line(str(error))}".rstrip(": ")
        log.error("boot failed after %.1fs: %s", time.monotonic() - t0, reason)
        await self._fail(reason)

    async def _fail(self, reason: str, *, console: bool = True, backoff: bool = True) -> None:
        """End in `failed`: the hypervisor killed, the console's last line in the reason (unless
        the reason has it already), and the next boot held back by a growing backoff (none for
        a VM that ran and then stopped answering: the next wake boots it at once). Never
        raises, so no caller stays in `starting` or `running` with a broken guest."""
        tail = ""
        with contextlib.suppress(Exception):
            tail = self.backend.console_tail(8)
        if tail:
            log.error("last console lines:\n%s", tail)
        await self._kill_quietly()
        if backoff:
            self.failures += 1
            self.retry_at = time.time() + min(FAILURE_BACKOFF_MAX, 2.0 ** self.failures)
        else:
            self.retry_at = time.time()
        last_line = tail.strip().splitlines()[-1] if tail.strip() and console else ""
        self._set(FAILED, reason + (f"; console: {last_line}" if last_line else ""))

    async def _kill_quietly(self) -> None:
        try:
            await self.backend.kill()
        except Exception:
            log.exception("could not kill the hypervisor")

    def _watch_exit(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        self._monitor = asyncio.create_task(self._monitor_exit())

    async def _monitor_exit(self) -> None:
        """Notice a hypervisor that exits, a guest that breaks while it runs on (a panic, an
        internal or I/O error: `failed`, never `running`), or a hypervisor that stops
        answering (hung, SIGSTOPped, a wedged host: `failed`, killed, booted cold next time)."""
        exited = asyncio.create_task(self.backend.wait_exit())
        broken = asyncio.create_task(self._wait_broken())
        silent = asyncio.create_task(self._wait_unresponsive())
        try:
            await asyncio.wait({exited, broken, silent}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            broken.cancel()
            silent.cancel()
        async with self._lock:
            if self.state not in (RUNNING, PAUSED):
                return
            if broken.done() and not broken.cancelled():
                log.error("the guest broke: %s", broken.result())
                await self._fail(broken.result(), console=False)
            elif silent.done() and not silent.cancelled() and not exited.done():
                reason = silent.result()
                log.error("%s; killing it (the next wake boots it cold)", reason)
                await self._fail(reason, console=False, backoff=False)
            else:
                await self._kill_quietly()  # reap and clean up
                self._set(STOPPED, "the hypervisor exited unexpectedly")
        if not self.config.onDemand.enable and self.state in (STOPPED, FAILED) \
                and time.time() >= self.retry_at:
            self.ensure_boot()  # (a broken guest waits for its backoff, then the next wake)

    async def _wait_unresponsive(self) -> str:
        """Return the reason once the hypervisor has missed LIVENESS_MISSES status queries in
        a row (one is enough when its process is stopped). Each query has its own deadline."""
        misses = 0
        while True:
            await asyncio.sleep(LIVENESS_INTERVAL)
            t0 = time.monotonic()
            try:
                await self.backend.ping(LIVENESS_TIMEOUT)
                misses = 0
                continue
            except BackendError as e:
                error = str(e)
            except Exception as e:  # a bug in a backend's ping must not pass for a dead VM
                log.exception("liveness check failed unexpectedly")
                error = f"{type(e).__name__}: {e}"
            if not self.backend.pid():
                await asyncio.Future()  # gone: the exit watch reports it
            misses += 1
            stopped = self.backend.stopped()
            log.warning("the hypervisor did not answer (%d of %d): %s", misses, LIVENESS_MISSES, error)
            if misses >= LIVENESS_MISSES or stopped:
                return (f"the hypervisor stopped answering ({error}; "
                        f"{time.monotonic() - t0:.1f}s without an answer)")

    async def _wait_broken(self) -> str:
        try:
            return await self.backend.wait_broken()
        except Exception as e:  # the exit watch still covers this VM
            log.warning("cannot watch the guest for errors: %s", e)
            await asyncio.Future()  # never
            raise

    async def _pause(self, args: dict[str, Any]) -> None:
        async with self._lock:
            if self.state != RUNNING or self._idle_refusal(args):
                return
            await self.backend.pause()
            self._set(PAUSED)

    async def _resume(self) -> None:
        async with self._lock:
            if self.state != PAUSED:
                return
            await self.backend.resume()
            self._set(RUNNING)
        task = asyncio.create_task(self._sync_clock())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resume_quietly(self) -> None:
        try:
            await self._resume()
        except BackendError as e:
            log.warning("resume failed: %s", e)

    async def _sync_clock(self) -> None:
        try:
            await self.backend.sync_clock()
        except (BackendError, OSError) as e:
            log.warning("clock sync after resume failed: %s", e)

    async def _stop(self, args: dict[str, Any]) -> None:
        async with self._lock:
            cold = bool(args.get("cold"))
            if self.state == SUSPENDED and cold:
                self.snapshots.discard()
                self._set(STOPPED, "the saved VM was deleted (stop --cold)")
                return
            if self.state in (STOPPED, SUSPENDED, FAILED) or self._idle_refusal(args):
                return
            if not cold and self.state in (RUNNING, PAUSED) and self.backend.can_suspend():
                await self._suspend_locked()
            else:
                await self._shutdown_locked(VM_SHUTDOWN_TIMEOUT)

    async def _suspend_locked(self) -> None:
        """Save the VM and let the hypervisor exit; on any failure, a clean stop instead."""
        self._set(SUSPENDING)
        if self._monitor is not None:
            self._monitor.cancel()
        t0 = time.monotonic()
        try:
            path = self.snapshots.begin()
            await self.backend.suspend(path)
            saved = time.monotonic() - t0
            # after the exit: the disk's identity is final only once the hypervisor is gone
            rec = await asyncio.to_thread(self.snapshots.commit, self._dependencies(), saved)
        except (BackendError, OSError) as e:
            log.warning("could not save the VM (%s); stopping it instead", e)
            self.snapshots.discard()
            await self.backend.shutdown(VM_SHUTDOWN_TIMEOUT)
            self._set(STOPPED, f"the VM could not be saved: {e}")
            return
        log.info("VM saved in %.2fs (%.1f MiB; recorded after %.2fs)", saved, rec["size"] / 2**20,
                 time.monotonic() - t0)
        self._set(SUSPENDED)

    async def _shutdown_locked(self, timeout: float) -> None:
        self._set(STOPPING)
        if self._monitor is not None:
            self._monitor.cancel()
        await self.backend.shutdown(timeout)
        self._set(STOPPED)

    # -- start and end of the worker ------------------------------------------------------------

    async def adopt(self) -> None:
        """Take over what a previous worker left, in the state it was in:

        * a hypervisor in the middle of a save (the worker was killed while `suspending`): the
          save is waited for and recorded (then `suspended`); if it failed, the guest is
          resumed and proven. Never killed silently, its snapshot never deleted;
        * a save that finished after its worker died (no hypervisor left): recorded;
        * a running guest: `starting` until it is proven like a fresh boot (the clock set, the
          agent's announcement, one SSH login): it may be half-booted or half-restored;
        * a paused guest: paused, as it was; a broken one: `failed`."""
        self._adopting = True
        try:
            await self._adopt()
        finally:
            self._adopting = False

    async def _adopt(self) -> None:
        try:
            adopted = await self.backend.adopt()
            saving = await self.backend.adopted_save() if adopted else None
            status = await self.backend.status() if adopted and saving is None else STOPPED
        except Exception as e:  # a VM we cannot drive is ended, never a crash loop
            log.warning("could not adopt a running VM (%s); killing it", describe(e))
            await self._kill_quietly()
            status, adopted, saving = STOPPED, False, None
        if saving == "saving" and self.snapshots.unfinished_save():
            log.info("adopted qemu pid %s in the middle of a save: waiting for it to finish",
                     self.backend.pid())
            self._set(SUSPENDING, "finishing the save a previous vm worker started")
            self._boot = asyncio.create_task(self._finish_adopted_save())
            return
        if saving is not None:
            why = ("a save failed" if saving == FAILED else "a save with no file to save into")
            log.warning("adopted qemu pid %s after %s: resuming the guest", self.backend.pid(), why)
            try:
                await self.backend.resume()
                status = RUNNING
            except BackendError as e:
                log.warning("cannot resume it (%s); killing it", e)
                await self._kill_quietly()
                status, adopted = STOPPED, False
        if not adopted and self.snapshots.unfinished_save():
            await self._record_unfinished_save()
        if status in (RUNNING, PAUSED, FAILED):
            self.snapshots.discard()  # a VM that ran since supersedes any saved one
        if status == RUNNING and saving is None and self._proven_pid() == self.backend.pid():
            log.info("adopted running qemu pid %s, proven by the previous vm worker",
                     self.backend.pid())
            self._set(RUNNING)
            self._watch_exit()
            return
        if status == RUNNING:
            self._set(STARTING, "adopted a running VM: proving it before use", phase=PROVING)
            self._boot = asyncio.create_task(self._prove_adopted())
            return
        if status == PAUSED:
            self._set(status)
            self._watch_exit()
            return
        if status == FAILED:
            await self._fail(self.backend.failure or "the guest is broken", console=False)
            return
        if adopted:
            log.warning("killing qemu pid %s: adopted in state %s, which cannot run on",
                        self.backend.pid(), status)
            await self._kill_quietly()
        self.snapshots.clean_leftovers()
        if self.snapshots.present():
            self._set(SUSPENDED)

    async def _record_unfinished_save(self) -> None:
        """The hypervisor quits only once its save completed, so a save file without a record
        and without a hypervisor is a whole save whose worker died before recording it. (A
        damaged one fails to load at the next wake: a cold boot, as for any bad snapshot.)"""
        try:
            rec = await asyncio.to_thread(self.snapshots.commit, self._dependencies(), 0.0)
        except OSError as e:
            log.warning("the save a previous vm worker left cannot be recorded (%s); deleted", e)
            self.snapshots.discard()
            return
        log.info("recorded the save a previous vm worker finished (%.1f MiB)", rec["size"] / 2**20)

    async def _finish_adopted_save(self) -> None:
        async with self._lock:
            t0 = time.monotonic()
            try:
                await self.backend.finish_suspend(SAVE_TIMEOUT)
                rec = await asyncio.to_thread(self.snapshots.commit, self._dependencies(),
                                              time.monotonic() - t0)
            except (BackendError, OSError) as e:
                log.warning("the save a previous vm worker started did not complete (%s)", e)
                self.snapshots.discard()
                if self.backend.pid() is None:
                    self._set(STOPPED, f"the VM could not be saved: {e}")
                    return
                try:
                    await self.backend.resume()
                except BackendError as e2:
                    await self._fail(f"the VM could not be saved ({e}) nor resumed ({e2})",
                                     console=False)
                    return
                self._set(STARTING, "the save failed: resuming and proving the guest", phase=PROVING)
                await self._prove_locked()
                return
            log.info("VM saved: the save a previous vm worker started finished after %.2fs "
                     "(%.1f MiB)", time.monotonic() - t0, rec["size"] / 2**20)
            self._set(SUSPENDED)

    async def _prove_adopted(self) -> None:
        async with self._lock:
            if self.state == STARTING:
                await self._prove_locked()

    async def _prove_locked(self) -> None:
        """An adopted guest, proven as a boot is: the clock and entropy set, the agent's
        announcement, one SSH login, within readyTimeout; else `failed`."""
        t0 = time.monotonic()
        deadline = t0 + self.config.readyTimeout
        try:
            await self.backend.sync_guest(os.urandom(SEED_BYTES))
            await asyncio.wait_for(self.backend.wait_announced(), deadline - time.monotonic())
            await self._prove_ssh(deadline)
        except asyncio.CancelledError:
            await self._kill_quietly()
            self._set(STOPPED, "boot cancelled")
            raise
        except Exception as e:
            await self._boot_failed(e, t0)
            return
        log.info("adopted guest proven in %.2fs (clock set, agent announced sshd, SSH login)",
                 time.monotonic() - t0)
        self._set(RUNNING)
        self._watch_exit()

    async def on_message(self, msg: bus.Message, peer: bus.Peer, restarted: bool) -> None:
        self.activity.observe(msg)  # the node publishes what this changes once we return
        if self.state == PAUSED and self.activity.open_connections() > 0:
            # A client got through while a pause raced in: never leave it hanging.
            log.info("connection open while paused: resuming")
            self.woken_at = time.time()
            task = asyncio.create_task(self._resume_quietly())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def close(self, *, keep: bool, orphaned: bool = False) -> None:
        """End this worker. A starting guest is killed at once (it has nothing to lose and
        cannot be adopted half-booted). A running or paused VM is left to the next worker when
        `keep`, else shut down cleanly; orphaned (circusd and the port are gone), at once."""
        if self._boot is not None and not self._boot.done():
            if self.state == SUSPENDING:
                # a save a previous worker started: let it finish (bounded by SAVE_TIMEOUT)
                # rather than leave the hypervisor in the middle of it
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._boot)
            else:
                self._boot.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._boot
        async with self._lock:
            if self._monitor is not None:
                self._monitor.cancel()
            if self.backend.pid() is None:
                return
            if keep and not orphaned and self.state in (RUNNING, PAUSED):
                log.info("leaving the VM %s (hypervisor pid %s) to the next vm worker",
                         self.state, self.backend.pid())
                await self.backend.close()
                return
            await self._shutdown_locked(0 if orphaned else VM_SHUTDOWN_TIMEOUT)


def booted_config(config: Config) -> Config:
    """The config a hypervisor left by a previous worker was started with (its snapshot and
    its pending changes are computed from it), else `config`."""
    path = config.runtime(BOOTED_CONFIG_FILE)
    if not os.path.exists(path):
        return config
    try:
        booted = load(path)
    except ConfigError as e:
        log.warning("ignoring %s: %s", path, e)
        return config
    return booted if booted != config else config


async def main(config: Config, stop: asyncio.Event) -> None:
    parent = os.getppid()
    keys = ensure_keys(config.stateDir)
    backend = make_backend(booted_config(config), keys)
    worker: VMWorker | None = None

    async def on_message(msg: bus.Message, peer: bus.Peer, restarted: bool) -> None:
        if worker is not None:
            await worker.on_message(msg, peer, restarted)

    node = bus.Node("vm", config, on_message)
    worker = VMWorker(config, backend, keys, node)
    worker.restore_counters()
    await worker.adopt()
    if worker._boot is not None:
        # A healthy adopted guest is proven in well under a second: go on the bus once it is
        # (the others keep seeing the old broadcast as `up` for PEER_TIMEOUT meanwhile), or
        # after ADOPT_QUIET with `starting`/`suspending`, so that wakes can wait on it.
        await asyncio.wait({worker._boot}, timeout=ADOPT_QUIET)
    runtime.on_sighup(worker.reload)
    control = bus.ControlServer(config, worker.handle)
    await node.start()
    control.start()
    log.info("vm worker ready (incarnation %s, VM %s)", node.inc, worker.state)
    if not config.onDemand.enable and worker.state in (STOPPED, FAILED):
        worker.ensure_boot()
    await stop.wait()
    orphaned = os.getppid() != parent
    await control.close()
    if orphaned:
        log.info("stopping: circusd is gone")
        await worker.close(keep=False, orphaned=True)
    else:
        if worker.state == STARTING:
            await worker.close(keep=False)  # kill the half-booted guest before asking anything
        intent = await stop_intent.ask(config)
        log.info("stopping: %s", intent.why)
        await worker.close(keep=intent.keep_vm)
    await node.close()


if __name__ == "__main__":
    run_worker("vm", main)
