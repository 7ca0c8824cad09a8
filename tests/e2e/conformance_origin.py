"""An origin for tests/e2e/test_conformance.py that logs the raw bytes it receives.

Run it as ``python conformance_origin.py --port 81 --log-dir DIR`` (standard
library only).  It listens on ``::`` (IPv4 and IPv6).  Every byte received on a
connection is appended, before anything is answered, to ``DIR/<n>.bin`` (``n``
counts connections), so once a client has its answer the test can read exactly
what reached the origin.

Each request (a head, then a body framed by Content-Length or chunked, with
trailers) is answered ``200 OK`` with the body ``ok\\n``.  Query parameters of
the request-target shape the answer:

``set_cookie=N``
    adds one ``Set-Cookie`` field whose value is N bytes long.
``fill=N``
    adds ``X-Fill`` fields of 1,000 bytes each, N bytes of values in all.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import socket
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

_ids = itertools.count(1)


def request_size(buf: bytes | bytearray) -> int | None:
    """The length of the complete request at the start of ``buf``, or None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    pos = end + 4
    if b"\r\ntransfer-encoding:" in head:
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0].strip(), 16)
            pos = eol + 2
            if size == 0:
                break
            pos += size + 2
            if pos > len(buf):
                return None
        if buf[pos : pos + 2] == b"\r\n":
            return pos + 2
        trailers_end = buf.find(b"\r\n\r\n", pos)
        return None if trailers_end < 0 else trailers_end + 4
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip() == b"content-length":
            pos += int(value.strip())
            break
    return pos if pos <= len(buf) else None


def answer(request: bytes) -> bytes:
    target = request.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
    query = parse_qs(urlsplit(target).query)
    fields = [b"Content-Type: text/plain", b"Content-Length: 3"]
    if "set_cookie" in query:
        n = int(query["set_cookie"][0])
        fields.append(b"Set-Cookie: s=" + b"c" * (n - 2))
    if "fill" in query:
        left = int(query["fill"][0])
        i = 0
        while left > 0:
            fields.append(b"X-Fill-%d: %s" % (i, b"f" * min(1000, left)))
            left -= 1000
            i += 1
    return b"HTTP/1.1 200 OK\r\n" + b"\r\n".join(fields) + b"\r\n\r\nok\n"


async def serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log_dir: Path
) -> None:
    buf = bytearray()
    path = log_dir / f"{next(_ids)}.bin"
    try:
        with open(path, "ab", buffering=0) as log:
            while data := await reader.read(65536):
                log.write(data)
                buf += data
                while (size := request_size(buf)) is not None:
                    writer.write(answer(bytes(buf[:size])))
                    del buf[:size]
                await writer.drain()
    except (ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-dir", type=Path, required=True)
    args = parser.parse_args()
    sock = socket.create_server(
        ("::", args.port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=128
    )
    server = await asyncio.start_server(
        lambda r, w: serve_connection(r, w, args.log_dir), sock=sock
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
