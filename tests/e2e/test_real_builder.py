"""The guest as a real Nix builder (issue 18), all in one VM: the host's Nix (Debian's 2.8)
builds through Virby's forwarder with the ssh_config `virby ssh-config` prints (its shared
connection on, as users get it), into the `nix` guest (Nix 2.26, a root nix-daemon, nixbld
users, the sandbox on, a 1 GiB store disk).

The host side of the guest's network is a plain HTTP server this test runs on 127.0.0.1: the
guest reaches it at its gateway, 10.0.2.2 (QEMU slirp, `guestNetwork: "nat"`). It serves a
20 MiB file for fixed-output fetches, a binary cache signed with a key made here, and an
unsigned one. Its request log is what shows who fetched what.

Each derivation carries a nonce unless the test needs a fixed path; what the host built is
deleted from its store at the end.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testing.harness import Instance
from testing.nixhost import NIX_CONFIG
from tests.require import require
from virby.workers.guestconf import free_space

pytestmark = pytest.mark.e2e

MiB = 1 << 20
DISK = 1 << 30
BUILD_TIMEOUT = 600
GUEST_GATEWAY = "10.0.2.2"


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))


class Handler(http.server.SimpleHTTPRequestHandler):
    server: Server

    def log_message(self, format: str, *args: object) -> None:
        self.server.requests.append(self.path)


@dataclass
class Lab:
    vm: Instance
    www: Path
    server: Server
    pubkey: str
    secret: Path
    env: dict[str, str]
    host_paths: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://{GUEST_GATEWAY}:{self.server.server_address[1]}/{path}"

    def nix_build(self, expr: Path, *args: str, jobs: int = 8) -> subprocess.CompletedProcess[str]:
        """The host's nix-build, everything sent to virby-vm (`--max-jobs 0`)."""
        proc = subprocess.run(
            ["nix-build", str(expr), "--no-out-link", "--max-jobs", "0",
             "--builders", f"ssh-ng://virby-vm x86_64-linux - {jobs} 1", *args],
            env=self.env, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
        if proc.returncode == 0:
            self.host_paths += proc.stdout.split()
        return proc

    def guest(self, command: str, timeout: float = BUILD_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return self.vm.ssh(command, timeout=timeout)

    def guest_ok(self, command: str) -> str:
        out = self.guest(command)
        assert out.returncode == 0, f"{command}: {out.stderr[-3000:]}"
        return out.stdout

    def avail(self) -> int:
        return int(self.guest_ok("df -kP /nix").splitlines()[-1].split()[3]) * 1024


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, guest_nix_dir: Path) -> Iterator[Lab]:
    require("nix-build", "apt-get install -y --no-install-recommends nix-bin")
    tmp = tmp_path_factory.mktemp("builder")
    www = tmp / "www"
    www.mkdir()
    subprocess.run(["nix-store", "--generate-binary-cache-key", "virby-test-1",
                    str(tmp / "secret"), str(tmp / "public")], check=True, capture_output=True)
    server = Server(www)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    vm = Instance(guest_dir=guest_nix_dir, memory=512, cores=2, diskSize=DISK,
                  substituters=[f"http://{GUEST_GATEWAY}:{port}/cache",
                                f"http://{GUEST_GATEWAY}:{port}/unsigned"],
                  trustedPublicKeys=[(tmp / "public").read_text().strip()])
    env = {**os.environ, "NIX_SSHOPTS": f"-F {vm.ssh_config}",
           "NIX_CONFIG": NIX_CONFIG + "\nbuilders-use-substitutes = true"}
    for var in ("NIX_REMOTE", "NIX_BUILDERS"):
        env.pop(var, None)
    lab = Lab(vm, www, server, (tmp / "public").read_text().strip(), tmp / "secret", env)
    try:
        vm.start()
        yield lab
    finally:
        # the shared connection would outlive the VM by ControlPersist: end it first
        subprocess.run(["ssh", "-F", str(vm.ssh_config), "-O", "exit", "virby-vm"],
                       capture_output=True, check=False, timeout=30)
        vm.close()
        server.shutdown()
        for path in lab.host_paths:
            subprocess.run(["nix-store", "--delete", path], env=env, capture_output=True, check=False)


# -- the sandbox --------------------------------------------------------------------------------

PROBE_NIX = """\
{ nonce, url }:
derivation {
  name = "sandbox-probe";
  system = "x86_64-linux";
  builder = "/bin/sh";
  inherit nonce;
  args = [ "-c" ''
    { ls -a / ; echo "home: $(ls /home 2>&1)"; echo "passwd:"; cat /etc/passwd
      if wget -q -O /dev/null ${"$"}{url}; then echo "tcp: reached"; else echo "tcp: refused"; fi
    } > $out
  '' ];
}
"""


def test_a_build_sees_only_the_sandbox_and_cannot_reach_the_host(lab: Lab, tmp_path: Path) -> None:
    probe = f"probe-{uuid.uuid4().hex}"
    (lab.www / probe).write_text("the host\n")
    # outside the sandbox the guest does reach the server: the sandbox is what stops the build
    assert lab.guest_ok(f"wget -q -O - {lab.url(probe)}") == "the host\n"
    lab.server.requests.clear()
    build = lab.nix_build(write(tmp_path / "probe.nix", PROBE_NIX),
                          "--argstr", "nonce", uuid.uuid4().hex, "--argstr", "url", lab.url(probe))
    assert build.returncode == 0, build.stderr
    assert "on 'ssh-ng://virby-vm'" in build.stderr
    text = Path(build.stdout.strip()).read_text()
    assert "home: ls: /home: No such file or directory" in text, text
    passwd = text.split("passwd:\n")[1].split("tcp:")[0]
    # Nix's own passwd for the build: root, the build user mapped to nixbld (uid 1000), nobody
    assert [line.split(":")[0] for line in passwd.splitlines()] == ["root", "nixbld", "nobody"]
    assert "builder" not in passwd and "/home" not in passwd
    assert "tcp: refused" in text, text
    assert f"/{probe}" not in lab.server.requests, "the sandboxed build reached the host"


FOD_NIX = """\
{ url, sha256 }:
derivation {
  name = "fetched";
  system = "x86_64-linux";
  builder = "/bin/sh";
  args = [ "-c" "wget -q -O $out ${url}" ];
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash = sha256;
}
"""


def test_a_fixed_output_derivation_fetches_from_the_host(lab: Lab, tmp_path: Path) -> None:
    name = f"fod-{uuid.uuid4().hex}"
    data = os.urandom(MiB)
    (lab.www / name).write_bytes(data)
    build = lab.nix_build(write(tmp_path / "fod.nix", FOD_NIX), "--argstr", "url", lab.url(name),
                          "--argstr", "sha256", hashlib.sha256(data).hexdigest())
    assert build.returncode == 0, build.stderr
    assert Path(build.stdout.strip()).read_bytes() == data
    assert f"/{name}" in lab.server.requests


# -- substitutes ----------------------------------------------------------------------------------

# x refuses to build under the guest's kernel: if y builds, the guest substituted x.
CACHED_NIX = """\
{ nonce }:
rec {
  x = derivation {
    name = "x-${nonce}";
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" ''
      read k < /proc/sys/kernel/osrelease
      case $k in *-cloud-*) echo "x must be substituted in the guest" >&2; exit 1 ;; esac
      echo "cached-${nonce}" > $out
    '' ];
  };
  y = derivation {
    name = "y-${nonce}";
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" "read v < ${x}; echo \\"y saw $v\\" > $out" ];
  };
}
"""


def cache_x(lab: Lab, tmp_path: Path, cache: str, *, signed: bool) -> tuple[Path, str, str]:
    """Build x in a store of its own (never the host's), copy it to the cache; returns the
    expression, the nonce and x's path."""
    busybox = require("busybox", "apt-get install -y busybox-static")
    expr = write(tmp_path / "cached.nix", CACHED_NIX)
    nonce = uuid.uuid4().hex[:12]
    side = tmp_path / "side"
    built = subprocess.run(
        ["nix-build", str(expr), "-A", "x", "--argstr", "nonce", nonce, "--no-out-link",
         "--store", str(side), "--option", "sandbox-paths", f"/bin/sh={busybox}"],
        env=lab.env, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    assert built.returncode == 0, built.stderr
    x = built.stdout.strip()
    to = f"file://{lab.www / cache}" + (f"?secret-key={lab.secret}" if signed else "")
    copied = subprocess.run(["nix", "copy", "--from", str(side), "--to", to, x], env=lab.env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert copied.returncode == 0, copied.stderr
    valid = subprocess.run(["nix-store", "--check-validity", x], env=lab.env, capture_output=True,
                           check=False)
    assert valid.returncode != 0, f"{x} is in the host's store"
    return expr, nonce, x


def test_the_builder_substitutes_an_input_from_a_signed_cache(lab: Lab, tmp_path: Path) -> None:
    """The host has no substituter and x was never in its store; x cannot be built in the guest.
    Nix 2.8 (the host) realises every input before it builds y: it asks the builder for x, the
    builder substitutes it from the cache, and (as after any remote build) Nix copies it back."""
    expr, nonce, x = cache_x(lab, tmp_path, "cache", signed=True)
    lab.server.requests.clear()
    build = lab.nix_build(expr, "-A", "y", "--argstr", "nonce", nonce)
    assert build.returncode == 0, build.stderr
    assert Path(build.stdout.strip()).read_text() == f"y saw cached-{nonce}\n"
    narinfo = f"/cache/{Path(x).name.split('-')[0]}.narinfo"
    assert narinfo in lab.server.requests, lab.server.requests
    assert any(r.startswith("/cache/nar/") for r in lab.server.requests), lab.server.requests
    assert "x must be substituted in the guest" not in build.stderr
    lab.host_paths.append(x)


def test_an_unsigned_cache_is_refused(lab: Lab, tmp_path: Path) -> None:
    expr, nonce, x = cache_x(lab, tmp_path, "unsigned", signed=False)
    lab.server.requests.clear()
    build = lab.nix_build(expr, "-A", "y", "--argstr", "nonce", nonce)
    assert build.returncode != 0
    # the guest looked, found the path unsigned, ignored it and tried to build x, which refuses
    assert f"/unsigned/{Path(x).name.split('-')[0]}.narinfo" in lab.server.requests
    assert not any(r.startswith("/unsigned/nar/") for r in lab.server.requests), lab.server.requests
    assert "x must be substituted in the guest" in build.stderr, build.stderr


# -- a small real workload ------------------------------------------------------------------------

# 20 derivations: a fetched 20 MiB file, 18 that compress or checksum it (or parts of it) in
# parallel, one that combines them (names without store hashes: the result is content only).
# pipefail: a tool missing from the sandbox fails the build instead of checksumming nothing.
DAG_NIX = """\
{ url, sha256, tag }:
let
  system = "x86_64-linux";
  step = name: script: derivation {
    inherit name system tag;
    builder = "/bin/sh";
    args = [ "-c" "set -eo pipefail; ${script}" ];
  };
  blob = derivation {
    name = "blob";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "wget -q -O $out ${url}" ];
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = sha256;
  };
  pack = name: command: step name "${command} < ${blob} > $out";
  sum = tool: step tool "${tool} < ${blob} | cut -d' ' -f1 > $out";
  part = i: step "part-${toString i}"
    "dd if=${blob} bs=1M skip=${toString (i * 2)} count=3 | sha256sum | cut -d' ' -f1 > $out";
  leaves = [ (pack "gzip-1" "gzip -1") (pack "gzip-6" "gzip -6") (pack "lzop" "lzop -c") ]
    ++ map sum [ "sha256sum" "sha1sum" "md5sum" "sha512sum" "sha3sum" ]
    ++ map part [ 0 1 2 3 4 5 6 7 8 ]
    ++ [ (step "size" "wc -c < ${blob} > $out") ];
in
step "combined" ''
  for f in ${builtins.concatStringsSep " " (map toString leaves)}; do
    echo "$(basename $f | cut -c34-) $(wc -c < $f) $(sha256sum < $f | cut -d' ' -f1)"
  done > $out
''
"""


def test_a_20_derivation_dag_equals_the_same_built_in_the_guest(lab: Lab, tmp_path: Path) -> None:
    data = os.urandom(20 * MiB)
    (lab.www / "blob20").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    expr = write(tmp_path / "dag.nix", DAG_NIX)
    args = ("--argstr", "url", lab.url("blob20"), "--argstr", "sha256", sha)
    drvs = subprocess.run(["nix-instantiate", str(expr), *args, "--argstr", "tag", "host"],
                          env=lab.env, capture_output=True, text=True, check=True).stdout.strip()
    closure = subprocess.run(["nix-store", "--query", "--requisites", drvs], env=lab.env,
                             capture_output=True, text=True, check=True).stdout.split()
    assert len([p for p in closure if p.endswith(".drv")]) == 20

    through_virby = lab.nix_build(expr, *args, "--argstr", "tag", "host", jobs=8)
    assert through_virby.returncode == 0, through_virby.stderr
    assert through_virby.stderr.count("on 'ssh-ng://virby-vm'") == 20, through_virby.stderr
    host_out = Path(through_virby.stdout.strip())

    # the same DAG (another tag: other store paths, the same fetched file) built in the guest
    scp = subprocess.run(["scp", "-F", str(lab.vm.ssh_config), str(expr), "virby-vm:/tmp/dag.nix"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert scp.returncode == 0, scp.stderr
    quoted = " ".join(f"'{a}'" for a in args)
    guest_out = lab.guest_ok(f"nix-build -j 2 --no-out-link /tmp/dag.nix {quoted} --argstr tag guest").strip()
    assert guest_out != str(host_out)
    guest_bytes = lab.guest_ok(f"cat {guest_out}")
    assert host_out.read_text() == guest_bytes
    lines = guest_bytes.splitlines()
    assert len(lines) == 18, lines
    # each line: a leaf's name, size and sha256; the sha256sum leaf holds the file's digest
    leaf = {line.split()[0]: line.split()[1:] for line in lines}
    assert leaf["sha256sum"] == ["65", hashlib.sha256(f"{sha}\n".encode()).hexdigest()]
    assert leaf["size"][0] == str(len(f"{20 * MiB}\n"))
    assert int(leaf["gzip-1"][0]) > 20 * MiB  # random bytes do not compress: all of them went in


def test_scp_to_the_builder_and_back_keeps_every_byte(lab: Lab, tmp_path: Path) -> None:
    src = tmp_path / "there"
    src.write_bytes(os.urandom(3 * MiB + 17))
    back = tmp_path / "back"
    config = str(lab.vm.ssh_config)
    for argv in (["scp", "-F", config, str(src), "virby-vm:/tmp/scp-test"],
                 ["scp", "-F", config, "virby-vm:/tmp/scp-test", str(back)]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
    assert hashlib.sha256(back.read_bytes()).hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()


# -- a store that cleans itself -------------------------------------------------------------------

SIZED_NIX = """\
{ nonce, mb, where }:
derivation {
  name = "sized-${toString mb}";
  system = "x86_64-linux";
  builder = "/bin/sh";
  inherit nonce;
  args = [ "-c" ({
    tmp = "dd if=/dev/zero of=big bs=1M count=${toString mb} && rm big && echo ok > $out";
    out = "dd if=/dev/zero of=$out bs=1M count=${toString mb}";
    fill = "fallocate -l ${toString mb}M $out";  # the space, without writing it
  }.${where}) ];
}
"""


def sized(lab: Lab, tmp_path: Path, mb: int, where: str) -> subprocess.CompletedProcess[str]:
    return lab.nix_build(write(tmp_path / "sized.nix", SIZED_NIX), "--argstr", "nonce",
                         uuid.uuid4().hex, "--arg", "mb", str(mb), "--argstr", "where", where)


def test_a_build_s_temporary_files_go_to_the_store_disk_not_ram(lab: Lab, tmp_path: Path) -> None:
    """300 MiB in the build's own directory: more than the 512 MiB guest's RAM-backed /tmp
    (about 230 MiB) could hold."""
    tmp_size = int(lab.guest_ok("df -kP /tmp").splitlines()[-1].split()[1]) * 1024
    assert tmp_size < 300 * MiB
    build = sized(lab, tmp_path, 300, "tmp")
    assert build.returncode == 0, build.stderr


def wait_until(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    """Poll `check` (an SSH round trip into the guest) until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


def test_past_min_free_the_store_collects_itself_and_the_next_build_succeeds(
        lab: Lab, tmp_path: Path) -> None:
    min_free, _ = free_space(DISK)
    lab.guest_ok("nix-store --gc >/dev/null")  # nothing dead left: the filler is what goes
    avail = lab.avail()
    fill_mb = (avail - min_free // 2) // MiB
    filler = lab.guest_ok(f"echo '{SIZED_NIX}' > /tmp/sized.nix && nix-build /tmp/sized.nix "
                          f"--no-out-link --argstr nonce {uuid.uuid4().hex} --arg mb {fill_mb} "
                          "--argstr where fill").strip()
    assert lab.avail() < min_free
    # `virby status` shows the guest's own view of the store's disk
    store = json.loads(lab.vm.cli("status", "--json").stdout)["store"]
    assert store["disk_size"] == DISK and store["guest"]["avail"] < min_free, store

    build = sized(lab, tmp_path, 1, "out")
    assert build.returncode == 0, build.stderr

    def collected() -> bool:
        return lab.guest(f"nix-store --check-validity {filler}").returncode != 0
    wait_until("the filler to be collected", collected)
    assert lab.avail() >= min_free


def test_a_build_bigger_than_the_disk_fails_with_nix_s_error_and_the_next_succeeds(
        lab: Lab, tmp_path: Path) -> None:
    too_big = sized(lab, tmp_path, 2 * DISK // MiB, "out")
    assert too_big.returncode != 0
    assert "No space left on device" in too_big.stderr, too_big.stderr[-3000:]
    assert re.search(r"builder for '[^']*sized-2048\.drv' failed", too_big.stderr), too_big.stderr[-3000:]
    small = sized(lab, tmp_path, 1, "out")
    assert small.returncode == 0, small.stderr[-3000:]
    assert lab.vm.status()["vm"]["state"] == "running"
