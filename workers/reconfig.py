"""Re-reading the config file while the arbiter runs (issue 20): every change is applied,
deferred to the VM's next boot, or refused, and each of those is said, never ignored.

`virby run` copies the resolved config into the runtime dir (VIRBY_CONFIG) and names the file
it came from (VIRBY_CONFIG_SOURCE). A worker reads the source again at its start and on
SIGHUP (`circusctl reload`, `virby reload`). Keys the arbiter itself was built from (the port
circusd listens on, the directories its sockets and state live in, the builder's name) cannot
change under it: such a change is refused, the running value kept, and the refusal shown by
`virby status` until `virby run` is restarted. A bad file changes nothing and says why.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from virby.core.config import ARBITER_KEYS, Config, ConfigError, load

log = logging.getLogger("virby.reconfig")

SOURCE_ENV = "VIRBY_CONFIG_SOURCE"


@dataclass
class Reread:
    config: Config  # what the worker uses from now on
    changed: list[str] = field(default_factory=list)  # "memory: 512 -> 768", applied here
    refused: list[str] = field(default_factory=list)  # arbiter keys the file changed
    error: str | None = None  # the file could not be used at all
    source: str | None = None


def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "sharedDirectories":
            out.update(flat(value, name + "."))
        else:
            out[name] = value
    return out


def as_data(config: Config) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(config.to_json())
    return data


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human lines for every key whose value differs, e.g. "memory: 512 -> 768"."""
    a, b = flat(old), flat(new)
    return [f"{k}: {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def reread(current: Config, source: str | None = None) -> Reread:
    """Load the source file again and merge it into `current`: arbiter keys keep their
    running values (and are listed as refused), everything else is taken."""
    source = source if source is not None else os.environ.get(SOURCE_ENV) or None
    if source is None:
        return Reread(current, source=None)  # started without a file: the defaults hold
    try:
        new = load(source)
    except ConfigError as e:
        return Reread(current, error=f"{e}; keeping the config in use", source=source)
    refused = [f"{k}: {json.dumps(getattr(current, k))} -> {json.dumps(getattr(new, k))} "
               "(needs `virby run` restarted)"
               for k in ARBITER_KEYS if getattr(current, k) != getattr(new, k)]
    merged = dataclasses.replace(new, **{k: getattr(current, k) for k in ARBITER_KEYS},
                                 source=current.source or source)
    return Reread(merged, diff(as_data(current), as_data(merged)), refused, None, source)


def report(result: Reread, worker: str) -> None:
    if result.error:
        log.error("%s: config not re-read: %s", worker, result.error)
    for line in result.refused:
        log.error("%s: config change refused: %s", worker, line)
    for line in result.changed:
        log.info("%s: config change taken: %s", worker, line)
