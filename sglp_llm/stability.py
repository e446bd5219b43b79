"""How stable a choice is: the same choice made on two disjoint halves of the sequences it was made on.

A choice that changes with the calibration sample fits that sample's noise, and a model pruned by
it may break on other text (benchmarks/results/robustness.md). The halves' agreement (the share
of the dropped blocks both drop) says how much the choice owes to the sample. Below `WARN_BELOW`
the user is told to calibrate on more text.

The default's loss check repeats its search on each half of the sequences it measures removals on
(sglp_llm.selection.loss_check), reading back the measurements it already made there: each half
is a sample of half the size (so the agreement errs low), at a fraction of the choice's time.
Every other choice is analysed again, in full, on each half of the calibration sequences
(`choice_stability`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from .config import ConfigError

if TYPE_CHECKING:
    from .data import CalibrationSet

# the halves agree on fewer than half the blocks: the choice mostly fits the sample
WARN_BELOW = 0.5


def calibration_halves(calibration: CalibrationSet) -> tuple[CalibrationSet, CalibrationSet] | None:
    """The first and the second half of the calibration sequences (a batch across the middle is
    split in two), or None with fewer than two sequences."""
    from .data import CalibrationSet, first_samples, skip_samples, token_count

    rows = sum(len(b["input_ids"]) for b in calibration.batches)
    if rows < 2:
        return None
    halves = (first_samples(calibration.batches, rows // 2), skip_samples(calibration.batches, rows // 2))
    return tuple(
        CalibrationSet(batches=half, n_tokens=token_count(half),
                       source=f"{calibration.source} ({which} half of its sequences)",
                       n_samples=sum(len(b["input_ids"]) for b in half), seq_len=calibration.seq_len)
        for which, half in (("first", halves[0]), ("second", halves[1]))
    )


def halves_agreement(
    chosen: list[list[int]], dropped: list[int], half_tokens: list[int], seconds: float, *, measured_on: str,
    **extra: Any,
) -> dict[str, Any]:
    """The stability record of a choice `dropped` whose halves (of the `measured_on` sequences,
    `half_tokens` tokens each) chose `chosen`: their agreement |A ∩ B| / |A| and each half's
    agreement with the whole's choice."""
    n = max(len(dropped), 1)
    chosen = [sorted(c) for c in chosen]
    return {
        "halves": chosen,
        "halves_of": measured_on,
        "half_tokens": half_tokens,
        "agreement": len(set(chosen[0]) & set(chosen[1])) / n,
        "agreement_with_choice": [len(set(c) & set(dropped)) / n for c in chosen],
        "seconds": seconds,
        **extra,
    }


def choice_stability(
    calibration: CalibrationSet, dropped: list[int], choose: Callable[[CalibrationSet], list[int]],
) -> dict[str, Any]:
    """The stability record of a choice `dropped` made on `calibration`: `choose` (the same
    analysis) run on each half of its sequences, so the two choices are what two other samples of
    half the size and the same source would have given (`halves_agreement`). None-valued
    agreement: too few sequences to split, or a half too small for the settings."""
    halves = calibration_halves(calibration)
    if halves is None:
        return {"agreement": None, "reason": "fewer than two calibration sequences: nothing to split"}
    started = time.perf_counter()
    try:
        chosen = [choose(half) for half in halves]
    except ConfigError as error:  # e.g. a half too small for the settings: the choice stands, unchecked
        return {"agreement": None, "reason": f"a half of the calibration cannot be analysed alike: {error}"}
    return halves_agreement(chosen, dropped, [half.n_tokens for half in halves], time.perf_counter() - started,
                            measured_on="calibration sequences")


def stability_warning(stability: dict[str, Any] | None) -> str | None:
    """What to tell the user when the halves disagree on most blocks, else None."""
    if not stability or stability.get("agreement") is None or stability["agreement"] >= WARN_BELOW:
        return None
    a, b = stability["halves"]
    loss = stability.get("halves_of") == "loss sequences"
    return (
        f"The choice is unstable: the two halves of the {'loss check' + chr(39) + 's sequences' if loss else 'calibration text'} "
        f"drop {a} and {b}, agreeing on {len(set(a) & set(b))} of {len(a)} blocks, so it fits this sample and may not "
        "hold on other text. Calibrate on more text (--n-samples" + (", and measure removals on more of it: --loss-tokens" if loss else "")
        + "), longer windows (--seq-len) or more varied text (--dataset), "
        "and check the pruned model on text unlike the calibration (sglp-llm eval)."
    )


def describe_stability(stability: dict[str, Any] | None) -> str | None:
    """One line for people: what each half chose and how far they agree (None: not checked)."""
    if not stability:
        return None
    if stability.get("agreement") is None:
        return f"stability: not measured ({stability.get('reason', 'no record')})"
    a, b = stability["halves"]
    both = len(set(a) & set(b))
    agreement = stability["agreement"]
    verdict = "stable" if agreement == 1 else "partly stable" if agreement >= WARN_BELOW else "UNSTABLE"
    made = ("the loss check's search on each half of its sequences" if stability.get("halves_of") == "loss sequences"
            else "the same analysis on each half of the calibration sequences")
    return (
        f"stability: {verdict}; {made} "
        f"({stability['half_tokens'][0]} and {stability['half_tokens'][1]} tokens) drops {a} and {b}: "
        f"they agree on {both} of {len(a)} blocks ({stability['agreement']:.0%}); with this choice on "
        f"{stability['agreement_with_choice'][0]:.0%} and {stability['agreement_with_choice'][1]:.0%}"
    )
