"""Where the replicas live for a run: local directories (faults in-process
only) or real nginx servers on loopback (``feedline.testing.NginxReplicas``,
or one per network namespace), where timed events kill, pause and resume
real processes."""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import threading
import time
from collections.abc import Mapping
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
    """Local replica directories holding the same objects under the same
    keys: the bench runner's local replicas (timed events become chaos
    outages) and the ``feedline_replicas`` pytest fixture's. ``roots`` are
    the directories; ``chaos`` maps a replica index to its faults (a
    ``feedline.chaos.Chaos`` or the keyword arguments of one)."""

    kind = "local"

    def __init__(self, roots: list[str], chaos: Mapping[int, Any] | None = None) -> None:
        for index in chaos or {}:
            if not isinstance(index, int) or not 0 <= index < len(roots):
                raise ValueError(f"chaos names replica {index!r}; this set has 0..{len(roots) - 1}")
        self.roots = list(roots)
        self.notes: list[str] = []
        self.chaos_spec = dict(chaos or {})
        self.keys: list[str] = []

    def write(self, key: str, data: bytes) -> None:
        """Writes ``data`` under ``key`` on every replica."""
        for root in self.roots:
            path = os.path.join(root, key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        if key not in self.keys:
            self.keys.append(key)

    def populate(self, objects: int, size_bytes: int, seed: int = 0) -> list[str]:
        """Writes ``objects`` random objects of ``size_bytes``; their keys."""
        rng = random.Random(seed)
        for i in range(objects):
            self.write(f"obj-{i:05d}.bin", rng.randbytes(size_bytes))
        return list(self.keys)

    def chaos(self) -> dict[int, Any]:
        """``{index: feedline.chaos.Chaos}``; empty without chaos."""
        if not self.chaos_spec:
            return {}
        from feedline.chaos import Chaos

        return {
            i: spec if isinstance(spec, Chaos) else Chaos(**spec)
            for i, spec in self.chaos_spec.items()
        }

    def filesystem(self, **options: Any) -> Any:
        """A ``feedline.FileSystem`` over the replicas, faults applied."""
        import feedline

        chaos = self.chaos()
        if chaos:
            options["chaos"] = chaos
        return feedline.FileSystem(replicas=self.roots, **options)

    def fsspec(self, index: int = 0) -> Any:
        """Plain fsspec rooted at replica ``index`` (paths are keys), faults applied."""
        from fsspec.implementations.dirfs import DirFileSystem
        from fsspec.implementations.local import LocalFileSystem

        fs: Any = LocalFileSystem()
        chaos = self.chaos()
        if index in chaos:
            from feedline.chaos import ChaosFileSystem

            fs = ChaosFileSystem(fs, chaos[index])
        return DirFileSystem(path=self.roots[index], fs=fs)

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
        super().__init__([])
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self.log: list[tuple[float, str]] = []

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
    """One nginx per network namespace over veth pairs (root only):
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
        return ReplicaSet(list(data.replica_dirs))
    if kind == "nginx":
        return NginxReplicaSet(data, scenario.replicas.count)
    if kind == "netns":
        return NetnsReplicaSet(data, scenario.replicas.count)
    raise ScenarioError(f"{scenario.source}: unknown replicas kind {kind!r}")
