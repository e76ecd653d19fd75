"""Real network faults for replicas: one nginx per network namespace.

Each replica is an nginx serving one directory inside its own network
namespace, reached from the host over a veth pair with a private /30 that
exists only inside this rig. Faults are applied where production has them:

* packet loss: nftables ``numgen random mod 10000 < N drop`` on the
  replica's output (real loss, so real TCP retransmission spikes),
* bandwidth caps: ``tc ... tbf`` on the replica's egress,
* link down/up: the host end of the veth,
* gray failure: SIGSTOP of the server (connections are accepted by the
  kernel, nothing is answered) and SIGCONT,
* crash: SIGKILL (connection refused afterwards).

The kernel here has no ``netem``; delay and jitter come from
:class:`feedline.testing.FaultProxy` instead.

Needs root (CI runs as root). Everything the rig makes carries its prefix
and a per-rig random tag, and is removed on :meth:`NetnsRig.close`, on
exceptions, and by :func:`cleanup_stale` after a crashed run.

    with NetnsRig(data_dir, replicas=3) as rig:
        rig.replicas[0].set_loss(1.0)            # 1% of packets dropped
        rig.at(0.5, rig.replicas[1].sigstop)     # gray failure in 0.5 s
        urls = [r.url for r in rig.replicas]
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["PREFIX", "NetnsError", "NetnsRig", "Replica", "Scheduled", "cleanup_stale"]

#: Every namespace, interface and temp dir the rig makes starts with this.
PREFIX = "flrig"
#: A command that takes longer than this is broken, not slow.
COMMAND_TIMEOUT_S = 10.0
#: How long a replica may take to accept connections after start.
READY_TIMEOUT_S = 10.0
NFT_TABLE = "feedline_rig"
#: Metric of the rig's blackhole route for its /24 (how cleanup finds it).
SAFETY_METRIC = "4242"
NOT_ROOT = "needs root for network namespaces"


class NetnsError(RuntimeError):
    """A rig command failed; the message has the command and its stderr."""


def _require_root() -> None:
    if os.geteuid() != 0:
        raise PermissionError(NOT_ROOT)
    missing = [tool for tool in ("ip", "nft", "tc", "nginx") if shutil.which(tool) is None]
    if missing:
        raise NetnsError(f"the netns rig needs {', '.join(missing)} on PATH")


def _run(*cmd: str, netns: str | None = None, check: bool = True, stdin: str | None = None) -> str:
    argv = ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"{' '.join(argv)} timed out after {COMMAND_TIMEOUT_S} s") from e
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _pick_subnet(replicas: int) -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no address or route on the host touches;
    each replica takes one /30 of it."""
    if replicas > 64:
        raise ValueError(f"replicas must be at most 64, got {replicas}")
    used = _run("ip", "-4", "-o", "addr", "show") + _run("ip", "-4", "route", "show")
    taken = [
        ipaddress.ip_network(m, strict=False) for m in re.findall(r"\d+\.\d+\.\d+\.\d+/\d+", used)
    ]
    taken += [
        ipaddress.ip_network(f"{m}/32")
        for m in re.findall(r"(?<![\d/])(\d+\.\d+\.\d+\.\d+)(?![\d/])", used)
    ]
    rng = random.Random(secrets.randbits(64))
    for _ in range(64):
        candidate = ipaddress.IPv4Network(f"10.{rng.randrange(200, 250)}.{rng.randrange(256)}.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise NetnsError("found no free 10.x.y.0/24 for the rig's veth pairs")


_NGINX_CONF = """\
user root;
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    {access_log}
    sendfile on;
    # tcp_nopush off: see nginx.py (a ~40 ms stall behind a delayed ACK).
    tcp_nopush off;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    default_type application/octet-stream;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {address}:{port} reuseport backlog=4096;
        root {root};
        location / {{ }}
    }}
}}
"""


def nginx_config(
    workdir: str | Path, address: str, port: int, root: str | Path, *, access_log: bool = False
) -> str:
    """The nginx configuration of a replica inside a namespace (shared by
    this rig and ``feedline bench --nnodes``); ``access_log`` writes
    ``workdir/access.log`` with the bytes each response sent."""
    log = (
        f"log_format sent '$remote_addr $status $body_bytes_sent';\n"
        f"    access_log {workdir}/access.log sent;"
        if access_log
        else "access_log off;"
    )
    return _NGINX_CONF.format(dir=workdir, address=address, port=port, root=root, access_log=log)


@dataclass
class Replica:
    """One nginx in its own namespace. Methods apply faults at once; use
    :meth:`NetnsRig.at` to apply them later."""

    index: int
    netns: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str
    port: int
    root: Path
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    stopped: bool = False
    loss_percent: float = 0.0
    _drops_before: int = field(default=0, repr=False)

    @property
    def address(self) -> str:
        return f"{self.ns_ip}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    # -- the server ---------------------------------------------------------

    def start_server(self) -> None:
        """Starts (or restarts, after :meth:`sigkill`) nginx and waits until
        it accepts connections."""
        if self.process is not None and self.process.poll() is None:
            return
        conf = self.workdir / "nginx.conf"
        conf.write_text(nginx_config(self.workdir, self.ns_ip, self.port, self.root))
        with open(self.workdir / "stderr.log", "ab") as err:
            # Its own session: SIGSTOP/SIGKILL reach master and worker alike.
            self.process = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns,
                    "nginx",
                    "-c",
                    str(conf),
                    "-e",
                    str(self.workdir / "error.log"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        self.stopped = False
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise NetnsError(f"nginx for replica {self.index} exited: {self._server_log()}")
            try:
                with socket.create_connection((self.ns_ip, self.port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise NetnsError(
                        f"replica {self.index} did not accept connections within "
                        f"{READY_TIMEOUT_S} s: {self._server_log()}"
                    ) from None
                time.sleep(0.02)

    def _server_log(self) -> str:
        logs = []
        for name in ("stderr.log", "error.log"):
            path = self.workdir / name
            if path.exists():
                logs.append(path.read_text(errors="replace").strip()[-2000:])
        return " | ".join(x for x in logs if x) or "(no log)"

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is None or self.process.poll() is not None:
            raise NetnsError(f"replica {self.index} has no running server to send {sig.name}")
        os.killpg(self.process.pid, sig)

    def sigstop(self) -> None:
        """Gray failure: the kernel still accepts connections, nothing answers."""
        self._signal(signal.SIGSTOP)
        self.stopped = True

    def sigcont(self) -> None:
        self._signal(signal.SIGCONT)
        self.stopped = False

    def sigkill(self) -> None:
        """Crash: connections are refused afterwards (until :meth:`start_server`)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=COMMAND_TIMEOUT_S)
        self.stopped = False
        # The worker dies a moment after the master; until it has, its copy
        # of the listening socket still accepts (and then resets).
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.ns_ip, self.port), timeout=1.0):
                    pass
            except ConnectionRefusedError:
                return
            except OSError:
                pass
            time.sleep(0.01)
        raise NetnsError(f"replica {self.index} still accepts connections after SIGKILL")

    # -- the network --------------------------------------------------------

    def set_loss(self, percent: float) -> None:
        """Drops ``percent`` % of the replica's outgoing packets (0 removes
        the loss); resolution 0.01 %."""
        if not 0 <= percent <= 100:
            raise ValueError(f"loss percent must be in [0, 100], got {percent!r}")
        self._drops_before = self.drops()
        _run("nft", "flush", "chain", "inet", NFT_TABLE, "out", netns=self.netns)
        threshold = round(percent * 100)
        if threshold > 0:
            _run(
                "nft", "add", "rule", "inet", NFT_TABLE, "out",
                "numgen", "random", "mod", "10000", "<", str(threshold), "counter", "drop",
                netns=self.netns,
            )  # fmt: skip
        self.loss_percent = percent

    def drops(self) -> int:
        """Packets dropped by :meth:`set_loss` so far (nft counters)."""
        listing = _run("nft", "list", "chain", "inet", NFT_TABLE, "out", netns=self.netns)
        now = sum(int(n) for n in re.findall(r"counter packets (\d+)", listing))
        return self._drops_before + now

    def set_bandwidth(self, bytes_per_s: int | None) -> None:
        """Caps the replica's egress with ``tbf``; ``None`` removes the cap."""
        if bytes_per_s is None:
            _run("tc", "qdisc", "del", "dev", self.ns_if, "root", netns=self.netns, check=False)
            return
        if isinstance(bytes_per_s, bool) or not isinstance(bytes_per_s, int) or bytes_per_s < 1:
            raise ValueError(f"bytes_per_s must be a positive int or None, got {bytes_per_s!r}")
        # Burst of at least one 10 ms tick (and a few MTUs) so tbf can keep up.
        burst = max(bytes_per_s // 100, 16 * 1024)
        _run(
            "tc", "qdisc", "replace", "dev", self.ns_if, "root", "tbf",
            "rate", f"{bytes_per_s * 8}bit", "burst", str(burst), "latency", "200ms",
            netns=self.netns,
        )  # fmt: skip

    def link_down(self) -> None:
        """Pulls the cable on the replica's side: the host's route stays, its
        packets vanish (clients time out, as with a dead switch port)."""
        _run("ip", "-n", self.netns, "link", "set", self.ns_if, "down")

    def link_up(self) -> None:
        _run("ip", "-n", self.netns, "link", "set", self.ns_if, "up")


@dataclass
class Scheduled:
    """One action of :meth:`NetnsRig.at`."""

    due_s: float
    action: Callable[[], object]
    name: str
    done: threading.Event = field(default_factory=threading.Event)
    ran_at_s: float | None = None
    error: BaseException | None = None


class _Scheduler:
    """Runs actions at their times on one thread, in order."""

    def __init__(self, origin: float) -> None:
        self.origin = origin
        self._heap: list[tuple[float, int, Scheduled]] = []
        self._cond = threading.Condition()
        self._seq = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="netns-rig-schedule", daemon=True)
        self._thread.start()

    def add(self, item: Scheduled) -> None:
        with self._cond:
            if self._closed:
                raise NetnsError("the rig is closed")
            heapq.heappush(self._heap, (item.due_s, self._seq, item))
            self._seq += 1
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._heap:
                        wait = self._heap[0][0] - (time.monotonic() - self.origin)
                        if wait <= 0:
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                if self._closed:
                    return
                _, _, item = heapq.heappop(self._heap)
            item.ran_at_s = time.monotonic() - self.origin
            try:
                item.action()
            except BaseException as e:
                item.error = e
            finally:
                item.done.set()

    def close(self) -> list[Scheduled]:
        with self._cond:
            self._closed = True
            pending = [item for _, _, item in self._heap]
            self._heap.clear()
            self._cond.notify()
        self._thread.join(timeout=COMMAND_TIMEOUT_S * 2)
        return pending


class NetnsRig:
    """``replicas`` nginx servers of ``root``, each in its own namespace.

    ``start`` (or ``with``) builds everything; ``close`` removes it all, also
    after failures. ``at(seconds, action)`` runs ``action`` that many seconds
    after the rig started, on a scheduler thread.
    """

    def __init__(
        self, root: str | os.PathLike[str], replicas: int = 3, *, port: int = 80,
        prefix: str = PREFIX,
    ) -> None:  # fmt: skip
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 64:
            raise ValueError(f"replicas must be an int in [1, 64], got {replicas!r}")
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be in [1, 65535], got {port!r}")
        if not re.fullmatch(r"[a-z]{1,6}", prefix):
            raise ValueError(f"prefix must be 1-6 lowercase letters, got {prefix!r}")
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"root {str(root)!r} is not a directory")
        self.count = replicas
        self.port = port
        self.prefix = prefix
        self.tag = secrets.token_hex(3)
        self.replicas: list[Replica] = []
        self.scheduled: list[Scheduled] = []
        self._workdir: Path | None = None
        self.subnet: ipaddress.IPv4Network | None = None
        self._scheduler: _Scheduler | None = None
        self._closed = False

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def start(self) -> NetnsRig:
        _require_root()
        if self._workdir is not None:
            raise NetnsError("the rig was already started")
        self._workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-{self.tag}-"))
        # cleanup_stale leaves a rig alone while this process lives.
        (self._workdir / "owner.pid").write_text(str(os.getpid()))
        try:
            subnet = _pick_subnet(self.count)
            self.subnet = subnet
            # Safety net: whatever happens to a veth, the rig's addresses
            # never fall through to the default route and off the machine.
            _run("ip", "route", "add", "blackhole", str(subnet), "metric", SAFETY_METRIC)
            hosts = list(subnet.hosts())
            for i in range(self.count):
                replica = Replica(
                    index=i,
                    netns=f"{self.prefix}-{self.tag}-r{i}",
                    host_if=f"{self.prefix}{self.tag}h{i}",
                    ns_if=f"{self.prefix}{self.tag}n{i}",
                    # In a /30 at 4i: .4i+1 on the host, .4i+2 in the namespace.
                    host_ip=str(hosts[4 * i]),
                    ns_ip=str(hosts[4 * i + 1]),
                    port=self.port,
                    root=self.root,
                    workdir=self._workdir / f"r{i}",
                )
                replica.workdir.mkdir()
                self.replicas.append(replica)
                self._build(replica)
            for replica in self.replicas:
                replica.start_server()
        except BaseException:
            self.close()
            raise
        self._scheduler = _Scheduler(time.monotonic())
        return self

    def _build(self, r: Replica) -> None:
        _run("ip", "netns", "add", r.netns)
        _run("ip", "link", "add", r.host_if, "type", "veth", "peer", "name", r.ns_if,
             "netns", r.netns)  # fmt: skip
        _run("ip", "addr", "add", f"{r.host_ip}/30", "dev", r.host_if)
        _run("ip", "link", "set", r.host_if, "up")
        _run("ip", "-n", r.netns, "addr", "add", f"{r.ns_ip}/30", "dev", r.ns_if)
        _run("ip", "-n", r.netns, "link", "set", r.ns_if, "up")
        _run("ip", "-n", r.netns, "link", "set", "lo", "up")
        _run(
            "nft", "-f", "-", netns=r.netns,
            stdin=f"table inet {NFT_TABLE} {{\n chain out {{\n"
            "  type filter hook output priority 0; policy accept;\n }\n}\n",
        )  # fmt: skip

    def at(self, seconds: float, action: Callable[[], object], name: str = "") -> Scheduled:
        """Runs ``action`` ``seconds`` after the rig started (at once if that
        time has passed). Errors are kept on the returned item and raised by
        :meth:`check` and on a clean exit of ``with``."""
        if self._scheduler is None:
            raise NetnsError("start the rig before scheduling actions")
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        item = Scheduled(
            due_s=float(seconds), action=action, name=name or getattr(action, "__name__", "action")
        )
        self._scheduler.add(item)
        self.scheduled.append(item)
        return item

    def elapsed_s(self) -> float:
        """Seconds since the rig started (the clock of :meth:`at`)."""
        if self._scheduler is None:
            return 0.0
        return time.monotonic() - self._scheduler.origin

    def wait_scheduled(self, timeout_s: float = 30.0) -> None:
        """Waits until every scheduled action has run, then :meth:`check`."""
        deadline = time.monotonic() + timeout_s
        for item in self.scheduled:
            if not item.done.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"scheduled action {item.name!r} did not run in {timeout_s} s")
        self.check()

    def check(self) -> None:
        for item in self.scheduled:
            if item.error is not None:
                raise NetnsError(f"scheduled action {item.name!r} failed: {item.error!r}")

    def close(self) -> None:
        """Stops the schedule, kills the servers, deletes namespaces (which
        takes their veth ends, nft tables and qdiscs with them). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._scheduler is not None:
            self._scheduler.close()
        for r in self.replicas:
            if r.process is not None and r.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(r.process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    r.process.wait(timeout=COMMAND_TIMEOUT_S)
        for r in self.replicas:
            _delete_netns(r.netns)
            _run("ip", "link", "del", r.host_if, check=False)
        if self.subnet is not None:
            _run("ip", "route", "del", "blackhole", str(self.subnet), "metric", SAFETY_METRIC,
                 check=False)  # fmt: skip
        # Replicas not yet appended when a build failed: sweep by tag.
        _sweep(f"{self.prefix}-{self.tag}", force=True)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> NetnsRig:
        if self._workdir is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        if exc_type is None:
            self.check()

    def __del__(self) -> None:
        # Best effort only; tests use `with` or close().
        if not getattr(self, "_closed", True) and getattr(self, "_workdir", None) is not None:
            self.close()


def _delete_netns(name: str) -> None:
    pids = _run("ip", "netns", "pids", name, check=False).split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _run("ip", "netns", "del", name, check=False)


def _owner_alive(workdir: Path) -> bool:
    try:
        pid = int((workdir / "owner.pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def cleanup_stale(prefix: str = PREFIX) -> int:
    """Removes namespaces, interfaces and temp dirs left by crashed rigs whose
    names start with ``prefix``; a rig whose owning process still runs is
    left alone. Returns how many namespaces went."""
    if os.geteuid() != 0:
        raise PermissionError(NOT_ROOT)
    return _sweep(prefix, force=False)


def _sweep(prefix: str, *, force: bool) -> int:
    tmp = Path(tempfile.gettempdir())
    live_tags: set[str] = set()
    for path in tmp.glob(f"{prefix}*"):
        m = re.match(r"[a-z]+-([0-9a-f]{6})-", path.name)
        if path.is_dir() and m:
            if not force and _owner_alive(path):
                live_tags.add(m.group(1))
            else:
                shutil.rmtree(path, ignore_errors=True)

    def stale(name: str, pattern: str) -> bool:
        m = re.match(pattern, name)
        return m is not None and m.group(1) not in live_tags

    removed = 0
    for line in _run("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix) and stale(name, r"[a-z]+-([0-9a-f]{6})-r\d+$"):
            _delete_netns(name)
            removed += 1
    link_prefix = prefix.replace("-", "")
    for line in _run("ip", "-o", "link", "show", check=False).splitlines():
        m = re.match(r"\d+:\s+([^@:\s]+)", line)
        if (
            m
            and m.group(1).startswith(link_prefix)
            and stale(m.group(1), r"[a-z]+([0-9a-f]{6})[hn]\d+$")
        ):
            _run("ip", "link", "del", m.group(1), check=False)
    if prefix == PREFIX:
        # A rig's blackhole route is stale once no address in its /24 is left.
        addrs = _run("ip", "-4", "-o", "addr", "show", check=False)
        in_use = [ipaddress.ip_address(a) for a in re.findall(r"inet (\d+\.\d+\.\d+\.\d+)", addrs)]
        routes = _run("ip", "route", "show", "type", "blackhole", check=False)
        for m in re.finditer(rf"blackhole (10\.\d+\.\d+\.0/24) .*metric {SAFETY_METRIC}", routes):
            net = ipaddress.ip_network(m.group(1))
            if not any(a in net for a in in_use):
                _run("ip", "route", "del", "blackhole", str(net), "metric", SAFETY_METRIC,
                     check=False)  # fmt: skip
    return removed
