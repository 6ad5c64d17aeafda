"""HTTP API of the ranker (FastAPI): rank candidates, append events, health, metrics.

    POST /v1/rank    {"user": "42", "candidates": ["1", "2"], "now": 1700000000}
                     -> {"scores": [...], ...} in candidate order
    POST /v1/events  {"user": "42", "events": [{"item": "7", "ts": 1700000000, ...}]}
    GET  /healthz    GET /metrics (Prometheus text)

Bad input never yields a 500: malformed JSON is 400, a body over the size limit 413, too many
candidates or a field of the wrong type 422, each with a message naming the problem. An
optional bearer token guards every route but /healthz.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Annotated

import numpy as np
import orjson
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from longrec.data.schema import UNSEEN
from longrec.data.vocab import load_vocab
from longrec.errors import UserError
from longrec.serve.ranker import Ranker, RankTimings

MAX_TS = 2**40  # unix seconds; anything larger is not a time


def _id_bytes(value: str) -> str:
    """The history store keys users by their UTF-8 bytes: bounded, and NUL is its separator."""
    if len(value.encode("utf-8")) > 256:
        raise ValueError("id must be at most 256 bytes of UTF-8")
    return value


Id = Annotated[
    Annotated[
        str, Field(min_length=1, max_length=256, pattern=r"^[^\x00]+$"), AfterValidator(_id_bytes)
    ]
    | int,
    Field(description="raw id as in the training logs"),
]


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user: Id
    candidates: list[Id] = Field(min_length=1, description="item ids to score")
    now: int | None = Field(
        None, ge=0, le=MAX_TS, description="request time, unix seconds (default: now)"
    )
    target_types: list[str] | None = Field(
        None, description="advertising target type per candidate"
    )


class RankResponse(BaseModel):
    user: str
    scores: list[float]
    cache_hit: bool
    history_len: int
    timings_ms: dict[str, float]


class Event(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    item: Id
    ts: int = Field(ge=0, le=MAX_TS, description="unix seconds")


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user: Id
    events: list[Event] = Field(min_length=1)


class EventsResponse(BaseModel):
    user: str
    appended: int
    version: int


class BodyLimit:
    """ASGI middleware: reject bodies over `limit` bytes with 413 before they are read whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(send, self.limit)
        seen, over = 0, False

        async def limited():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise _BodyTooLarge
            return message

        async def unless_over(message):
            # a streamed (chunked) body goes over while the app parses it: the app answers
            # that with its own error, which is dropped here for the 413
            if not over:
                await send(message)

        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, limited, unless_over)
        if over:
            await _too_large(send, self.limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"detail": f"request body larger than {limit} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def create_app(
    ranker: Ranker, token: str | None = None, max_body_bytes: int = 1 << 20, docs: bool = False
) -> FastAPI:
    """`docs`: serve /docs, /redoc and /openapi.json (off by default; behind the token when
    one is set, like every route but /healthz)."""
    app = FastAPI(
        title="longrec ranker",
        version="1",
        description=__doc__,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    registry = CollectorRegistry()
    requests = Counter("longrec_requests", "HTTP requests", ["route", "status"], registry=registry)
    latency = Histogram(
        "longrec_request_seconds",
        "request latency",
        ["route"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    )
    hit_rate = Gauge(
        "longrec_user_cache_hit_ratio", "user-state cache hit ratio", registry=registry
    )
    cache_entries = Gauge("longrec_user_cache_entries", "user states cached", registry=registry)
    batch_size = Histogram(
        "longrec_microbatch_requests",
        "size of the forward pass (micro-batch) each rank request was answered by",
        registry=registry,
        buckets=(1, 2, 4, 8, 16, 32),
    )
    event_encoder = EventEncoder(ranker)

    async def auth(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is not None and authorization != f"Bearer {token}":
            raise HTTPException(status_code=401, detail="missing or wrong bearer token")

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(status_code=400, content={"detail": "malformed JSON body"})
        parts = [
            f"{'.'.join(str(x) for x in e.get('loc', []) if x != 'body')}: {e.get('msg')}"
            for e in errors[:5]
        ]
        return JSONResponse(status_code=422, content={"detail": "; ".join(parts)})

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.post("/v1/rank", response_model=RankResponse, dependencies=[Depends(auth)])
    async def rank(req: RankRequest) -> Response:
        if len(req.candidates) > ranker.config.max_candidates:
            raise HTTPException(
                status_code=413,
                detail=f"{len(req.candidates)} candidates; at most {ranker.config.max_candidates}",
            )
        if req.target_types is not None and len(req.target_types) != len(req.candidates):
            raise HTTPException(
                status_code=422, detail="target_types must have one entry per candidate"
            )
        timings = RankTimings()
        scores = await ranker.rank_async(
            str(req.user), [str(c) for c in req.candidates], req.now, req.target_types, timings
        )
        batch_size.observe(timings.extra.get("batch", 1))
        stats = ranker.cache.stats
        hit_rate.set(stats.hits / max(1, stats.hits + stats.misses))
        cache_entries.set(stats.entries)
        # RankResponse's fields, encoded directly: validating 1,000 floats that the ranker
        # produced would only cost time
        body = {
            "user": str(req.user),
            "scores": scores,
            "cache_hit": timings.cache_hit,
            "history_len": timings.history_len,
            "timings_ms": {
                "fetch": timings.fetch_ms,
                "encode": timings.encode_ms,
                "score": timings.score_ms,
            },
        }
        return Response(orjson.dumps(body), media_type="application/json")

    @app.post("/v1/events", response_model=EventsResponse, dependencies=[Depends(auth)])
    def events(req: EventsRequest) -> EventsResponse:
        if len(req.events) > 10_000:
            raise HTTPException(status_code=413, detail="at most 10000 events per request")
        encoded = event_encoder.encode(req.events)
        try:
            version = ranker.history.append(str(req.user), encoded)
        except ValueError as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        return EventsResponse(user=str(req.user), appended=len(req.events), version=version)

    @app.get("/healthz")
    def healthz() -> dict:
        return {
            "status": "ok",
            "model": ranker.run_cfg.model.name,
            "max_len": ranker.max_len,
            "device": str(ranker.runtime.device),
            "precision": "bf16" if ranker.bf16 else "fp32",
            "bf16": ranker.bf16,
        }

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(auth)])
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    observed = Observe(app, requests, latency, token)
    return BodyLimit(observed, max_body_bytes)


class Observe:
    """ASGI middleware: count and time every request by its route template (never the raw
    path: a client cannot grow the label set), and guard the documentation routes with the
    token. Plain ASGI rather than `@app.middleware`: that wrapper runs each request through an
    extra task and memory streams, a cost paid on every rank request."""

    def __init__(self, app, requests: Counter, latency: Histogram, token: str | None):
        self.app, self.requests, self.latency, self.token = app, requests, latency, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500  # an exception escaping the app is answered with a 500

        async def observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if (
                self.token is not None
                and scope["path"] in DOC_PATHS
                and not self._authorised(scope)
            ):
                await JSONResponse(
                    status_code=401, content={"detail": "missing or wrong bearer token"}
                )(scope, receive, observed)
            else:
                await self.app(scope, receive, observed)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.requests.labels(route, str(status)).inc()
            self.latency.labels(route).observe(time.perf_counter() - t0)

    def _authorised(self, scope) -> bool:
        wanted = f"Bearer {self.token}".encode()
        return any(k == b"authorization" and v == wanted for k, v in scope.get("headers") or [])


class EventEncoder:
    """Raw event fields -> vocabulary indices in the history store's layout. Item-side fields
    not given come from the item tables; unknown values become "unseen" (index 1)."""

    def __init__(self, ranker: Ranker):
        self.ranker = ranker
        root = ranker.dataset_root
        self.vocabs = {}
        for name in ranker.schema.fields:
            try:
                self.vocabs[name] = load_vocab(root, name)
            except FileNotFoundError:
                self.vocabs[name] = {}
        self.tables = {k: v.numpy() for k, v in ranker.item_tables_all.items()}

    def encode(self, events: list[Event]) -> dict[str, np.ndarray]:
        n = len(events)
        items = np.array(
            [self.vocabs["item"].get(str(e.item), UNSEEN) for e in events], dtype=np.int64
        )
        out: dict[str, np.ndarray] = {"ts": np.array([e.ts for e in events], dtype=np.int64)}
        for name, spec in self.ranker.schema.fields.items():
            if name == "item":
                out[name] = items.astype(np.int32)
                continue
            if spec.width > 1:
                col = np.zeros((n, spec.width), dtype=np.int32)
                for i, e in enumerate(events):
                    values = (e.model_extra or {}).get(name)
                    if isinstance(values, list):
                        ids = [self.vocabs[name].get(str(v), UNSEEN) for v in values[: spec.width]]
                        col[i, : len(ids)] = ids
                    elif name in self.tables:
                        col[i] = self.tables[name][min(items[i], len(self.tables[name]) - 1)]
                out[name] = col
                continue
            extra = [(e.model_extra or {}).get(name) for e in events]
            col = np.array(
                [self.vocabs[name].get(str(v), UNSEEN) if v is not None else -1 for v in extra],
                dtype=np.int64,
            )
            missing = col < 0
            if missing.any():
                if name in self.tables:
                    table = self.tables[name]
                    col[missing] = table[np.minimum(items[missing], len(table) - 1)]
                else:
                    col[missing] = UNSEEN
            out[name] = col.astype(np.int32)
        order = np.argsort(out["ts"], kind="stable")
        return {k: v[order] for k, v in out.items()}
