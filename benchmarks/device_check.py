"""Every registered model trained on two devices (or precisions) from the same weights and the
same batches: the losses of N steps and the first step's gradients must agree.

    .venv/bin/python benchmarks/device_check.py DATA [--a cpu] [--b cuda] [--steps 20]

An arm is `DEVICE[/PRECISION]` (`cuda`, `cpu/bf16`, ...; precision fp32 unless given). The
default compares the CPU with CUDA when a GPU is present, else the CPU in fp32 with the CPU in
bf16. Tolerances: fp32 against fp32 (float sums in another order) 1e-3 relative on the losses
and on the first step's gradient of all parameters (‖g_a − g_b‖ / ‖g_a‖); with a bf16 arm
5e-2 on the losses, and the gradients must point the same way (cosine ≥ 0.99): bf16 rounds
every product to 3 significant digits, and the embedding tables' gradients, sums of many
small terms, differ by ~8% in norm from fp32's (STCA on the Taobao sample) while the losses
agree to 2e-4. Prints a markdown table and
exits 1 if a model disagrees. DATA: a prepared dataset (the bundled Taobao sample as
`make demo` prepares it).
"""

# ruff: noqa: I001  (longrec is imported before torch on purpose)
from __future__ import annotations

import longrec  # noqa: F401  (first: its allocator settings apply before torch allocates)

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

from longrec.config import resolve
from longrec.models import describe_models
from longrec.train.loop import Trainer

SETTINGS = ["data.max_len=100", "train.batch_size=128", "train.progress=false", "train.lr=0.003"]
# models that train only with a prepared side input (IAT's tokens) or from another model
NEEDS_MORE = {"iat"}


def trainer(data: Path, model: str, arm: str, out: Path) -> Trainer:
    device, _, precision = arm.partition("/")
    cfg = resolve(
        None,
        [*SETTINGS, f"train.device={device}", f"train.precision={precision or 'fp32'}"],
        data__path=str(data),
        model__name=model,
    )
    return Trainer(cfg, out)


def dense_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.to_dense() if p.grad.is_sparse else p.grad
            out[name] = g.detach().float().cpu()
    return out


def check(data: Path, model: str, arms: tuple[str, str], steps: int, tmp: Path) -> dict:
    a = trainer(data, model, arms[0], tmp / f"{model}-a")
    b = trainer(data, model, arms[1], tmp / f"{model}-b")
    b.model.load_state_dict(a.model.state_dict())
    chunks = a.loader.batch_requests(0)
    losses: list[tuple[float, float]] = []
    grad_error = cosine = math.nan
    for i in range(steps):
        batch = a.loader.make_batch(chunks[i % len(chunks)])
        losses.append((a._step(batch, i), b._step(batch, i)))
        if i == 0:
            ga, gb = dense_grads(a.model), dense_grads(b.model)
            # over all parameters together: a parameter whose exact gradient is ~0 (a bias
            # before a BatchNorm) has a meaningless error of its own
            flat_a = torch.cat([g.reshape(-1) for g in ga.values()])
            flat_b = torch.cat([gb[name].reshape(-1) for name in ga])
            grad_error = float((flat_a - flat_b).norm() / flat_a.norm().clamp_min(1e-12))
            cosine = float(torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0))
    loss_error = max(abs(x - y) / max(abs(x), 1e-6) for x, y in losses)
    return {
        "loss_a": losses[-1][0],
        "loss_b": losses[-1][1],
        "loss": loss_error,
        "grad": grad_error,
        "cosine": cosine,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    gpu = torch.cuda.is_available()
    parser.add_argument("--a", default="cpu")
    parser.add_argument("--b", default="cuda" if gpu else "cpu/bf16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models", default=None, help="comma-separated (default: all)")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else [n for n, _ in describe_models()]
    low = any(arm.endswith("/bf16") for arm in (args.a, args.b))
    tol = 5e-2 if low else 1e-3
    grad_rule = "cosine >= 0.99" if low else f"error <= {tol:g}"
    print(
        f"{args.a} against {args.b}, {args.steps} steps: losses within {tol:g}, grads {grad_rule}"
    )
    print(f"\n| model | loss ({args.a}) | loss ({args.b}) | loss error | grad error | cosine |")
    print("|---|---:|---:|---:|---:|---:|")
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name in NEEDS_MORE:
                print(f"| {name} | | | (needs a token store: not checked) | |")
                continue
            r = check(args.data, name, (args.a, args.b), args.steps, Path(tmp))
            grad_ok = r["cosine"] >= 0.99 if low else r["grad"] <= tol
            ok = r["loss"] <= tol and grad_ok
            failed += [] if ok else [name]
            loss_mark = " **over**" if r["loss"] > tol else ""
            grad_mark = "" if grad_ok else " **over**"
            print(
                f"| {name} | {r['loss_a']:.4f} | {r['loss_b']:.4f} | {r['loss']:.1e}{loss_mark} "
                f"| {r['grad']:.1e}{grad_mark} | {r['cosine']:.4f} |",
                flush=True,
            )
    if failed:
        print(f"\ndisagree: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
