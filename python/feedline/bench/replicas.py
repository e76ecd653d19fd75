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
from feedline.bench.systems import has_module


def nginx_support() -> str | None:
    """None when nginx replicas can run here, else why not."""
    import os
    import shutil

    if shutil.which("nginx") is None and not any(
        os.path.exists(p) for p in ("/usr/sbin/nginx", "/usr/bin/nginx")
    ):
        return "nginx is not installed (Debian: apt-get install nginx)"
    if not has_module("feedline.testing"):
        return "this build has no feedline.testing.NginxReplicas (issue 4)"
    mod = importlib.import_module("feedline.testing")
    if not hasattr(mod, "NginxReplicas"):
        return "this build has no feedline.testing.NginxReplicas (issue 4)"
    return None


class ReplicaSet:
    """Local directories: roots are the directories; events become chaos outages."""

    kind = "local"

    def __init__(self, data: Materialized) -> None:
        self.roots = list(data.replica_dirs)

    def start_events(self, events: tuple[Event, ...], stop: threading.Event) -> None:
        pass

    def end_events(self) -> None:
        pass

    def close(self) -> None:
        pass


class NginxReplicaSet(ReplicaSet):
    """N nginx processes serving the dataset; ``roots`` are their URLs."""

    kind = "nginx"

    def __init__(self, data: Materialized, n: int) -> None:
        why = nginx_support()
        if why is not None:
            raise ScenarioError(f'[replicas] kind = "nginx": {why}')
        mod = importlib.import_module("feedline.testing")
        # Every replica directory holds the same bytes: serve the first.
        self.servers: Any = mod.NginxReplicas(data.replica_dirs[0], n=n)
        self.servers.start_all()
        self.roots = list(self.servers.urls)
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self.log: list[tuple[float, str]] = []

    def _apply(self, ev: Event) -> None:
        assert ev.replica is not None
        i = ev.replica
        if ev.action == "kill":
            self.servers.kill(i)
        elif ev.action == "stop":
            self.servers.pause(i)  # SIGSTOP: connections hang, a gray failure
        elif ev.action == "resume":
            self._restore(i)

    def _restore(self, i: int) -> None:
        with contextlib.suppress(Exception):
            self.servers.resume(i)
        if self.servers.pids[i] == 0:
            self.servers.start(i)

    def start_events(self, events: tuple[Event, ...], stop: threading.Event) -> None:
        """Runs kill/stop/resume at their ``at`` (and undoes at ``until``),
        relative to now, on a background thread."""
        timeline: list[tuple[float, Event]] = []
        for ev in events:
            if ev.action in ("kill", "stop", "resume") and ev.replica is not None:
                timeline.append((ev.at_s, ev))
                if ev.until_s is not None and ev.action != "resume":
                    timeline.append((ev.until_s, Event("resume", ev.until_s, ev.replica)))
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

    def close(self) -> None:
        self._done.set()
        self.servers.close()


def open_replicas(scenario: Scenario, data: Materialized) -> ReplicaSet:
    kind = scenario.replicas.kind
    if kind == "local":
        return ReplicaSet(data)
    if kind == "nginx":
        return NginxReplicaSet(data, scenario.replicas.count)
    raise ScenarioError(
        f"{scenario.source}: [replicas] kind = {kind!r} needs the namespace rig of issue 4 "
        "(veth pairs, nftables), which this build's harness does not drive yet; use "
        'kind = "local" or "nginx"'
    )
