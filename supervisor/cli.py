"""`virby`: the command line. These command names are an interface: keep them stable.

Every command takes `--config` (or VIRBY_CONFIG), answers in well under a second, exits 2 on a
bad config and 1 with one clear line when the arbiter is not running.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import click
from virby.supervisor import circus_ini
from virby.supervisor.config import ENV_VAR, Config, ConfigError, load

CONFIG_HELP = "Config file (JSON, or TOML by extension). Default: $VIRBY_CONFIG, else built-in defaults."


class ConfigClickError(click.ClickException):
    exit_code = 2


def _load(path: str | None) -> Config:
    try:
        return load(path)
    except ConfigError as e:
        raise ConfigClickError(str(e)) from e


def _fail(message: str) -> NoReturn:
    click.echo(f"virby: {message}", err=True)
    sys.exit(1)


def config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--config", "config_path", envvar=ENV_VAR, type=click.Path(dir_okay=False),
                        help=CONFIG_HELP)(f)


def _control_call(fn: Callable[[], Any]) -> Any:
    from virby.supervisor.control import NotRunning

    try:
        return fn()
    except NotRunning as e:
        _fail(str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Virby: a Linux build machine for Nix that exists only while it is needed.

    \b
    Quick start:
      virby run --config virby.json &      # the arbiter (launchd runs this on macOS)
      ssh -F <(virby ssh-config) virby-vm uname -a
    """


# -- run -------------------------------------------------------------------------------------


def _port_holder(port: int) -> str:
    import psutil

    try:
        for c in psutil.net_connections("tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                return f" by pid {c.pid} ({psutil.Process(c.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return ""


def check_port_free(port: int) -> None:
    """circusd exits 0 when it cannot bind its socket (reference/circus.md §2.1): find out
    first and fail loudly instead."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as circus binds it
    try:
        s.bind(("127.0.0.1", port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise click.ClickException(f"port 127.0.0.1:{port} is already in use{_port_holder(port)}; "
                                       "stop that program or set `port` in the config") from e
        raise click.ClickException(f"cannot bind 127.0.0.1:{port}: {e.strerror}") from e
    finally:
        s.close()


def prepare_dirs(config: Config) -> None:
    from virby.workers.keys import ensure_keys

    try:
        os.makedirs(config.runtimeDir, mode=0o700, exist_ok=True)
        os.chmod(config.runtimeDir, 0o700)  # sockets without auth: only we may reach them
        os.makedirs(config.log_dir, mode=0o700, exist_ok=True)
        ensure_keys(config.stateDir)
    except OSError as e:
        raise click.ClickException(f"cannot prepare {e.filename}: {e.strerror}") from e


def clean_runtime_dir(config: Config) -> None:
    """Leftovers of a previous arbiter: sockets, failure records, counters. Keep the pid file
    of a hypervisor that may still run (the vm worker adopts or removes it)."""
    for name in os.listdir(config.runtimeDir):
        if name.endswith((".sock", ".failure", ".tmp")) or name == "vm.counters.json":
            try:
                os.unlink(os.path.join(config.runtimeDir, name))
            except OSError:
                pass


@cli.command()
@config_option
def run(config_path: str | None) -> None:
    """Run the arbiter in the foreground (what launchd runs): render the circus ini into the
    runtime dir and exec circusd.

    \b
    Example:
      virby run --config /etc/virby/config.json
    """
    config = _load(config_path)
    prepare_dirs(config)
    # Another arbiter of ours still there? Then the port is taken by it: say so plainly.
    from virby.supervisor.control import NotRunning, circus_call

    try:
        circus_call(config, "status", timeout=0.5)
        raise click.ClickException(f"virby is already running for this config ({config.runtimeDir})")
    except NotRunning:
        pass
    check_port_free(config.port)
    clean_runtime_dir(config)
    try:
        ini = circus_ini.write_all(config)
    except OSError as e:
        raise click.ClickException(f"cannot write {e.filename}: {e.strerror}") from e
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "circus.circusd", ini])


# -- status and VM commands ------------------------------------------------------------------


def _age(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0.0, time.time() - float(t))
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago"


def format_status(st: dict[str, Any]) -> str:
    vm = st["vm"]
    lines = [f"VM        {vm.get('state')}" + (f" since {_age(vm.get('since'))}" if vm.get("since") else "")]
    if vm.get("reason"):
        lines.append(f"reason    {vm['reason']}")
    lines.append(f"backend   {vm.get('backend', '-')}   boots {vm.get('boots', '-')}   "
                 f"last cold start {vm.get('last_boot_seconds') or '-'}s")
    lines.append(f"clients   {vm.get('connections', '-')} open")
    idle = st.get("idle") or {}
    if idle:
        lines.append(f"idle      {idle.get('decision', '-')}")
    lines.append("")
    lines.append(f"{'watcher':<10} {'status':<9} incarnation")
    for name, w in st["watchers"].items():
        lines.append(f"{name:<10} {w['status']:<9} {w.get('incarnation') or '-'}")
        if w.get("failure"):
            f = w["failure"]
            lines.append(f"           failed {f.get('count')}x: {f.get('reason')}")
    return "\n".join(lines)


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: str | None, as_json: bool) -> None:
    """Show the VM state, the watchers and their incarnations.

    \b
    Example:
      virby status --json | jq .vm.state
    """
    from virby.supervisor import control

    config = _load(config_path)
    st = _control_call(lambda: control.status(config))
    click.echo(control.dumps(st) if as_json else format_status(st))


def _vm_command(cmd: str, args: dict[str, Any] | None = None, timeout: float = 2.0) -> Callable[..., None]:
    def command(config_path: str | None) -> None:
        from virby.supervisor import control

        config = _load(config_path)
        reply = _control_call(lambda: control.request(config, cmd, args, timeout=timeout))
        state = (reply.get("state") or {}).get("state")
        if not reply.get("ok"):
            _fail(f"{cmd}: {reply.get('error') or 'refused'} (VM {state})")
        click.echo(f"VM {state}")

    return command


for _name, _args, _timeout, _doc in (
    ("start", {"wait": 10.0}, 15.0, "Boot the VM now (it boots by itself on the first connection)."),
    ("stop", None, 60.0, "Shut the VM down cleanly; its memory goes back to the host."),
    ("pause", None, 5.0, "Pause the VM (its memory stays; the next connection resumes it)."),
    ("resume", None, 5.0, "Resume a paused VM."),
):
    cli.command(name=_name, help=f"{_doc}\n\n\b\nExample:\n  virby {_name}")(
        config_option(_vm_command(_name, _args, _timeout)))


# -- ssh -------------------------------------------------------------------------------------


def ssh_config_text(config: Config, host: str = "virby-vm") -> str:
    from virby.workers.keys import HOST_KEY_ALIAS, KeyPaths

    keys = KeyPaths.in_dir(config.stateDir)
    # The forwarder accepts at once but the banner comes only when the guest is up: the
    # timeout must cover a cold boot.
    connect_timeout = int(config.readyTimeout) + 15
    return "\n".join([
        f"Host {host}",
        "  HostName 127.0.0.1",
        f"  Port {config.port}",
        f"  User {config.sshUser}",
        f"  IdentityFile {keys.client_key}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {keys.known_hosts}",
        f"  HostKeyAlias {HOST_KEY_ALIAS}",
        "  StrictHostKeyChecking yes",
        f"  ConnectTimeout {connect_timeout}",
        "  BatchMode yes",
        "",
    ])


@cli.command("ssh-config")
@config_option
@click.option("--host", default="virby-vm", show_default=True, help="The Host alias.")
def ssh_config(config_path: str | None, host: str) -> None:
    """Print an ssh_config block for the builder.

    \b
    Example:
      ssh -F <(virby ssh-config) virby-vm uname -a
    """
    click.echo(ssh_config_text(_load(config_path), host), nl=False)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@config_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ssh(config_path: str | None, command: tuple[str, ...]) -> None:
    """Open a shell in the VM, or run COMMAND there (booting it if needed).

    \b
    Example:
      virby ssh -- uname -a
    """
    config = _load(config_path)
    path = config.runtime("ssh_config")
    if not os.path.isdir(config.runtimeDir):
        _fail(f"virby is not running: no runtime dir {config.runtimeDir} (start it with `virby run`)")
    with open(path, "w") as f:
        f.write(ssh_config_text(config))
    args = ["ssh", "-F", path, "virby-vm"]
    if command:
        args += ["--", *command]
    os.execvp("ssh", args)


# -- logs ------------------------------------------------------------------------------------

LOG_FILES = {"circusd": "circusd.log", "vm": "vm.log", "forwarder": "forwarder.log",
             "idle": "idle.log", "console": "console.log", "qemu": "qemu.log"}


@cli.command()
@config_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (across rotation).")
@click.option("-n", "--lines", default=40, show_default=True, help="How many lines to show first.")
@click.argument("watcher", required=False, type=click.Choice(sorted(LOG_FILES)))
def logs(config_path: str | None, follow: bool, lines: int, watcher: str | None) -> None:
    """Show the logs: circusd, each watcher, the guest console.

    \b
    Example:
      virby logs -f vm
    """
    from virby.supervisor import logview

    config = _load(config_path)
    names = [watcher] if watcher else ["circusd", "vm", "forwarder", "idle"]
    paths = {n: os.path.join(config.log_dir, LOG_FILES[n]) for n in names}
    logview.show(paths, lines=lines, follow=follow, echo=click.echo)


def main() -> None:
    cli(prog_name="virby")


if __name__ == "__main__":
    main()
