"""The training loop: evaluation on valid every N steps, best-checkpoint selection, early
stopping, exact resume, and one test evaluation at the best checkpoint.

Exact resume: a checkpoint (last-STEP.safetensors, then state.pt naming it, see
run_dir.save_checkpoint) is written at every evaluation and holds the optimiser state, the
step, the position in the epoch and the RNG state; batches are a pure function of (seed, epoch, index) (see data/loader.py). A run interrupted at any point and
restarted with `resume=True` redoes the steps since its last checkpoint and ends with the same
metrics as an uninterrupted run (seeded, on CPU).

The model, its optimiser state and every batch live on `train.device`; steps and evaluation
run under `train.precision` (longrec/runtime.py resolves both, and the run's log records them).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from longrec.config import RunConfig
from longrec.data.batch import Batch
from longrec.data.dataset import PreparedDataset
from longrec.data.lengths import LengthSampling
from longrec.data.loader import BatchLoader, LoaderConfig
from longrec.errors import UserError
from longrec.faults import fault_point
from longrec.models import build_model
from longrec.models.base import DataSchema
from longrec.ops import dispatch
from longrec.outputs import write_marker
from longrec.runtime import Runtime
from longrec.train import distributed
from longrec.train import run_dir as rd
from longrec.train.batch_size import plan_run_batch
from longrec.train.compile import compile_dense_modules
from longrec.train.evaluate import evaluate_split
from longrec.train.optim import (
    build_optimizers,
    clip_grad_norm_,
    l2_penalty,
    lr_factor,
    set_lr,
    wants_sparse_embeddings,
)
from longrec.train.table_adam import use_sparse_table_grads


def masked_bce(logits: Tensor, labels: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
    """BCE over real targets: "mean" over all targets, or "per_user" (mean within each request,
    then across requests: STCA's per-user loss, docs/models.md, "STCA")."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none") * mask
    if reduction == "mean":
        return loss.sum() / mask.sum().clamp_min(1)
    if reduction == "per_user":
        per_row = loss.sum(1) / mask.sum(1).clamp_min(1)
        rows = (mask.sum(1) > 0).float()
        return (per_row * rows).sum() / rows.sum().clamp_min(1)
    raise UserError(f"train.loss_reduction must be mean or per_user, got '{reduction}'")


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        run: str | Path,
        callbacks: list[Callable[[int], None]] | None = None,
    ):
        self.run = Path(run)
        self.callbacks = callbacks or []
        self.runtime = Runtime.resolve(cfg.train.device, cfg.train.precision)
        self.distributed = distributed.init(self.runtime.device)
        self.rank, self.world_size = distributed.world()
        self.main = self.rank == 0
        self.dataset = PreparedDataset(cfg.data.path)
        self.batch_plan = plan_run_batch(cfg, self.dataset.split("train"), self.world_size)
        # a copy with the concrete batch: config.yaml records it, the caller's cfg keeps None
        cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, batch_size=self.batch_plan.size)
        )
        self.cfg = cfg
        tc = cfg.train
        dispatch.set_kernels(dispatch.for_run(tc.kernels, cfg.model.params), "train.kernels")
        torch.set_num_threads(tc.threads or max(1, (os.cpu_count() or 1) // self.world_size))
        if self.runtime.cuda and tc.deterministic:  # cuBLAS is deterministic only with this
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # multi-threaded scatter/index_add accumulate in a varying order: without this, two
        # seeded runs (or a resumed and an uninterrupted one) drift apart. Its side effect of
        # NaN-filling every torch.empty (a debugging aid for reads of uninitialised memory) is
        # turned off: it was a tenth of a DARE training step (BENCHMARKS.md).
        torch.use_deterministic_algorithms(tc.deterministic, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.manual_seed(tc.seed)
        self.schema = DataSchema.from_dataset(self.dataset, cfg.data.max_len)
        self.model = build_model(
            cfg.model.name,
            self.schema,
            cfg.model.params,
            sparse_embeddings=wants_sparse_embeddings(tc),
        ).to(self.runtime.device)
        self.sharded = None
        self._previous_checkpoint = 0  # step of the last sharded-tables checkpoint written
        if tc.shard_embeddings:
            if not self.distributed:
                raise UserError("train.shard_embeddings needs >= 2 processes (--nproc or torchrun)")
            from longrec.train.sharded import ShardOptions, shard_embeddings

            # before the optimisers and DDP: the replaced tables leave model.parameters()
            self.sharded = shard_embeddings(
                self.model,
                self.world_size,
                ShardOptions.from_train_config(tc),
                device=self.runtime.device,
            )
        if tc.embed_optimizer == "adam" and tc.sparse_table_grads and not self.distributed:
            use_sparse_table_grads(self.model)  # DDP gets the dense gradients it buckets
        self.compiled = compile_dense_modules(self.model, tc.compile)
        self.optimizers = build_optimizers(self.model, tc)
        # fused optimiser of the sharded tables: scheduled with the others, checkpointed apart
        self.table_optimizers = self.sharded.optimizers() if self.sharded is not None else []
        self.loader = BatchLoader(
            self.dataset,
            "train",
            LoaderConfig(
                batch_size=tc.batch_size,
                max_len=cfg.data.max_len,
                layout=cfg.data.layout,
                shuffle=True,
                seed=tc.seed,
                prefetch=cfg.data.prefetch,
                rank=self.rank,
                world_size=self.world_size,
                history_fields=self.model.history_fields(),
                history_ts=self.model.reads_history_ts(),
                lengths=LengthSampling(
                    cfg.data.train_lengths,
                    cfg.data.train_min_len,
                    cfg.data.train_mean_len,
                    cfg.data.train_length_alpha,
                ),
                bucket=cfg.data.bucket,
                order=cfg.data.order,
                token_store=cfg.data.token_store,
                max_tokens=cfg.data.max_tokens,
                pin_memory=self.runtime.cuda,
            ),
        )
        self.step_module = distributed.wrap(self.model, self.runtime.device)
        per_epoch = len(self.loader)
        if per_epoch == 0:
            raise UserError(f"{cfg.data.path}: the train split is empty")
        self.total_steps = tc.max_steps if tc.max_steps is not None else tc.epochs * per_epoch
        self.epochs = tc.epochs if tc.max_steps is None else math.ceil(tc.max_steps / per_epoch)
        self.batch_plan = dataclasses.replace(self.batch_plan, steps=self.total_steps)

    # -- state ----------------------------------------------------------------------------
    def _fresh_state(self) -> dict:
        return {
            "step": 0,
            "epoch": 0,
            "batch_in_epoch": 0,
            "best_metric": -math.inf,
            "best_step": -1,
            "evals_without_gain": 0,
            "train_samples": 0,
            "train_seconds": 0.0,
            "stopped_early": False,
        }

    def _tables_file(self, kind: str) -> Path:
        return self.run / f"tables-{kind}.rank{self.rank}.pt"

    def _checkpoint(self, state: dict) -> None:
        if self.sharded is not None:
            # named by step, like the weights: state.pt (rank 0) commits to one of them
            self.sharded.save(self._tables_file(f"last-{state['step']}"))
            for old in self.run.glob(f"tables-last-*.rank{self.rank}.pt"):
                step = int(old.name.split("-")[2].split(".")[0])
                if step < self._previous_checkpoint:  # no committed state can name it any more
                    old.unlink(missing_ok=True)
            self._previous_checkpoint = state["step"]
        if not self.main:
            return
        full = dict(state)
        full["optimizers"] = [o.state_dict() for o in self.optimizers]
        full.update(self.runtime.rng_state())
        rd.save_checkpoint(self.run, self.model, full)

    def _restore(self) -> dict:
        saved = rd.load_checkpoint(self.run, self.model)
        if self.sharded is not None:
            tables = self._tables_file(f"last-{saved['step']}")
            if not tables.exists():
                raise UserError(f"{self.run}: {tables.name} is missing; the run cannot resume")
            self.sharded.load(tables)
            self._previous_checkpoint = saved["step"]
        try:
            for opt, sd in zip(self.optimizers, saved.pop("optimizers"), strict=True):
                opt.load_state_dict(sd)
        except (ValueError, KeyError) as e:
            raise UserError(
                f"{self.run}/{rd.STATE}: optimiser state does not fit this model ({e})"
            ) from None
        self.runtime.set_rng_state(saved)
        return saved

    # -- loop -----------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        if self.main:
            self.run.mkdir(parents=True, exist_ok=True)
            write_marker(self.run, "run")
            rd.write_config(self.run, self.cfg, self.schema)
            note = self.batch_plan.note()
            if note:
                print(note, file=sys.stderr)
            if not resume:
                (self.run / rd.LOG).unlink(missing_ok=True)
                rd.append_log(self.run, self.batch_plan.record())
        distributed.barrier()
        state = (
            self._restore() if resume and (self.run / rd.STATE).exists() else self._fresh_state()
        )
        if self.main:
            self._announce_runtime(state["step"], resume)
        tc = self.cfg.train
        bar = _progress(tc.progress and self.main, self.total_steps, state["step"])
        done = state["step"] >= self.total_steps or state["stopped_early"]
        while not done and state["epoch"] < self.epochs:
            start = state["batch_in_epoch"]
            # training time: building or waiting for the batch plus its step, not validation
            t0 = time.perf_counter()
            for i, batch in enumerate(self.loader.iter_epoch(state["epoch"], start), start=start):
                loss = self._step(batch, state["step"])
                state["train_seconds"] += time.perf_counter() - t0
                state["train_samples"] += int(batch.target_mask.sum())
                state["step"] += 1
                state["batch_in_epoch"] = i + 1
                step = state["step"]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{loss:.4f}",
                        sps=f"{state['train_samples'] / max(state['train_seconds'], 1e-9):,.0f}",
                    )
                if self.main and step % tc.log_every == 0:
                    rd.append_log(
                        self.run,
                        {
                            "step": step,
                            "epoch": state["epoch"],
                            "loss": loss,
                            "samples_per_s": state["train_samples"]
                            / max(state["train_seconds"], 1e-9),
                        },
                    )
                last = step >= self.total_steps
                if step % tc.eval_every == 0 or last:
                    self._validate(state)
                    if last:
                        state["batch_in_epoch"] = i + 1
                for cb in self.callbacks:
                    cb(step)
                if last or state["stopped_early"]:
                    done = True
                    break
                t0 = time.perf_counter()
            if not done:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
        if bar is not None:
            bar.close()
        if state["best_step"] < 0 or not rd.has_checkpoint(self.run):
            self._validate(state)
        return self._finish(state)

    def _announce_runtime(self, step: int, resume: bool) -> None:
        """One stderr line and one log.jsonl record of the device and precision (what auto
        chose); a resume whose precision differs from the run's last one says so."""
        before = rd.last_logged(self.run, "precision") if resume else None
        note = (
            f"; until step {step} it trained in {before}"
            if before not in (None, self.runtime.precision)
            else ""
        )
        print(f"train: {self.runtime.describe()}{note}", file=sys.stderr)
        rd.append_log(self.run, {"step": step, **self.runtime.record()})

    def _step(self, batch: Batch, step: int) -> float:
        tc = self.cfg.train
        optimizers = self.optimizers + self.table_optimizers
        set_lr(optimizers, lr_factor(tc, step, self.total_steps))
        self.model.train()
        batch = self.runtime.put(batch)
        with self.runtime.autocast():
            logits, aux = self.step_module(batch)
        loss = masked_bce(logits, batch.label, batch.target_mask, tc.loss_reduction)
        for aux_logits, weight in aux:
            loss = loss + weight * masked_bce(
                aux_logits, batch.label, batch.target_mask, tc.loss_reduction
            )
        penalty = l2_penalty(self.model, tc.l2)
        total = loss + penalty if penalty is not None else loss
        for opt in optimizers:  # the fused optimiser takes its lr here, before backward
            opt.zero_grad(set_to_none=True)
        total.backward()
        if tc.grad_clip:
            clip_grad_norm_(list(self.model.parameters()), tc.grad_clip)
        for opt in optimizers:
            opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise UserError(f"training diverged at step {step} (loss {value}); lower train.lr")
        return value

    def _validate(self, state: dict) -> None:
        """Rank 0 validates and checkpoints; every rank then adopts its decisions."""
        if self.main or self.sharded is not None:  # sharded lookups: every rank predicts
            self._validate_main(state)
        keys = ("best_metric", "best_step", "evals_without_gain", "stopped_early")
        state.update(distributed.broadcast({k: state[k] for k in keys}))

    def _validate_main(self, state: dict) -> None:
        tc = self.cfg.train
        metrics = evaluate_split(self.model, self.dataset, "valid", self.cfg, self.runtime)
        if self.sharded is not None:  # rank 0's numbers decide on every rank
            metrics = distributed.broadcast(metrics)
        value = metrics.get(tc.select_by, math.nan) if metrics else math.nan
        if self.main:
            rd.append_log(self.run, {"step": state["step"], "split": "valid", **(metrics or {})})
        improved = not math.isnan(value) and value > state["best_metric"]
        if improved or state["best_step"] < 0:
            state["best_metric"] = value if not math.isnan(value) else state["best_metric"]
            state["best_step"] = state["step"]
            state["evals_without_gain"] = 0
            if self.main:
                rd.save_weights(self.model, self.run / rd.BEST)
            if self.sharded is not None:
                self.sharded.save(self._tables_file("best"))
        else:
            state["evals_without_gain"] += 1
            if (
                tc.early_stop_patience is not None
                and state["evals_without_gain"] >= tc.early_stop_patience
            ):
                state["stopped_early"] = True
        self._checkpoint(state)

    def _finish(self, state: dict) -> dict:
        samples = int(distributed.all_sum(state["train_samples"]))
        if self.sharded is not None:
            return self._finish_sharded(state, samples)
        if not self.main:
            distributed.barrier()
            return {}
        rd.load_weights(self.model, self.run / rd.BEST)
        rd.copy_atomic(self.run / rd.BEST, self.run / rd.WEIGHTS)
        fault_point("finish-weights-written")
        result = {
            split: evaluate_split(self.model, self.dataset, split, self.cfg, self.runtime)
            for split in ("valid", "test")
        }
        result["train"] = self._summary(state, samples)
        rd.write_metrics(self.run, result)
        distributed.barrier()
        return result

    def _finish_sharded(self, state: dict, samples: int) -> dict:
        """Every rank restores the best weights and predicts (lookups are collective); rank 0
        then gets plain tables back (unshard) and writes a model that eval and serve read."""
        rd.load_weights(self.model, self.run / rd.BEST)
        self.sharded.load(self._tables_file("best"))
        result = {
            split: distributed.broadcast(
                evaluate_split(self.model, self.dataset, split, self.cfg, self.runtime)
            )
            for split in ("valid", "test")
        }
        if not self.sharded.unshard(self.model, dst=0):  # collective
            distributed.barrier()
            return {}
        rd.save_weights(self.model, self.run / rd.WEIGHTS)
        result["train"] = self._summary(state, samples)
        result["train"]["sharded_tables"] = sorted(self.sharded.placement())
        rd.write_metrics(self.run, result)
        distributed.barrier()
        return result

    def _summary(self, state: dict, samples: int) -> dict:
        """metrics.json's `train` section: the schedule, throughput, and what it ran on."""
        out = {
            "steps": state["step"],
            "best_step": state["best_step"],
            "stopped_early": state["stopped_early"],
            "samples": samples,
            "train_seconds": round(state["train_seconds"], 3),
            "samples_per_s": samples / max(state["train_seconds"], 1e-9),
            "select_by": self.cfg.train.select_by,
            "model": self.cfg.model.name,
            "parameters": int(sum(p.numel() for p in self.model.parameters())),
            "device": str(self.runtime.device),
            "precision": self.runtime.precision,
        }
        if self.world_size > 1:
            out["processes"] = self.world_size
        return out


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="step",
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        disable=None,
    )
