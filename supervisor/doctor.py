"""`virby doctor`: check what users trip over, one line each with the fix.

Every check is a function of the config (and the running Virby, when there is one) returning
a Check: ok (✓), failed (✗, with the fix) or skipped (·, with why). The command exits 1 if any
check failed. Checks never change anything.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from virby.core import machost
from virby.core.config import LONGEST_SOCKET_NAME, UNIX_PATH_MAX, Config
from virby.core.protocol import RUNNING, WATCHERS
from virby.supervisor import nixreg

MAX_SKEW = 3.0  # seconds; `date +%s` has 1 s resolution and the round trip adds a little


@dataclass(frozen=True)
class Check:
    ok: bool | None  # None: skipped
    title: str
    detail: str = ""
    fix: str = ""

    def line(self, ascii_only: bool = False) -> str:
        marks = ({True: "ok", False: "FAIL", None: "skip"} if ascii_only
                 else {True: "✓", False: "✗", None: "·"})
        text = f"{marks[self.ok]} {self.title}"
        if self.detail:
            text += f": {self.detail}"
        if self.ok is False and self.fix:
            text += f"\n    fix: {self.fix}"
        return text


@dataclass
class Context:
    config: Config
    running: bool = False  # circusd answers
    vm_state: str | None = None
    ssh_config_path: str | None = None
    # The host, as the checks see it (tests give another one: no check asks the machine itself).
    platform: str = sys.platform
    machine: str = field(default_factory=machost.host_machine)
    macos: machost.MacVersion | None = field(default_factory=machost.host_macos_version)
    cpu: Callable[[], str | None] = machost.cpu_brand  # asked only when nesting is on
    root: str = "/"  # where the Mac's files are looked for (Rosetta)
    nix_conf_dir: str = nixreg.DEFAULT_CONF_DIR


def check_hypervisor(ctx: Context) -> Check:
    hv = ctx.config.hypervisor
    path = shutil.which(hv)
    title = f"hypervisor {hv}"
    if path is None:
        fix = ("install QEMU (apt-get install qemu-system-x86, brew install qemu) or set `hypervisor`"
               if ctx.config.backend == "qemu" else "install vfkit (brew install vfkit) or set `hypervisor`")
        return Check(False, title, "not found on PATH", fix)
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check(False, title, f"{path} does not run: {e}", "reinstall it; check it is executable")
    first = (out.stdout or out.stderr).strip().splitlines()[:1]
    if out.returncode != 0:
        return Check(False, title, f"`{path} --version` exited {out.returncode}: {' '.join(first)}",
                     "reinstall it (a missing library shows here)")
    return Check(True, title, f"{path}: {first[0] if first else 'runs'}")


def check_port(ctx: Context) -> Check:
    port = ctx.config.port
    title = f"port 127.0.0.1:{port}"
    if ctx.running:
        # Ask circusd rather than connect: a connection would wake the VM.
        from virby.supervisor import control

        try:
            sockets = control.circus_call(ctx.config, "listsockets", timeout=2).get("sockets") or []
        except control.NotRunning as e:
            return Check(False, title, str(e), "`virby logs circusd`")
        if any(isinstance(s, dict) and s.get("port") == port for s in sockets):
            return Check(True, title, "held by this Virby's arbiter")
        return Check(False, title, f"virby runs but circusd does not hold the port (it has {sockets})",
                     "`virby logs circusd`; restart the arbiter")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError as e:
        from virby.supervisor.arbiter import _port_holder

        return Check(False, title, f"in use{_port_holder(port)} ({e.strerror})",
                     "stop that program, or set `port` to a free one")
    finally:
        s.close()
    return Check(True, title, "free (virby is not running)")


def check_runtime_dir(ctx: Context) -> Check:
    rd = ctx.config.runtimeDir
    longest = len((rd + LONGEST_SOCKET_NAME).encode())
    title = "runtime dir"
    if longest >= UNIX_PATH_MAX:
        return Check(False, title,
                     f"{rd}: socket paths would be {longest} bytes (macOS limit {UNIX_PATH_MAX})",
                     "set `runtimeDir` to a shorter path")
    detail = f"{rd} (socket paths {longest}/{UNIX_PATH_MAX} bytes)"
    try:
        st = os.stat(rd)
    except FileNotFoundError:
        return Check(not ctx.running, title, detail + ", not created yet",
                     "`virby run` creates it")
    if st.st_uid != os.getuid():
        return Check(False, title, f"{rd} belongs to uid {st.st_uid}, not you ({os.getuid()})",
                     "run virby commands as the user the daemon runs as (e.g. `sudo -u _virby`)")
    if st.st_mode & 0o077:
        return Check(False, title, f"{rd} is mode {stat.S_IMODE(st.st_mode):o}: others can reach the sockets",
                     f"chmod 700 {rd}")
    return Check(True, title, detail + ", mode 700")


def check_keys(ctx: Context) -> Check:
    from virby.core.keys import HOST_KEY_ALIAS, KeyPaths

    keys = KeyPaths.in_dir(ctx.config.stateDir)
    title = "SSH keys"
    wanted = (keys.client_key, keys.host_key, keys.host_pub, keys.known_hosts)
    missing = [p for p in wanted if not os.path.exists(p)]
    if missing:
        return Check(None if not ctx.running else False, title, f"missing {', '.join(missing)}",
                     "`virby run` creates them on start")
    problems = []
    for path in (keys.client_key, keys.host_key):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            problems.append(f"{path} is mode {mode:o} (ssh refuses a private key others can read)")
        if not os.access(path, os.R_OK):
            problems.append(f"{path} is not readable by you (uid {os.getuid()})")
    if not os.access(keys.known_hosts, os.R_OK):
        problems.append(f"{keys.known_hosts} is not readable: ssh will not know the host key")
    else:
        with open(keys.known_hosts) as f:
            kh = f.read().split()
        with open(keys.host_pub) as f:
            pub = f.read().split()
        if kh[:1] != [HOST_KEY_ALIAS] or kh[1:3] != pub[:2]:
            problems.append(f"{keys.known_hosts} does not pin {keys.host_pub} under {HOST_KEY_ALIAS}")
    if problems:
        return Check(False, title, "; ".join(problems),
                     f"chmod 600 the private keys, chmod 644 {os.path.basename(keys.known_hosts)}; "
                     "a wrong known_hosts is rewritten by the next `virby run`")
    return Check(True, title, f"client key 600, known_hosts pins {HOST_KEY_ALIAS}")


def check_guest_files(ctx: Context) -> Check:
    g = ctx.config.guest
    files = [("guest.kernel", g.kernel), ("guest.initrd", g.initrd)]
    if g.disk:
        files.append(("guest.disk", g.disk))
    missing = [f"{key} {path}" for key, path in files if not os.path.isfile(path)]
    if missing:
        fix = ("build the guest: `virby guest build` (or point `guest` at your image)"
               if ctx.config.backend == "qemu" else "rebuild with nix-darwin (`darwin-rebuild switch`)")
        return Check(False, "guest files", "missing " + ", ".join(missing), fix)
    return Check(True, "guest files", ", ".join(os.path.basename(p) for _, p in files))


def check_rosetta(ctx: Context) -> Check:
    title = "Rosetta"
    c = ctx.config
    if not c.rosetta:
        return Check(None, title, "not asked for (`rosetta` is off)")
    if c.backend != "vfkit" or ctx.platform != "darwin":
        return Check(None, title, "only the vfkit backend on a Mac attaches Rosetta")
    problem = machost.rosetta_problem(ctx.machine, ctx.macos, ctx.root)
    if problem:
        return Check(False, title, problem.detail, problem.fix)
    return Check(True, title, f"installed ({machost.show_version(ctx.macos)}); x86_64-linux builds "
                              "run through it")


def check_nested(ctx: Context) -> Check:
    title = "nested virtualization"
    c = ctx.config
    if not c.nestedVirtualization:
        return Check(None, title, "not asked for (`nestedVirtualization` is off)")
    if c.backend != "vfkit" or ctx.platform != "darwin":
        return Check(None, title, "checked for the vfkit backend on a Mac only")
    cpu = ctx.cpu()
    problem = machost.nested_problem(cpu, ctx.macos)
    if problem:
        # The builder still starts (without --nested), but its machines line offers kvm and
        # nixos-test: Nix would send it VM tests that fail with "failed to initialize kvm".
        return Check(False, title, f"{problem.detail}: the VM starts without it, but Nix is told "
                     "this builder has kvm and nixos-test", problem.fix)
    return Check(True, title, f"{cpu or 'an unknown CPU'} on {machost.show_version(ctx.macos)}")


def _nix_registration_fix(reg: nixreg.Registration) -> str:
    if reg.determinate:
        return ("Determinate Nix ignores nix.buildMachines: set services.virby.supportDeterminateNix "
                "= true, then `darwin-rebuild switch`")
    return ("enable services.virby in nix-darwin and `darwin-rebuild switch` (it lists the builder in "
            "/etc/nix/machines); by hand: add the line `virby nix-machines` prints")


def check_nix_registration(ctx: Context) -> Check:
    alias = ctx.config.name
    title = "Nix builder registration"
    on_mac = ctx.platform == "darwin"
    if not os.path.isdir(ctx.nix_conf_dir):
        return Check(False if on_mac else None, title,
                     f"no {ctx.nix_conf_dir}: no system-wide Nix configuration registers a builder",
                     "install Nix (the daemon reads /etc/nix), then rebuild with nix-darwin")
    reg = nixreg.find(alias, ctx.nix_conf_dir)
    how = (f"builders = {reg.builders or '(empty)'} in {reg.set_in}" if reg.set_in
           else f"Nix's default builders = {reg.builders}")
    if reg.line is not None:
        uri = reg.line.split()[0]
        systems = nixreg.line_systems(reg.line)
        want = f"{ctx.config.arch}-linux"
        if want not in systems:
            return Check(False, title, f"{uri} in {reg.found_in} offers {','.join(systems) or 'no system'}, "
                         f"not {want}: Nix sends it no {want} build",
                         "rebuild with nix-darwin, or fix the systems field of that line")
        return Check(True, title, f"{uri} ({','.join(systems)}) in {reg.found_in} ({how})")
    if not reg.builders.strip():
        detail = f"`builders` is empty in {reg.set_in}: Nix uses no remote machine"
    else:
        looked = [f for f in reg.machine_files if f not in reg.absent]
        detail = f"no line for {alias}"
        if looked or not reg.machine_files:
            detail += f" in {', '.join(looked) or 'the inline builders'}"
        if reg.absent:
            detail += f"{';' if looked else ':'} {', '.join(reg.absent)} does not exist"
        detail += f" ({how})"
    if reg.unreadable:
        detail += f"; could not read {', '.join(reg.unreadable)}"
    if on_mac:
        return Check(False, title, detail, _nix_registration_fix(reg))
    return Check(None, title, detail + "; to use it here, pass `--builders \"$(virby nix-machines)\"` "
                 "to nix, or add that line to /etc/nix/machines")


def check_arbiter(ctx: Context) -> Check:
    from virby.supervisor import control

    try:
        reply = control.circus_call(ctx.config, "status", timeout=2)
    except control.NotRunning as e:
        return Check(False, "arbiter (circusd)", str(e).removeprefix("virby is not running: "),
                     "start it: `virby run --config …` "
                     "(macOS: `sudo launchctl kickstart system/org.nixos.virby`)")
    ctx.running = True
    statuses = reply.get("statuses") or {}
    bad = {n: statuses.get(n, "missing") for n in WATCHERS if statuses.get(n) != "active"}
    if bad:
        listed = ", ".join(f"{n} {s}" for n, s in bad.items())
        return Check(False, "arbiter (circusd)", f"watchers not active: {listed}",
                     "`virby status` shows the crash reason; `virby logs <watcher>`")
    states = control.collect_states(ctx.config, 1.0)
    vm = states.get("vm")
    ctx.vm_state = str(vm.data.get("state")) if vm else None
    if vm is None:
        return Check(False, "arbiter (circusd)", "the vm worker does not broadcast", "`virby logs vm`")
    return Check(True, "arbiter (circusd)", f"reachable; watchers active; VM {ctx.vm_state}")


def _ssh_config_file(ctx: Context) -> str:
    if ctx.ssh_config_path is None:
        from virby.supervisor.sshconfig import ssh_config_text

        fd, path = tempfile.mkstemp(prefix="virby-doctor-", suffix=".ssh_config")
        with os.fdopen(fd, "w") as f:
            f.write(ssh_config_text(ctx.config))
        ctx.ssh_config_path = path
    return ctx.ssh_config_path


def check_ssh_alias(ctx: Context) -> Check:
    title = "ssh_config alias virby-vm"
    if shutil.which("ssh") is None:
        return Check(False, title, "no `ssh` on PATH", "install OpenSSH")
    out = subprocess.run(["ssh", "-G", "-F", _ssh_config_file(ctx), "virby-vm"], capture_output=True,
                         text=True, timeout=10, check=False)
    if out.returncode != 0:
        return Check(False, title, f"`ssh -G` failed: {out.stderr.strip()}", "check `virby ssh-config`")
    opts: dict[str, str] = {}
    for line in out.stdout.splitlines():
        k, _, v = line.partition(" ")
        opts.setdefault(k, v)
    want = {"hostname": "127.0.0.1", "port": str(ctx.config.port), "user": ctx.config.sshUser}
    wrong = [f"{k} is {opts.get(k)!r}, not {v!r}" for k, v in want.items() if opts.get(k) != v]
    if wrong:
        return Check(False, title, "; ".join(wrong), "regenerate it with `virby ssh-config`")
    return Check(True, title,
                 f"-> {opts['user']}@127.0.0.1:{opts['port']} (`ssh -G` on `virby ssh-config`'s text)")


def check_host_key(ctx: Context) -> Check:
    title = "guest host key"
    if ctx.vm_state != RUNNING:
        return Check(None, title, f"not checked: the VM is {ctx.vm_state or 'not running'} "
                                  "(doctor does not boot it)")
    from virby.core.keys import KeyPaths
    from virby.core.sshcheck import SSHNotReady, prove_ssh

    keys = KeyPaths.in_dir(ctx.config.stateDir)
    try:
        prove_ssh("127.0.0.1", ctx.config.port, keys, 15.0)
    except SSHNotReady as e:
        text = str(e)
        if "host key mismatch" in text:
            return Check(False, title, f"the guest offers a different host key than the one pinned: {text}. "
                         "Nix shows this only as \"unable to start any build; remote machines may not have "
                         "all required system features\" or \"Host key verification failed\"",
                         "restart the VM so it gets the current key (`virby stop`, then build again); "
                         "if the pinned key was replaced, `virby run` rewrites known_hosts")
        return Check(False, title, text, "`virby logs vm`, `virby logs console`")
    except OSError as e:
        return Check(False, title, f"cannot read the keys: {e}", "see the SSH keys check")
    return Check(True, title, "matches the pinned key; login works")


def check_clock(ctx: Context) -> Check:
    title = "guest clock"
    if ctx.vm_state != RUNNING:
        return Check(None, title, f"not checked: the VM is {ctx.vm_state or 'not running'}")
    t0 = time.time()
    try:
        # its own connection: a shared one (ControlPersist) would hold the VM in use after us
        out = subprocess.run(["ssh", "-F", _ssh_config_file(ctx), "-o", "ControlPath=none",
                              "virby-vm", "--", "date", "+%s"],
                             capture_output=True, text=True, timeout=30, check=False,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Check(False, title, "`date` over ssh did not answer in 30s",
                     "`virby doctor` again; `virby logs vm`")
    t1 = time.time()
    try:
        guest = float(out.stdout.strip())
    except ValueError:
        return Check(False, title,
                     f"`ssh virby-vm date` failed ({out.returncode}): {out.stderr.strip()[-300:]}",
                     "see the host key check above")
    # The guest read its clock somewhere in [t0, t1]; with 1 s resolution, allow that much.
    skew = 0.0 if t0 - 1 <= guest <= t1 else min(abs(guest - t0), abs(guest - t1))
    if skew > MAX_SKEW:
        return Check(False, title,
                     f"{skew:.0f}s off the host's clock (builds see wrong timestamps; TLS may fail)",
                     "`virby pause` then `virby resume` resyncs it; or `virby stop`")
    return Check(True, title, f"within {MAX_SKEW:g}s of the host (skew {skew:.0f}s)")


CHECKS: list[Callable[[Context], Check]] = [
    check_hypervisor, check_guest_files, check_rosetta, check_nested, check_runtime_dir, check_keys,
    check_arbiter, check_port, check_ssh_alias, check_nix_registration, check_host_key, check_clock,
]


def run(config: Config, emit: Callable[[Check], None]) -> bool:
    """Run every check in order, emitting each result as it comes; True if none failed."""
    ctx = Context(config)
    ok = True
    try:
        for check in CHECKS:
            try:
                result = check(ctx)
            except Exception as e:  # a broken check must not hide the others
                result = Check(False, check.__name__.removeprefix("check_").replace("_", " "),
                               f"the check itself failed: {type(e).__name__}: {e}", "report this as a bug")
            ok = ok and result.ok is not False
            emit(result)
    finally:
        if ctx.ssh_config_path:
            os.unlink(ctx.ssh_config_path)
    return ok
