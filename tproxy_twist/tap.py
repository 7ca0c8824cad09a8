"""
C{twistd tproxy}: command-line options and the service tree.

The plugin file in C{twisted/plugins} points here; this module only parses
options, loads the configuration and wires services together.

A mistake in the configuration is printed alone, in one line, and twistd
exits 1 (not after twistd's usage text).
"""

from __future__ import annotations

import grp
import os
import pwd
import sys

from twisted.application.service import IService
from twisted.python import usage

from . import config as configuration


def version() -> str:
    """tproxy-twist's own version (its installed distribution's)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("tproxy-twist")
    except PackageNotFoundError:
        return "unknown (not installed)"


class Options(usage.Options):
    synopsis = "[--config FILE] [--workers N]"
    longdesc = (
        "Transparent (TPROXY) HTTP proxy: relays intercepted HTTP to its original"
        " destination from the client's own IP address, plus an explicit forward"
        " proxy port, with Prometheus metrics and a status page (/status on the"
        " metrics listener, for the networks in [metrics] status_allow).  TLS ports"
        ' (protocol = "tls") splice, deny or bump intercepted HTTPS by its SNI; bumping'
        " needs the [tls] CA (`tproxy-twist ca init`), is checked at start and on reload,"
        " and verifies every origin before a client sees a certificate.  A master process"
        " supervises"
        " pre-forked workers; SIGHUP reloads the configuration without dropping"
        " requests, SIGTERM drains and stops; a worker that stops answering is"
        " replaced (heartbeat_grace).  twistd's --uid/--gid apply to the"
        " workers (the master keeps root to supervise them).  See the README and"
        " the sample etc/tproxy.toml for the configuration reference."
    )
    optParameters = [
        [
            "config",
            "c",
            None,
            "The TOML configuration file (default: the first that exists of "
            + ", ".join(configuration.default_paths())
            + ").",
        ],
        [
            "workers",
            "w",
            None,
            "Worker processes; overrides `workers` in the config (0: one per CPU).",
            int,
        ],
    ]

    def opt_version(self) -> None:
        """Print tproxy-twist's version and exit."""
        sys.stdout.write(f"tproxy-twist {version()}\n")
        sys.exit(0)

    def postOptions(self) -> None:
        try:
            if self["config"] is None:
                self["loaded"] = configuration.load_default()
            else:
                self["loaded"] = configuration.load(self["config"])
        except configuration.ConfigError as e:
            # Alone and first: twistd would print its usage text before a UsageError.
            raise SystemExit(f"tproxy-twist: {e}") from None
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


def access_log_problem(config: configuration.Config) -> str | None:
    """Why the workers could not write the configured access log, or None."""
    path = config.access_log.path
    if path is None:
        return None
    from .privileges import Identity, can_write_directory, resolve

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"{config.path}: access_log.path: directory {directory} does not exist"
    if config.user is not None:
        identity = resolve(config.user, config.group)
    else:
        identity = Identity(os.geteuid(), os.getegid(), "root", "root")
    try:
        writable = can_write_directory(directory, identity)
    except OSError as e:
        return f"{config.path}: access_log.path: directory {directory}: {e.strerror}"
    if not writable:
        return (
            f"{config.path}: access_log.path: directory {directory} is not writable by"
            f" {identity.user}, the user the workers run as"
        )
    return None


def makeService(options: Options) -> IService:
    config = _take_twistd_identity(options, options["loaded"])
    problem = access_log_problem(config)
    if problem is not None:
        raise SystemExit(f"tproxy-twist: {problem}")
    # prometheus_client picks its storage when it is first imported: the
    # multiprocess directory must be in the environment before that.
    from .master import prepare_runtime_dir

    run_dir = prepare_runtime_dir()
    from .master import MasterService
    from .worker import StartupError, check_tproxy_support

    try:
        check_tproxy_support(config)
    except StartupError as e:
        raise SystemExit(f"tproxy-twist: {e}") from None
    return MasterService(config, workers_override=options["workers"], run_dir=run_dir)
