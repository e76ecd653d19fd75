"""``feedline bench``: end-to-end data-path benchmarks under faults, with AU,
stall time and honest (coordinated-omission corrected) latency percentiles.

Use it from the command line (``feedline bench [SCENARIO.toml]``) or from
Python::

    from feedline.bench import scenario, runner
    report = runner.run(scenario.default())
"""

from feedline.bench.scenario import NeedsRootError, Scenario, ScenarioError, default, load, loads

__all__ = ["NeedsRootError", "Scenario", "ScenarioError", "default", "load", "loads"]
