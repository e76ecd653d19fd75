"""Two "nodes" on one machine for ``feedline bench --nproc N --nnodes 2``.

Three network namespaces: ``node0`` and ``node1`` each run their own torchrun
agent; ``store`` holds the replicas (one nginx per replica, all serving the
dataset). Each node has a veth link into a bridge in ``store``, so the two
agents meet through c10d rendezvous over real TCP (node 0 hosts the
rendezvous store), the ranks' gloo traffic crosses the same links, and every
read goes over the link of its node. Faults apply per link: packet loss with
nftables on a node's side of its link (``--link-loss 1:1`` drops 1% of the
packets reaching node 1 only); the scenario's events act on the replicas
(kill, stop, resume: signals to nginx; loss: nftables on the replica's
port, seen by both nodes).

Root only. Names start with ``flnode-<pid>-``; :meth:`TwoNodes.close` removes
the namespaces (their links and bridge with them) and stops every server,
also on failure, and a later run removes those of a launcher that died.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from feedline.bench.dataset import Materialized
from feedline.bench.replicas import ServerReplicaSet
from feedline.bench.scenario import Event, Scenario, ScenarioError
from feedline.testing.netns import nginx_config

PREFIX = "flnode"
SUBNET = "10.251.0"
STORE_IP = f"{SUBNET}.100"
RENDEZVOUS_PORT = 29400
FIRST_PORT = 8001
COMMAND_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 10.0
NFT_TABLE = "feedline_nodes"


def check_support() -> None:
    """A ScenarioError saying why two nodes cannot run here, if they cannot."""
    if os.geteuid() != 0:
        raise ScenarioError("--nnodes 2 needs root (network namespaces, veth links, nftables)")
    missing = [t for t in ("ip", "nft", "nginx") if shutil.which(t) is None]
    if missing:
        raise ScenarioError(f"--nnodes 2 needs {', '.join(missing)} on PATH")


def _run(*cmd: str, netns: str | None = None, stdin: str | None = None) -> str:
    argv = ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)
    try:
        done = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(argv)}: no answer in {COMMAND_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> int:
    """Removes the namespaces of launchers that are gone; returns how many."""
    removed = 0
    with contextlib.suppress(RuntimeError):
        for line in _run("ip", "netns", "list").splitlines():
            name = line.split()[0] if line.split() else ""
            m = re.fullmatch(rf"{PREFIX}-(\d+)-[0-9a-f]+-\w+", name)
            if m and not _alive(int(m.group(1))):
                with contextlib.suppress(RuntimeError):
                    _delete_netns(name)
                    removed += 1
    return removed


def _delete_netns(name: str) -> None:
    """Kills whatever still runs in namespace ``name`` (a server or rank a
    killed launcher left), then removes it with its links."""
    with contextlib.suppress(RuntimeError):
        for pid in _run("ip", "netns", "pids", name).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    _run("ip", "netns", "delete", name)


class NodeReplicas(ServerReplicaSet):
    """The nginx replicas in the store namespace; events act on them."""

    kind = "nodes"

    def __init__(self, store: str, root: str, n: int, workdir: Path) -> None:
        super().__init__()
        self.store = store
        self.root = root
        self.workdirs = [workdir / f"replica-{i}" for i in range(n)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.ports = [FIRST_PORT + i for i in range(n)]
        self.roots = [f"http://{STORE_IP}:{p}" for p in self.ports]
        self.loss: dict[int, float] = {}
        for i in range(n):
            self.workdirs[i].mkdir(parents=True)
            self.start(i)

    def start(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            return
        d = self.workdirs[i]
        conf = d / "nginx.conf"
        conf.write_text(nginx_config(d, STORE_IP, self.ports[i], self.root, access_log=True))
        with open(d / "stderr.log", "ab") as err:
            self.procs[i] = subprocess.Popen(
                ["ip", "netns", "exec", self.store, "nginx", "-c", str(conf), "-e", str(d / "e")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # signals reach master and worker alike
            )
        self._wait_ready(i)

    def _wait_ready(self, i: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        probe = [sys.executable, "-c", _PROBE.format(ip=STORE_IP, port=self.ports[i])]
        while True:
            proc = self.procs[i]
            if proc is None or proc.poll() is not None:
                raise RuntimeError(f"nginx for replica {i} exited: {self._log(i)}")
            with contextlib.suppress(RuntimeError):
                _run(*probe, netns=self.store)
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {i} did not listen within {READY_TIMEOUT_S} s")
            time.sleep(0.05)

    def _log(self, i: int) -> str:
        with contextlib.suppress(OSError):
            return (self.workdirs[i] / "stderr.log").read_text(errors="replace")[-500:]
        return ""

    def signal(self, i: int, sig: signal.Signals) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            if sig == signal.SIGKILL:
                proc.wait(timeout=COMMAND_TIMEOUT_S)

    def sent_bytes(self) -> int:
        """Body bytes every replica sent (their access logs)."""
        total = 0
        for d in self.workdirs:
            with contextlib.suppress(OSError), open(d / "access.log") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 3 and parts[2].isdigit():
                        total += int(parts[2])
        return total

    def set_replica_loss(self, i: int, percent: float) -> None:
        self.loss[i] = percent
        _nft_loss(
            self.store,
            "output",
            [f"tcp sport {self.ports[j]}" for j, p in self.loss.items() if p > 0],
            [p for p in self.loss.values() if p > 0],
        )

    def _apply(self, ev: Event) -> None:
        targets = range(len(self.roots)) if ev.replica is None else [ev.replica]
        for i in targets:
            if ev.action == "kill":
                self.signal(i, signal.SIGKILL)
            elif ev.action == "stop":
                self.signal(i, signal.SIGSTOP)
            elif ev.action == "resume":
                self._restore(i)
            elif ev.action == "loss":
                self.set_replica_loss(i, ev.loss_percent or 0.0)
            elif ev.action == "loss_end":
                self.set_replica_loss(i, 0.0)

    def _undo(self, ev: Event) -> Event:
        if ev.action == "loss":
            return Event("loss_end", ev.until_s or 0.0, ev.replica)
        return super()._undo(ev)

    def _restore(self, i: int) -> None:
        with contextlib.suppress(RuntimeError):
            if self.loss.get(i):
                self.set_replica_loss(i, 0.0)
        self.signal(i, signal.SIGCONT)
        self.start(i)

    def close(self) -> None:
        self._done.set()
        for i in range(len(self.procs)):
            self.signal(i, signal.SIGCONT)
            self.signal(i, signal.SIGKILL)


_PROBE = "import socket; socket.create_connection(('{ip}', {port}), timeout=1).close()"


def _nft_loss(netns: str, hook: str, matches: list[str], percents: list[float]) -> None:
    """Replaces the namespace's loss rules: one ``drop`` per match, each
    with its share of packets (nftables ``numgen``; the kernel has no netem)."""
    rules = "\n".join(
        f"    {m} numgen random mod 10000 < {round(p * 100)} counter drop"
        for m, p in zip(matches, percents, strict=True)
    )
    script = (
        f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
        f"table inet {NFT_TABLE} {{\n  chain {hook} {{\n"
        f"    type filter hook {hook} priority 0; policy accept;\n{rules}\n  }}\n}}\n"
    )
    _run("nft", "-f", "-", netns=netns, stdin=script)


class TwoNodes:
    """The rig of the module doc; ``replicas`` as :class:`ReplicaSet`."""

    nnodes = 2

    def __init__(
        self, scenario: Scenario, data: Materialized, link_loss: dict[int, float] | None = None
    ) -> None:
        check_support()
        sweep_stale()
        tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.nodes = [f"{tag}-node0", f"{tag}-node1"]
        self.store = f"{tag}-store"
        self.links = [f"fl{i}{secrets.token_hex(3)}" for i in range(2)]
        self.ips = [f"{SUBNET}.{1 + i}" for i in range(2)]
        self.rendezvous_id = tag
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
        self.made: list[str] = []
        self.replicas: Any = None
        try:
            self._build()
            self.replicas = NodeReplicas(
                self.store, data.replica_dirs[0], scenario.replicas.count, self.workdir
            )
            for node, percent in (link_loss or {}).items():
                self.set_link_loss(node, percent)
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for ns in (*self.nodes, self.store):
            _run("ip", "netns", "add", ns)
            self.made.append(ns)
            _run("ip", "link", "set", "lo", "up", netns=ns)
        _run("ip", "link", "add", "br0", "type", "bridge", netns=self.store)
        _run("ip", "addr", "add", f"{STORE_IP}/24", "dev", "br0", netns=self.store)
        _run("ip", "link", "set", "br0", "up", netns=self.store)
        for i, node in enumerate(self.nodes):
            peer = f"{self.links[i]}s"
            _run(
                "ip", "link", "add", self.links[i], "netns", node,
                "type", "veth", "peer", "name", peer, "netns", self.store,
            )  # fmt: skip
            _run("ip", "link", "set", peer, "master", "br0", "up", netns=self.store)
            _run("ip", "addr", "add", f"{self.ips[i]}/24", "dev", self.links[i], netns=node)
            _run("ip", "link", "set", self.links[i], "up", netns=node)

    def set_link_loss(self, node: int, percent: float) -> None:
        """Drops ``percent``% of the packets that reach ``node`` over its link."""
        _nft_loss(self.nodes[node], "input", [f"iifname {self.links[node]}"], [percent])

    def link_drops(self, node: int) -> int:
        """Packets the loss rule on ``node``'s link dropped so far."""
        try:
            text = _run("nft", "list", "table", "inet", NFT_TABLE, netns=self.nodes[node])
        except RuntimeError:
            return 0
        m = re.search(r"counter packets (\d+)", text)
        return int(m.group(1)) if m else 0

    def figures(self) -> dict[str, Any]:
        return {
            "link_drops": {str(i): self.link_drops(i) for i in range(len(self.nodes))},
            "replica_sent_bytes": self.replicas.sent_bytes(),
        }

    def commands(self, nproc: int, program: list[str]) -> list[tuple[list[str], dict[str, str]]]:
        from feedline.bench.ranks import torchrun_argv

        endpoint = f"{self.ips[0]}:{RENDEZVOUS_PORT}"
        out = []
        for i, node in enumerate(self.nodes):
            rendezvous = (
                "--nnodes=2",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}",
                f"--rdzv-id={self.rendezvous_id}",
                f"--rdzv-conf=is_host={1 if i == 0 else 0},join_timeout=60",
                f"--local-addr={self.ips[i]}",
            )
            argv = ["ip", "netns", "exec", node, *torchrun_argv(nproc, program, *rendezvous)]
            env = {"GLOO_SOCKET_IFNAME": self.links[i], "FEEDLINE_NODE": f"node{i}"}
            out.append((argv, env))
        return out

    def close(self) -> None:
        """Stops the servers and removes the namespaces; never raises."""
        if self.replicas is not None:
            with contextlib.suppress(Exception):
                self.replicas.close()
        for ns in reversed(self.made):
            with contextlib.suppress(RuntimeError):
                _delete_netns(ns)
        self.made = []
        shutil.rmtree(self.workdir, ignore_errors=True)
