"""
C{twistd tproxy}: command-line options and the service tree.

The plugin file in C{twisted/plugins} points here; this module only parses
options, loads the configuration and wires services together.
"""

from __future__ import annotations

import grp
import pwd

from twisted.application.service import IService
from twisted.python import usage

from . import config as configuration

DEFAULT_CONFIG = "/etc/tproxy-twist/tproxy.toml"


class Options(usage.Options):
    synopsis = "[--config FILE] [--workers N]"
    longdesc = (
        "Transparent (TPROXY) HTTP proxy: relays intercepted HTTP to its original"
        " destination from the client's own IP address, plus an explicit forward"
        " proxy port, with Prometheus metrics.  A master process supervises"
        " pre-forked workers; SIGHUP reloads the configuration without dropping"
        " requests, SIGTERM drains and stops.  twistd's --uid/--gid apply to the"
        " workers (the master keeps root to supervise them).  See the README and"
        " the sample etc/tproxy.toml for the configuration reference."
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


def _take_twistd_identity(options: Options, config: configuration.Config):
    """
    twistd's --uid/--gid would make the master give up root, and with it the
    ability to start workers with transparent sockets.  Apply them to the
    workers instead, and keep twistd from switching the master's identity.
    """
    parent = getattr(options, "parent", None)
    if parent is None or parent.get("uid") is None:
        return config
    user = pwd.getpwuid(parent["uid"]).pw_name
    group = grp.getgrgid(parent["gid"]).gr_name if parent.get("gid") is not None else None
    parent["uid"] = None
    parent["gid"] = None
    if config.user is not None:
        return config  # the configuration file says who the workers run as
    return configuration.with_identity(config, user, group)


def makeService(options: Options) -> IService:
    config = _take_twistd_identity(options, options["loaded"])
    # prometheus_client picks its storage when it is first imported: the
    # multiprocess directory must be in the environment before that.
    from .master import prepare_metrics_dir

    prepare_metrics_dir()
    from .master import MasterService
    from .worker import StartupError, check_tproxy_support

    try:
        check_tproxy_support(config)
    except StartupError as e:
        raise SystemExit(f"tproxy-twist: {e}") from None
    return MasterService(config, workers_override=options["workers"])
