"""The typed configuration: one schema in the core, reached the same way from
keyword arguments, section objects, dicts and pickles, documented in
docs/configuration.md (checked here against the core's own defaults)."""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any

import feedline
import pytest
from feedline import _core

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def documented(heading: str) -> dict[str, str]:
    """``{option: default cell}`` of the table under ``## heading``."""
    text = DOCS.read_text()
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_0-9]+)` \| ([^|]+) \|", section, flags=re.M)
    return {name: cell.strip() for name, cell in rows}


@pytest.mark.parametrize(
    ("heading", "section"),
    [
        ("Routing (`feedline.Routing`)", feedline.Routing),
        ("Prefetch (`feedline.Prefetch`)", feedline.Prefetch),
        ("Cache (`feedline.Cache`)", feedline.Cache),
        ("Chaos (`feedline.Chaos`)", feedline.Chaos),
    ],
)
def test_docs_list_every_option_with_the_cores_default(heading: str, section: Any) -> None:
    rows = documented(heading)
    defaults = section().to_dict()
    assert list(rows) == list(section.options) == list(defaults)
    for name, value in defaults.items():
        assert rows[name] == f"`{value!r}`", name


def test_docs_list_every_top_level_option() -> None:
    rows = documented("Top level")
    top = _core.check_options({})
    assert list(rows) == list(top)
    sections = {"routing", "prefetch", "cache"}
    for name, value in top.items():
        if name not in sections:
            assert rows[name] == f"`{value!r}`", name
    flat = set(feedline.Routing.options) | set(feedline.Prefetch.options) | set(top)
    flat |= set(feedline.Cache.options)
    assert set(_core.option_names()) == flat


def test_flat_keywords_and_sections_make_the_same_filesystem(tmp_path: Path) -> None:
    flat = feedline.FileSystem([tmp_path], hedge_after_ms="p95", depth=3, timeout_ms=250)
    nested = feedline.FileSystem(
        [tmp_path],
        routing=feedline.Routing(hedge_after_ms="p95", timeout_ms=250),
        prefetch=feedline.Prefetch(depth=3),
    )
    as_dict = feedline.FileSystem(
        [tmp_path], routing={"hedge_after_ms": "p95", "timeout_ms": 250}, prefetch={"depth": 3}
    )
    assert flat.config == nested.config == as_dict.config
    assert flat.config["routing"]["hedge_after_ms"] == "p95"
    assert flat.prefetch == feedline.Prefetch(depth=3)


def test_sections_are_frozen_values_that_pickle_and_copy() -> None:
    routing = feedline.Routing(hedge_after_ms=20, policy="p2c")
    assert routing.hedge_after_ms == 20.0 and routing.policy == "p2c"
    assert repr(routing) == "Routing(policy='p2c', hedge_after_ms=20.0)"
    assert pickle.loads(pickle.dumps(routing)) == routing
    changed = routing.replace(timeout_ms=100)
    assert changed.timeout_ms == 100.0 and routing.timeout_ms is None
    with pytest.raises(AttributeError):
        routing.policy = "affinity"  # type: ignore[misc]
    with pytest.raises(AttributeError, match="no option 'polcy'"):
        _ = routing.polcy
    with pytest.raises(TypeError, match="unhashable"):
        hash(routing)
    replica = feedline.Replica("s3://b/x", storage_options={"region": "eu"}, weight=2)
    assert pickle.loads(pickle.dumps(replica)) == replica


@pytest.mark.parametrize(
    ("make", "error", "needle"),
    [
        (lambda: feedline.Routing(hedge_afer_ms=20), ValueError, "did you mean 'hedge_after_ms'"),
        (lambda: feedline.Prefetch(dept=2), ValueError, "did you mean 'depth'"),
        (lambda: feedline.Chaos(error_rte=0.1), ValueError, "did you mean 'error_rate'"),
        (lambda: feedline.Routing(hedge_after_ms="fast"), ValueError, "got 'fast'"),
        (lambda: feedline.Routing(hedge_after_ms="p1e1"), ValueError, "got 'p1e1'"),
        (lambda: feedline.Routing(timeout_ms="1s"), TypeError, "timeout_ms must be a number"),
        (lambda: feedline.Routing(policy=None), TypeError, "policy must be a string, got None"),
        (lambda: feedline.Prefetch(depth=2.5), TypeError, "depth must be a whole number"),
        (lambda: feedline.Prefetch(depth=True), TypeError, "depth must be .* got True"),
        (lambda: feedline.Routing(deadline_ms=math.nan), ValueError, "finite number, got nan"),
        (lambda: feedline.Routing(deadline_ms=-math.inf), ValueError, "finite number, got -inf"),
        (lambda: feedline.Routing(weights=[1, object()]), TypeError, r"weights\[1\]"),
        (lambda: feedline.Replica("/x", weight=0), ValueError, "weight must be"),
    ],
)
def test_bad_options_name_the_option_and_value(make: Any, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle):
        make()


def test_fsspec_keywords_pass_through_and_typos_do_not(tmp_path: Path) -> None:
    fs = feedline.FileSystem([tmp_path], skip_instance_cache=True, use_listings_cache=False)
    assert fs.config["replicas"][0]["url"] == str(tmp_path)
    with pytest.raises(TypeError, match="unknown option 'hedge_afer_ms'"):
        feedline.FileSystem([tmp_path], hedge_afer_ms=20)
    with pytest.raises(TypeError, match="unknown option 'dept'; did you mean 'depth'"):
        feedline.open(str(tmp_path / "x"), dept=2)


def test_per_replica_options_override_the_shared_ones_and_stay_secret() -> None:
    fs = feedline.FileSystem(
        [
            feedline.Replica(
                "s3://bucket-a/data",
                storage_options={"endpoint_url": "http://127.0.0.1:1", "secret": "hunter2"},
            ),
            feedline.Replica("s3://bucket-b/data", storage_options={"secret": "x"}, weight=3),
        ],
        storage_options={"endpoint_url": "http://127.0.0.1:2", "region": "eu-west-1", "key": "k"},
    )
    config = fs.config
    assert [r["url"] for r in config["replicas"]] == ["s3://bucket-a/data", "s3://bucket-b/data"]
    assert config["replicas"][1]["weight"] == 3.0
    assert "hunter2" not in repr(config) and "hunter2" not in repr(fs)


def test_no_numeric_option_can_panic(tmp_path: Path) -> None:
    """Every numeric option, with every awkward number: a clear TypeError or
    ValueError (or acceptance), never a PanicException."""
    numeric = [
        name
        for name, value in {
            **feedline.Routing().to_dict(),
            **feedline.Prefetch().to_dict(),
        }.items()
        if name not in ("policy", "weights")
    ] + ["concurrency"]
    awkward: list[object] = [0, -1, 1, 0.5, 1e23, 1e300, -1e300, 2**63, 2**64, 2**70, -(2**70)]
    awkward += [math.nan, math.inf, -math.inf, True, "1"]
    for name in numeric:
        for value in awkward:
            try:
                feedline.FileSystem([tmp_path], **{name: value})
            except (TypeError, ValueError) as e:
                assert name in str(e), (name, value, e)
    chaos_numeric = [n for n in feedline.Chaos.options if n not in ("latency", "outages")]
    for name in chaos_numeric:
        for value in awkward:
            try:
                feedline.FileSystem([tmp_path], chaos={0: feedline.Chaos(**{name: value})})
            except (TypeError, ValueError) as e:
                assert name in str(e), (name, value, e)


def test_cache_settings_without_a_cache_dir_are_refused_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cache_bytes, cache_policy given without cache_dir"):
        feedline.FileSystem([str(tmp_path)], cache_bytes=1 << 30, cache_policy="lru")
    with pytest.raises(ValueError, match=r"cache_block_bytes must be at least 4096.*got 3"):
        feedline.FileSystem([str(tmp_path)], cache_dir=str(tmp_path / "c"), cache_block_bytes=3)
    fs = feedline.FileSystem([str(tmp_path)], cache_dir=str(tmp_path / "c"), cache_bytes=16 << 20)
    assert fs.cache is not None
