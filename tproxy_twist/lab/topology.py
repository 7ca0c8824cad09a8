"""Three network namespaces: client ── router ── origin, for end-to-end tests.

```
 client ns               router ns                         origin ns
 eth0 198.51.100.2  ──  to-client 198.51.100.1
      2001:db8:1::2               2001:db8:1::1
                        to-origin 203.0.113.1   ──  eth0 203.0.113.2
                                  2001:db8:2::1          2001:db8:2::2
```

The client and the origin route everything via the router, so the origin's
replies to a spoofed client address come back through the router, where the
TPROXY ``socket`` rule hands them to the proxy. All addresses are from the
documentation ranges; no traffic leaves the namespaces.

Root is required (namespaces, veth, sysctls). Every namespace and process the
lab creates is removed by :meth:`Lab.teardown`; :func:`cleanup_stale` removes
what a crashed run left behind, without touching a lab that is still in use.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Lab", "LabCommandError", "cleanup_stale", "listen_ports", "REPO_ROOT"]

# The checkout holding the tproxy_twist package: children get it on PYTHONPATH,
# so the lab works from a checkout as well as from an installed package.
REPO_ROOT = Path(__file__).resolve().parents[2]

# Each lab records its owner here, so cleanup_stale() can tell a crashed run's
# namespaces from those of a test session still running next to it.
OWNERS_DIR = Path("/run/tproxy-twist-lab")

_GRACE = 2.0  # seconds between SIGTERM and SIGKILL at teardown

# `ip netns exec NS` bind-mounts the files in /etc/netns/NS/ over /etc/.
NETNS_ETC = Path("/etc/netns")


class LabCommandError(subprocess.CalledProcessError):
    """A command in a namespace failed; str() shows its output, not just its status."""

    def __str__(self) -> str:
        def text(data: bytes | str | None) -> str:
            if data is None:
                return ""
            if isinstance(data, bytes):
                data = data.decode(errors="replace")
            return data.strip()

        return f"{super().__str__()}\nstdout: {text(self.stdout)}\nstderr: {text(self.stderr)}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check=check)


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, timeout=timeout, input=input, env=env)
    if check and proc.returncode != 0:
        raise LabCommandError(proc.returncode, list(argv), proc.stdout, proc.stderr)
    return proc


#: twistd the way users run it, with this interpreter (`python -m twisted` is
#: `twist`, which has no -n or --pidfile).  The lab, the tests and the bench use it.
TWISTD = [
    sys.executable,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Python children: the repo root first on PYTHONPATH."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def _list_netns() -> list[str]:
    proc = _ip("netns", "list", check=False)
    names = []
    for line in proc.stdout.decode().splitlines():
        # "name (id: 3)" or just "name"
        if line.strip():
            names.append(line.split()[0])
    return names


def _netns_pids(ns: str) -> list[int]:
    proc = _ip("netns", "pids", ns, check=False)
    return [int(tok) for tok in proc.stdout.decode().split() if tok.isdigit()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is as good as dead for us.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (guards against pid reuse)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _kill_pids(pids: Sequence[int], grace: float = _GRACE) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after ``grace`` seconds."""
    me = os.getpid()
    pids = [p for p in pids if p != me]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _delete_namespaces(names: Sequence[str], grace: float = _GRACE) -> None:
    """Kill every process in the namespaces, then delete them. Never raises."""
    existing = set(_list_netns())
    names = [n for n in names if n in existing]
    pids: list[int] = []
    for ns in names:
        pids += _netns_pids(ns)
    _kill_pids(pids, grace)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for ns in names:
        _ip("netns", "del", ns, check=False)
    for ns in names:  # per-namespace /etc files (Lab.set_hosts)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def _owner_file(prefix: str) -> Path:
    return OWNERS_DIR / prefix


# The owner file of a lab left up on purpose (``tproxy-twist lab --keep``).
_KEPT = "kept"


def _owner_alive(prefix: str) -> bool:
    try:
        pid_text, start = _owner_file(prefix).read_text().split()[:2]
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    return _alive(pid) and _start_time(pid) == start


def _kept(prefix: str) -> bool:
    try:
        return _KEPT in _owner_file(prefix).read_text().split()[2:]
    except OSError:
        return False


def cleanup_stale(prefix_pattern: str = "tpt", *, kept: bool = False) -> list[str]:
    """Remove namespaces left by crashed lab runs; return their names.

    A namespace is stale when its name starts with ``prefix_pattern`` and the
    process that created its lab is gone. Labs of other test sessions that are
    still running (on the same machine, at the same time) are left alone, and
    so are labs left up on purpose (:meth:`Lab.keep`) unless ``kept`` is true
    (``tproxy-twist lab --clean``). Never raises.
    """
    removed: list[str] = []
    try:
        groups: dict[str, list[str]] = {}
        for name in _list_netns():
            if name.startswith(prefix_pattern) and "-" in name:
                groups.setdefault(name.rsplit("-", 1)[0], []).append(name)
        for prefix, names in groups.items():
            if _owner_alive(prefix) or (_kept(prefix) and not kept):
                continue
            _delete_namespaces(names)
            _owner_file(prefix).unlink(missing_ok=True)
            removed += names
    except Exception as e:  # cleanup must not stop a test session from starting
        print(f"tproxy_twist.lab: cleanup_stale: {e!r}", file=sys.stderr)
    return removed


class Lab:
    """The client/router/origin lab. Use as a context manager; root only.

    ``__enter__`` calls :meth:`setup`; ``__exit__`` always calls
    :meth:`teardown`, which kills every process in the three namespaces and
    deletes them.
    """

    CLIENT4 = "198.51.100.2"
    ROUTER_CLIENT4 = "198.51.100.1"
    ROUTER_ORIGIN4 = "203.0.113.1"
    ORIGIN4 = "203.0.113.2"
    CLIENT6 = "2001:db8:1::2"
    ROUTER_CLIENT6 = "2001:db8:1::1"
    ROUTER_ORIGIN6 = "2001:db8:2::1"
    ORIGIN6 = "2001:db8:2::2"
    # On the origin link, but nobody answers ARP / neighbour solicitations.
    UNREACHABLE4 = "203.0.113.99"
    UNREACHABLE6 = "2001:db8:2::99"

    # Interface names (each lives in its own namespace only, so they never clash).
    CLIENT_IF = "eth0"
    ORIGIN_IF = "eth0"
    ROUTER_CLIENT_IF = "to-client"
    ROUTER_ORIGIN_IF = "to-origin"

    # Ports the origin listens on by default: 80 is diverted by the lab's
    # rules, 8080 is not (the direct path, for comparison).
    ORIGIN_PORTS = (80, 8080)

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix if prefix is not None else "tpt" + secrets.token_hex(3)
        self.client = f"{self.prefix}-client"
        self.router = f"{self.prefix}-router"
        self.origin = f"{self.prefix}-origin"
        self.namespaces = (self.client, self.router, self.origin)
        self.tmpdir: Path | None = None
        self._procs: list[subprocess.Popen] = []
        self._log_files: list = []
        self._is_set_up = False

    def __repr__(self) -> str:
        return f"<Lab {self.prefix}>"

    # -- life cycle ---------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.teardown()

    def setup(self) -> None:
        """Create the namespaces, links, addresses, routes and sysctls.

        On failure, whatever was created is torn down again before the error
        propagates.
        """
        if os.geteuid() != 0:
            raise PermissionError("the namespace lab needs root")
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        self._is_set_up = True

    def _setup(self) -> None:
        OWNERS_DIR.mkdir(parents=True, exist_ok=True)
        _owner_file(self.prefix).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        for ns in self.namespaces:
            _ip("netns", "add", ns)
            self._ip(ns, "link", "set", "lo", "up")

        # The router: forwarding on, no reverse-path filtering (the TPROXY return
        # path delivers packets for foreign addresses locally). Set before the
        # veths exist so they inherit the defaults, and on each veth below.
        for key, value in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.forwarding", "1"),
            ("net.ipv4.conf.default.forwarding", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.conf.default.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.lo.rp_filter", "0"),
        ]:
            self._sysctl(self.router, key, value)
        # Closing one reuseport listener hands its queued connections to the
        # others (Linux 5.14+); older kernels lack it, which tests can live with.
        self._sysctl(self.router, "net.ipv4.tcp_migrate_req", "1", check=False)
        # No duplicate address detection anywhere: the router's link-local
        # addresses would stay tentative for a second or two and stall the
        # first IPv6 flow.
        for ns in (self.client, self.router, self.origin):
            self._sysctl(ns, "net.ipv6.conf.all.accept_dad", "0", check=False)
            self._sysctl(ns, "net.ipv6.conf.default.accept_dad", "0", check=False)

        self._veth(self.client, self.CLIENT_IF, self.router, self.ROUTER_CLIENT_IF)
        self._veth(self.router, self.ROUTER_ORIGIN_IF, self.origin, self.ORIGIN_IF)
        for ifname in (self.ROUTER_CLIENT_IF, self.ROUTER_ORIGIN_IF):
            self._sysctl(self.router, f"net.ipv4.conf.{ifname}.rp_filter", "0")

        self._addr(self.client, self.CLIENT_IF, self.CLIENT4 + "/24", self.CLIENT6 + "/64")
        self._addr(
            self.router,
            self.ROUTER_CLIENT_IF,
            self.ROUTER_CLIENT4 + "/24",
            self.ROUTER_CLIENT6 + "/64",
        )
        self._addr(
            self.router,
            self.ROUTER_ORIGIN_IF,
            self.ROUTER_ORIGIN4 + "/24",
            self.ROUTER_ORIGIN6 + "/64",
        )
        self._addr(self.origin, self.ORIGIN_IF, self.ORIGIN4 + "/24", self.ORIGIN6 + "/64")

        for ns, ifname, gw4, gw6 in [
            (self.client, self.CLIENT_IF, self.ROUTER_CLIENT4, self.ROUTER_CLIENT6),
            (self.origin, self.ORIGIN_IF, self.ROUTER_ORIGIN4, self.ROUTER_ORIGIN6),
        ]:
            self._ip(ns, "-4", "route", "replace", "default", "via", gw4, "dev", ifname)
            self._ip(ns, "-6", "route", "replace", "default", "via", gw6, "dev", ifname)

    def keep(self) -> None:
        """Leave this lab up after its owner exits: only ``cleanup_stale(kept=True)`` removes it."""
        owner = _owner_file(self.prefix)
        owner.write_text(owner.read_text().strip() + f" {_KEPT}\n")

    def teardown(self) -> None:
        """Kill every process in the lab's namespaces and delete them.

        Never raises; safe to call more than once.
        """
        self._is_set_up = False
        try:
            tracked = [p for p in self._procs if p.poll() is None]
            _kill_pids([p.pid for p in tracked])
            for p in tracked:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        except Exception as e:
            print(f"{self!r}: teardown: {e!r}", file=sys.stderr)
        self._procs.clear()
        try:
            _delete_namespaces(self.namespaces)
        except Exception as e:
            print(f"{self!r}: teardown: {e!r}", file=sys.stderr)
        for f in self._log_files:
            try:
                f.close()
            except Exception:
                pass
        self._log_files.clear()
        try:
            _owner_file(self.prefix).unlink(missing_ok=True)
        except Exception:
            pass
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    # -- running things in namespaces --------------------------------------

    def run(
        self,
        ns: str,
        argv: list[str],
        *,
        check: bool = True,
        timeout: float = 60,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` in namespace ``ns``; stdout and stderr are captured (bytes).

        With ``check`` a non-zero exit raises :class:`LabCommandError`, whose
        message includes the output. Python children find this checkout's
        packages (PYTHONPATH).
        """
        return _run(
            ["ip", "netns", "exec", ns, *argv],
            check=check,
            timeout=timeout,
            input=input,
            env=child_env(),
        )

    def popen(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` in namespace ``ns``; it is killed at teardown at the latest.

        Keyword arguments go to :class:`subprocess.Popen`; ``env`` defaults to
        :func:`child_env`. The returned process is ``argv`` itself
        (``ip netns exec`` execs it), so its pid can be signalled directly.
        """
        kw.setdefault("env", child_env())
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self._procs.append(proc)
        return proc

    def stop_process(self, proc: subprocess.Popen, grace: float = 5) -> int | None:
        """SIGTERM ``proc``, SIGKILL it after ``grace`` seconds; return its exit status."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def set_hosts(self, ns: str, names: dict[str, str] | None) -> None:
        """Give ``ns`` an /etc/hosts of its own: localhost and ``names`` (name -> address).

        Processes started in ``ns`` from now on resolve these names (``ip netns
        exec`` bind-mounts /etc/netns/NS/hosts); ``None`` gives it the host's
        /etc/hosts again.  Teardown removes the file.
        """
        if names is None:
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
            return
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{address} {name}" for name, address in names.items()]
        (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
        (NETNS_ETC / ns / "hosts").write_text("\n".join(lines) + "\n")

    def apply_rules(self, script: str) -> None:
        """Run a rules script (see :mod:`tproxy_twist.rules`) with ``sh -e`` in the router."""
        assert self.tmpdir is not None, "setup() first"
        fd, path = tempfile.mkstemp(prefix="rules-", suffix=".sh", dir=self.tmpdir)
        with os.fdopen(fd, "w") as f:
            f.write(script)
        self.run(self.router, ["sh", "-e", path])

    def start_origin(self, ports: Sequence[int] = ORIGIN_PORTS) -> subprocess.Popen:
        """Start ``python -m tproxy_twist.lab.origin`` in the origin namespace.

        It listens on ``::`` (IPv4 and IPv6) on each of ``ports`` (default 80 and
        8080); this returns once every port accepts on both families. Its output
        goes to ``origin.log`` in the lab's temporary directory.
        """
        assert self.tmpdir is not None, "setup() first"
        argv = [sys.executable, "-m", "tproxy_twist.lab.origin"]
        for port in ports:
            argv += ["--port", str(port)]
        log = open(self.tmpdir / "origin.log", "ab")
        self._log_files.append(log)
        proc = self.popen(self.origin, argv, stdout=log, stderr=subprocess.STDOUT)
        for port in ports:
            for host in (self.ORIGIN4, self.ORIGIN6):
                try:
                    self.wait_port(self.origin, host, port)
                except TimeoutError:
                    if proc.poll() is not None:
                        raise RuntimeError(
                            f"the origin server exited with status {proc.returncode}:\n"
                            + (self.tmpdir / "origin.log").read_text(errors="replace")
                        ) from None
                    raise
        return proc

    def start_proxy(
        self,
        config: Path | str,
        log: Path,
        *,
        ports: Sequence[int] = (),
        extra_args: Sequence[str] = (),
        twistd_args: Sequence[str] = (),
        pidfile: Path | str = "",
        cwd: Path | str = REPO_ROOT,
        timeout: float = 30,
    ) -> subprocess.Popen:
        """Run ``twistd -n tproxy --config CONFIG`` in the router: the one place the lab,
        the tests and the bench start the proxy.

        Its output goes to ``log``; it runs in a session of its own (so that a
        group signal reaches its workers too). With ``ports``, returns once
        something listens on each, or raises ``RuntimeError`` with the end of
        ``log`` (see :meth:`wait_listening`). ``extra_args`` follow
        ``--config CONFIG``, ``twistd_args`` (``--uid``) go before ``tproxy``;
        ``pidfile`` empty means none.
        """
        argv = [*TWISTD, "-n", f"--pidfile={pidfile}", *twistd_args, "tproxy", "--config",
                os.path.abspath(config), *extra_args]  # fmt: skip
        with open(log, "ab") as out:
            proc = self.popen(
                self.router,
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                start_new_session=True,
            )
        if ports:
            try:
                self.wait_listening(self.router, ports, proc, log, timeout=timeout)
            except RuntimeError:
                # Not serving: take it and its workers (its session) down before saying so.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait(timeout=10)
                raise
        return proc

    def listening(self, ns: str, port: int) -> int:
        """How many TCP sockets listen on ``port`` in ``ns`` (workers each have one)."""
        proc = self.run(ns, ["ss", "-Hltn", "sport", "=", f":{port}"], check=False, timeout=20)
        return sum(1 for line in proc.stdout.decode().splitlines() if line.strip())

    def wait_listening(
        self,
        ns: str,
        ports: int | Sequence[int],
        proc: subprocess.Popen,
        log: Path,
        timeout: float = 20,
    ) -> None:
        """Return once something listens on every port in ``ns``.

        Judged with ``ss``, not by connecting: a probe connection would be
        counted by the proxy (and refused as a loop on a tproxy port).  Raises
        ``RuntimeError`` with the end of ``log`` if ``proc`` exits first or
        ``timeout`` passes.
        """
        waiting = [ports] if isinstance(ports, int) else list(ports)
        deadline = time.monotonic() + timeout
        while waiting:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"exited with status {proc.returncode} before listening on {waiting}:\n"
                    f"{_tail(log)}"
                )
            waiting = [port for port in waiting if not self.listening(ns, port)]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"nothing listens on {waiting} in {ns} after {timeout:g}s:\n{_tail(log)}"
                )
            time.sleep(0.05)

    def wait_port(self, ns: str, host: str, port: int, timeout: float = 10) -> None:
        """Return once a TCP connection to ``(host, port)`` from inside ``ns`` succeeds.

        Raises :class:`TimeoutError` otherwise. One helper process polls inside
        the namespace (every 20 ms).
        """
        code = (
            "import socket, sys, time\n"
            "host, port, deadline = sys.argv[1], int(sys.argv[2]), "
            "time.monotonic() + float(sys.argv[3])\n"
            "while True:\n"
            "    try:\n"
            "        socket.create_connection((host, port), timeout=1).close()\n"
            "        break\n"
            "    except OSError as e:\n"
            "        if time.monotonic() > deadline:\n"
            "            sys.exit(f'{host} port {port}: {e}')\n"
            "        time.sleep(0.02)\n"
        )
        proc = self.run(
            ns,
            [sys.executable, "-c", code, host, str(port), str(timeout)],
            check=False,
            timeout=timeout + 10,
        )
        if proc.returncode != 0:
            raise TimeoutError(
                f"{ns}: nothing accepted on {host} port {port} within {timeout}s: "
                + proc.stderr.decode(errors="replace").strip()
            )

    # -- helpers ---------------------------------------------------------------

    def _ip(self, ns: str, *args: str) -> None:
        _ip("-n", ns, *args)

    def _sysctl(self, ns: str, key: str, value: str, *, check: bool = True) -> None:
        # Write /proc/sys directly: no dependency on procps' sysctl binary.
        path = "/proc/sys/" + key.replace(".", "/")
        _run(["ip", "netns", "exec", ns, "sh", "-c", f"echo {value} > {path}"], check=check)

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        # Created directly inside the namespaces: the names never exist in the
        # root namespace, so concurrent labs cannot clash.
        _ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        self._ip(ns_a, "link", "set", if_a, "up")
        self._ip(ns_b, "link", "set", if_b, "up")

    def _addr(self, ns: str, ifname: str, addr4: str, addr6: str) -> None:
        self._ip(ns, "-4", "addr", "add", addr4, "dev", ifname)
        self._ip(ns, "-6", "addr", "add", addr6, "dev", ifname, "nodad")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def listen_ports(config_toml: str) -> list[int]:
    """The TCP ports a proxy configuration listens on: every ``[[port]]`` and the
    metrics listener (read from the TOML alone, so configurations meant to fail work too)."""
    import tomllib

    config = tomllib.loads(config_toml)
    listens = [p["listen"] for p in config.get("port", []) if "listen" in p]
    metrics = config.get("metrics", {})
    listens.append(metrics.get("listen", "127.0.0.1:9464") if isinstance(metrics, dict) else "")
    # "host:port", "[v6]:port" or a bare port number; "" turns a listener off.
    return [int(str(listen).rsplit(":", 1)[-1]) for listen in listens if str(listen)]
