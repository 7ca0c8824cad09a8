"""
Everything a worker needs to bump, loaded once when it starts.

A worker with a bump port calls L{load_bump_kit} as root, before it drops
privileges: the CA key file is readable by root only.  Workers without a
bump port never import this module (nor OpenSSL): see the README's memory
notes.
"""

from __future__ import annotations

import datetime

import attrs
from twisted.internet.interfaces import IReactorTime

from ..config import Config, ConfigError
from .ca import CAError, CertificateAuthority, load_ca
from .leaf import BumpServerTLS, LeafCache
from .pinning import PinnedHosts
from .verify import OriginTrust, TrustError, load_trust_root

__all__ = ["BumpKit", "load_bump_kit"]


@attrs.frozen
class BumpKit:
    """
    @ivar ca: the CA, its key in memory.
    @ivar leaves: this worker's leaf key and cache of forged leaves.
    @ivar server: the client-side TLS (C{server.creator(name)} per connection).
    @ivar origins: the origin-side TLS (C{origins.creator(sni)} per connection).
    @ivar pinned: hosts whose clients keep refusing our certificate.
    @ivar on_verify_failure: C{"splice"} or C{"terminate"}.
    """

    ca: CertificateAuthority
    leaves: LeafCache
    server: BumpServerTLS
    origins: OriginTrust
    pinned: PinnedHosts
    on_verify_failure: str


def load_bump_kit(config: Config, clock: IReactorTime, *, metrics: bool = True) -> BumpKit:
    """
    Read the C{[tls]} files of C{config} and build a worker's bump state.
    Raises L{ConfigError} naming the configuration file, the key and the
    problem (a missing or unsafe CA key, a certificate that is not a CA, an
    unreadable trust bundle...).  C{metrics=False}: count nothing.
    """
    tls = config.tls
    now = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)
    try:
        ca = load_ca(tls.ca_cert, tls.ca_key, now)
    except CAError as e:
        key = "ca_key" if str(e).startswith(f"{tls.ca_key}:") else "ca_cert"
        raise ConfigError(f"{config.path}: tls.{key}: {e}") from None
    try:
        trust_root = load_trust_root(tls.ca_bundle)
    except TrustError as e:
        raise ConfigError(f"{config.path}: tls.ca_bundle: {e}") from None
    cache_metrics = None
    if metrics:
        from ..metrics import LeafCacheMetrics

        cache_metrics = LeafCacheMetrics()
    leaves = LeafCache(ca, tls.leaf_cache_size, clock, cache_metrics)
    return BumpKit(
        ca=ca,
        leaves=leaves,
        server=BumpServerTLS(leaves),
        origins=OriginTrust(trust_root, clock=clock),
        pinned=PinnedHosts(tls.pinned_splice_after),
        on_verify_failure=tls.on_verify_failure,
    )
