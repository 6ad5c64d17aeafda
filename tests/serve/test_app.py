"""The ranker over real HTTP (uvicorn on 127.0.0.1) with a tiny model trained on the bundled
Taobao sample: scores equal the offline model's, bad input never gives a 500."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from longrec.bench.serve import Server
from longrec.config import resolve
from longrec.data.batch import Batch
from longrec.data.dataset import PreparedDataset
from longrec.data.vocab import load_vocab
from longrec.ops import dispatch
from longrec.runtime import resolve_precision
from longrec.serve.app import create_app
from longrec.serve.history import open_history
from longrec.serve.load_history import load_history
from longrec.serve.ranker import Ranker, RankerConfig
from longrec.train.loop import Trainer

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def served(prepared_taobao, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cfg = resolve(
        None,
        ["train.max_steps=8", "train.batch_size=256", "train.progress=false", "train.eval_every=8"],
        data__path=str(prepared_taobao),
        model__name="dare",
    )
    Trainer(cfg, root / "run").fit()
    url = f"lmdb://{root / 'history'}"
    ds = PreparedDataset(prepared_taobao)
    store = open_history(url, list(ds.fields.values()))
    load_history(prepared_taobao, store)
    ranker = Ranker.from_run(root / "run", history=store, config=RankerConfig(max_candidates=50))
    app = create_app(ranker, token=TOKEN, max_body_bytes=64 * 1024, docs=True)
    with Server(app) as base:
        client = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        )
        yield {"client": client, "ranker": ranker, "dataset": ds, "base": base, "run": root / "run"}
        client.close()


def _offline_scores(
    ranker: Ranker, ds: PreparedDataset, user_index: int, items: list[int], now: int
) -> np.ndarray:
    """The model on a batch built from the prepared dataset directly (not through the server)."""
    store = ds.store
    lo, hi = int(store.offsets[user_index]), int(store.offsets[user_index + 1])
    lo = max(lo, hi - ranker.max_len)
    n = hi - lo
    length = -(-n // 8) * 8
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, length - n :] = True
    hist = {}
    for f in ranker.fields:
        t = torch.zeros(1, length, dtype=torch.int32)
        t[0, length - n :] = torch.from_numpy(np.asarray(store.fields[f][lo:hi], dtype=np.int32))
        hist[f] = t
    ts = torch.zeros(1, length, dtype=torch.int64)
    ts[0, length - n :] = torch.from_numpy(np.asarray(store.ts[lo:hi]))
    item = torch.tensor([items])
    target = {
        "item": item,
        "category": torch.from_numpy(ds.item_tables["category"][item.numpy()]).long(),
    }
    m = len(items)
    batch = Batch(
        torch.tensor([user_index]),
        hist,
        mask,
        ts,
        target,
        torch.full((1, m), now),
        torch.zeros(1, m),
        torch.ones(1, m, dtype=torch.bool),
    )
    with torch.no_grad():
        return torch.sigmoid(ranker.model(batch))[0].numpy()


def test_scores_equal_the_offline_model(served):
    ds, ranker, client = served["dataset"], served["ranker"], served["client"]
    users = load_vocab(ds.root, "user")
    items = load_vocab(ds.root, "item")
    raw_user = next(
        u
        for u, i in users.items()
        if i >= 2 and ds.store.offsets[i + 1] - ds.store.offsets[i] > 100
    )
    u = users[raw_user]
    raw_items = [*[k for k, v in items.items() if v >= 2][:20], "no-such-item"]
    now = int(ds.store.ts[ds.store.offsets[u + 1] - 1]) + 60
    r = client.post("/v1/rank", json={"user": raw_user, "candidates": raw_items, "now": now})
    assert r.status_code == 200, r.text
    online = np.array(r.json()["scores"])
    idx = [items.get(c, 1) for c in raw_items]
    offline = _offline_scores(ranker, ds, u, idx, now)
    assert online.shape == (21,)
    np.testing.assert_allclose(online, offline, rtol=1e-5, atol=1e-6)


def test_cache_hit_then_invalidated_by_an_event(served):
    client = served["client"]
    users = load_vocab(served["dataset"].root, "user")
    raw_user = next(u for u, i in users.items() if i >= 2)
    body = {"user": raw_user, "candidates": ["1", "2"], "now": 1_600_000_000}
    client.post("/v1/rank", json=body)
    assert client.post("/v1/rank", json=body).json()["cache_hit"] is True
    r = client.post(
        "/v1/events",
        json={
            "user": raw_user,
            "events": [{"item": "2268318", "ts": 1_600_000_000 - 5, "behavior": "pv"}],
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["appended"] == 1
    after = client.post("/v1/rank", json=body).json()
    assert after["cache_hit"] is False


def test_unknown_user_gets_an_empty_history_and_scores(served):
    r = served["client"].post("/v1/rank", json={"user": "nobody-ever", "candidates": ["1", "x"]})
    assert r.status_code == 200
    assert r.json()["history_len"] == 0 and len(r.json()["scores"]) == 2


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b'{"user": "1", "candidates": []}', 422),
        (b'{"user": "1"}', 422),
        (b'{"user": "1", "candidates": ["1"], "now": "yesterday"}', 422),
        (b'{"user": "1", "candidates": ["1"], "surprise": 1}', 422),
        (b'{"user": {"a": 1}, "candidates": ["1"]}', 422),
        (b'{"user": true, "candidates": ["1"]}', 422),
        (b'{"user": "1", "candidates": [false]}', 422),
        (b'{"user": "1", "candidates": ["1"], "now": "1700000000"}', 422),
        (b'{"user": "1", "candidates": ["1", "2"], "target_types": ["a"]}', 422),
    ],
)
def test_bad_rank_requests_are_4xx_with_a_message(served, body, status):
    r = served["client"].post(
        "/v1/rank", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert r.json()["detail"]


def test_too_many_candidates_and_too_large_bodies_are_413(served):
    client = served["client"]
    r = client.post("/v1/rank", json={"user": "1", "candidates": [str(i) for i in range(51)]})
    assert r.status_code == 413 and "at most 50" in r.json()["detail"]
    big = {"user": "1", "candidates": ["x" * 1000] * 100}
    assert client.post("/v1/rank", json=big).status_code == 413

    def chunks():  # no content-length: the limit must hold while the body streams in
        yield b'{"user": "1", "candidates": ['
        for _ in range(100):
            yield b'"' + b"x" * 1000 + b'", '
        yield b'"1"]}'

    r = client.post("/v1/rank", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text


def test_bad_events_are_422(served):
    client = served["client"]
    assert (
        client.post("/v1/events", json={"user": "1", "events": [{"item": "1"}]}).status_code == 422
    )
    assert (
        client.post(
            "/v1/events", json={"user": "1", "events": [{"item": "1", "ts": -5}]}
        ).status_code
        == 422
    )
    assert client.post("/v1/events", json={"user": "1", "events": []}).status_code == 422


def test_bearer_token_is_required(served):
    r = httpx.post(f"{served['base']}/v1/rank", json={"user": "1", "candidates": ["1"]})
    assert r.status_code == 401
    assert httpx.get(f"{served['base']}/healthz").status_code == 200


def test_health_says_where_and_in_which_precision_it_scores(served):
    health = served["client"].get("/healthz").json()
    assert health["device"] == "cpu" and health["precision"] == "fp32"  # the served default
    assert health["bf16"] is False


def test_precision_bf16_scores_within_tolerance_or_is_dropped(served):
    ds, run, store = served["dataset"], served["run"], served["ranker"].history
    users = [u for u, i in load_vocab(ds.root, "user").items() if i >= 2][:3]
    items = [k for k, v in load_vocab(ds.root, "item").items() if v >= 2][:30]
    now = int(ds.store.ts[-1]) + 60

    def ranker(**options) -> Ranker:
        config = RankerConfig(micro_batch=1, cache_bytes=0, device="cpu", **options)
        return Ranker.from_run(run, history=store, config=config)

    fp32, bf16 = ranker(precision="fp32"), ranker(precision="bf16")
    assert not fp32.bf16 and bf16.bf16 and bf16.runtime.precision == "bf16"
    assert 0 < bf16.bf16_max_error <= 0.01
    for user in users:
        low, ref = bf16.rank(user, items, now), fp32.rank(user, items, now)
        np.testing.assert_allclose(low, ref, atol=0.02)
        assert low != ref  # really scored in bf16
    strict = ranker(precision="bf16", bf16_tolerance=0.0)  # calibration error above tolerance
    assert strict.runtime.precision == "bf16" and not strict.bf16
    assert strict.rank(users[0], items, now) == fp32.rank(users[0], items, now)
    auto = ranker(precision="auto")
    assert auto.runtime.precision == resolve_precision("auto", torch.device("cpu"))[0]


def test_the_ranker_scores_the_same_under_both_kernels_settings(served):
    """RankerConfig.kernels (`longrec serve --kernels`, ops.dispatch): C++ or PyTorch ops give
    the same scores to float rounding."""
    ds, run, store = served["dataset"], served["run"], served["ranker"].history
    user = next(u for u, i in load_vocab(ds.root, "user").items() if i >= 2)
    items = [k for k, v in load_vocab(ds.root, "item").items() if v >= 2][:30]
    now = int(ds.store.ts[-1]) + 60
    scores = {}
    for kernels in ("native", "reference"):
        config = RankerConfig(micro_batch=1, cache_bytes=0, device="cpu", kernels=kernels)
        ranker = Ranker.from_run(run, history=store, config=config)
        assert dispatch.kernels() == kernels
        scores[kernels] = ranker.rank(user, items, now)
    np.testing.assert_allclose(scores["native"], scores["reference"], rtol=1e-5, atol=1e-6)


def test_metrics_are_prometheus_text(served):
    client = served["client"]
    client.post("/v1/rank", json={"user": "1", "candidates": ["1"]})
    text = client.get("/metrics").text
    for name in (
        "longrec_requests_total",
        "longrec_request_seconds_bucket",
        "longrec_user_cache_hit_ratio",
    ):
        assert name in text


def test_metrics_labels_are_route_templates_not_raw_paths(served):
    client = served["client"]
    for i in range(3):
        assert client.get(f"/no/such/path-{i}-zz").status_code == 404
    text = client.get("/metrics").text
    assert "path-0-zz" not in text and 'route="unmatched"' in text
    assert 'route="/v1/rank"' in text


def test_docs_follow_the_token_rule(served):
    base = served["base"]
    for path in ("/openapi.json", "/docs"):
        assert httpx.get(f"{base}{path}").status_code == 401
        assert served["client"].get(path).status_code == 200


def test_openapi_schema_never_gives_a_500(served):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(
        f"{served['base']}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    failures: list[tuple] = []
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:200]))

        check()
        checked += 1
    assert checked >= 4  # rank, events, healthz, metrics
    assert not failures, failures


def test_the_readme_curl_example_works_as_printed(served, repo_root):
    import json
    import shlex
    import subprocess

    lines = (repo_root / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("curl "))
    command = lines[start]
    while command.endswith("\\"):
        start += 1
        command = command[:-1] + lines[start]
    args = shlex.split(command.replace("localhost:8000", served["base"]))
    args += ["-H", f"Authorization: Bearer {TOKEN}", "-w", "\\n%{http_code}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=30).stdout
    body, status = out.rsplit("\n", 1)
    assert status == "200", body
    assert len(json.loads(body)["scores"]) == 2
