"""What every watcher process does the same way: logging that survives a dead circusd, exiting
when circusd is gone, SIGTERM handling, and our own crash backoff.

Circus respawns a crashed watcher once per `check_delay` forever, with no backoff, and its
Flapping plugin drops its own stop command (circus 0.19). So a worker that fails
records the failure in `<runtimeDir>/<name>.failure` and sleeps 1 s, 2 s, 4 s … up to 60 s
*before* exiting; a worker that has run for HEALTHY_AFTER seconds clears the record. `virby
status` shows the record. A kill -9 records nothing, so it is respawned at circus's pace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import TextIO

from virby.core import procwait
from virby.core.config import Config, ConfigError, load_for_worker
from virby.core.failures import clear_failure, record_failure
from virby.workers import reconfig

HEALTHY_AFTER = 10.0

log = logging.getLogger("virby")

# What the worker's start made of the config file (re-read over the runtime copy), and the
# callbacks SIGHUP runs (`circusctl reload`, `virby reload`): each re-reads the file itself.
started_with: reconfig.Reread | None = None
_on_sighup: list[Callable[[], None]] = []


def on_sighup(callback: Callable[[], None]) -> None:
    """Run `callback` in the event loop on every SIGHUP (a reload)."""
    _on_sighup.append(callback)


def _sighup() -> None:
    log.info("SIGHUP: re-reading the config")
    for callback in list(_on_sighup):
        try:
            callback()
        except Exception:  # a reload must never take the worker down
            log.exception("reload failed")


class _SafeStream:
    """stderr that turns into /dev/null once circusd's pipe is gone (BrokenPipeError would
    otherwise kill the task that is shutting us down: circusd closes it when it exits)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (BrokenPipeError, OSError, ValueError):
            self.stream = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (BrokenPipeError, OSError, ValueError):
            self.stream = open(os.devnull, "w")  # noqa: SIM115


def setup_logging(name: str, debug: bool) -> None:
    stream = _SafeStream(sys.stderr)
    sys.stderr = stream  # type: ignore[assignment,unused-ignore]
    sys.stdout = _SafeStream(sys.stdout)  # type: ignore[assignment,unused-ignore]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s {name}[%(process)d] %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


async def _watch_parent(stop: asyncio.Event) -> None:
    """circusd starts us in our own session, so nobody kills us if it dies: watch for it."""
    parent = os.getppid()
    await procwait.exited(parent, lambda: os.getppid() == parent)
    if not stop.is_set():
        log.warning("circusd (pid %d) is gone; exiting", parent)
        stop.set()


async def _mark_healthy(config: Config, name: str) -> None:
    await asyncio.sleep(HEALTHY_AFTER)
    clear_failure(config, name)


WorkerMain = Callable[[Config, asyncio.Event], Awaitable[None]]


def run_worker(name: str, main: WorkerMain) -> None:
    """Run `main(config, stop)` until it returns or `stop` is set by SIGTERM/SIGINT/parent loss.
    `main` must return promptly once `stop` is set."""
    global started_with
    # SIGHUP first of all: circusd's reload and `send_hup` deliver it, and the default action
    # (die) would restart the VM manager. Until the loop runs it is ignored; then it re-reads
    # the config file.
    signal.signal(signal.SIGHUP, lambda *_: log.info("SIGHUP before start-up: ignored"))
    setup_logging(name, debug=False)
    try:
        config = load_for_worker()
    except ConfigError as e:
        log.error("%s", e)
        _sleep_unless_orphaned(5)  # the config will not fix itself; don't let circus spin
        sys.exit(2)
    started_with = reconfig.reread(config)
    config = started_with.config
    setup_logging(name, config.debug)
    reconfig.report(started_with, name)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, _sighup)
        watchers = [asyncio.create_task(_watch_parent(stop)),
                    asyncio.create_task(_mark_healthy(config, name))]
        try:
            await main(config, stop)
        finally:
            for w in watchers:
                w.cancel()

    try:
        asyncio.run(runner())
    except KeyboardInterrupt:
        pass
    except Exception:
        reason = traceback.format_exc()
        log.error("%s failed:\n%s", name, reason)
        delay = record_failure(config, name, reason.strip().splitlines()[-1])
        log.error("waiting %.0fs before exiting (crash backoff)", delay)
        _sleep_unless_orphaned(delay)
        sys.exit(1)


def _sleep_unless_orphaned(seconds: float) -> None:
    parent = os.getppid()
    procwait.exited_within(parent, lambda: os.getppid() == parent, seconds)
