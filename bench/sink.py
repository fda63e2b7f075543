"""A host-side stand-in for the guest's sshd, for `bench.throughput`: `python -m bench.sink`
prints its port, then serves until SIGTERM.

On accept it speaks first (like an SSH server, which the forwarder waits for), then reads one
command line: `UP <n>` reads n bytes and answers `OK`; `DOWN <n>` sends n bytes. EOF before a
command just closes (a setup-latency probe)."""

from __future__ import annotations

import signal
import socket
import sys
import threading

BANNER = b"SSH-2.0-sink\r\n"
CHUNK = 1 << 20
MAX_LINE = 256


def _read_line(conn: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n") and len(line) < MAX_LINE:
        b = conn.recv(1)
        if not b:
            return b""
        line += b
    return line


def serve(conn: socket.socket) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with conn:
        try:
            conn.sendall(BANNER)
            words = _read_line(conn).split()
            if len(words) != 2 or not words[1].isdigit():
                return
            cmd, n = words[0], int(words[1])
            if cmd == b"UP":
                left = n
                while left > 0:
                    got = conn.recv_into(view, min(CHUNK, left))
                    if got == 0:
                        return
                    left -= got
                conn.sendall(b"OK\n")
            elif cmd == b"DOWN":
                left = n
                while left > 0:
                    k = min(CHUNK, left)
                    conn.sendall(view[:k])
                    left -= k
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(CHUNK):  # until the client closes
                    pass
        except OSError:
            return


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(512)
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
