"""
Clients that reject the proxy's certificate.

A client without the CA installed, or an application that pins its
server's certificate, ends a bumped handshake with an alert such as
C{unknown_ca}.  L{client_rejected_certificate} recognises that failure so
it can be counted; L{PinnedHosts} remembers, per host, how often it
happened, and after C{threshold} rejections says that the host should be
spliced instead of bumped from then on (C{[tls] pinned_splice_after}).

The memory is per worker and bounded (least recently rejected hosts are
forgotten first); a worker that starts again starts from nothing.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["PinnedHosts", "client_rejected_certificate"]

# OpenSSL's reason strings for the alerts a client sends when it does not
# accept a server's certificate (RFC 8446, 6.2).
_REJECTION_ALERTS = (
    "alert unknown ca",
    "alert bad certificate",
    "alert certificate unknown",
    "alert unsupported certificate",
    "alert certificate expired",
)


def client_rejected_certificate(error: BaseException) -> bool:
    """
    Whether C{error} (the C{OpenSSL.SSL.Error} a server-side handshake
    ended with) is the client refusing our certificate, rather than a
    network failure or some other protocol error.
    """
    text = str(error).lower()
    return any(alert in text for alert in _REJECTION_ALERTS)


class PinnedHosts:
    """
    Counts certificate rejections per host name.  With C{threshold} 0 the
    feature is off: nothing is recorded and no host is ever spliced.
    """

    def __init__(self, threshold: int, capacity: int = 10_000) -> None:
        if threshold < 0 or capacity < 1:
            raise ValueError("threshold must be >= 0 and capacity >= 1")
        self.threshold = threshold
        self.capacity = capacity
        self._rejections: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rejections)

    def rejected(self, host: str) -> bool:
        """
        Record that a client rejected our certificate for C{host}; return
        whether this rejection is the one that makes the host spliced.
        """
        if not self.threshold:
            return False
        count = self._rejections.pop(host, 0) + 1
        self._rejections[host] = count
        while len(self._rejections) > self.capacity:
            self._rejections.popitem(last=False)
        return count == self.threshold

    def should_splice(self, host: str) -> bool:
        """Whether C{host} has been rejected C{threshold} times (and is to be spliced)."""
        return bool(self.threshold) and self._rejections.get(host, 0) >= self.threshold
