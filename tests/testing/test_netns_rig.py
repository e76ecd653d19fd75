"""The network-namespace rig: real nginx replicas behind veth pairs, real
packet loss (nftables), real bandwidth caps (tbf), link down, SIGSTOP and
SIGKILL. Root only; CI runs as root and must not skip these."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from feedline.testing import netns
from feedline.testing.netns import NetnsRig

IS_ROOT = os.geteuid() == 0
pytestmark = [
    pytest.mark.root,
    pytest.mark.nginx,
    pytest.mark.skipif(not IS_ROOT and os.environ.get("CI") != "true", reason=netns.NOT_ROOT),
]

OBJECT_BYTES = 1 << 20


def get(url: str, timeout_s: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        data: bytes = r.read()
        return data


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rigdata")
    for i in range(4):
        (root / f"obj{i}.bin").write_bytes(os.urandom(OBJECT_BYTES))
    return root


@pytest.fixture
def rig(dataset: Path) -> Iterator[NetnsRig]:
    with NetnsRig(dataset, replicas=3) as r:
        yield r


def test_every_replica_serves_the_dataset(rig: NetnsRig, dataset: Path) -> None:
    assert len({r.netns for r in rig.replicas}) == 3
    for replica in rig.replicas:
        assert replica.ns_ip.startswith("10.")
        for path in sorted(dataset.iterdir()):
            assert get(f"{replica.url}/{path.name}") == path.read_bytes()
    # Range requests, as the HTTP store sends them.
    req = urllib.request.Request(
        f"{rig.replicas[0].url}/obj0.bin", headers={"Range": "bytes=100-199"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 206
        assert r.read() == (dataset / "obj0.bin").read_bytes()[100:200]


def test_packet_loss_drops_packets_and_tcp_still_delivers(rig: NetnsRig, dataset: Path) -> None:
    lossy = rig.replicas[1]
    assert lossy.drops() == 0
    lossy.set_loss(5)
    want = hashlib.sha256((dataset / "obj1.bin").read_bytes()).hexdigest()
    for _ in range(4):
        assert hashlib.sha256(get(f"{lossy.url}/obj1.bin")).hexdigest() == want
    dropped = lossy.drops()
    assert dropped > 0
    # Loss off: the counter keeps what it had.
    lossy.set_loss(0)
    get(f"{lossy.url}/obj1.bin")
    assert lossy.drops() == dropped
    # The other replicas were never touched.
    assert rig.replicas[0].drops() == 0
    with pytest.raises(ValueError, match="101"):
        lossy.set_loss(101)


def test_sigstop_is_a_gray_failure(rig: NetnsRig, dataset: Path) -> None:
    gray = rig.replicas[2]
    item = rig.at(0.0, gray.sigstop, name="stop replica 2")
    assert item.done.wait(10)
    # The kernel completes the handshake; nobody answers.
    with socket.create_connection((gray.ns_ip, gray.port), timeout=5) as s:
        s.sendall(b"GET /obj0.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(1)
    # The other replicas are fine.
    assert get(f"{rig.replicas[0].url}/obj0.bin") == (dataset / "obj0.bin").read_bytes()
    gray.sigcont()
    assert get(f"{gray.url}/obj0.bin") == (dataset / "obj0.bin").read_bytes()
    rig.wait_scheduled()
    assert item.ran_at_s is not None


def test_sigkill_refuses_and_restart_recovers(rig: NetnsRig, dataset: Path) -> None:
    dead = rig.replicas[0]
    dead.sigkill()
    with pytest.raises(urllib.error.URLError) as info:
        get(f"{dead.url}/obj0.bin", timeout_s=2)
    assert isinstance(info.value.reason, ConnectionRefusedError)
    dead.start_server()
    assert get(f"{dead.url}/obj0.bin") == (dataset / "obj0.bin").read_bytes()


def test_link_down_times_out_and_link_up_recovers(rig: NetnsRig, dataset: Path) -> None:
    cut = rig.replicas[1]
    cut.link_down()
    with pytest.raises((TimeoutError, urllib.error.URLError)) as info:
        get(f"{cut.url}/obj0.bin", timeout_s=0.5)
    if isinstance(info.value, urllib.error.URLError):
        assert isinstance(info.value.reason, TimeoutError | OSError)
    cut.link_up()
    assert get(f"{cut.url}/obj0.bin") == (dataset / "obj0.bin").read_bytes()


def test_bandwidth_cap_with_tbf(rig: NetnsRig, dataset: Path) -> None:
    import time

    capped = rig.replicas[0]
    capped.set_bandwidth(4_000_000)
    started = time.monotonic()
    assert get(f"{capped.url}/obj2.bin") == (dataset / "obj2.bin").read_bytes()
    # 1 MiB at 4 MB/s, less one burst: at least ~0.2 s.
    assert time.monotonic() - started >= 0.2
    out = subprocess.run(
        ["ip", "netns", "exec", capped.netns, "tc", "qdisc", "show", "dev", capped.ns_if],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout  # fmt: skip
    assert "tbf" in out
    capped.set_bandwidth(None)
    with pytest.raises(ValueError, match="-1"):
        capped.set_bandwidth(-1)


def test_scheduled_actions_run_in_order_and_errors_surface(rig: NetnsRig) -> None:
    ran: list[str] = []
    rig.at(0.2, lambda: ran.append("second"), name="second")
    rig.at(0.1, lambda: ran.append("first"), name="first")

    def boom() -> None:
        raise RuntimeError("kaput")

    rig.at(0.0, boom, name="boom")
    with pytest.raises(netns.NetnsError, match=r"boom.*kaput"):
        rig.wait_scheduled(timeout_s=10)
    assert ran == ["first", "second"]
    rig.scheduled.clear()  # handled: do not re-raise on exit


def _rig_leftovers(tag: str) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10)
    return [
        line for line in (names.stdout + links.stdout).splitlines() if tag in line.replace("-", "")
    ]


def test_close_removes_everything_even_after_a_failure(dataset: Path) -> None:
    rig = NetnsRig(dataset, replicas=2)
    with pytest.raises(RuntimeError, match="in the middle"), rig:
        pids = [r.process.pid for r in rig.replicas if r.process is not None]
        rig.replicas[0].set_loss(1)
        rig.replicas[1].sigstop()
        raise RuntimeError("in the middle")
    assert _rig_leftovers(netns.PREFIX + rig.tag) == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert rig.subnet is not None
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True, timeout=10).stdout
    assert str(rig.subnet) not in routes


def test_cleanup_stale_removes_a_crashed_rigs_leftovers() -> None:
    # What a killed run leaves: a namespace and a veth with the prefix, and
    # no live owner.
    tag = "dead00"
    ns, host_if = f"{netns.PREFIX}-{tag}-r0", f"{netns.PREFIX}{tag}h0"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    subprocess.run(
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", f"{netns.PREFIX}{tag}n0"],
        check=True, timeout=10,
    )  # fmt: skip
    try:
        assert _rig_leftovers(netns.PREFIX + tag)
        assert netns.cleanup_stale() >= 1
        assert _rig_leftovers(netns.PREFIX + tag) == []
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10, capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], check=False, timeout=10, capture_output=True)


def test_cleanup_stale_leaves_a_live_rig_alone(rig: NetnsRig, dataset: Path) -> None:
    netns.cleanup_stale()
    assert get(f"{rig.replicas[0].url}/obj0.bin") == (dataset / "obj0.bin").read_bytes()


def test_bad_arguments_are_named(dataset: Path) -> None:
    with pytest.raises(ValueError, match="replicas"):
        NetnsRig(dataset, replicas=0)
    with pytest.raises(ValueError, match="nowhere"):
        NetnsRig(dataset / "nowhere")
    with pytest.raises(ValueError, match="prefix"):
        NetnsRig(dataset, prefix="Bad-Prefix")


def test_not_root_is_a_clear_error(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionError, match=netns.NOT_ROOT):
        NetnsRig(dataset).start()
