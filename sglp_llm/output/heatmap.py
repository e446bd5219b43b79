"""The CKA heatmap saved next to a pruned model: the similarity structure SGLP segmented, with the
segments boxed and the dropped blocks marked, so a reader can see why those blocks went.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global backend change).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..plan import PruningPlan

HEATMAP_NAME = "cka_heatmap.png"
DROPPED_COLOR = "red"
MAX_TICK_LABELS = 48


def plot_cka_heatmap(plan: PruningPlan, path: str | Path) -> Path:
    """Draw `plan.cka` with segment boxes and dropped blocks marked; save a PNG at `path`."""
    cka = np.asarray(plan.cka, dtype=float)
    n = plan.num_blocks
    if cka.shape != (n, n):
        raise ValueError(
            f"plan.cka has shape {cka.shape} but the plan has num_blocks={n}; the report is "
            "inconsistent, re-run the analysis to regenerate it."
        )
    dropped = set(plan.dropped)

    size = min(4.0 + 0.18 * n, 14.0)
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(cka, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="linear CKA")

    for segment in plan.segments:
        start, length = segment[0] - 0.5, len(segment)
        ax.add_patch(Rectangle((start, start), length, length, fill=False, edgecolor="white", lw=2))
        if segment[0] > 0:
            for draw in (ax.axhline, ax.axvline):
                draw(start, color="white", lw=0.8, ls="--", alpha=0.6)

    for i in sorted(dropped):
        ax.axhline(i, color=DROPPED_COLOR, lw=0.6, alpha=0.5)
        ax.axvline(i, color=DROPPED_COLOR, lw=0.6, alpha=0.5)
    if dropped:
        ax.scatter(sorted(dropped), sorted(dropped), marker="x", s=60, color=DROPPED_COLOR,
                   linewidths=2, label="dropped block", zorder=3)
        ax.legend(loc="upper right", fontsize="small", framealpha=0.8)

    step = max(1, -(-n // MAX_TICK_LABELS))
    ticks = sorted(set(range(0, n, step)) | dropped)
    labels = [str(i) for i in ticks]
    ax.set_xticks(ticks, labels, fontsize="small", rotation=90)
    ax.set_yticks(ticks, labels, fontsize="small")
    for label in (*ax.get_xticklabels(), *ax.get_yticklabels()):
        if int(label.get_text()) in dropped:
            label.set_color(DROPPED_COLOR)
            label.set_fontweight("bold")
    ax.set_xlabel("block")
    ax.set_ylabel("block")
    name = plan.model_name or "model"
    ax.set_title(
        f"{name}: CKA between block outputs\n{len(plan.segments)} segments, "
        f"dropped {len(plan.dropped)} of {n} blocks"
    )

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path
