"""N real nginx replicas serving one directory over HTTP on loopback.

Each replica is its own nginx master (``daemon off``) with one worker, its
own temp prefix and config, and its own process group, so a test can stop,
SIGKILL (connection refused) or SIGSTOP (a gray failure: the kernel still
accepts connections, nothing answers) one replica without touching the
others. Everything is torn down on exit, also when the body raises.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from types import TracebackType

#: How long a replica may take to answer its first request.
START_TIMEOUT_S = 10.0
#: How long a stopped replica may take to exit before it is killed.
STOP_TIMEOUT_S = 5.0
#: Fresh ports tried when another process takes the one picked.
PORT_ATTEMPTS = 5

#: Paths the config answers specially, for error-mapping tests.
ERROR_500_PATH = "/__feedline_500"
FORBIDDEN_PREFIX = "/__feedline_forbidden/"


class NginxUnavailable(RuntimeError):
    """Debian's ``nginx`` binary is not installed (``apt-get install nginx``)."""


def nginx_binary() -> str | None:
    """The nginx executable, or None. Debian installs it in /usr/sbin, which
    is not on a non-root PATH."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _config(prefix: str, root: str, host: str, port: int, extra: str) -> str:
    temp = os.path.join(prefix, "tmp")
    # As root, nginx drops its worker to `nobody`, which cannot read a
    # test's 0700 temp directories; keep the worker as the caller instead.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return f"""{user}daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    # tcp_nopush off: with it, nginx 1.22 turns TCP_NODELAY off to cork a
    # sendfile response and uncorks with Nagle on, so the tail of a response
    # of 1-2 MSS (64-128 KiB on loopback) waits for the client's delayed
    # ACK (~40 ms) on a kept-alive connection.
    tcp_nopush off;
    tcp_nodelay on;
    keepalive_timeout 60s;
    keepalive_requests 1000000;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    default_type application/octet-stream;
    server {{
        listen {host}:{port} reuseport;
        server_name _;
        root {root};
        max_ranges 64;
        location / {{ }}
        location = {ERROR_500_PATH} {{ return 500; }}
        location {FORBIDDEN_PREFIX} {{ deny all; }}
{extra}
    }}
}}
"""


class _Replica:
    def __init__(self, prefix: str, host: str, port: int, wrap: Sequence[str]) -> None:
        self.prefix = prefix
        self.host = host
        self.port = port
        self.wrap = list(wrap)
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def error_log(self) -> str:
        try:
            with open(os.path.join(self.prefix, "error.log"), encoding="utf-8") as f:
                return f.read()[-2000:]
        except OSError:
            return ""


class NginxReplicas:
    """``with NginxReplicas(root_dir, n=3) as r: r.urls`` -- N nginx
    processes serving ``root_dir`` (with HTTP Range support) on loopback.

    ``hosts`` gives each replica's listen address (default 127.0.0.1) and
    ``wrap`` a command prefix per replica (for example ``["ip", "netns",
    "exec", "ns0"]``) so a rig can run a replica inside a namespace.
    ``extra_config`` is pasted into every ``server`` block.
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        n: int = 3,
        *,
        hosts: Sequence[str] | None = None,
        wrap: Sequence[Sequence[str]] | None = None,
        extra_config: str = "",
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        root = os.path.abspath(os.fspath(root_dir))
        if not os.path.isdir(root):
            raise ValueError(f"root_dir {os.fspath(root_dir)!r} is not a directory")
        if hosts is not None and len(hosts) != n:
            raise ValueError(f"hosts names {len(hosts)} addresses for n={n} replicas")
        if wrap is not None and len(wrap) != n:
            raise ValueError(f"wrap names {len(wrap)} prefixes for n={n} replicas")
        self.root_dir = root
        self.n = n
        self._hosts = list(hosts) if hosts is not None else ["127.0.0.1"] * n
        self._wrap = [list(w) for w in wrap] if wrap is not None else [[] for _ in range(n)]
        self._extra = extra_config
        self._start_timeout_s = start_timeout_s
        self._binary: str | None = None
        self._base: str | None = None
        self._replicas: list[_Replica] = []

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> NginxReplicas:
        self.start_all()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start_all(self) -> None:
        binary = nginx_binary()
        if binary is None:
            raise NginxUnavailable("nginx is not installed (Debian: apt-get install nginx)")
        self._binary = binary
        self._base = tempfile.mkdtemp(prefix="feedline-nginx-")
        try:
            for i in range(self.n):
                prefix = os.path.join(self._base, f"replica{i}")
                os.makedirs(os.path.join(prefix, "tmp"))
                host = self._hosts[i]
                replica = _Replica(prefix, host, 0, self._wrap[i])
                self._replicas.append(replica)
                self._start_fresh_port(replica)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kills every replica and removes the temp prefixes. Idempotent."""
        for replica in self._replicas:
            self._kill_group(replica, signal.SIGKILL)
            self._reap(replica)
        self._replicas = []
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None

    # -- what tests use ----------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self._replicas]

    @property
    def pids(self) -> list[int]:
        """Each replica's nginx master pid (0 when it is not running)."""
        return [
            r.proc.pid if r.proc is not None and r.proc.poll() is None else 0
            for r in self._replicas
        ]

    def url(self, i: int) -> str:
        return self._replica(i).url

    def stop(self, i: int) -> None:
        """Graceful shutdown (SIGQUIT); SIGKILL after STOP_TIMEOUT_S."""
        replica = self._replica(i)
        if replica.paused:
            self.resume(i)
        if replica.proc is not None and replica.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                replica.proc.send_signal(signal.SIGQUIT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                replica.proc.wait(STOP_TIMEOUT_S)
        self._kill_group(replica, signal.SIGKILL)
        self._reap(replica)

    def kill(self, i: int) -> None:
        """SIGKILL master and worker: new connections are refused at once."""
        replica = self._replica(i)
        self._kill_group(replica, signal.SIGKILL)
        self._reap(replica)

    def pause(self, i: int) -> None:
        """SIGSTOP master and worker: a gray failure. The listening socket
        still completes TCP handshakes (the kernel does that), but no request
        is answered until :meth:`resume`."""
        replica = self._replica(i)
        self._kill_group(replica, signal.SIGSTOP)
        replica.paused = True

    def resume(self, i: int) -> None:
        replica = self._replica(i)
        self._kill_group(replica, signal.SIGCONT)
        replica.paused = False

    def start(self, i: int) -> None:
        """Starts a stopped or killed replica again on its old port."""
        replica = self._replica(i)
        if replica.proc is not None and replica.proc.poll() is None:
            return
        self._launch(replica)
        self._wait_ready(replica)

    # -- internals ---------------------------------------------------------

    def _replica(self, i: int) -> _Replica:
        if not 0 <= i < len(self._replicas):
            raise IndexError(f"replica index {i} out of range for {len(self._replicas)} replicas")
        return self._replicas[i]

    def _start_fresh_port(self, replica: _Replica) -> None:
        last = ""
        for _ in range(PORT_ATTEMPTS):
            replica.port = _free_port(replica.host) if not replica.wrap else _free_port("127.0.0.1")
            self._launch(replica)
            try:
                self._wait_ready(replica)
                return
            except RuntimeError as e:
                last = str(e)
                self._kill_group(replica, signal.SIGKILL)
                self._reap(replica)
                if "Address already in use" not in last:
                    raise
        raise RuntimeError(f"nginx could not bind a port after {PORT_ATTEMPTS} tries: {last}")

    def _launch(self, replica: _Replica) -> None:
        assert self._binary is not None
        conf = os.path.join(replica.prefix, "nginx.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(_config(replica.prefix, self.root_dir, replica.host, replica.port, self._extra))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(replica.prefix, "error.log"))
        cmd = [
            *replica.wrap,
            self._binary,
            "-p",
            replica.prefix,
            "-c",
            conf,
            "-e",
            os.path.join(replica.prefix, "error.log"),
        ]
        # Own process group: signals reach master and worker together.
        replica.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        replica.paused = False

    def _wait_ready(self, replica: _Replica) -> None:
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            assert replica.proc is not None
            if replica.proc.poll() is not None:
                raise RuntimeError(
                    f"nginx for {replica.url} exited with {replica.proc.returncode}: "
                    f"{replica.error_log()}"
                )
            try:
                conn = http.client.HTTPConnection(replica.host, replica.port, timeout=1.0)
                try:
                    conn.request("HEAD", "/")
                    conn.getresponse().read()
                    return
                finally:
                    conn.close()
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(
            f"nginx for {replica.url} did not answer within {self._start_timeout_s} s: "
            f"{replica.error_log()}"
        )

    @staticmethod
    def _kill_group(replica: _Replica, sig: signal.Signals) -> None:
        proc = replica.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        if sig == signal.SIGKILL and replica.paused:
            replica.paused = False

    @staticmethod
    def _reap(replica: _Replica) -> None:
        proc = replica.proc
        if proc is None:
            return
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(STOP_TIMEOUT_S)
        # The worker is in the master's group; make sure none outlives it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        replica.proc = None
