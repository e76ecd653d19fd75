"""Test and benchmark rigs: real servers on loopback (and, as root, in
network namespaces) that feedline's remote path is exercised against."""

from feedline.testing.nginx import NginxReplicas, NginxUnavailable, nginx_binary

__all__ = ["NginxReplicas", "NginxUnavailable", "nginx_binary"]
