"""`virby`: the command line. These command names are an interface: keep them stable.

Every command takes `--config` (or VIRBY_CONFIG), answers in well under a second, exits 2 on a
bad config and 1 with one clear line when the arbiter is not running.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from virby.core import protocol, watchers
from virby.core.config import ENV_VAR, Config, ConfigError, load, load_builders

CONFIG_HELP = ("Config file (JSON, or TOML by extension), or for `status`, `nix-machines` and "
               "`ssh-config` a directory of them (one per builder). Default: $VIRBY_CONFIG, "
               "else built-in defaults.")


class ConfigClickError(click.ClickException):
    exit_code = 2


def _load(path: str | None) -> Config:
    if path is not None and os.path.isdir(path):
        raise ConfigClickError(f"{path} is a directory of builders; this command works on one: "
                               f"pass its file ({path}/NAME.json)")
    try:
        return load(path)
    except ConfigError as e:
        raise ConfigClickError(str(e)) from e


def _load_builders(path: str | None) -> list[Config]:
    """Every builder: each file of a directory (builders side by side), or the one config."""
    try:
        return load_builders(path) if path is not None else [load(None)]
    except ConfigError as e:
        raise ConfigClickError(str(e)) from e


def _fail(message: str) -> NoReturn:
    click.echo(f"virby: {message}", err=True)
    sys.exit(1)


def config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--config", "config_path", envvar=ENV_VAR, type=click.Path(),
                        help=CONFIG_HELP)(f)


def _require_running(config: Config) -> None:
    from virby.supervisor import control

    _control_call(lambda: control.require_running(config))


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
      export VIRBY_CONFIG=$PWD/virby.json
      virby doctor                         # what is wrong, and the fix
      virby ssh -- uname -a                # boots the VM on first use
      virby status; virby events -f; virby logs -f

    \b
    Shell completion (bash; zsh and fish likewise):
      eval "$(_VIRBY_COMPLETE=bash_source virby)"
    """


# -- run -------------------------------------------------------------------------------------


@cli.command()
@config_option
def run(config_path: str | None) -> None:
    """Run the arbiter in the foreground (what launchd runs): render the circus ini into the
    runtime dir and exec circusd.

    \b
    Example:
      virby run --config /etc/virby/config.json
    """
    from virby.supervisor import arbiter

    config = _load(config_path)
    try:
        arbiter.exec_circusd(config)
    except arbiter.CannotStart as e:
        raise click.ClickException(str(e)) from e


# -- status and VM commands ------------------------------------------------------------------


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: str | None, as_json: bool) -> None:
    """Show the VM state (and since when), boots, the last cold start, open connections,
    the idle countdown to pause/stop, the hypervisor's memory and CPU, and each watcher's
    status, uptime, restarts and crash record.

    \b
    Examples:
      virby status
      virby status --json | jq .vm.state
    """
    from virby.supervisor import control
    from virby.supervisor.statusview import format_status
    from virby.supervisor.storeuse import store_use

    configs = _load_builders(config_path)
    if len(configs) == 1:
        st = _control_call(lambda: control.status(configs[0]))
        st["store"] = store_use(configs[0], st.get("vm") or {})
        click.echo(control.dumps(st) if as_json else format_status(st))
        return
    from virby.supervisor.sshconfig import guest_systems

    # Several builders, each its own arbiter: one that is down does not hide the others.
    report: dict[str, Any] = {}
    down = False
    for config in configs:
        try:
            report[config.name] = control.status(config)
            report[config.name]["store"] = store_use(config, report[config.name].get("vm") or {})
        except control.NotRunning as e:
            report[config.name] = {"error": str(e)}
            down = True
    if as_json:
        click.echo(control.dumps({"builders": report}))
    else:
        blocks = []
        for config in configs:
            st = report[config.name]
            head = (f"== {config.name}: {','.join(guest_systems(config))}, "
                    f"127.0.0.1:{config.port} ({config.source})")
            blocks.append(head + "\n" + (f"virby: {st['error']}" if "error" in st else format_status(st)))
        click.echo("\n\n".join(blocks))
    sys.exit(1 if down else 0)


def _vm_command(cmd: str, timeout: float = 2.0) -> Callable[..., None]:
    def command(config_path: str | None) -> None:
        from virby.supervisor import control

        config = _load(config_path)
        reply = _control_call(lambda: control.request(config, cmd, None, timeout=timeout))
        state = (reply.get("state") or {}).get("state")
        if not reply.get("ok"):
            _fail(f"{cmd}: {reply.get('error') or 'refused'} (VM {state})")
        click.echo(f"VM {state}")

    return command


@cli.command()
@config_option
@click.option("--cold", is_flag=True, help="Shut the guest down (no snapshot; the next start is a cold "
              "boot) and delete a saved VM.")
def stop(config_path: str | None, cold: bool) -> None:
    """Suspend the VM: save its whole state to a file in the state dir and end the hypervisor;
    its memory goes back to the host and the next connection restores it in about a second.
    With --cold, or where the backend cannot save a VM (vfkit), shut it down cleanly instead.
    Open sessions are cut: an explicit stop does not wait for them.

    \b
    Examples:
      virby stop
      virby stop --cold
    """
    from virby.supervisor import control

    config = _load(config_path)
    reply = _control_call(lambda: control.request(config, "stop", {"cold": cold}, timeout=60.0))
    state = (reply.get("state") or {}).get("state")
    if not reply.get("ok"):
        _fail(f"stop: {reply.get('error') or 'refused'} (VM {state})")
    click.echo(f"VM {state}")


for _name, _timeout, _doc, _example in (
    ("pause", 5.0, "Pause the VM (its memory stays; the next connection resumes it).", "virby pause"),
    ("resume", 5.0, "Resume a paused VM (the guest clock is set again).", "virby resume"),
):
    cli.command(name=_name, help=f"{_doc}\n\n\b\nExample:\n  {_example}")(
        config_option(_vm_command(_name, _timeout)))


def _wait_running(config: Config) -> dict[str, Any]:
    """Start the VM if needed, with progress on stderr; exit 1 with the reason if it fails."""
    from virby.supervisor import control
    from virby.supervisor.progress import Progress, StartFailed, wait_running

    progress = Progress(click.get_text_stream("stderr"))
    try:
        state = wait_running(config, progress)
    except StartFailed as e:
        progress.done()
        _fail(f"the VM could not start: {e}\n       (details: `virby logs vm`, `virby logs console`)")
    except control.NotRunning as e:
        progress.done()
        _fail(str(e))
    except KeyboardInterrupt:
        progress.done("interrupted (the VM keeps booting; `virby stop` ends it)")
        sys.exit(130)
    took = progress.elapsed
    progress.done(f"VM running (ready after {took:.1f}s)" if took >= 1.0 and progress.tty else None)
    return state


@cli.command()
@config_option
def start(config_path: str | None) -> None:
    """Boot the VM now and wait until it is ready (it also boots by itself on the first
    connection). Shows a spinner with the elapsed time on a terminal, plain lines otherwise.

    \b
    Example:
      virby start && nix build --builders "$(virby nix-machines)" ...
    """
    config = _load(config_path)
    state = _wait_running(config)
    click.echo(f"VM {state.get('state')}")


@cli.command()
@config_option
def reload(config_path: str | None) -> None:
    """Re-read the config file in the running arbiter (as `circusctl reload` does). Changes
    are taken at once (idle policy, readyTimeout), at the VM's next boot (memory, cores,
    guest, ...: `virby status` lists them as pending; a saved VM is then not restored), or
    refused with the reason (port, stateDir, runtimeDir, name: restart `virby run`).

    \b
    Example:
      virby reload && virby status
    """
    import time

    from virby.core.config import ARBITER_KEYS
    from virby.supervisor import control

    config = _load(config_path)
    try:
        running = load(config.runtime("config.json"))
    except ConfigError:
        running = None
    if running is not None:
        refused = [f"{k} {getattr(running, k)!r} -> {getattr(config, k)!r}"
                   for k in ARBITER_KEYS if getattr(running, k) != getattr(config, k)]
        if refused:
            _fail("reload refused: the running arbiter cannot change " + ", ".join(refused)
                  + "; restart `virby run` for that (nothing was reloaded)")
    t0 = time.time()
    # waiting: the answer comes once every watcher is reloaded (circusd hangs on a SIGTERM that
    # arrives while a reload is still under way)
    _control_call(lambda: control.circus_call(config, "reload", timeout=60, waiting=True))
    deadline = time.monotonic() + 10
    while True:
        vm = control.collect_states(config, 0.5).get("vm")
        cfg = (vm.data.get("config") if vm is not None else None) or {}
        if isinstance(cfg.get("reread_at"), int | float) and cfg["reread_at"] >= t0:
            break
        if time.monotonic() > deadline:
            _fail("reload sent, but the vm worker has not reported the re-read config within 10s "
                  "(`virby logs vm`)")
    if cfg.get("error"):
        _fail(f"config not re-read: {cfg['error']}")
    for line in cfg.get("refused") or []:
        click.echo(f"refused: {line}")
    for line in cfg.get("pending") or []:
        click.echo(f"pending (at the VM's next boot): {line}")
    click.echo("reloaded")


# -- ssh -------------------------------------------------------------------------------------


def _wait_unless_running(config: Config) -> None:
    """Before handing over to ssh: a VM that is not running is booted here, where we can show
    progress (ssh itself would only sit silent until the banner). If the bus does not answer,
    leave it to the forwarder."""
    from virby.supervisor import control

    _require_running(config)
    vm = control.collect_states(config, 0.5).get("vm")
    if vm is not None and protocol.as_vm_state(vm.data).get("state") not in (protocol.RUNNING,
                                                                               protocol.PAUSED):
        _wait_running(config)


@cli.command("ssh-config")
@config_option
@click.option("--host", default=None, help="The Host alias (default: the config's `name`, virby-vm).")
def ssh_config(config_path: str | None, host: str | None) -> None:
    """Print an ssh_config block for the builder (one per builder for a directory). Write it
    to a file: OpenSSH closes extra file descriptors before it reads its config, so
    `ssh -F <(virby ssh-config)` does not work.

    \b
    Example:
      virby ssh-config > ~/.ssh/virby.conf && ssh -F ~/.ssh/virby.conf virby-vm uname -a
    """
    from virby.supervisor.sshconfig import ssh_config_text

    configs = _load_builders(config_path)
    if host is not None and len(configs) > 1:
        raise click.UsageError("--host names one builder; a directory has several (set `name`)")
    click.echo("\n".join(ssh_config_text(c, host or c.name) for c in configs), nl=False)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@config_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ssh(config_path: str | None, command: tuple[str, ...]) -> None:
    """Open a shell in the VM, or run COMMAND there (booting it if needed, with progress on
    stderr while it boots).

    \b
    Examples:
      virby ssh
      virby ssh -- uname -a
    """
    config = _load(config_path)
    path = config.runtime("ssh_config")
    _wait_unless_running(config)
    from virby.supervisor.sshconfig import ssh_config_text

    with open(path, "w") as f:
        f.write(ssh_config_text(config))
    args = ["ssh", "-F", path, "virby-vm"]
    if command:
        args += ["--", *command]
    os.execvp("ssh", args)


# -- logs ------------------------------------------------------------------------------------

@cli.command()
@config_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (across rotation).")
@click.option("-n", "--lines", default=40, show_default=True, help="How many lines to show first.")
@click.argument("watcher", required=False, type=click.Choice(sorted(watchers.LOGS)))
def logs(config_path: str | None, follow: bool, lines: int, watcher: str | None) -> None:
    """Show the logs: circusd and each watcher (default: all four, each line tagged), or one
    of them, the guest serial console (`console`) or the hypervisor's own output (`qemu`, or
    `vfkit` on a Mac that runs it). With -f, keep
    following, across log rotation (the file renamed to .1 and a new one started).

    \b
    Examples:
      virby logs -f vm
      virby logs -n 200 console
    """
    from virby.supervisor import logview

    config = _load(config_path)
    names = [watcher] if watcher else ["circusd", *watchers.NAMES]
    paths = {n: os.path.join(config.log_dir, watchers.LOGS[n]) for n in names}
    logview.show(paths, lines=lines, follow=follow, echo=click.echo)


# -- events, doctor, forward -----------------------------------------------------------------


@cli.command()
@config_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing changes as they happen (Ctrl-C ends).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def events(config_path: str | None, follow: bool, as_json: bool) -> None:
    """Show what happens on the bus: VM state changes, connections accepted and closed,
    clients closed before the VM was ready, idle decisions, worker restarts. Without -f,
    print the current state (one line for the vm worker, one for the idle monitor) and exit.

    \b
    Examples:
      virby events -f
      virby events -f --json | jq -c 'select(.kind == "state")'
    """
    from virby.supervisor import events as ev

    config = _load(config_path)
    _require_running(config)

    def emit(e: ev.Event) -> None:
        click.echo(e.json() if as_json else e.line())

    if follow:
        ev.follow(config, emit)
        return
    for e in ev.current(config):
        emit(e)


@cli.command()
@config_option
def doctor(config_path: str | None) -> None:
    """Check what users trip over, one line each with the fix: the hypervisor runs, the port
    is free or ours, the runtime dir path fits the 104-byte socket limit, key and known_hosts
    permissions, guest files, circusd reachable, the ssh_config alias, how Nix finds the builder
    (/etc/nix/machines, nix.conf's builders, Determinate's nix.custom.conf), on a Mac Rosetta and
    nested virtualization when asked for, and (when the VM runs) the guest's host key against
    the pinned one and the guest clock. Exits 1 if any check fails.

    \b
    Example:
      virby doctor || virby logs vm
    """
    from virby.supervisor import doctor as doc

    config = _load(config_path)
    out = click.get_text_stream("stdout")
    ascii_only = "utf" not in (getattr(out, "encoding", None) or "").lower()
    ok = doc.run(config, lambda c: click.echo(c.line(ascii_only)))
    click.echo("all checks passed" if ok else "some checks failed (✗): see the fixes above"
               if not ascii_only else "some checks failed: see the fixes above")
    sys.exit(0 if ok else 1)


@cli.command()
@config_option
@click.argument("guest_port", type=click.IntRange(1, 65535))
@click.argument("host_port", type=click.IntRange(0, 65535), required=False, default=0)
def forward(config_path: str | None, guest_port: int, host_port: int) -> None:
    """Reach GUEST_PORT inside the builder from this host on 127.0.0.1:HOST_PORT (default: a
    free port, printed), through an SSH tunnel. Boots the VM if needed; while the tunnel is open
    the VM counts as in use and is not paused. Ctrl-C (or SIGTERM) closes it.

    \b
    Example:
      virby forward 8080          # prints e.g. 127.0.0.1:41233, then: curl http://127.0.0.1:41233/
    """
    from virby.supervisor.tunnel import Tunnel, TunnelError

    config = _load(config_path)
    _wait_unless_running(config)
    tunnel = Tunnel(config, guest_port, host_port)
    try:
        host, port = tunnel.open(timeout=config.readyTimeout + 15)
    except TunnelError as e:
        _fail(f"cannot forward guest port {guest_port}: {e}")
    click.echo(f"{host}:{port}")
    click.echo(f"virby: forwarding 127.0.0.1:{port} -> guest 127.0.0.1:{guest_port}; Ctrl-C to stop",
               err=True)
    why = tunnel.serve()
    if why == "dropped":
        _fail("the SSH connection to the VM was lost (was it stopped?)")


# -- integration with Nix, launchd and circusctl ---------------------------------------------


@cli.command("nix-machines")
@config_option
@click.option("--protocol", type=click.Choice(["ssh-ng", "ssh"]), default="ssh-ng", show_default=True)
@click.option("--speed-factor", type=click.IntRange(1), default=1, show_default=True)
def nix_machines(config_path: str | None, protocol: str, speed_factor: int) -> None:
    """Print the /etc/nix/machines line (`--builders` value) for this builder, or for a
    directory one line per builder, each with its systems: Nix sends every derivation to a
    builder of its system (it takes newlines between machines in --builders too).

    \b
    Examples:
      nix-build --max-jobs 0 --builders "$(virby nix-machines)" ...
      nix-build --max-jobs 0 --builders "$(virby nix-machines --config /etc/virby/builders)" ...
    """
    from virby.supervisor.sshconfig import nix_machines_line

    for config in _load_builders(config_path):
        click.echo(nix_machines_line(config, protocol=protocol, speed_factor=speed_factor))


@cli.command("launchd-plist")
@config_option
@click.option("--user", default=None, help="UserName for the daemon (e.g. _virby).")
def launchd_plist(config_path: str | None, user: str | None) -> None:
    """Print the launchd daemon plist that runs `virby run` for this config.

    \b
    Example:
      virby launchd-plist --config /etc/virby/config.json --user _virby
    """
    import shutil

    from virby.supervisor.launchd import render_plist

    config = _load(config_path)
    if config.source is None:
        raise click.UsageError("launchd-plist needs --config FILE: launchd must find the same file")
    exe = shutil.which("virby") or os.path.abspath(sys.argv[0])
    click.echo(render_plist(config.source, config, virby_exe=exe, user=user).decode(), nl=False)


@cli.command()
@config_option
def env(config_path: str | None) -> None:
    """Print shell variables for this Virby: `eval "$(virby env)"`, then `circusctl status`.

    \b
    Example:
      eval "$(virby env --config virby.json)" && circusctl status
    """
    import shlex

    config = _load(config_path)
    values = {
        "CIRCUSCTL_ENDPOINT": config.endpoint(protocol.CIRCUS_CONTROL),
        "VIRBY_EVENTS_ENDPOINT": config.endpoint(protocol.CIRCUS_EVENTS),
        "VIRBY_VM_ENDPOINT": config.endpoint(protocol.state_endpoint("vm")),
        "VIRBY_CONTROL_ENDPOINT": config.endpoint(protocol.VM_COMMANDS),
        "VIRBY_RUNTIME_DIR": config.runtimeDir,
        "VIRBY_STATE_DIR": config.stateDir,
    }
    if config.source:
        values["VIRBY_CONFIG"] = config.source
    for key, value in values.items():
        click.echo(f"export {key}={shlex.quote(value)}")


def _mount_guest() -> None:
    from virby.guestbuild.cli import guest

    cli.add_command(guest)


_mount_guest()


def main() -> None:
    cli(prog_name="virby")


if __name__ == "__main__":
    main()
