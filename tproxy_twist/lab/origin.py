"""A small HTTP/1.1 origin server for end-to-end tests (asyncio, standard library only).

Run it as ``python -m tproxy_twist.lab.origin --port 80 [--port 8080] [--host ::]``.
On ``::`` it serves IPv4 and IPv6 on one socket; IPv4 peers are reported as
plain IPv4 addresses (``198.51.100.2``, not ``::ffff:198.51.100.2``).

HTTP/1.1 with keep-alive and pipelining (answered in order), request bodies
framed by Content-Length or chunked (with trailers), ``Expect: 100-continue``.
HTTP/1.0 clients get keep-alive only when they ask for it. Every response
carries ``X-Connection-Id`` (unique per TCP connection).

Endpoints (JSON bodies unless stated; ``HEAD`` works on every GET endpoint and
sends the same headers without a body):

``GET /ip``
    ``{"client": peer ip, "port": peer port, "connection_id": int,
    "requests_on_connection": n}`` (n counts this request).
``GET /headers``
    ``{"method", "target", "version", "headers": [[name, value], ...]}``: the
    request as received (names keep their case, values lose surrounding blanks).
``POST /echo`` (any method, any body framing)
    ``{"length": n, "sha256": hex, "framing": "length" | "chunked" | "none",
    "trailers": [[name, value], ...]}``.
``GET /bytes?n=N[&seed=S][&chunked=1][&chunk=SIZE][&rate=BYTES_PER_SEC]``
    N deterministic bytes (:func:`payload`), with Content-Length, or chunked
    in chunks of SIZE (default 65536); ``rate`` paces the sending. A test checks
    what it received against :func:`expected_sha256` ``(N, S)``. ``&short=K``
    announces Content-Length N but sends only N-K bytes, then closes.
``GET /close?n=N[&seed=S]``
    The same bytes, delimited by closing the connection (no Content-Length,
    not chunked).
``GET /status/<code>``
    That status (200-599); 204 and 304 have no body.
``GET /sleep?s=SECONDS``
    Answers 200 after that long.
``GET /ws`` with ``Upgrade: websocket``
    ``101 Switching Protocols``, then every byte received is echoed back until
    the client closes (a raw byte tunnel, no websocket framing).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import itertools
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

__all__ = ["BLOCK_SIZE", "expected_sha256", "main", "payload", "serve"]

# -- the deterministic payload ------------------------------------------------

BLOCK_SIZE = 65536


@functools.lru_cache(maxsize=256)
def _block(seed: str, index: int) -> bytes:
    return hashlib.shake_256(f"tproxy-twist:{seed}:{index}".encode()).digest(BLOCK_SIZE)


def payload(n: int, seed: str = "0", piece_size: int = BLOCK_SIZE) -> Iterator[bytes]:
    """Yield the ``n`` bytes that ``/bytes?n=N&seed=S`` sends, in pieces of ``piece_size``.

    The stream is the concatenation of blocks ``shake_256(f"tproxy-twist:{seed}:{i}")``
    of 65536 bytes each (i = 0, 1, ...), cut to ``n`` bytes.
    """
    if piece_size <= 0:
        raise ValueError("piece_size must be positive")
    pos = 0
    while pos < n:
        want = min(piece_size, n - pos)
        parts = []
        while want:
            index, offset = divmod(pos, BLOCK_SIZE)
            take = min(want, BLOCK_SIZE - offset)
            block = _block(seed, index)
            parts.append(block if take == BLOCK_SIZE else block[offset : offset + take])
            pos += take
            want -= take
        yield parts[0] if len(parts) == 1 else b"".join(parts)


def expected_sha256(n: int, seed: str = "0") -> str:
    """The hex SHA-256 of the body of ``/bytes?n=N&seed=S`` (and ``/close``)."""
    h = hashlib.sha256()
    for piece in payload(n, seed):
        h.update(piece)
    return h.hexdigest()


# -- HTTP ---------------------------------------------------------------------

MAX_HEAD = 65536
_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_connection_ids = itertools.count(1)


class BadRequest(Exception):
    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    path: str = ""
    query: dict[str, list[str]] = field(default_factory=dict)
    body_length: int = 0
    body_sha256: str = hashlib.sha256(b"").hexdigest()
    framing: str = "none"
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        name = name.lower()
        values = [v for k, v in self.headers if k.lower() == name]
        return ", ".join(values) if values else None

    def tokens(self, name: str) -> list[str]:
        value = self.header(name) or ""
        return [t.strip().lower() for t in value.split(",") if t.strip()]

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    # A body too big to hold: an async iterator of pieces, and its length if known.
    stream: Callable[[], AsyncIterator[bytes]] | None = None
    length: int | None = None
    chunked: bool = False
    close: bool = False  # close the connection after this response
    upgrade: bool = False  # 101: the connection becomes a byte-echo tunnel


def _json(obj: object, status: int = 200) -> Response:
    return Response(
        status, [("Content-Type", "application/json")], json.dumps(obj).encode() + b"\n"
    )


def _plain_ip(host: str) -> str:
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:") :]
    return host


def _parse_head(head: bytes) -> Request:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise BadRequest("undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise BadRequest(f"bad request line {lines[0]!r}")
    method, target, version = parts
    if not all(ord(c) in _TOKEN_CHARS for c in method):
        raise BadRequest(f"bad method {method!r}")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise BadRequest(f"unsupported version {version!r}", 505)
        raise BadRequest(f"bad version {version!r}")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or not all(ord(c) in _TOKEN_CHARS for c in name):
            raise BadRequest(f"bad header line {line!r}")
        headers.append((name, value.strip(" \t")))
    req = Request(method, target, version, headers)
    split = urlsplit(target)
    req.path = split.path or "/"
    req.query = parse_qs(split.query, keep_blank_values=True)
    return req


def _wants_keep_alive(req: Request) -> bool:
    tokens = req.tokens("Connection")
    if req.version == "HTTP/1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


class Connection:
    """One client connection: read requests in order, answer each in turn."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.id = next(_connection_ids)
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.client = _plain_ip(peer[0])
        self.port = peer[1]
        self.requests = 0

    async def serve(self) -> None:
        try:
            while True:
                try:
                    req = await self._read_request()
                except BadRequest as e:
                    await self._send(
                        None,
                        Response(
                            e.status,
                            [("Content-Type", "text/plain")],
                            f"{e}\n".encode(),
                            close=True,
                        ),
                    )
                    return
                if req is None:
                    return
                self.requests += 1
                resp = await self._dispatch(req)
                keep = await self._send(req, resp)
                if resp.upgrade:
                    await self._echo()
                    return
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    # -- reading --

    async def _read_request(self) -> Request | None:
        while True:
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                if e.partial.strip(b"\r\n"):
                    raise BadRequest("connection closed inside a request head") from None
                return None
            except asyncio.LimitOverrunError:
                raise BadRequest("request head too large", 431) from None
            head = head.lstrip(b"\r\n")
            if head:
                break
        req = _parse_head(head[:-4])
        await self._read_body(req)
        return req

    async def _read_body(self, req: Request) -> None:
        te = req.tokens("Transfer-Encoding")
        cl_values = [v for k, v in req.headers if k.lower() == "content-length"]
        if te:
            if te[-1] != "chunked":
                raise BadRequest(f"unsupported transfer-coding {te!r}", 501)
            framing = "chunked"
        elif cl_values:
            lengths = {v.strip() for cl in cl_values for v in cl.split(",")}
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise BadRequest(f"bad Content-Length {cl_values!r}")
            length = int(next(iter(lengths)))
            framing = "length"
        else:
            req.framing = "none"
            return
        if (
            req.version == "HTTP/1.1"
            and "100-continue" in req.tokens("Expect")
            and (framing == "chunked" or length > 0)
        ):
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await self.writer.drain()
        h = hashlib.sha256()
        total = 0
        if framing == "length":
            remaining = length
            while remaining:
                data = await self.reader.read(min(remaining, 1 << 20))
                if not data:
                    raise asyncio.IncompleteReadError(b"", remaining)
                h.update(data)
                remaining -= len(data)
            total = length
        else:
            while True:
                line = await self.reader.readuntil(b"\r\n")
                size_text = line[:-2].split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise BadRequest(f"bad chunk size {size_text!r}") from None
                if size == 0:
                    break
                data = await self.reader.readexactly(size)
                h.update(data)
                total += size
                if await self.reader.readexactly(2) != b"\r\n":
                    raise BadRequest("chunk not followed by CRLF")
            while True:
                line = await self.reader.readuntil(b"\r\n")
                if line == b"\r\n":
                    break
                name, sep, value = line[:-2].decode("latin-1").partition(":")
                if not sep:
                    raise BadRequest(f"bad trailer line {line!r}")
                req.trailers.append((name, value.strip(" \t")))
        req.framing = framing
        req.body_length = total
        req.body_sha256 = h.hexdigest()

    # -- answering --

    async def _dispatch(self, req: Request) -> Response:
        try:
            return await self._route(req)
        except BadRequest as e:
            return Response(e.status, [("Content-Type", "text/plain")], f"{e}\n".encode())

    async def _route(self, req: Request) -> Response:
        path = req.path
        get_like = req.method in ("GET", "HEAD")
        if path == "/echo":
            return _json(
                {
                    "length": req.body_length,
                    "sha256": req.body_sha256,
                    "framing": req.framing,
                    "trailers": [list(t) for t in req.trailers],
                }
            )
        if not get_like:
            return Response(
                405,
                [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")],
                b"method not allowed\n",
            )
        if path == "/ip":
            return _json(
                {
                    "client": self.client,
                    "port": self.port,
                    "connection_id": self.id,
                    "requests_on_connection": self.requests,
                }
            )
        if path == "/headers":
            return _json(
                {
                    "method": req.method,
                    "target": req.target,
                    "version": req.version,
                    "headers": [list(h) for h in req.headers],
                }
            )
        if path in ("/bytes", "/close"):
            return self._bytes(req, close_delimited=path == "/close")
        if path.startswith("/status/"):
            code_text = path[len("/status/") :]
            if not code_text.isdigit() or not 200 <= int(code_text) <= 599:
                raise BadRequest(f"status must be 200-599, got {code_text!r}")
            code = int(code_text)
            if code in (204, 304):
                return Response(code)
            return _json({"status": code}, code)
        if path == "/sleep":
            seconds = _float_arg(req, "s", 0.0)
            await asyncio.sleep(seconds)
            return _json({"slept": seconds})
        if path == "/ws":
            if "websocket" not in req.tokens("Upgrade") or req.method != "GET":
                return Response(
                    426,
                    [
                        ("Upgrade", "websocket"),
                        ("Connection", "Upgrade"),
                        ("Content-Type", "text/plain"),
                    ],
                    b"this endpoint needs Upgrade: websocket\n",
                )
            return Response(
                101, [("Upgrade", "websocket"), ("Connection", "Upgrade")], upgrade=True
            )
        if path == "/":
            return _json({"origin": "tproxy-twist lab origin"})
        return Response(404, [("Content-Type", "text/plain")], b"not found\n")

    def _bytes(self, req: Request, close_delimited: bool) -> Response:
        n = _int_arg(req, "n", 0)
        seed = req.arg("seed", "0") or "0"
        rate = _float_arg(req, "rate", 0.0)
        short = min(max(_int_arg(req, "short", 0), 0), n)  # bytes left out, then close
        chunk_arg = req.arg("chunk")
        if chunk_arg is not None:
            piece = _int_arg(req, "chunk", BLOCK_SIZE)
            if piece <= 0:
                raise BadRequest("chunk must be positive")
        elif rate > 0:
            piece = max(1, min(BLOCK_SIZE, int(rate / 20)))  # about 20 writes a second
        else:
            piece = BLOCK_SIZE

        async def stream() -> AsyncIterator[bytes]:
            start = time.monotonic()
            sent = 0
            for data in payload(n, seed, piece):
                if sent + len(data) > n - short:
                    data = data[: n - short - sent]
                    if data:
                        yield data
                    return
                yield data
                sent += len(data)
                if rate > 0:
                    delay = start + sent / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)

        headers = [("Content-Type", "application/octet-stream")]
        if close_delimited:
            return Response(200, headers, stream=stream, close=True)
        chunked = req.arg("chunked", "0") not in ("0", "", "false", "no")
        if chunked and req.version == "HTTP/1.0":
            return Response(200, headers, stream=stream, close=True)  # 1.0 knows no chunks
        return Response(
            200,
            headers,
            stream=stream,
            length=None if chunked else n,
            chunked=chunked,
            close=bool(short),
        )

    async def _send(self, req: Request | None, resp: Response) -> bool:
        """Write ``resp``; return whether the connection stays open for more requests."""
        keep = req is not None and _wants_keep_alive(req) and not resp.close
        if req is not None and req.header("Transfer-Encoding") and req.header("Content-Length"):
            keep = False  # RFC 9112 6.3: both framings in one request: close afterwards
        version = req.version if req is not None else "HTTP/1.1"
        head_only = req is not None and req.method == "HEAD"
        reason = _reason(resp.status)
        lines = [
            f"HTTP/1.1 {resp.status} {reason}",
            "Server: tproxy-twist-origin",
            f"Date: {_date()}",
            f"X-Connection-Id: {self.id}",
        ]
        lines += [f"{k}: {v}" for k, v in resp.headers]
        no_body = resp.status in (204, 304) or 100 <= resp.status < 200
        if resp.upgrade:
            keep = True
        elif no_body:
            pass
        elif resp.stream is None:
            lines.append(f"Content-Length: {len(resp.body)}")
        elif resp.chunked:
            lines.append("Transfer-Encoding: chunked")
        elif resp.length is not None:
            lines.append(f"Content-Length: {resp.length}")
        else:
            keep = False  # delimited by close
        if not resp.upgrade:
            if not keep:
                lines.append("Connection: close")
            elif version == "HTTP/1.0":
                lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if head_only or no_body or resp.upgrade:
            self.writer.write(head)
        elif resp.stream is None:
            self.writer.write(head + resp.body)
        else:
            self.writer.write(head)
            async for data in resp.stream():
                if resp.chunked:
                    self.writer.write(b"%x\r\n" % len(data))
                    self.writer.write(data)
                    self.writer.write(b"\r\n")
                else:
                    self.writer.write(data)
                await self.writer.drain()
            if resp.chunked:
                self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()
        return keep

    async def _echo(self) -> None:
        while True:
            data = await self.reader.read(65536)
            if not data:
                break
            self.writer.write(data)
            await self.writer.drain()
        if self.writer.can_write_eof():
            self.writer.write_eof()


def _int_arg(req: Request, name: str, default: int) -> int:
    value = req.arg(name)
    if value is None:
        return default
    try:
        result = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {value!r}") from None
    if result < 0:
        raise BadRequest(f"{name} must not be negative")
    return result


def _float_arg(req: Request, name: str, default: float) -> float:
    value = req.arg(name)
    if value is None:
        return default
    try:
        result = float(value)
    except ValueError:
        raise BadRequest(f"{name} must be a number, got {value!r}") from None
    if not 0 <= result < 1e9:
        raise BadRequest(f"{name} out of range")
    return result


@functools.cache
def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


_date_cache: tuple[int, str] = (0, "")


def _date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


# -- the server ---------------------------------------------------------------


def _listening_socket(host: str, port: int) -> socket.socket:
    if host in ("::", ""):
        return socket.create_server(
            ("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=1024
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024)


async def serve(host: str, ports: list[int], ready: Callable[[], None] | None = None) -> None:
    """Serve on ``host`` and each of ``ports`` until cancelled or SIGTERM/SIGINT."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Connection(reader, writer).serve()

    servers = []
    for port in ports:
        sock = _listening_socket(host, port)
        servers.append(await asyncio.start_server(handle, sock=sock, limit=MAX_HEAD))
        print(f"origin: listening on [{host}]:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        for server in servers:
            server.close()
        print("origin: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tproxy_twist.lab.origin", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--host", default="::", help="address to listen on (default ::, which serves IPv4 and IPv6)"
    )
    parser.add_argument(
        "--port",
        type=int,
        action="append",
        help="port to listen on; repeat for several (default 80)",
    )
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port or [80]))
    except OSError as e:
        print(f"origin: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- a scripted raw-bytes origin (a separate helper for conformance tests) ------------
#
# Unlike the HTTP origin above, this one does not speak HTTP: it logs every byte
# it receives and answers each request head with bytes a test scripted, so a
# test can assert exactly what reached the origin and make the origin
# misbehave at will. Run it with
#
#     python -c "from tproxy_twist.lab.origin import raw_main; raw_main()" \
#         --dir DIR --port PORT [--host HOST]
#
# DIR/current names the active case: a subdirectory CASE of DIR holding
# CASE/script.json, ``{"0": [step, ...], "1": [...], "*": [...]}``: the steps of
# the first, second, ... connection of the case ("*": any other), one step per
# request head received (heads end at CRLFCRLF; a Content-Length or chunked
# body after a head is skipped). A step is ``{"send": HEX}`` (answer those
# bytes), ``{"send": HEX, "close": true}`` (answer, then close),
# ``{"close": true}`` (close without answering) or ``{"hold": true}`` (answer
# nothing). After the last step: hold. Every byte received on connection N is
# appended to CASE/conn-N.bin as it arrives; CASE/conn-N.end is written when
# the connection ends.


def _raw_request_end(buf: bytes) -> int:
    """Where the first request in ``buf`` ends (head and body), or -1 if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return -1
    head = buf[:end].lower()
    pos = end + 4
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip() == b"content-length" and value.strip().isdigit():
            need = pos + int(value.strip())
            return need if len(buf) >= need else -1
        if name.strip() == b"transfer-encoding" and b"chunked" in value:
            last = buf.find(b"0\r\n\r\n", pos)
            return last + 5 if last >= 0 else -1
    return pos


def _raw_connection(conn: socket.socket, base: str) -> None:
    from pathlib import Path

    try:
        case = Path(base) / (Path(base) / "current").read_text().strip()
        index = len(list(case.glob("conn-*.bin")))
        log_path = case / f"conn-{index}.bin"
        log_path.touch()
        script = json.loads((case / "script.json").read_text())
        steps = list(script.get(str(index), script.get("*", [])))
        pending = b""
        while True:
            data = conn.recv(65536)
            if not data:
                break
            with open(log_path, "ab") as log:
                log.write(data)
            pending += data
            while (end := _raw_request_end(pending)) >= 0:
                pending = pending[end:]
                step = steps.pop(0) if steps else {"hold": True}
                if "send" in step:
                    conn.sendall(bytes.fromhex(step["send"]))
                if step.get("close"):
                    return
    except OSError:
        pass
    finally:
        conn.close()
        try:
            (case / f"conn-{index}.end").touch()
        except (NameError, OSError):
            pass


def raw_main(argv: list[str] | None = None) -> int:
    """Serve the scripted raw origin (see the comment above) until SIGTERM."""
    import threading

    parser = argparse.ArgumentParser(prog="raw-origin")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="::")
    args = parser.parse_args(argv)
    server = _listening_socket(args.host, args.port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"raw origin: listening on [{args.host}]:{args.port}", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_raw_connection, args=(conn, args.dir), daemon=True).start()
