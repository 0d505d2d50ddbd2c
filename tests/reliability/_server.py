"""A real ``matcher serve`` in a child process on loopback: start, SIGKILL, restart, measure.

Unlike tests/service_helpers.ServerThread (same process), a child process can be killed
without warning and its memory measured on its own. Output goes to a log file (read by the
privacy test). Ports are bound by the server itself (port 0: the OS picks a free one) and
read back from its log: gRPC from the "listening on" line, /metrics from "metrics on", so
no other process can take a port between its choice and its bind.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from service_helpers import Started

from matcher.client import MatcherClient

REPO = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")
_METRICS = re.compile(rb"metrics on http://127\.0\.0\.1:(\d+)/metrics")
_RECENT_BYTES = 1 << 20
# Serve /metrics on a port the server picks (read back as ServerProcess.metrics_port).
METRICS_ANY_PORT = ("--metrics-listen", "127.0.0.1:0")


def metric(port: int, name: str) -> float:
    """One unlabelled sample of a server's /metrics (KeyError if it is not there)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise KeyError(name)


def rss_kib(pid: int) -> int:
    """Resident set size of a live process, KiB (from /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class ServerProcess(Started):
    """``matcher -v serve --listen 127.0.0.1:0 --data DIR ...`` as a child process.

    ``client_kw`` are the MatcherClient options (token, ca, cert, key) for health checks.
    ``keep_port``: a restart listens on the port the first start got (a client given the
    address once finds the server again). ``metrics_port``: the /metrics port, when the
    args serve it (METRICS_ANY_PORT), else None.
    """

    def __init__(self, data_dir: Path, log_path: Path, args: list[str] | tuple[str, ...] = (),
                 *, client_kw: dict | None = None, env: dict[str, str] | None = None,
                 verbose: bool = True, keep_port: bool = False) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.args = list(args)
        self.client_kw = client_kw or {}
        self.env = {**os.environ, **(env or {})}
        self.verbose = verbose
        self.keep_port = keep_port
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._port_seen = threading.Event()
        self._reader: threading.Thread | None = None
        self._output = threading.Condition()
        self._recent = bytearray()  # the last ~_RECENT_BYTES of output, for wait_for_output

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 90.0) -> ServerProcess:
        port = self.port if self.keep_port and self.port is not None else 0
        argv = [sys.executable, "-m", "matcher.cli", *(["-v"] if self.verbose else []),
                "serve", "--listen", f"127.0.0.1:{port}", "--data", str(self.data_dir),
                *self.args]
        self._port_seen.clear()
        self.port = None
        self.metrics_port = None
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=REPO, env=self.env,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._tee, args=(self.proc,), daemon=True)
        self._reader.start()
        if not self._port_seen.wait(timeout):
            self.kill()
            raise TimeoutError(f"server did not listen within {timeout:.0f} s; see {self.log_path}")
        if self.port is None:
            raise RuntimeError(f"server exited before listening; see {self.log_path}")
        try:
            with self.client() as client:
                client.wait_serving(timeout)
        except Exception as exc:
            raise RuntimeError(f"server on {self.address} (exit code {self.proc.poll()}) did not "
                               f"become SERVING: {exc}\n{self.log_tail()}") from exc
        return self

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the server wrote (for a failure message)."""
        with self._output:
            recent = bytes(self._recent[-16384:])
        return "\n".join(recent.decode(errors="replace").splitlines()[-lines:])

    def _tee(self, proc: subprocess.Popen) -> None:
        """Copy the child's output to the log file; note the port from the listen line."""
        with open(self.log_path, "ab") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                with self._output:
                    self._recent += line
                    if len(self._recent) > 2 * _RECENT_BYTES:
                        del self._recent[:-_RECENT_BYTES]
                    self._output.notify_all()
                if self.metrics_port is None:
                    m = _METRICS.search(line)
                    if m:  # logged before the listening line
                        self.metrics_port = int(m.group(1))
                if self.port is None:
                    m = _LISTENING.search(line)
                    if m:
                        self.port = int(m.group(1))
                        self._port_seen.set()
        self._port_seen.set()  # exited: wake a waiting start()

    def wait_for_output(self, needle: bytes, timeout: float = 10.0) -> bool:
        """True once ``needle`` has appeared in the recent output (False on timeout)."""
        with self._output:
            return self._output.wait_for(lambda: needle in self._recent, timeout)

    def client(self, **overrides) -> MatcherClient:
        kw = {"timeout": 30.0, **self.client_kw, **overrides}
        return MatcherClient(self.address, **kw)

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or closed."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self._reap()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful shutdown); SIGKILL if it does not exit in time."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        return self._reap()

    def _reap(self) -> int:
        if self.proc is None:
            return 0
        code = self.proc.wait(30)
        if self._reader is not None:
            self._reader.join(10)
        self.proc.stdout.close()
        return code

    def abandon(self) -> None:
        self.kill()
