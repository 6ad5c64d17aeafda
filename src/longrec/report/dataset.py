"""Text summary of a prepared dataset (printed by `prepare` and by the demo)."""

from __future__ import annotations


def dataset_table(meta: dict, title: str = "") -> str:
    rows = meta["rows"]
    lines = [f"## {title}" if title else "## dataset"]
    lines.append(
        f"source {meta['source']['name']}, protocol {meta['protocol']['name']}: "
        f"{rows['rows_read']:,} rows read, {rows['rows_skipped']:,} skipped, "
        f"{sum(rows['rows_filtered'].values()):,} filtered; store {meta['store']['rows']:,} behaviours "
        f"of {meta['store']['users_with_history']:,} users"
    )
    sizes = ", ".join(f"{f['name']} {f['vocab_size']:,}" for f in meta["fields"])
    lines.append(f"vocabularies: user {meta['n_users']:,}, {sizes}")
    lines.append("")
    lines.append("| split | samples | users | requests | positive rate | history p50 | p90 | max |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in meta["splits"].items():
        if not s.get("samples"):
            lines.append(f"| {name} | 0 | | | | | | |")
            continue
        h = s["history_len_percentiles"]
        lines.append(
            f"| {name} | {s['samples']:,} | {s['users']:,} | {s['requests']:,} | "
            f"{s['positive_rate']:.3f} | {h['50']:.0f} | {h['90']:.0f} | {h['100']:.0f} |"
        )
    return "\n".join(lines)
