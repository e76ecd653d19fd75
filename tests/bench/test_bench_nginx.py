"""The harness on real nginx replicas: a timed kill of a real process, and
every system's bytes verified. Skips where nginx or
``feedline.testing.NginxReplicas`` is missing."""

from __future__ import annotations

import pytest
from feedline.bench import runner
from feedline.bench import scenario as sc
from feedline.bench.replicas import nginx_support

pytestmark = pytest.mark.nginx

NGINX = """
seed = 2
systems = ["fsspec", "obstore", "feedline"]
[dataset]
objects = 32
size_bytes = 16384
[replicas]
kind = "nginx"
count = 2
[[faults.event]]
at = "0.3s"
action = "kill"
replica = 1
[workload]
readers = 2
batch_size = 4
steps = 40
compute = { distribution = "fixed", ms = 10 }
"""


def test_nginx_replicas_with_a_real_kill() -> None:
    why = nginx_support()
    if why is not None:
        pytest.skip(why)
    rep = runner.run(sc.loads(NGINX))
    by_name = {s["system"]: s for s in rep["systems"]}
    fs = by_name["fsspec"]
    assert fs["status"] == "ok", fs["notes"]
    assert fs["steps"] == 40
    # Reads after the kill failed over to replica 0 by hand, never silently wrong.
    assert fs["mismatches"] == 0 and fs["verified_bytes"] == fs["bytes"]
    for s in rep["systems"]:
        if s["status"] == "ok":
            assert s["mismatches"] == 0, s["system"]
    feedline = by_name["feedline"]
    if feedline["status"] == "ok":
        # Routed reads fail over inside feedline: nothing reaches the loop.
        assert feedline["errors"] == 0 and feedline["steps"] == 40
