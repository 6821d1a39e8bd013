"""A local S3-compatible server (moto's standalone server) on 127.0.0.1: the one place that starts one.

The test fixtures, the benchmarks and ``infra/object_store.sh`` all use it (the script runs this file, which needs
only the standard library, so it works before the package is installed)::

    python pipeline/testing/object_store.py answers http://127.0.0.1:9555   # exit 0 when anything answers there
    python pipeline/testing/object_store.py start-moto 9555 server.log       # start, wait, print the server's pid
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["answers", "free_port", "MotoServer"]


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether an HTTP server answers at ``url``: any answer, an S3 error included, means it is up."""
    try:
        urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """A moto server of the caller's own on 127.0.0.1 (a separate process, so Ray workers and writer processes
    reach it too, and freezing or killing it touches nothing else).

    Args:
        port: where it listens (default: a free port).
        log: file for its output (default: none kept).
        detach: a new session, so it outlives the process that started it (``infra/object_store.sh``).
        timeout: seconds to wait for its first answer.
    """

    def __init__(self, port: int | None = None, log: str | None = None, detach: bool = False, timeout: float = 30):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(self.port)], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=detach)
        finally:
            if log:
                out.close()
        deadline = time.monotonic() + timeout
        while not answers(self.endpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto_server did not start on {self.endpoint}"
                                   + (f"; see {log}" if log else ""))
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """Stop it (resumed first if a test froze it with SIGSTOP)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "answers":
        return 0 if answers(argv[1]) else 1
    if len(argv) == 3 and argv[0] == "start-moto":
        try:
            server = MotoServer(int(argv[1]), log=argv[2], detach=True)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        print(server.pid)
        return 0
    print(__doc__.strip().splitlines()[-2:], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
