"""The Tencent-stack ablation: start from TIN over the most recent behaviours and add one
component at a time, as `longrec ablate` runs it (issue 03)."""

from __future__ import annotations

from longrec.train.compare import Variant

# each step keeps everything above it
TENCENT_STEPS: list[Variant] = [
    Variant("tin (recent K)", "tin", {"search": "recent"}),
    Variant("+ hierarchical hard search", "tin", {"search": "hier"}),
    Variant("+ decoupled soft search (union)", "tin", {"search": "hier+soft"}),
    Variant("+ DSI-TIN", "tin", {"search": "hier+soft", "modelling": "dsi"}),
    Variant(
        "+ target-decoupled PE", "tin", {"search": "hier+soft", "modelling": "dsi", "td_pe": True}
    ),
    Variant(
        "+ head per target type (= tencent)",
        "tin",
        {"search": "hier+soft", "modelling": "dsi", "td_pe": True, "type_heads": True},
    ),
]
# the other modelling choice of the composed model, for the same search
ALTERNATIVES: list[Variant] = [
    Variant(
        "tencent with Stacked TIN",
        "tin",
        {"search": "hier+soft", "modelling": "stacked", "td_pe": True, "type_heads": True},
    ),
]
