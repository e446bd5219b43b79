"""`PruningPlan`: what the analysis found and decided, as one JSON-serialisable record.

It is the report users read (`sglp_report.json`), the input of the rewrite, and what the CLI's
`analyze` prints; keeping it a plain dataclass makes it easy to save, diff and test.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stability import describe_stability
from .explain import chosen_by, kept_for_attention, stages

REPORT_NAME = "sglp_report.json"


@dataclass
class PruningPlan:
    num_blocks: int
    layers_path: str
    cka: list[list[float]]
    segments: list[list[int]]
    scores: list[float | None]  # None where the method has no score for a block
    keep_per_segment: list[int]
    dropped: list[int]
    kept: list[int]
    n_tokens: int
    n_batches: int
    config: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    segmentation_losses: list[float] = field(default_factory=list)
    # SGLP's gradient score ("taylor", "fisher", "gradnorm"), "loss_without_block" (a loss check of
    # every block; estimated on loss_screen_samples sequences when screened), or the baseline's
    # score (sglp_llm.selection.baselines), "none" if it has none
    score_kind: str = "gradnorm"
    model_name: str | None = None
    calibration_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningPlan":
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def score_text(self, block: int) -> str:
        """Block `block`'s score for people: 4 significant digits, or "–" where there is none."""
        score = self.scores[block]
        return "–" if score is None else f"{score:.4g}"

    def score_label(self) -> str:
        """`score_kind` for people, saying when the scores are the loss check's screen estimates."""
        samples = self.config.get("loss_screen_samples")
        if self.score_kind == "loss_without_block" and samples:
            sequences = "calibration sequence" if samples == 1 else f"{samples} calibration sequences"
            return f"{self.score_kind} (estimated on the first {sequences})"
        return self.score_kind

    def summary(self) -> str:
        """A few human-readable lines: the stages that ran, segments, scores and the decision
        with what chose each dropped block."""
        lines = [
            f"{self.num_blocks} blocks, {len(self.segments)} segment{'s' if len(self.segments) != 1 else ''}, "
            f"{self.n_tokens} calibration tokens in {self.n_batches} batches; scores: {self.score_label()}"
            + (f"; ran on {', '.join(self.extra['devices'])}" if self.extra.get("devices") else ""),
            *(f"  {stage}" for stage in stages(self.config, self.n_tokens)),
        ]
        for seg, keep in zip(self.segments, self.keep_per_segment):
            drop = [i for i in seg if i in self.dropped]
            scores = ", ".join(f"{i}:{self.score_text(i)}" for i in seg)
            lines.append(
                f"  segment {seg[0]:>3}-{seg[-1]:<3} keep {keep}/{len(seg)}  "
                f"drop {drop or '-'}  {self.score_kind}: {scores}"
            )
        lines.append(f"drop {len(self.dropped)} blocks: {self.dropped}")
        lines += [f"  block {block}: {why}" for block, why in sorted(chosen_by(self).items())]
        lines.append(f"keep {len(self.kept)} blocks: {self.kept}")
        if kept := kept_for_attention(self):
            lines.append(f"  {kept}")
        stability = describe_stability(self.extra.get("stability"))
        if stability:
            lines.append(stability)
        return "\n".join(lines)
