"""Render the circusd configuration for a Virby config.

The settings: ipc endpoints in the private runtime dir, no
multicast (it would bind UDP on every interface), `check_delay = 1` (respawn within a second),
singletons with `send_hup` for the VM manager so a reload never runs two of it, the listening
socket only in the forwarder, a rotating log per watcher and for circusd, no hooks, no
`on_demand`, and our own crash backoff in the workers (workers/runtime.py).
"""

from __future__ import annotations

import configparser
import io
import json
import sys

from virby.core import watchers
from virby.core.config import Config
from virby.core.protocol import CIRCUS_CONTROL, CIRCUS_EVENTS

SOCKET_BACKLOG = 512
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5


def ini_path(config: Config) -> str:
    return config.runtime("circus.ini")


def resolved_config_path(config: Config) -> str:
    """The exact config the watchers load: written by `virby run` next to the ini."""
    return config.runtime("config.json")


def logger_config(config: Config) -> dict[str, object]:
    """circusd's own log, rotated by the stdlib handler (circus's `loggerconfig`)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s circusd[%(process)d] %(levelname)s %(message)s"}},
        "handlers": {"file": {
            "class": "logging.handlers.RotatingFileHandler",
            "filename": f"{config.log_dir}/{watchers.CIRCUSD_LOG}",
            "maxBytes": LOG_MAX_BYTES, "backupCount": LOG_BACKUPS, "formatter": "plain",
        }},
        "root": {"level": "DEBUG" if config.debug else "INFO", "handlers": ["file"]},
    }


def render(config: Config, *, python: str | None = None) -> str:
    python = python or sys.executable
    ini = configparser.ConfigParser(interpolation=None)
    ini.optionxform = str  # type: ignore[assignment,method-assign]  # keep option case
    ini["circus"] = {
        "endpoint": config.endpoint(CIRCUS_CONTROL),
        "pubsub_endpoint": config.endpoint(CIRCUS_EVENTS),
        "multicast_endpoint": "",
        "statsd": "False",
        "check_delay": "1",
        "warmup_delay": "0",
        "umask": "077",
        "pidfile": config.runtime("circusd.pid"),
        "loglevel": "debug" if config.debug else "info",
        "loggerconfig": config.runtime("circusd-logging.json"),
    }
    ini["socket:ssh"] = {
        "host": "127.0.0.1",
        "port": str(config.port),
        "family": "AF_INET",
        "backlog": str(SOCKET_BACKLOG),
        "blocking": "False",
    }
    common = {
        "numprocesses": "1",
        "copy_env": "True",
        "max_retry": "5",
        "respawn": "True",
        "autostart": "True",
        "stop_signal": "TERM",
    }
    for w in watchers.TABLE:
        section = dict(common)
        section["cmd"] = f"{python} {w.command}"
        section["priority"] = str(w.priority)
        section["graceful_timeout"] = str(w.graceful_timeout)
        # circus hands every watcher the arbiter's sockets unless told not to
        section["use_sockets"] = str(w.holds_socket)
        if w.singleton:
            section["singleton"] = "True"
            section["send_hup"] = "True"
        for stream, filename in (("stderr_stream", w.log_file), ("stdout_stream", w.out_file)):
            section[f"{stream}.class"] = "FileStream"
            section[f"{stream}.filename"] = f"{config.log_dir}/{filename}"
            section[f"{stream}.max_bytes"] = str(LOG_MAX_BYTES)
            section[f"{stream}.backup_count"] = str(LOG_BACKUPS)
        ini[f"watcher:{w.name}"] = section
    ini["env"] = {
        "VIRBY_CONFIG": resolved_config_path(config),
        # the file the config came from: re-read at each worker start and reload (issue 20)
        "VIRBY_CONFIG_SOURCE": config.source or "",
        "PYTHONUNBUFFERED": "1",
    }
    out = io.StringIO()
    ini.write(out)
    return out.getvalue()


def write_all(config: Config) -> str:
    """Write the ini, circusd's logging config and the resolved config; return the ini path."""
    with open(config.runtime("circusd-logging.json"), "w") as f:
        json.dump(logger_config(config), f)
    with open(resolved_config_path(config), "w") as f:
        f.write(config.to_json())
    path = ini_path(config)
    with open(path, "w") as f:
        f.write(render(config))
    return path
