"""The serving benchmark's load generator against a real server: every request is answered and
counted by status, and a dropped connection is an error, not a hang."""

import json
import subprocess
import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from longrec.bench.serve import Server


async def rank(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse({"echo": body["n"]}, status_code=200 if body["n"] % 3 else 503)


def test_load_generator_counts_every_answer_by_status(tmp_path):
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(90)))
    with Server(Starlette(routes=[Route("/v1/rank", rank, methods=["POST"])])) as base:
        port = base.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "longrec.bench.load", "--port", port, "--bodies", str(bodies)]
        done = subprocess.run(
            [*cmd, "--concurrency", "4", "--warmup", "6"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["requests"] == 90
    # bodies 0, 3, 6, ... answer 503: 30 of 90
    assert result["statuses"] == {"200": 60, "503": 30}
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert result["requests_per_s"] > 0
