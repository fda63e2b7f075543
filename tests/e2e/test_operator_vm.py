"""Issue 8 with a real guest: progress while it boots, status of a running VM, doctor's host
key and clock checks, and `virby forward` to a service in the guest."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from testing.harness import Instance
from tests.integration.test_operator import Lines, _marks
from virby.core.keys import HOST_KEY_ALIAS, public_line

pytestmark = pytest.mark.e2e

VIRBY = [sys.executable, "-m", "virby.supervisor.cli"]


def _in_pty(args: list[str], timeout: float = 180) -> tuple[int, str]:
    """Run a command with stdout and stderr on a terminal; return (status, what it drew)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    try:
        code = proc.wait(timeout)
    finally:
        t.join(5)
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_operator_commands_on_a_real_vm(guest_dir: Path) -> None:
    with Instance(guest_dir=guest_dir) as inst:
        inst.start()
        conf = ["--config", str(inst.config_path)]
        # 1. `virby ssh` on a stopped VM: progress on stderr (plain: not a terminal), then the command
        out = subprocess.run([*VIRBY, "ssh", *conf, "--", "echo", "hi"], capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "hi\n"
        assert "virby: booting the VM (cold start) (0s)" in out.stderr and "\r" not in out.stderr
        # `virby ssh` shares its connection (ControlPersist): it stays open, and the VM in use,
        # until it ends; `ssh -O exit` ends it as a user would, and the idle countdown starts
        assert inst.wait_vm("running")["connections"] == 1
        mux = subprocess.run(["ssh", "-F", str(Path(inst.config.runtimeDir) / "ssh_config"),
                              "-O", "exit", inst.config.name], capture_output=True, text=True,
                             timeout=30, check=False)
        assert mux.returncode == 0, mux.stderr
        inst.wait_bus(lambda s: s.get("vm", {}).get("connections") == 0, 30,
                      "the shared connection to end")

        # 2. status of a running VM: the hypervisor's memory and CPU, the idle countdown
        text = inst.cli("status").stdout
        assert text.startswith("VM          running since ")
        assert "boots 1    last cold start " in text
        qemu = inst.qemu()
        assert qemu is not None
        assert f"hypervisor  pid {qemu.pid}    RSS " in text and "MiB" in text
        assert "(pause in " in text and "stop in " in text

        # 3. doctor: every check passes, host key and clock included
        doc = inst.cli("doctor", check=False)
        assert doc.returncode == 0, doc.stdout
        marks = _marks(doc.stdout)
        assert marks["guest host key"] == "✓" and marks["guest clock"] == "✓", doc.stdout
        # skipped, with why: the Mac-only checks (off in this config), and the Nix registration
        # check on a host whose Nix has no system-wide configuration (Debian's nix-bin here)
        skipped = {name for name, mark in marks.items() if mark == "·"}
        assert skipped <= {"Rosetta", "nested virtualization", "Nix builder registration"}, doc.stdout
        assert set(marks.values()) <= {"✓", "·"}, doc.stdout

        # 4. forward to a service in the guest; while open the VM counts as in use
        setup = inst.ssh("mkdir -p /tmp/www && echo hello-from-guest > /tmp/www/index.html && "
                         "busybox httpd -p 127.0.0.1:8080 -h /tmp/www")
        assert setup.returncode == 0, setup.stderr
        for sig in (signal.SIGINT, signal.SIGTERM):
            fwd = Lines("forward", *conf, "8080")
            try:
                addr = fwd.wait_for("127.0.0.1:", timeout=60)
                host, port = addr.split(":")
                assert host == "127.0.0.1" and int(port) > 0
                body = urllib.request.urlopen(f"http://{addr}/index.html", timeout=30).read()
                assert body == b"hello-from-guest\n"
                inst.wait_bus(lambda s: s.get("idle", {}).get("connections", 0) >= 1
                              and "connection(s) open" in s["idle"].get("decision", ""), 10,
                              "the idle monitor to count the tunnel")
                assert fwd.stop(sig) == 0
            finally:
                if fwd.proc.poll() is None:
                    fwd.proc.kill()
            inst.wait_bus(lambda s: s.get("vm", {}).get("connections") == 0, 10, "the tunnel to close")

        # 5. stop (cold: no snapshot), then `virby start` on a terminal: a spinner with the elapsed time
        assert inst.cli("stop", "--cold").stdout.strip() == "VM stopped"
        code, drawn = _in_pty([*VIRBY, "start", *conf])
        assert code == 0, drawn
        assert "\r\x1b[K" in drawn and "booting the VM (cold start)" in drawn
        assert "virby: VM running (ready after " in drawn and drawn.rstrip().endswith("VM running")

        # 6. the host key the guest offers no longer matches the pinned one (keys replaced
        #    while the VM runs): doctor says so plainly, as Nix would not
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        other = public_line(Ed25519PrivateKey.generate(), "root@virby-vm") + "\n"
        state = inst.dir / "state"
        (state / "ssh_host_ed25519_key.pub").write_text(other)
        (state / "ssh_known_hosts").write_text(f"{HOST_KEY_ALIAS} {other}")
        doc = inst.cli("doctor", check=False)
        assert doc.returncode == 1
        assert _marks(doc.stdout)["guest host key"] == "✗"
        assert "the guest offers a different host key than the one pinned" in doc.stdout
        assert "unable to start any build" in doc.stdout
        assert "fix: restart the VM" in doc.stdout
