"""
C{twistd tproxy}: command-line options and the service tree.

The plugin file in C{twisted/plugins} points here; this module only parses
options, loads the configuration and wires services together.
"""

from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.python import usage

from . import config as configuration

DEFAULT_CONFIG = "/etc/tproxy-twist/tproxy.toml"


class Options(usage.Options):
    synopsis = "[--config FILE] [--workers N]"
    longdesc = (
        "Transparent (TPROXY) HTTP proxy: relays intercepted HTTP to its original"
        " destination from the client's own IP address, plus an explicit forward"
        " proxy port, with Prometheus metrics.  See the README and the sample"
        " etc/tproxy.toml for the configuration reference."
    )
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "The TOML configuration file."],
        [
            "workers",
            "w",
            None,
            "Worker processes; overrides `workers` in the config (0: one per CPU).",
            int,
        ],
    ]

    def postOptions(self) -> None:
        try:
            self["loaded"] = configuration.load(self["config"])
        except configuration.ConfigError as e:
            raise usage.UsageError(str(e)) from None
        workers = self["workers"]
        if workers is not None:
            if not 0 <= workers <= 1024:
                raise usage.UsageError("--workers: must be from 0 to 1024")
            self["loaded"] = configuration.with_workers(self["loaded"], workers)


def makeService(options: Options) -> IService:
    from .worker import ProxyService, StartupError

    top = MultiService()
    try:
        ProxyService(options["loaded"]).setServiceParent(top)
    except StartupError as e:
        raise SystemExit(f"tproxy-twist: {e}") from None
    return top
