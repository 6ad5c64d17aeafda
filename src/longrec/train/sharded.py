"""Sharded embedding tables (TorchRec): tables that outgrow one process live on one rank each.

`shard_embeddings(model, world_size)` replaces a model's large `nn.Embedding` tables (at least
`min_rows` rows, or a named list) by `ShardedEmbedding` modules with the same call signature
(ids of any shape -> rows [*ids.shape, d]). Behind them, one TorchRec `EmbeddingCollection`
(sequence embeddings, no pooling) holds all selected tables, wrapped in
`DistributedModelParallel` with TABLE_WISE sharding: each table lives whole on one rank, and a
lookup sends the ids to the owner and the rows back (all-to-all), so the model code does not
change. The weights are copied from the original tables (same init as an unsharded run).

What works with torchrec 1.9.2 / fbgemm-gpu-cpu 1.8.0 on CPU (gloo), found by trying it:
  * compute kernel FUSED only: the optimiser runs inside the backward pass (fbgemm TBE).
    `EmbeddingCollectionSharder` offers DENSE only for DATA_PARALLEL, and a hand-built
    TABLE_WISE + DENSE plan aborts the process (heap corruption in the forward).
  * fused optimisers on CPU: exact SGD, exact Adagrad, exact row-wise Adagrad. Adam, LAMB and
    LARS are CUDA-only; plain "sgd"/"row_wise_adagrad" are refused by fbgemm in this version.
  * gradients reaching a sharded table are divided by the world size (TorchRec's default),
    i.e. averaged over ranks like DDP averages dense gradients.
  * TorchRec's planner works too (`plan="planner"`), also with ROW_WISE sharding.

Every lookup is a collective: all ranks must call the same sharded tables in the same order
(training steps with equal step counts, and evaluation on every rank, not on rank 0 alone).
The tables get their own process group, so their all-to-alls never interleave with DDP's
all-reduces. The replaced modules hold no parameters, so `model.parameters()`,
`model.embedding_parameters()`, L2 and gradient clipping no longer see the sharded tables:
the Trainer's own optimisers exclude them by construction, and `ShardedTables.optimizers()`
returns the fused optimiser to schedule (its `zero_grad`/`step` push the learning rate into
the kernel; the update itself happens in `backward`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from longrec.errors import UserError

# longrec optimiser name -> fbgemm EmbOptimType name (CPU set; CUDA adds adam)
FUSED_OPTIMIZERS = {
    "sgd": "EXACT_SGD",
    "adagrad": "EXACT_ADAGRAD",
    "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD",
    "adam": "ADAM",
}
CPU_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise")


@dataclass
class ShardOptions:
    """Which tables to shard and how.

    tables: module paths or their last part ("item" = every item table); None: by min_rows.
    min_rows: without `tables`, shard every nn.Embedding with at least this many rows.
    optimizer: fused optimiser of the sharded tables: sgd | adagrad | rowwise_adagrad
        (exact fbgemm kernels), adam on CUDA only.
    plan: "greedy" (table-wise, largest table to the least-loaded rank, no planner) or
        "planner" (TorchRec's EmbeddingShardingPlanner, restricted to `sharding_type`).
    sharding_type: for the planner: table_wise (default) or row_wise (also works on CPU).
    """

    tables: tuple[str, ...] | None = None
    min_rows: int = 100_000
    optimizer: str = "sgd"
    lr: float = 0.01
    eps: float = 1e-10  # adagrad epsilon (torch.optim.Adagrad's default; fbgemm's is 1e-8)
    plan: str = "greedy"
    sharding_type: str = "table_wise"

    @classmethod
    def from_train_config(cls, tc) -> ShardOptions:
        """From `train.*`: shard_tables, shard_min_rows, shard_plan, shard_optimizer (default:
        embed_optimizer), embed_lr (default: lr). DARE's default embed_optimizer=adam has no
        fused CPU kernel; shard_embeddings then says which ones exist."""
        names = getattr(tc, "shard_tables", None)
        optimizer = getattr(tc, "shard_optimizer", None) or tc.embed_optimizer
        return cls(
            tables=tuple(names) if names else None,
            min_rows=getattr(tc, "shard_min_rows", cls.min_rows),
            optimizer={"sparse_adam": "adam"}.get(optimizer, optimizer),
            lr=tc.embed_lr if tc.embed_lr is not None else tc.lr,
            plan=getattr(tc, "shard_plan", cls.plan),
        )


@dataclass
class TableSpec:
    name: str  # TorchRec table and feature name (module path with "." -> "__")
    path: str  # module path in the model
    rows: int
    dim: int
    padding_idx: int | None


class ShardedTables:
    """The DMP-wrapped collection of a model's sharded tables, and what the Trainer needs of it:
    optimisers, per-rank checkpoints, and gathering full tables for export. Not an nn.Module
    (the model must not see its parameters or state)."""

    def __init__(self, dmp, specs: list[TableSpec], plan, group, device: torch.device):
        self.dmp = dmp
        self.specs = {s.name: s for s in specs}
        self.names = [s.name for s in specs]
        self.plan = plan
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    # -- lookups --------------------------------------------------------------------------
    def lookup(self, name: str, ids: Tensor) -> Tensor:
        """Rows of `ids` (any shape) from table `name` -> [*ids.shape, d]. Collective."""
        from torchrec import KeyedJaggedTensor

        flat = ids.reshape(-1).to(device=self.device, dtype=torch.int64)
        lengths = torch.zeros(len(self.names), dtype=torch.int64, device=self.device)
        lengths[self.names.index(name)] = flat.numel()
        kjt = KeyedJaggedTensor(keys=self.names, values=flat, lengths=lengths)  # stride 1
        rows = self.dmp(kjt)[name].values()
        return rows.view(*ids.shape, self.specs[name].dim)

    # -- placement ------------------------------------------------------------------------
    def placement(self) -> dict[str, list[int]]:
        """Ranks holding (a shard of) each table."""
        return {n: list(self.plan.plan[""][n].ranks) for n in self.names}

    def local_shards(self) -> dict[str, list[tuple[tuple[int, int], Tensor]]]:
        """This rank's shards: table -> [((row offset, column offset), tensor view)]."""
        out: dict[str, list] = {}
        for key, value in self.dmp.state_dict().items():
            name = key.split(".")[-2]  # ...embeddings.<table>.weight
            out[name] = [(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
        return out

    # -- optimisation ---------------------------------------------------------------------
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The fused optimiser (empty on a rank without tables). Put it through the Trainer's
        set_lr/zero_grad/step with the others; do not checkpoint it with them (per-rank state:
        see `state_dict`)."""
        opt = self.dmp.fused_optimizer
        return [opt] if opt.param_groups else []

    # -- checkpoints (per rank) -----------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's shards and their optimiser state, as plain tensors (torch.load with
        weights_only=True). Resume needs the same world size and plan."""
        weights = {
            n: [t.detach().clone() for _, t in shards] for n, shards in self.local_shards().items()
        }
        optim = {}
        for key, state in self.dmp.fused_optimizer.state_dict()["state"].items():
            optim[key] = {k: _local(v) for k, v in state.items()}
        return {"tables": self.names, "rank": self.rank, "weights": weights, "optim": optim}

    def load_state_dict(self, sd: dict) -> None:
        if sd["tables"] != self.names or sd["rank"] != self.rank:
            raise UserError("sharded tables checkpoint is from a different model or rank")
        with torch.no_grad():
            for n, shards in self.local_shards().items():
                for (_, t), saved in zip(shards, sd["weights"][n], strict=True):
                    t.copy_(saved)
            for key, state in self.dmp.fused_optimizer.state_dict()["state"].items():
                for k, v in state.items():
                    _load_local(v, sd["optim"][key][k])

    def save(self, path: str | Path) -> None:
        """This rank's state_dict to `path`, written to a temporary name and renamed."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, weights_only=True, map_location=self.device))

    # -- export ---------------------------------------------------------------------------
    def gather(self, dst: int = 0) -> dict[str, Tensor] | None:
        """Full tables on rank `dst` ({module path}.weight -> [rows, d]); None elsewhere.
        Collective; `dst` must hold every table in memory."""
        full: dict[str, Tensor] = {}
        sd = self.dmp.state_dict()
        for key in sorted(sd):
            name = key.split(".")[-2]
            spec = self.specs[name]
            out = None
            if self.rank == dst:
                out = torch.empty(spec.rows, spec.dim, device=self.device)
            sd[key].gather(dst=dst, out=out)
            if out is not None:
                full[f"{spec.path}.weight"] = out.detach()
        return full if self.rank == dst else None

    def unshard(self, model: nn.Module, dst: int = 0) -> bool:
        """Put plain nn.Embedding tables with the trained weights back into `model` on rank
        `dst` (to save a model that `load_run` and `serve` read). Collective; True on dst."""
        full = self.gather(dst)
        if full is None:
            return False
        for spec in self.specs.values():
            table = nn.Embedding(spec.rows, spec.dim, padding_idx=spec.padding_idx)
            with torch.no_grad():
                table.weight.copy_(full[f"{spec.path}.weight"])
            _set_module(model, spec.path, table)
        return True


def _local(value):
    """Local shards of a ShardedTensor as a list of tensors; other values unchanged."""
    if hasattr(value, "local_shards"):
        return [s.tensor.detach().clone() for s in value.local_shards()]
    return value.detach().clone() if isinstance(value, Tensor) else value


def _load_local(current, saved) -> None:
    if hasattr(current, "local_shards"):
        for s, t in zip(current.local_shards(), saved, strict=True):
            s.tensor.detach().copy_(t)
    elif isinstance(current, Tensor):
        current.detach().copy_(saved)


class ShardedEmbedding(nn.Module):
    """Drop-in for an nn.Embedding whose table lives in a ShardedTables: ids -> rows. Holds no
    parameters; `padding_idx` rows are returned as zeros and get no gradient, as in nn.Embedding."""

    def __init__(self, tables: ShardedTables, spec: TableSpec):
        super().__init__()
        self._sharded = tables  # a plain object: the model does not see the DMP's parameters
        self.table = spec.name
        self.num_embeddings, self.embedding_dim = spec.rows, spec.dim
        self.padding_idx = spec.padding_idx

    def forward(self, ids: Tensor, distinct: bool = False) -> Tensor:
        """`distinct` (RowTable's hint that no id repeats) changes nothing here."""
        rows = self._sharded.lookup(self.table, ids)
        if self.padding_idx is not None:
            rows = rows * (ids != self.padding_idx).unsqueeze(-1).to(rows.dtype)
        return rows

    def __getattr__(self, name: str):
        if name == "weight":
            raise AttributeError(
                f"embedding table '{self.table}' is sharded across processes and has no local "
                "weight; leave it out of the sharded tables (train.shard_tables / shard_min_rows)"
            )
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table={self.table}, sharded"


def select_tables(model: nn.Module, options: ShardOptions) -> list[tuple[str, nn.Embedding]]:
    """(module path, table) of every nn.Embedding to shard, in module order."""
    picked = []
    wanted = set(options.tables or ())
    matched: set[str] = set()
    for path, module in model.named_modules():
        if not isinstance(module, nn.Embedding):
            continue
        if options.tables is not None:
            hits = {w for w in wanted if path == w or path.endswith("." + w)}
            matched |= hits
            if hits:
                picked.append((path, module))
        elif module.num_embeddings >= options.min_rows:
            picked.append((path, module))
    if wanted - matched:
        raise UserError(f"no embedding table matches {', '.join(sorted(wanted - matched))}")
    for path, module in picked:
        if module.max_norm is not None or module.scale_grad_by_freq:
            raise UserError(f"{path}: max_norm / scale_grad_by_freq tables cannot be sharded")
    return picked


def greedy_placement(specs: list[TableSpec], world_size: int) -> dict[str, int]:
    """Largest table first onto the least-loaded rank (deterministic on every rank)."""
    load = [0] * world_size
    ranks = {}
    for spec in sorted(specs, key=lambda s: (-s.rows * s.dim, s.name)):
        r = min(range(world_size), key=lambda i: (load[i], i))
        ranks[spec.name] = r
        load[r] += spec.rows * spec.dim
    return ranks


def shard_embeddings(
    model: nn.Module,
    world_size: int | None = None,
    options: ShardOptions | None = None,
    *,
    device: torch.device | str | None = None,
    group=None,
    **overrides,
) -> ShardedTables | None:
    """Replace the selected nn.Embedding tables of `model` (in place) by table-wise sharded
    TorchRec tables; returns their ShardedTables, or None if no table qualifies.

    Every rank calls it (collective) with the same model (same init). `world_size` is checked
    against the process group; `options` (or keyword overrides of ShardOptions fields) choose
    the tables, the fused optimiser and the plan. Call it before building the Trainer's
    optimisers and before wrapping the model in DDP.
    """
    opts = dataclasses.replace(options or ShardOptions(), **overrides)
    if not dist.is_initialized():
        raise UserError("sharded embeddings need a process group (run under torchrun)")
    size = dist.get_world_size()
    if world_size is not None and world_size != size:
        raise UserError(f"world_size {world_size} != process group size {size}")
    device = torch.device(device) if device is not None else _default_device()
    _check_optimizer(opts, device)
    if opts.plan not in ("greedy", "planner"):
        raise UserError(f"shard plan must be greedy or planner, got '{opts.plan}'")
    if opts.sharding_type not in SHARDING_TYPES:
        raise UserError(f"sharding type must be one of {', '.join(SHARDING_TYPES)}")
    if opts.plan == "greedy" and opts.sharding_type != "table_wise":
        raise UserError("the greedy plan is table_wise; use plan='planner' for other types")

    picked = select_tables(model, opts)
    if not picked:
        return None
    specs = [
        TableSpec(path.replace(".", "__"), path, m.num_embeddings, m.embedding_dim, m.padding_idx)
        for path, m in picked
    ]

    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingCollection, EmbeddingConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.types import ShardingEnv

    group = group or dist.new_group()  # own group: never interleaves with DDP's all-reduces
    collection = EmbeddingCollection(
        tables=[
            EmbeddingConfig(
                name=s.name, embedding_dim=s.dim, num_embeddings=s.rows, feature_names=[s.name]
            )
            for s in specs
        ],
        device=torch.device("meta"),  # materialised by DMP: each rank allocates its shards only
    )
    fused = {
        "optimizer": getattr(EmbOptimType, FUSED_OPTIMIZERS[opts.optimizer]),
        "learning_rate": opts.lr,
    }
    if "adagrad" in opts.optimizer:
        fused["eps"] = opts.eps
    sharder = EmbeddingCollectionSharder(fused_params=fused)
    if opts.plan == "greedy":
        plan = _greedy_plan(collection, specs, sharder, size, device)
    else:
        plan = _planner_plan(collection, specs, sharder, size, device, opts, group)
    dmp = DistributedModelParallel(
        collection,
        device=device,
        plan=plan,
        sharders=[sharder],
        env=ShardingEnv.from_process_group(group),
    )
    tables = ShardedTables(dmp, specs, plan, group, device)
    originals = dict(picked)
    with torch.no_grad():
        for name, shards in tables.local_shards().items():
            src = originals[tables.specs[name].path].weight
            for (r0, c0), t in shards:
                t.copy_(src[r0 : r0 + t.shape[0], c0 : c0 + t.shape[1]])
    for spec in specs:
        _set_module(model, spec.path, ShardedEmbedding(tables, spec))
    return tables


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_optimizer(opts: ShardOptions, device: torch.device) -> None:
    allowed = CPU_OPTIMIZERS if device.type == "cpu" else tuple(FUSED_OPTIMIZERS)
    if opts.optimizer not in allowed:
        raise UserError(
            f"sharded tables on {device.type} train with a fused optimiser: "
            f"{', '.join(allowed)}; got '{opts.optimizer}' (set train.embed_optimizer)"
        )


def _greedy_plan(collection, specs, sharder, world_size: int, device: torch.device):
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingPlan

    ranks = greedy_placement(specs, world_size)
    module_plan = construct_module_sharding_plan(
        collection,
        per_param_sharding={
            n: table_wise(rank=r, compute_kernel="fused") for n, r in ranks.items()
        },
        sharder=sharder,
        local_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
        world_size=world_size,
        device_type=device.type,
    )
    return ShardingPlan({"": module_plan})


def _planner_plan(collection, specs, sharder, world_size, device, opts: ShardOptions, group):
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints

    constraints = {
        s.name: ParameterConstraints(sharding_types=[opts.sharding_type], compute_kernels=["fused"])
        for s in specs
    }
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device.type),
        constraints=constraints,
    )
    return planner.collective_plan(collection, [sharder], group)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def sharded_tables_of(model: nn.Module) -> ShardedTables | None:
    """The ShardedTables behind a model's ShardedEmbedding modules (None if it has none)."""
    for m in model.modules():
        if isinstance(m, ShardedEmbedding):
            return m._sharded
    return None


__all__ = [
    "ShardOptions",
    "ShardedEmbedding",
    "ShardedTables",
    "TableSpec",
    "select_tables",
    "shard_embeddings",
    "sharded_tables_of",
]
