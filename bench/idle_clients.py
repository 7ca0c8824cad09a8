"""Open N keep-alive connections, send one request on each, then hold them open.

Run inside the client namespace by bench/measure.py::

    python idle_clients.py HOST PORT PATH N HOLD_SECONDS

Prints one JSON line once every connection got its response (or failed):
``{"open": n, "failed": m, "errors": {...}, "seconds": s}``. Then it holds the
connections until its standard input closes (or HOLD_SECONDS pass) and exits.
Standard library only.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import resource
import select
import sys
import time

CONCURRENT_OPENS = 256  # connections being opened at any moment
STEP_TIMEOUT = 30.0  # seconds for each of connect, response head, response body


async def _open_one(
    host: str,
    port: int,
    request: bytes,
    gate: asyncio.Semaphore,
    held: list,
    errors: collections.Counter,
) -> None:
    async with gate:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), STEP_TIMEOUT
            )
        except (TimeoutError, OSError) as e:
            errors[f"connect: {type(e).__name__}"] += 1
            return
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_TIMEOUT)
            if not head.startswith(b"HTTP/1.1 200"):
                errors[f"status: {head.split(b' ', 2)[1].decode(errors='replace')}"] += 1
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await asyncio.wait_for(reader.readexactly(length), STEP_TIMEOUT)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
            errors[f"response: {type(e).__name__}"] += 1
            writer.close()
            return
        held.append(writer)


async def _open_all(host: str, port: int, path: str, count: int) -> tuple[list, dict]:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    gate = asyncio.Semaphore(CONCURRENT_OPENS)
    held: list = []
    errors: collections.Counter = collections.Counter()
    await asyncio.gather(
        *(_open_one(host, port, request, gate, held, errors) for _ in range(count))
    )
    return held, dict(errors)


def main() -> None:
    host, port, path, count, hold = sys.argv[1:6]
    count_n = int(count)
    want = count_n + 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    start = time.monotonic()
    held, errors = asyncio.run(_open_all(host, int(port), path, count_n))
    report = {
        "open": len(held),
        "failed": count_n - len(held),
        "errors": errors,
        "seconds": round(time.monotonic() - start, 2),
    }
    print(json.dumps(report), flush=True)
    # Hold every connection open (the sockets stay referenced by `held`) until
    # told to stop, or the deadline.
    select.select([sys.stdin], [], [], float(hold))
    os._exit(0)


if __name__ == "__main__":
    main()
