"""The training loop end to end on the bundled real data: it learns, it resumes exactly, the
run directory is complete, compare is resumable, and the metrics are right."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from longrec.config import resolve
from longrec.train import run_dir as rd
from longrec.train.compare import run_compare
from longrec.train.loop import Trainer, masked_bce
from longrec.train.metrics import gauc
from longrec.train.run_dir import load_run

SHORT = ["train.batch_size=256", "train.eval_every=20", "train.progress=false", "data.prefetch=0"]


def _cfg(data, model="dare", extra=()):
    return resolve(None, [*SHORT, *extra], data__path=str(data), model__name=model)


@pytest.mark.slow
def test_dare_learns_on_real_taobao(prepared_taobao, tmp_path):
    # measured: DARE reaches test AUC ~0.83 after 3 epochs (make demo); 1 epoch gives ~0.78
    metrics = Trainer(_cfg(prepared_taobao, extra=["train.epochs=1"]), tmp_path / "run").fit()
    assert metrics["test"]["auc"] > 0.70
    assert metrics["valid"]["auc"] > 0.70
    for name in (rd.CONFIG, rd.WEIGHTS, rd.STATE, rd.METRICS, rd.LOG):
        assert (tmp_path / "run" / name).exists(), name
    state = torch.load(tmp_path / "run" / rd.STATE, weights_only=True)  # weights_only-loadable
    assert state["step"] == metrics["train"]["steps"]


@pytest.mark.parametrize(
    ("embed_optimizer", "precision"),
    [("adam", "auto"), ("rowwise_adam", "auto"), ("rowwise_adagrad", "auto"), ("adam", "bf16")],
)
def test_resume_gives_identical_metrics(prepared_taobao, tmp_path, embed_optimizer, precision):
    """Also with the row-wise optimiser: its sparse table gradients and lazy moments must come
    back from state.pt exactly; and under bf16 autocast."""
    extra = ["train.max_steps=30", "train.eval_every=10", "model.embed_dim=8", "model.pos_dim=8"]
    extra += [f"train.embed_optimizer={embed_optimizer}", f"train.precision={precision}"]
    straight = Trainer(_cfg(prepared_taobao, extra=extra), tmp_path / "a").fit()

    class Interrupt(Exception):
        pass

    def stop_at_17(step):
        if step == 17:  # after the checkpoint at step 10, before the one at 20
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(_cfg(prepared_taobao, extra=extra), tmp_path / "b", callbacks=[stop_at_17]).fit()
    assert torch.load(tmp_path / "b" / rd.STATE, weights_only=True)["step"] == 10
    resumed = Trainer(_cfg(prepared_taobao, extra=extra), tmp_path / "b").fit(resume=True)
    for split in ("valid", "test"):
        for key in ("auc", "gauc", "logloss"):
            assert resumed[split][key] == pytest.approx(straight[split][key], abs=1e-9), (
                split,
                key,
            )
    assert resumed["train"]["steps"] == straight["train"]["steps"] == 30


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    ("device", "precision"),
    [("cpu", "auto"), ("cpu", "bf16"), pytest.param("cuda", "auto", marks=CUDA)],
)
def test_loaded_run_scores_like_the_trained_model(prepared_taobao, tmp_path, device, precision):
    """On the chosen device and precision end to end; the run records what they resolved to."""
    sets = ["train.max_steps=5", f"train.device={device}", f"train.precision={precision}"]
    trainer = Trainer(_cfg(prepared_taobao, "twin", sets), tmp_path / "r")
    metrics = trainer.fit()
    rt = trainer.runtime
    assert rt.device.type == device and next(trainer.model.parameters()).device == rt.device
    if precision != "auto":
        assert rt.precision == precision
    assert metrics["train"]["device"] == str(rt.device)
    assert metrics["train"]["precision"] == rt.precision
    assert 0.0 < metrics["test"]["auc"] < 1.0 and np.isfinite(metrics["test"]["logloss"])
    log = [json.loads(line) for line in (tmp_path / "r" / rd.LOG).read_text().splitlines()]
    assert {"step": 0, **rt.record()} in log
    model, _, _ = load_run(tmp_path / "r", device=rt.device)
    from longrec.data.loader import BatchLoader, LoaderConfig

    batch = next(
        iter(BatchLoader(trainer.dataset, "test", LoaderConfig(batch_size=64, layout="request")))
    )
    batch = rt.put(batch)
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(batch), trainer.model(batch))


def test_compare_is_resumable(prepared_taobao, tmp_path):
    base = _cfg(
        prepared_taobao, extra=["train.max_steps=3", "model.embed_dim=4", "model.pos_dim=4"]
    )
    records = run_compare(base, ["din", "dare"], [1, 2], tmp_path, log=lambda m: None)
    assert len(records) == 2 * 2 * 2  # models x seeds x (valid, test)
    assert {r["model"] for r in records} == {"din", "dare"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(records))
    stamp = (tmp_path / "runs" / "dare-seed1" / rd.METRICS).stat().st_mtime_ns
    log: list[str] = []
    again = run_compare(base, ["din", "dare"], [1, 2], tmp_path, log=log.append)
    assert all("reusing" in line for line in log)
    assert (tmp_path / "runs" / "dare-seed1" / rd.METRICS).stat().st_mtime_ns == stamp
    assert again == records


def test_per_user_loss_equals_mean_when_requests_are_equal():
    logits = torch.randn(4, 3)
    labels = torch.randint(0, 2, (4, 3)).float()
    mask = torch.ones(4, 3, dtype=torch.bool)
    assert torch.allclose(
        masked_bce(logits, labels, mask, "mean"), masked_bce(logits, labels, mask, "per_user")
    )
    mask[0, 1:] = False  # user 0 has one target: per-user weighting gives it a full share
    per_user = masked_bce(logits, labels, mask, "per_user")
    full = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    expected = (full[0, 0] + full[1:].mean(1).sum()) / 4
    assert torch.allclose(per_user, expected)


def test_gauc_matches_a_per_user_loop():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 30, 600)
    labels = rng.integers(0, 2, 600)
    scores = np.round(rng.random(600), 1)  # many ties
    value, used, skipped = gauc(users, labels, scores)
    num = den = 0.0
    n_used = n_skipped = 0
    for u in np.unique(users):
        sel = users == u
        if len(np.unique(labels[sel])) < 2:
            n_skipped += 1
            continue
        num += sel.sum() * roc_auc_score(labels[sel], scores[sel])
        den += sel.sum()
        n_used += 1
    assert value == pytest.approx(num / den)
    assert (used, skipped) == (n_used, n_skipped)


def test_adam_is_fused_and_steps_like_the_reference():
    from longrec.config import TrainConfig
    from longrec.train.optim import build_optimizers

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    model.embedding_parameters = lambda: []
    (opt,) = build_optimizers(model, TrainConfig(lr=0.05))
    assert opt.defaults["fused"] is True
    ref_model = torch.nn.Linear(8, 3)
    ref_model.load_state_dict(model.state_dict())
    ref = torch.optim.Adam(ref_model.parameters(), lr=0.05, foreach=False)
    x = torch.randn(16, 8)
    for _ in range(3):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
