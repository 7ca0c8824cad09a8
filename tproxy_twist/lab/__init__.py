"""A network-namespace lab for end-to-end tests (root only).

:class:`Lab` builds client ── router ── origin namespaces joined by veth pairs,
with documentation-range addresses; :mod:`tproxy_twist.lab.origin` is the test
origin HTTP server that runs in the origin namespace.
"""

from tproxy_twist.lab.topology import TWISTD, Lab, LabCommandError, cleanup_stale, listen_ports

__all__ = ["TWISTD", "Lab", "LabCommandError", "cleanup_stale", "listen_ports"]
