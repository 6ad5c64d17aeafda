"""HTTP load generator for the serving benchmark, run in its own process.

A client in the server's process competes with it for the GIL, so it measures the client as
much as the server: the in-process httpx clients capped the earlier serving figures. This one
runs as `python -m longrec.bench.load` in a separate process, keeps one HTTP/1.1 keep-alive
connection per simulated client on asyncio (uvloop when installed), sends request bytes encoded
before the clock starts, and reads only the status line, headers and body length of each
answer, so that a client costs tens of microseconds per request.

    python -m longrec.bench.load --port 8000 --bodies bodies.jsonl --concurrency 16
    -> one JSON line: requests, seconds, requests_per_s, p50_ms, p99_ms, statuses
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np


def encode_request(host: str, port: int, path: str, body: bytes, token: str | None) -> bytes:
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if token:
        head.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """The status code of one response (its body is read and dropped)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def _client(
    host: str, port: int, requests: list[bytes], latencies: list[float], statuses: dict
) -> None:
    """One keep-alive connection sending `requests` in turn; a dropped connection counts as an
    "error" answer and is opened again."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for request in requests:
            t0 = time.perf_counter()
            try:
                writer.write(request)
                status: int | str = await _read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                status = "error"
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def run_load(
    host: str,
    port: int,
    bodies: list[bytes],
    concurrency: int,
    path: str = "/v1/rank",
    token: str | None = None,
    warmup: int = 0,
) -> dict:
    """Send `bodies` from `concurrency` connections (client i sends bodies i, i + c, ...);
    `warmup` requests go first, one connection, unmeasured."""
    encoded = [encode_request(host, port, path, b, token) for b in bodies]
    if warmup:
        await _client(host, port, encoded[:warmup], [], {})
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    t0 = time.perf_counter()
    await asyncio.gather(
        *(
            _client(host, port, encoded[i::concurrency], latencies, statuses)
            for i in range(concurrency)
        )
    )
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    return {
        "requests": len(lat),
        "seconds": round(wall, 3),
        "requests_per_s": round(len(lat) / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p90_ms": round(float(np.percentile(lat, 90)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "max_ms": round(float(lat.max()), 2),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bodies", type=Path, required=True, help="JSON lines, one body each")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--path", default="/v1/rank")
    parser.add_argument("--token", default=None)
    parser.add_argument("--warmup", type=int, default=0)
    args = parser.parse_args(argv)
    bodies = [line.encode() for line in args.bodies.read_text().splitlines() if line.strip()]
    load = run_load(
        args.host, args.port, bodies, args.concurrency, args.path, args.token, args.warmup
    )
    try:
        import uvloop

        result = uvloop.run(load)
    except ImportError:
        result = asyncio.run(load)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
