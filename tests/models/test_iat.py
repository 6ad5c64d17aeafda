"""IAT (docs/iat.md): no instance token at or after the request time reaches a sample, the
user-order source model's SIT only reads the same user's earlier instances, Stage I -> tokens
-> Stage II end to end with the real Trainer (the store stays untouched), and the downstream
model with tokens, without them, and with every token masked."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from longrec.cli import app
from longrec.config import resolve
from longrec.data.dataset import PreparedDataset
from longrec.data.loader import BatchLoader, LoaderConfig
from longrec.data.token_store import TokenStore
from longrec.errors import UserError
from longrec.models import build_model
from longrec.models.iat import SourceInstanceTransformer
from longrec.train.iat import build_tokens
from longrec.train.loop import Trainer
from longrec.train.run_dir import load_run

SPLITS = ("train", "valid", "test")
REQUEST_TIME = 10_000_000  # target_ts of the synthetic model-test batches


def _model(name, schema, **params):
    torch.manual_seed(0)
    return build_model(name, schema, params or None)


# -- 1. no token at or after the request time ----------------------------------------------
def _synthetic_store(dataset: PreparedDataset, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """A token at every sample's own (user, request time), plus random extra times; the first
    token coordinate is the token's time (offset from the earliest), so alignment is checkable."""
    rng = np.random.default_rng(0)
    user = np.concatenate([dataset.split(s)["user"] for s in SPLITS]).astype(np.int64)
    ts = np.concatenate([dataset.split(s)["target_ts"] for s in SPLITS]).astype(np.int64)
    pick = rng.integers(0, len(user), size=3000)
    user = np.concatenate((user, user[pick]))
    ts = np.concatenate((ts, ts[pick] + rng.integers(-50_000, 50_000, size=len(pick))))
    t0 = int(ts.min())
    tokens = rng.normal(size=(len(user), 4)).astype(np.float32)
    tokens[:, 0] = ts - t0  # < 2^24: exact in float32
    label = rng.integers(0, 2, size=len(user)).astype(np.float32)
    TokenStore.write(root, dataset.n_users, user, ts, label, tokens, {"kind": "test"})
    return user, ts


@pytest.mark.parametrize("layout", ["pointwise", "request"])
def test_no_token_at_or_after_the_request_time(prepared_taobao, tmp_path, layout):
    dataset = PreparedDataset(prepared_taobao)
    user_all, ts_all = _synthetic_store(dataset, tmp_path / "tokens")
    t0 = int(ts_all.min())
    max_tokens = 8
    for split in SPLITS:
        loader = BatchLoader(
            dataset,
            split,
            LoaderConfig(
                batch_size=512,
                layout=layout,
                prefetch=0,
                token_store=str(tmp_path / "tokens"),
                max_tokens=max_tokens,
            ),
        )
        for i, batch in enumerate(loader):
            extra = batch.extra
            mask = extra["token_mask"]
            now = batch.target_ts[:, :1].expand_as(mask)
            # every real token is strictly earlier than the request: the sample's own token
            # (stored at exactly the request time, with its same-request siblings) never is
            assert (extra["token_ts"][mask] < now[mask]).all()
            assert (extra["tokens"][..., 0][mask] == (extra["token_ts"][mask] - t0).float()).all()
            assert (extra["tokens"][~mask] == 0).all() and (extra["token_label"][~mask] == 0).all()
            if i > 1:
                continue
            # the first batches against a naive per-row lookup: the most recent 8 before t
            for r in range(batch.batch_size):
                u, t = int(batch.user[r]), int(batch.target_ts[r, 0])
                own = ts_all[user_all == u]
                assert (own == t).any()  # the sample's own token is in the store...
                expect = np.sort(own[own < t])[-max_tokens:]
                got = extra["token_ts"][r][mask[r]].numpy()
                assert np.array_equal(got, expect)  # ...but not in its batch
                assert (got[1:] >= got[:-1]).all()  # time order, most recent last


# -- 2. the user-order SIT mask ------------------------------------------------------------
USERS = torch.tensor([3, 3, 5, 3, 5, 3, 3, 5])
TIMES = torch.tensor([10, 10, 5, 20, 7, 15, 30, 7])  # same-time siblings; 15 after 20 in order


def _allowed(i: int, j: int, window: int | None = None) -> bool:
    same_user = bool(USERS[i] == USERS[j])
    ok = same_user and j <= i and (bool(TIMES[j] < TIMES[i]) or i == j)
    if ok and window is not None:  # at most `window` of the user's instances back
        ok = _slot(i) - _slot(j) <= window
    return ok


def _slot(k: int) -> int:
    """How many of k's user's instances come before k in batch order."""
    return int((USERS[:k] == USERS[k]).sum())


@pytest.mark.parametrize("window", [None, 1])
def test_sit_reads_only_the_same_users_earlier_instances(window):
    torch.manual_seed(0)
    sit = SourceInstanceTransformer(dim=8, layers=2, heads=2, ffn_dim=16).eval()
    x = torch.randn(len(USERS), 8, requires_grad=True)
    out = sit(x, USERS, TIMES, window) @ torch.randn(8)  # (a plain sum of a LayerNorm is constant)
    for i in range(len(USERS)):
        (grad,) = torch.autograd.grad(out[i], x, retain_graph=True)
        reads = grad.abs().sum(-1) > 0
        expect = torch.tensor([_allowed(i, j, window) for j in range(len(USERS))])
        assert torch.equal(reads, expect), (i, reads, expect)


def _user_batch(schema, helpers, n_targets: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    hist = [rng.integers(2, 50, size=n) for n in (3, 7, 0, 12, 5, 9, 4, 6)]
    targets = [rng.integers(2, 50, size=n_targets) for _ in hist]
    batch = helpers["build_batch"](schema, hist, targets, rng, length=16, n_targets=n_targets)
    ts = (REQUEST_TIME + 1000 * TIMES).unsqueeze(1).expand(-1, n_targets).contiguous()
    return replace(batch, user=USERS.clone(), target_ts=ts)


def test_user_order_source_never_reads_a_later_or_foreign_row(helpers):
    schema = helpers["make_schema"](False)
    model = _model("iat_source_user", schema).eval()
    batch = _user_batch(schema, helpers)
    with torch.no_grad():
        base = model(batch)[:, 0]
        for k in range(len(USERS)):
            target = {f: v.clone() for f, v in batch.target.items()}
            target["item"][k] = 2 + (target["item"][k] + 7) % 48
            changed = model(replace(batch, target=target))[:, 0] != base
            expect = torch.tensor([_allowed(i, k) for i in range(len(USERS))])
            assert torch.equal(changed, expect), (k, changed, expect)


def test_user_order_request_layout_equals_pointwise(helpers):
    schema = helpers["make_schema"](False)
    model = _model("iat_source_user", schema).eval()
    batch = _user_batch(schema, helpers, n_targets=2)
    mask = batch.target_mask.clone()
    mask[1::3, 1] = False  # padded targets in some requests
    batch = replace(batch, target_mask=mask)
    with torch.no_grad():
        request = model(batch)
        pointwise = model(helpers["to_pointwise"](batch))[:, 0]
        garbage = model(helpers["with_target_garbage"](batch))
    torch.testing.assert_close(request[mask], pointwise, atol=1e-5, rtol=0)
    torch.testing.assert_close(request[mask], garbage[mask], atol=1e-5, rtol=0)
    assert (request[~mask] == 0).all() and (garbage[~mask] == 0).all()


def test_compress_is_pre_sit(helpers):
    """The stored token does not depend on the other instances of the batch."""
    schema = helpers["make_schema"](False)
    model = _model("iat_source_user", schema).eval()
    batch = _user_batch(schema, helpers)
    with torch.no_grad():
        together = model.compress(batch)
        alone = torch.cat([model.compress(_row(batch, r)) for r in range(batch.batch_size)])
    assert together.shape == (batch.batch_size, 1, 64)
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
    assert ((together > 0) & (together < 1)).all()  # sigmoid output


@pytest.mark.parametrize(
    "params", [{"head_input": "sit"}, {"head_bn": False, "sit_window": 2}, {"order": "temporal"}]
)
def test_source_options_run(helpers, params):
    schema = helpers["make_schema"](False)
    model = _model("iat_source_user", schema, **params).train()
    batch = _user_batch(schema, helpers, n_targets=2)
    logits, _ = model.forward_train(batch)
    logits[batch.target_mask].sum().backward()
    assert torch.isfinite(logits).all() and (logits[~batch.target_mask] == 0).all()
    assert (model.sit is None) == (params.get("order") == "temporal")


def _row(batch, r):
    def take(x):
        if x is None:
            return None
        if isinstance(x, dict):
            return {k: v[r : r + 1] for k, v in x.items()}
        return x[r : r + 1]

    return type(batch)(**{k: take(v) for k, v in vars(batch).items()})


# -- 3. Stage I -> tokens -> Stage II end to end ------------------------------------------
SHORT = [
    "train.batch_size=256",
    "train.max_steps=5",
    "train.eval_every=100",
    "train.progress=false",
    "train.threads=1",
    "data.prefetch=0",
    "data.max_len=50",
    "model.embed_dim=4",
    "model.token_dim=16",
]


def _hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def test_two_stages_end_to_end(prepared_taobao, tmp_path):
    source_cfg = resolve(
        None,
        [
            *SHORT,
            "data.order=user_time",
            "model.interaction=[32]",
            "model.decompress=[16]",
        ],
        data__path=str(prepared_taobao),
        model__name="iat_source_user",
    )
    source = Trainer(source_cfg, tmp_path / "source").fit()
    assert np.isfinite(source["test"]["auc"])

    tokens = tmp_path / "tokens"
    # the command in-process (a subprocess would spend most of the test importing torch)
    args = ["iat", "tokens", "--source-run", str(tmp_path / "source"), "--out", str(tokens)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert '"source_model": "iat_source_user"' in result.stdout
    with pytest.raises(UserError, match="already exists"):
        build_tokens(tmp_path / "source", tokens)

    dataset = PreparedDataset(prepared_taobao)
    store = TokenStore.open(tokens)
    n = {s: len(dataset.split(s)["label"]) for s in SPLITS}
    assert store.meta["count"] == len(store.ts) == sum(n.values())  # one token per sample
    assert store.meta["samples"] == n and store.meta["splits"] == list(SPLITS)
    assert store.meta["source_run"] == str((tmp_path / "source").resolve())
    assert store.meta["source_model"] == "iat_source_user" and store.dim == 16
    users = np.concatenate([dataset.split(s)["user"] for s in SPLITS])
    per_user = np.bincount(users, minlength=len(store.offsets) - 1)
    assert np.array_equal(np.diff(store.offsets), per_user)
    assert np.isfinite(store.tokens).all()
    assert ((np.asarray(store.tokens) > 0) & (np.asarray(store.tokens) < 1)).all()

    # the stored vectors are the source model's pre-SIT compression of those samples
    model, cfg, _ = load_run(tmp_path / "source")
    batch = next(
        iter(
            BatchLoader(
                dataset,
                "test",
                LoaderConfig(batch_size=16, max_len=cfg.data.max_len, layout="request"),
            )
        )
    )
    with torch.no_grad():
        compressed = model.compress(batch)
    for r in range(batch.batch_size):
        u, t = int(batch.user[r]), int(batch.target_ts[r, 0])
        lo, hi = store.offsets[u], store.offsets[u + 1]
        rows = np.asarray(store.tokens[lo:hi])[np.asarray(store.ts[lo:hi]) == t]
        for m in np.flatnonzero(batch.target_mask[r].numpy()):
            dist = np.abs(rows - compressed[r, m].numpy()).max(-1)
            assert dist.min() < 1e-5

    before = _hashes(tokens)
    downstream_cfg = resolve(
        None,
        [
            *SHORT,
            f"data.token_store={tokens}",
            "data.max_tokens=16",
            "model.dim=16",
            "model.adapt_dim=8",
            "model.side_dim=8",
            "model.query_hidden=16",
            "model.hidden=[16]",
        ],
        data__path=str(prepared_taobao),
        model__name="iat",
    )
    trainer = Trainer(downstream_cfg, tmp_path / "downstream")
    first = next(trainer.loader.iter_epoch(0))
    assert first.extra["token_mask"].any()  # the batches carry tokens
    metrics = trainer.fit()
    for split in ("valid", "test"):
        assert np.isfinite(metrics[split]["auc"]) and metrics[split]["n"] == n[split]
    assert _hashes(tokens) == before  # frozen: training never writes the store
    with pytest.raises(UserError, match="iat_source"):
        build_tokens(tmp_path / "downstream", tmp_path / "other")
    _served_with_tokens(prepared_taobao, tmp_path / "downstream", tokens, tmp_path / "history")


def _served_with_tokens(data: Path, run: Path, tokens: Path, history: Path) -> None:
    """The ranker feeds a served IAT model the user's tokens strictly before the request time,
    keys its cache by how many there are, and micro-batches users with different token counts
    exactly."""
    from longrec.data.vocab import load_vocab
    from longrec.serve.history import open_history
    from longrec.serve.load_history import load_history
    from longrec.serve.ranker import Ranker, RankerConfig, RankTimings, _Request

    dataset = PreparedDataset(data)
    store = open_history(f"lmdb://{history}", list(dataset.fields.values()))
    load_history(data, store)
    ranker = Ranker.from_run(run, history=store, config=RankerConfig(micro_batch=1))
    assert ranker.tokens is not None
    token_store = TokenStore.open(tokens)
    counts = np.diff(token_store.offsets)
    users = load_vocab(dataset.root, "user")
    raw = {i: u for u, i in users.items()}
    items = [k for k, v in load_vocab(dataset.root, "item").items() if v >= 2][:12]

    def offline(user: int, now: int, with_tokens: bool) -> np.ndarray:
        events, _ = store.recent(raw[user], ranker.max_len)
        extra = token_store.before(np.array([user]), np.array([now]), ranker.max_tokens)
        base = ranker.batches.history(events, now, extra=extra if with_tokens else None)
        idx = ranker.item_indices(items).view(1, -1)
        batch = ranker.batches.with_targets(
            base, idx, None, torch.tensor([now]), torch.ones_like(idx, dtype=torch.bool)
        )
        with torch.no_grad():
            return torch.sigmoid(ranker.model(batch))[0].numpy()

    u = int(np.argmax(counts))
    lo, hi = token_store.offsets[u], token_store.offsets[u + 1]
    late = int(token_store.ts[hi - 1]) + 1  # sees all of the user's tokens (up to max_tokens)
    early = int(token_store.ts[lo])  # strictly before the first token: none
    online = np.array(ranker.rank(raw[u], items, late))
    np.testing.assert_allclose(online, offline(u, late, True), rtol=1e-5, atol=1e-6)
    assert np.abs(online - offline(u, late, False)).max() > 1e-6  # the tokens matter
    np.testing.assert_allclose(
        ranker.rank(raw[u], items, early), offline(u, early, False), rtol=1e-5, atol=1e-6
    )
    hit = RankTimings()
    ranker.rank(raw[u], items, late + 1, timings=hit)  # same tokens: the cached state
    assert hit.cache_hit
    # users with different token counts in one micro-batch score as they do alone
    others = [int(x) for x in np.argsort(-counts)[1:3]]
    nows = [late] + [
        int(token_store.ts[token_store.offsets[x] + k]) for x, k in zip(others, (2, 6), strict=True)
    ]
    requests = [
        _Request(raw[x], items, t, None, RankTimings())
        for x, t in zip([u, *others], nows, strict=True)
    ]
    seen = {int(ranker._instance_tokens(r.user, r.now)[1]) for r in requests}
    assert len(seen) == 3, seen  # three token widths: the batch left-pads them
    alone = [ranker.rank(r.user, r.candidates, r.now) for r in requests]
    fresh = Ranker.from_run(run, history=store, config=RankerConfig(micro_batch=1, cache_bytes=0))
    for got, want in zip(fresh._rank_many(requests), alone, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    store.close()


# -- 4. the downstream model with and without tokens --------------------------------------
def _extra(batch, lengths, dim=64, width=6, seed=0):
    """Left-padded tokens strictly before the request time, `lengths[r]` real ones per row."""
    gen = torch.Generator().manual_seed(seed)
    b = batch.batch_size
    mask = torch.arange(width)[None, :] >= width - torch.tensor(lengths)[:, None]
    gaps = torch.randint(1, 100_000, (b, width), generator=gen).flip(1).cumsum(1).flip(1)
    return {
        "tokens": torch.rand(b, width, dim, generator=gen) * mask[..., None],
        "token_label": torch.randint(0, 2, (b, width), generator=gen).float() * mask,
        "token_mask": mask,
        "token_ts": (REQUEST_TIME - gaps) * mask,
    }


def _pad_extra(extra, more):
    def pad(x):
        return torch.cat((x.new_zeros(x.shape[0], more, *x.shape[2:]), x), dim=1)

    return {k: pad(v) for k, v in extra.items()}


def test_downstream_without_tokens_works(schema, batch, helpers):
    model = _model("iat", schema).eval()
    none = _extra(batch, [0] * batch.batch_size)
    none["tokens"] = torch.randn_like(none["tokens"])  # garbage under the mask
    with torch.no_grad():
        plain = model(batch)
        masked = model(replace(batch, extra=none))
    assert torch.isfinite(plain).all()
    torch.testing.assert_close(plain, masked, atol=1e-5, rtol=0)
    model.train()
    logits, _ = model.forward_train(replace(batch, extra=none))
    logits[batch.target_mask].sum().backward()
    assert model.label.weight.grad[0].abs().sum() > 0  # the null token trains


def test_downstream_reads_tokens_but_never_trains_them(schema, batch, helpers):
    model = _model("iat", schema).eval()
    extra = _extra(batch, [0, 6, 3, 1])
    with_tokens = replace(batch, extra=extra)
    with torch.no_grad():
        base = model(with_tokens)
        # extra left padding of the tokens changes nothing
        padded = model(replace(batch, extra=_pad_extra(extra, 5)))
        torch.testing.assert_close(base, padded, atol=1e-5, rtol=0)
        # the request and pointwise layouts agree with tokens too
        pointwise = model(helpers["to_pointwise"](with_tokens))[:, 0]
        torch.testing.assert_close(base[batch.target_mask], pointwise, atol=1e-5, rtol=0)
        # a real token, and its label side information, change the score of its row only
        for key, value in (
            ("tokens", 0.5),
            ("token_label", 1 - float(extra["token_label"][1, -1])),
        ):
            edited = {**extra, key: extra[key].clone()}
            edited[key][1, -1] = value
            out = model(replace(batch, extra=edited))
            assert not torch.allclose(out[1], base[1]), key
            torch.testing.assert_close(out[[0, 2, 3]], base[[0, 2, 3]], atol=1e-6, rtol=0)
        without = model(batch)
    assert not torch.allclose(without[1], base[1])
    # frozen: no gradient flows into the token tensor the loader hands over
    tokens = extra["tokens"].clone().requires_grad_(True)
    model.train()
    logits, _ = model.forward_train(replace(batch, extra={**extra, "tokens": tokens}))
    logits[batch.target_mask].sum().backward()
    assert tokens.grad is None
    assert model.adapt.weight.grad is not None and model.adapt.weight.grad.abs().sum() > 0


def test_downstream_token_width_must_match(schema, batch):
    model = _model("iat", schema, token_dim=32).eval()
    with pytest.raises(UserError, match=r"model\.token_dim=64"):
        model(replace(batch, extra=_extra(batch, [1, 2, 3, 4])))


@pytest.mark.parametrize("encoder", ["transformer", "none"])
def test_downstream_encoders_and_gap_option(schema, batch, encoder):
    model = _model("iat", schema, encoder=encoder, time_gap=encoder == "none").train()
    logits, _ = model.forward_train(replace(batch, extra=_extra(batch, [2, 6, 0, 4])))
    logits[batch.target_mask].sum().backward()
    assert torch.isfinite(logits).all()
    assert (model.gap is not None) == (encoder == "none")
