"""The serving benchmark's load generator against a real server: every request is answered and
counted by status, and a dropped connection is an error, not a hang."""

import json
import subprocess
import sys
import threading
import time

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from longrec.bench.serve import _free_port


async def rank(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse({"echo": body["n"]}, status_code=200 if body["n"] % 3 else 503)


def _serve(app) -> tuple[uvicorn.Server, int]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    return server, port


def test_load_generator_counts_every_answer_by_status(tmp_path):
    server, port = _serve(Starlette(routes=[Route("/v1/rank", rank, methods=["POST"])]))
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(90)))
    cmd = [sys.executable, "-m", "longrec.bench.load", "--port", str(port), "--bodies", str(bodies)]
    try:
        done = subprocess.run(
            [*cmd, "--concurrency", "4", "--warmup", "6"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.should_exit = True
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["requests"] == 90
    # bodies 0, 3, 6, ... answer 503: 30 of 90
    assert result["statuses"] == {"200": 60, "503": 30}
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert result["requests_per_s"] > 0
