"""Search-stage cost against the attention dimension (DARE §3.5, Fig. 11): scoring every
behaviour with attention embeddings and taking the top k, timed at d_A = 128, 64, 32, 16."""

from __future__ import annotations

import torch

from longrec.bench.common import median_ms
from longrec.nn.attention import dot_scores
from longrec.nn.search import topk_search


def soft_search(query, keys, mask, top_k):
    """The soft search stage alone: dot-product scores over the history, then top-k."""
    return topk_search(dot_scores(query, keys), mask, top_k)


def bench_search_dims(
    dims=(128, 64, 32, 16),
    lengths=(1000, 10000),
    batch: int = 256,
    top_k: int = 100,
    repeats: int = 5,
    seed: int = 0,
) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        base = None
        for d in dims:
            keys = torch.randn(batch, length, d, generator=g)
            query = torch.randn(batch, 1, d, generator=g)
            mask = torch.ones(batch, length, dtype=torch.bool)
            ms = median_ms(soft_search, (query, keys, mask, top_k), repeats)
            base = base or ms
            rows.append(
                {
                    "history": length,
                    "attn_dim": d,
                    "batch": batch,
                    "top_k": top_k,
                    "ms": round(ms, 2),
                    "ratio_to_128": round(ms / base, 3),
                }
            )
    return rows


def bench_search_quality(
    data,
    dims=(128, 64, 32, 16),
    models=("dare", "twin"),
    overrides=None,
    out_dir=None,
    seed: int = 1,
) -> list[dict]:
    """Test AUC and retrieval NDCG@k at each attention dimension. DARE varies only its attention
    tables (representation stays at embed_dim); TWIN has one table, so its single dim varies."""
    from pathlib import Path

    from longrec.config import resolve
    from longrec.train.loop import Trainer
    from longrec.train.retrieval import retrieval_ndcg

    rows = []
    for model in models:
        for d in dims:
            dim_set = (
                [f"model.attn_dim={d}", f"model.attn_pos_dim={d}"]
                if model == "dare"
                else [f"model.embed_dim={d}", f"model.pos_dim={d}"]
            )
            cfg = resolve(
                None,
                [*(overrides or []), *dim_set, f"train.seed={seed}", "train.progress=false"],
                data__path=str(data),
                model__name=model,
            )
            run = Path(out_dir or "/tmp/longrec-bench-search") / f"{model}-d{d}"
            trainer = Trainer(cfg, run)
            metrics = trainer.fit()
            ndcg = retrieval_ndcg(trainer.model, trainer.dataset, "test", cfg)
            rows.append(
                {
                    "model": model,
                    "attn_dim": d,
                    "test_auc": metrics["test"].get("auc"),
                    "test_gauc": metrics["test"].get("gauc"),
                    **{k: v for k, v in ndcg.items() if k.startswith("ndcg")},
                    "ndcg_source": ndcg["source"],
                }
            )
    return rows
