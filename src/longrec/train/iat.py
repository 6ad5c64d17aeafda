"""IAT token building (docs/iat.md, "Token building"): run a trained, frozen Stage-I source model
over every sample of the chosen splits and write one instance token per sample to a TokenStore.

Each token is the source model's pre-SIT compressed vector h_c (`IatSourceModel.compress`)
stored with the sample's user, request time (`target_ts`) and label, so a Stage-II request at
time t reads that user's tokens with ts < t (strictly; the loader's `TokenStore.before`): its
own instance and its same-request siblings are never among them. The source runs in eval mode
(BatchNorm on running statistics) without gradients, on the request layout in split order;
h_c does not depend on the batch, so the order does not matter (the SIT is never run here).
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import numpy as np
import torch

from longrec.data.dataset import PreparedDataset
from longrec.data.loader import BatchLoader, LoaderConfig
from longrec.data.token_store import TokenStore
from longrec.errors import UserError
from longrec.models.iat import IatSourceModel
from longrec.outputs import check_replaceable, writer_lock
from longrec.train.run_dir import load_run

DTYPES = {"float32": np.float32, "float16": np.float16}


def source_tokens(
    model: IatSourceModel,
    dataset: PreparedDataset,
    split: str,
    max_len: int,
    batch_size: int = 2048,
    progress: bool = False,
) -> np.ndarray:
    """[n_samples, token_dim] float32: the instance token of every sample of the split, in
    split order."""
    cols = dataset.split(split)
    n = len(cols["label"])
    out = np.zeros((n, model.params.token_dim), dtype=np.float32)
    if n == 0:
        return out
    filled = np.zeros(n, dtype=bool)
    loader = BatchLoader(
        dataset,
        split,
        LoaderConfig(
            batch_size=batch_size,
            max_len=max_len,
            layout="request",
            shuffle=False,
            prefetch=None,  # loader.default_prefetch
            history_fields=model.history_fields(),
        ),
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(loader), desc=f"tokens {split}", unit="batch", file=sys.stderr)
    model.eval()
    with torch.no_grad():
        for batch in loader:
            tokens = model.compress(batch)
            mask = batch.target_mask
            idx = batch.sample_index[mask].numpy()
            out[idx] = tokens[mask].float().numpy()
            filled[idx] = True
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if not filled.all():  # a loader bug, not a user error
        raise RuntimeError(f"{split}: {int((~filled).sum())} samples got no token")
    return out


def build_tokens(
    source_run: str | Path,
    out: str | Path,
    splits: tuple[str, ...] = ("train", "valid", "test"),
    *,
    data: str | Path | None = None,
    batch_size: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write the token store of `splits` (one token per sample) to `out`; return its meta."""
    out = Path(out)
    if dtype not in DTYPES:
        raise UserError(f"token dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if not splits:
        raise UserError("no splits given")
    check_replaceable(out, "token-store", overwrite)
    model, cfg, schema = load_run(source_run)
    if not isinstance(model, IatSourceModel):
        raise UserError(
            f"{source_run} is a '{cfg.model.name}' run; tokens come from an IAT source model "
            "(train one with --model iat_source or iat_source_user)"
        )
    dataset = PreparedDataset(data or cfg.data.path)
    dataset.check_belongs(schema.fingerprint, schema.fields, str(source_run))
    bs = batch_size or cfg.data.eval_batch_size
    users, times, labels, tokens, counts = [], [], [], [], {}
    for split in splits:
        cols = dataset.split(split)
        tokens.append(source_tokens(model, dataset, split, cfg.data.max_len, bs, progress))
        users.append(np.asarray(cols["user"], dtype=np.int64))
        times.append(np.asarray(cols["target_ts"], dtype=np.int64))
        labels.append(np.asarray(cols["label"], dtype=np.float32))
        counts[split] = len(cols["label"])
    user = np.concatenate(users)
    meta = {
        "kind": "iat_tokens",
        "source_run": str(Path(source_run).resolve()),
        "source_model": getattr(model, "registered_name", cfg.model.name),
        "source_order": model.params.order,
        "data": str(dataset.root.resolve()),
        "splits": list(splits),
        "samples": counts,
        "token": "pre-SIT compressed vector h_c = sigmoid(W_1 h + b_1)",
        "dtype": dtype,
        "max_len": cfg.data.max_len,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    with writer_lock(out):
        check_replaceable(out, "token-store", overwrite)  # it may have appeared meanwhile
        _write_tokens(out, dataset, user, times, labels, tokens, dtype, meta)
    return TokenStore.open(out).meta


def _write_tokens(out, dataset, user, times, labels, tokens, dtype, meta) -> None:
    TokenStore.write(
        out,
        max(dataset.n_users, int(user.max()) + 1 if len(user) else 0),
        user,
        np.concatenate(times),
        np.concatenate(labels),
        np.concatenate(tokens).astype(DTYPES[dtype]),
        meta,
    )
