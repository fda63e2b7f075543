"""The rendered circus ini, read back by circus's own config loader."""

from __future__ import annotations

import configparser
import json
import os
from pathlib import Path

from circus.config import get_config

from virby.core.config import from_dict
from virby.core.watchers import BY_NAME
from virby.supervisor import circus_ini


def render(tmp_path: Path) -> tuple[Path, configparser.ConfigParser]:
    c = from_dict({"runtimeDir": str(tmp_path / "run"), "stateDir": str(tmp_path / "state"),
                   "port": 40123})
    os.makedirs(c.runtimeDir)
    path = Path(circus_ini.write_all(c))
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(path)
    return path, ini


def test_circus_accepts_it_with_our_settings(tmp_path: Path) -> None:
    path, _ = render(tmp_path)
    conf = get_config(str(path))
    assert conf["check_delay"] == 1.0
    assert conf["multicast_endpoint"] == ""  # no UDP listener on every interface
    assert conf["endpoint"] == f"ipc://{tmp_path}/run/ctl.sock"
    assert conf["pubsub_endpoint"] == f"ipc://{tmp_path}/run/events.sock"
    assert not conf.get("statsd")
    [sock] = conf["sockets"]
    assert (sock["host"], int(sock["port"]), int(sock["backlog"])) == ("127.0.0.1", 40123, 512)
    watchers = {w["name"]: w for w in conf["watchers"]}
    assert set(watchers) == {"vm", "forwarder", "idle"}
    assert watchers["forwarder"]["use_sockets"] is True
    assert "$(circus.sockets.ssh)" in watchers["forwarder"]["cmd"]
    for name in ("vm", "idle"):
        assert watchers[name]["use_sockets"] is False  # an orphan must never hold the port
        assert watchers[name]["singleton"] is True
        assert watchers[name]["send_hup"] is True  # a reload is a SIGHUP, never a second copy
    for name, w in watchers.items():
        assert w["max_retry"] == 5 and w.get("on_demand") is not True
        assert float(w["graceful_timeout"]) == BY_NAME[name].graceful_timeout
        assert w["stderr_stream"]["class"] == "FileStream"
        assert w["stderr_stream"]["filename"] == f"{tmp_path}/state/logs/{name}.log"
        assert int(w["stderr_stream"]["max_bytes"]) > 0 and int(w["stderr_stream"]["backup_count"]) > 0
        assert not w.get("hooks")  # hooks would block the arbiter
    assert watchers["vm"]["priority"] > watchers["forwarder"]["priority"] > watchers["idle"]["priority"]


def test_watchers_load_the_resolved_config(tmp_path: Path) -> None:
    _, ini = render(tmp_path)
    resolved = Path(ini["env"]["VIRBY_CONFIG"])
    assert resolved == tmp_path / "run" / "config.json"
    loaded = from_dict(json.loads(resolved.read_text()))
    assert loaded.port == 40123


def test_circusd_log_rotates(tmp_path: Path) -> None:
    _, ini = render(tmp_path)
    logging_conf = json.loads(Path(ini["circus"]["loggerconfig"]).read_text())
    handler = logging_conf["handlers"]["file"]
    assert handler["class"] == "logging.handlers.RotatingFileHandler"
    assert handler["filename"] == f"{tmp_path}/state/logs/circusd.log"
    assert handler["maxBytes"] > 0 and handler["backupCount"] > 0
