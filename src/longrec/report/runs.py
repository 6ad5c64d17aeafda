"""Tables of run metrics."""

from __future__ import annotations


def metrics_table(results: dict[str, dict]) -> str:
    lines = [
        "| model | valid AUC | test AUC | test GAUC | test logloss | train samples/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in results.items():
        v, t = m.get("valid", {}), m.get("test", {})
        lines.append(
            f"| {name} | {v.get('auc', float('nan')):.4f} | {t.get('auc', float('nan')):.4f} | "
            f"{t.get('gauc', float('nan')):.4f} | {t.get('logloss', float('nan')):.4f} | "
            f"{m['train']['samples_per_s']:,.0f} |"
        )
    return "\n".join(lines)
