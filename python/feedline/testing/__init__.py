"""Test, benchmark and staging rigs: real servers and real faults, no mocks.

* :class:`NginxReplicas`: nginx replicas on loopback.
* :class:`FaultProxy`: an embedded TCP fault proxy (latency, jitter,
  bandwidth, slicer, black hole, reset, slow close, data limit).
* :mod:`feedline.testing.netns`: replicas in network namespaces with packet
  loss, bandwidth caps, link down and SIGSTOP/SIGKILL (root only).
"""

from feedline._core import FaultProxy
from feedline.testing.nginx import NginxReplicas, NginxUnavailable, nginx_binary

__all__ = ["FaultProxy", "NginxReplicas", "NginxUnavailable", "nginx_binary"]
