"""`longrec synth`: write a synthetic dataset with planted structure and known ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from longrec.errors import UserError

HELP = (
    "Generate synthetic long behaviour sequences with known ground truth.\n\n"
    "Writes OUT/manifest.json, behaviors.csv (Taobao layout, no header: "
    "user,item,category,behavior,ts,domain) or behaviors.parquet, taxonomy.csv, "
    "category_map.csv, impressions.csv|parquet and truth.parquet (which behaviours drive each "
    "impression's click probability).\n\n"
    "Users have a few long-term interests recurring sparsely over years, a drifting short-term "
    "interest and noise, across three domains and two category systems. The same seed gives the "
    "same bytes. The process is described in docs/synthetic.md."
)

EPILOG = (
    "Example: longrec synth --out raw/synth --users 20000 --mean-len 500 --max-len 50000 "
    "--seed 1  (10M behaviours, ~10 s). "
    "Any other generator parameter: --set name=value, e.g. --set target_floor=0.05,0.5,0.85"
)


def _coerce(name: str, raw: str, default: object, nullable: bool = False) -> object:
    """Parse a --set value to the type of the field's default (tuples: comma-separated)."""
    if nullable and raw.strip().lower() in ("none", "null"):
        return None

    def one(text: str, like: object) -> object:
        if isinstance(like, bool):
            return text.lower() in ("1", "true", "yes")
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
        return text

    try:
        if isinstance(default, tuple):
            like = default[0] if default else ""
            return tuple(one(part.strip(), like) for part in raw.split(",") if part.strip())
        return one(raw, default)
    except ValueError:
        kind = type(default[0] if isinstance(default, tuple) and default else default).__name__
        raise UserError(f"--set {name}={raw}: expected {kind} value(s), comma-separated") from None


def _apply_sets(values: dict[str, object], sets: list[str]) -> None:
    from dataclasses import fields

    from longrec.data.synthetic import SynthConfig

    known = {f.name: f.default for f in fields(SynthConfig)}
    nullable = {f.name for f in fields(SynthConfig) if "None" in str(f.type)}
    for item in sets:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in known:
            raise UserError(
                f"--set expects name=value with name one of: {', '.join(sorted(known))} "
                f"(got {item!r})"
            )
        values[name] = _coerce(name, raw, known[name], name in nullable)


def register(app: typer.Typer) -> None:
    @app.command("synth", help=HELP, epilog=EPILOG)
    def synth(
        out: Annotated[Path, typer.Option("--out", help="Output folder (must not exist).")],
        users: Annotated[int, typer.Option(help="Number of users.")] = 2000,
        mean_len: Annotated[float, typer.Option(help="Mean history length.")] = 500.0,
        max_len: Annotated[int, typer.Option(help="Longest history (heavy-tail cap).")] = 50_000,
        min_len: Annotated[int, typer.Option(help="Shortest history.")] = 5,
        seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
        format: Annotated[
            str, typer.Option("--format", help="csv (Taobao layout) or parquet.")
        ] = "csv",
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="Replace OUT if it exists.")
        ] = False,
        items: Annotated[int, typer.Option(help="Items in each of the two ad domains.")] = 50_000,
        content_items: Annotated[int, typer.Option(help="Items in the content domain.")] = 100_000,
        requests_per_user: Annotated[
            float, typer.Option(help="Mean ad requests per user (Poisson).")
        ] = 4.0,
        candidates: Annotated[int, typer.Option(help="Ads shown per request.")] = 5,
        years: Annotated[float, typer.Option(help="Calendar span of the logs, in years.")] = 3.0,
        zipf: Annotated[float, typer.Option(help="Zipf exponent of item popularity.")] = 1.0,
        chunk_rows: Annotated[
            int, typer.Option(help="Behaviours per chunk (memory bound).")
        ] = 2_000_000,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="Any other SynthConfig field: name=value (repeatable)."),
        ] = None,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    ) -> None:
        from longrec.data.synthetic import SynthConfig, generate

        values: dict[str, object] = {
            "users": users,
            "mean_len": mean_len,
            "max_len": max_len,
            "min_len": min_len,
            "seed": seed,
            "format": format,
            "ad_items": items,
            "content_items": content_items,
            "requests_per_user": requests_per_user,
            "candidates_per_request": candidates,
            "years": years,
            "zipf": zipf,
            "chunk_rows": chunk_rows,
        }
        _apply_sets(values, set_ or [])
        config = SynthConfig(**values)  # type: ignore[arg-type]
        manifest = generate(config, out, overwrite=overwrite, progress=not quiet)
        s = manifest["stats"]
        auc = s["auc"]
        typer.echo(
            f"wrote {s['rows']:,} behaviours of {s['users']:,} users and {s['impressions']:,} "
            f"impressions (positive rate {s['positive_rate']}) to {out} "
            f"in {s['generation_seconds']} s; truth AUC {auc['truth_relevance']}, "
            f"last-{config.eval_recent} only {auc[f'truth_relevance_last{config.eval_recent}']}"
        )
