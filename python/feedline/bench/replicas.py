"""Where the replicas live for a run: local directories (faults in-process
only) or real nginx servers on loopback (``feedline.testing.NginxReplicas``,
issue 4), where timed events kill, pause and resume real processes."""

from __future__ import annotations

import contextlib
import importlib
import threading
import time
from typing import Any

from feedline.bench.dataset import Materialized
from feedline.bench.scenario import Event, Scenario, ScenarioError


def nginx_support() -> str | None:
    """None when nginx replicas can run here, else why not."""
    import os
    import shutil

    if shutil.which("nginx") is None and not any(
        os.path.exists(p) for p in ("/usr/sbin/nginx", "/usr/bin/nginx")
    ):
        return "nginx is not installed (Debian: apt-get install nginx)"
    return None


class ReplicaSet:
    """Local directories: roots are the directories; events become chaos outages."""

    kind = "local"

    def __init__(self, data: Materialized) -> None:
        self.roots = list(data.replica_dirs)
        self.notes: list[str] = []

    def start_events(self, events: tuple[Event, ...], stop: threading.Event) -> None:
        pass

    def end_events(self) -> None:
        pass

    def close(self) -> None:
        pass


class ServerReplicaSet(ReplicaSet):
    """Replicas that are real servers: timed events act on them for real,
    on a background thread, relative to each system's start."""

    kind = "server"

    def __init__(self) -> None:
        self.roots: list[str] = []
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self.log: list[tuple[float, str]] = []
        self.notes: list[str] = []

    def _apply(self, ev: Event) -> None:
        raise NotImplementedError

    def _restore(self, i: int) -> None:
        raise NotImplementedError

    def _undo(self, ev: Event) -> Event:
        """The event that ends ``ev``'s window at its ``until``."""
        return Event("resume", ev.until_s or 0.0, ev.replica)

    def start_events(self, events: tuple[Event, ...], stop: threading.Event) -> None:
        timeline: list[tuple[float, Event]] = []
        for ev in events:
            timeline.append((ev.at_s, ev))
            if ev.until_s is not None and ev.action != "resume":
                timeline.append((ev.until_s, self._undo(ev)))
        timeline.sort(key=lambda x: x[0])
        self._done.clear()
        t0 = time.perf_counter()

        def loop() -> None:
            for at_s, ev in timeline:
                while not (self._done.is_set() or stop.is_set()):
                    left = t0 + at_s - time.perf_counter()
                    if left <= 0:
                        break
                    self._done.wait(min(left, 0.05))
                if self._done.is_set() or stop.is_set():
                    return
                self._apply(ev)
                self.log.append((time.perf_counter() - t0, f"{ev.action} replica {ev.replica}"))

        self._thread = threading.Thread(target=loop, name="bench-events", daemon=True)
        self._thread.start()

    def end_events(self) -> None:
        """Stops the event thread and brings every replica back for the next system."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for i in range(len(self.roots)):
            self._restore(i)


class NginxReplicaSet(ServerReplicaSet):
    """N nginx processes on loopback serving the dataset; roots are URLs."""

    kind = "nginx"

    def __init__(self, data: Materialized, n: int) -> None:
        super().__init__()
        why = nginx_support()
        if why is not None:
            raise ScenarioError(f'[replicas] kind = "nginx": {why}')
        mod = importlib.import_module("feedline.testing")
        # Every replica directory holds the same bytes: serve the first.
        self.servers: Any = mod.NginxReplicas(data.replica_dirs[0], n=n)
        self.servers.start_all()
        self.roots = list(self.servers.urls)

    def _apply(self, ev: Event) -> None:
        if ev.replica is None:
            return
        i = ev.replica
        if ev.action == "kill":
            self.servers.kill(i)  # connection refused from now on
        elif ev.action == "stop":
            self.servers.pause(i)  # SIGSTOP: connections hang, a gray failure
        elif ev.action == "resume":
            self._restore(i)

    def _restore(self, i: int) -> None:
        with contextlib.suppress(Exception):
            self.servers.resume(i)
        if self.servers.pids[i] == 0:
            self.servers.start(i)

    def close(self) -> None:
        self._done.set()
        self.servers.close()


class NetnsReplicaSet(ServerReplicaSet):
    """One nginx per network namespace over veth pairs (issue 4's rig, root):
    kill/stop/resume signal the server, loss drops packets with nftables."""

    kind = "netns"

    def __init__(self, data: Materialized, n: int) -> None:
        super().__init__()
        mod = importlib.import_module("feedline.testing.netns")
        self.rig: Any = mod.NetnsRig(data.replica_dirs[0], replicas=n)
        self.rig.start()
        self.roots = list(self.rig.urls)

    def _targets(self, ev: Event) -> list[Any]:
        reps: list[Any] = self.rig.replicas
        return reps if ev.replica is None else [reps[ev.replica]]

    def _undo(self, ev: Event) -> Event:
        if ev.action == "loss":
            return Event("loss_end", ev.until_s or 0.0, ev.replica)
        return super()._undo(ev)

    def _apply(self, ev: Event) -> None:
        for r in self._targets(ev):
            if ev.action == "kill":
                r.sigkill()
            elif ev.action == "stop":
                r.sigstop()
            elif ev.action == "resume":
                self._restore(r.index)
            elif ev.action == "loss":
                r.set_loss(ev.loss_percent)
            elif ev.action == "loss_end":
                r.set_loss(0.0)
            elif ev.action == "delay":
                self.notes.append("delay events need the fault proxy; not applied")

    def _restore(self, i: int) -> None:
        r = self.rig.replicas[i]
        with contextlib.suppress(Exception):
            r.set_loss(0.0)
        with contextlib.suppress(Exception):
            r.sigcont()
        if r.process is None or r.process.poll() is not None:
            r.start_server()

    def close(self) -> None:
        self._done.set()
        self.rig.close()


def open_replicas(scenario: Scenario, data: Materialized) -> ReplicaSet:
    kind = scenario.replicas.kind
    if kind == "local":
        return ReplicaSet(data)
    if kind == "nginx":
        return NginxReplicaSet(data, scenario.replicas.count)
    if kind == "netns":
        return NetnsReplicaSet(data, scenario.replicas.count)
    raise ScenarioError(f"{scenario.source}: unknown replicas kind {kind!r}")
