"""The LatencyHistogram and crc32c bindings the harness builds on."""

from __future__ import annotations

import threading

import pytest
from feedline import _core


def test_histogram_percentiles_merge_reset() -> None:
    h = _core.LatencyHistogram()
    assert h.count == 0 and h.percentile_ms(99) == 0.0
    h.record_many_us([1_000] * 990)
    for _ in range(10):
        h.record_us(200_000)
    s = h.summary()
    assert s["count"] == 1000 and len(h) == 1000
    assert s["p50_ms"] == pytest.approx(1.0, rel=1e-2)
    assert s["p99.9_ms"] == pytest.approx(200.0, rel=1e-2)
    g = _core.LatencyHistogram()
    g.merge(h)
    g.merge(g)
    assert g.count == 2000
    g.reset()
    assert g.count == 0


@pytest.mark.parametrize("bad", [0.0, -1.0, 100.01, float("nan")])
def test_percentile_outside_0_100_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\]"):
        _core.LatencyHistogram().percentile_ms(bad)


def test_histogram_records_from_many_threads() -> None:
    h = _core.LatencyHistogram()

    def work() -> None:
        for i in range(1000):
            h.record_us(i + 1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert h.count == 4000


def test_crc32c_known_value_and_buffers() -> None:
    # The standard check value for CRC-32C.
    assert _core.crc32c(b"123456789") == 0xE3069283
    assert _core.crc32c(memoryview(bytearray(b"123456789"))) == 0xE3069283
    assert _core.crc32c(b"6789", _core.crc32c(b"12345")) == 0xE3069283
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.crc32c(memoryview(b"123456789")[::2])


def test_au_per_epoch_splits_the_steps_and_times_each_epoch_from_the_last() -> None:
    from feedline.bench.metrics import StepTiming, accelerator_utilization, au_per_epoch

    # Two epochs of 3 steps: the first waits 1 s per step, the second none.
    steps: list[StepTiming] = []
    t = 0.0
    for wait in (1.0, 1.0, 1.0, 0.0, 0.0, 0.0):
        steps.append(StepTiming(wait_start_s=t, ready_s=t + wait, compute_s=1.0))
        t += wait + 1.0
    first, second = au_per_epoch(steps, 3)
    # Epoch 1 from its first step's end (as the whole-run AU): 2 s of
    # compute in 4 s; epoch 2: 3 s in 3 s.
    assert first == pytest.approx(0.5) and second == pytest.approx(1.0)
    assert au_per_epoch(steps, 6) == [accelerator_utilization(steps)]
