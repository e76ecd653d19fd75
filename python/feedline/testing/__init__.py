"""Test and staging helpers: real servers and real faults, no mocks.

* :class:`FaultProxy`: an embedded TCP fault proxy (latency, jitter,
  bandwidth, slicer, black hole, reset, slow close, data limit).
* :mod:`feedline.testing.netns`: replicas in network namespaces with packet
  loss, bandwidth caps, link down and SIGSTOP/SIGKILL (root only).
"""

from feedline._core import FaultProxy

__all__ = ["FaultProxy"]
