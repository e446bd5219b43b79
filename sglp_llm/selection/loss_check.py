"""SGLP's loss check: the blocks a segment gives up, chosen one removal at a time by the
calibration loss of the network without them, among the candidates the gradient score ranks first.

SLEB's criterion (the calibration NLL after a removal) restricted to SGLP's groups and to each
group's lowest-scored blocks, with stale measurements reused as lower bounds (`loss_lazy`) and a
candidate costing only the blocks after it (sglp_llm.selection.removal.RemovalLoss).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from tqdm.auto import tqdm

from ..config import ConfigError
from ..data import first_samples, first_tokens, skip_samples, token_count
from ..stability import halves_agreement
from .removal import MeasuredLosses, RemovalLoss, removal_loss
from .registry import SelectionContext

# when blocks are read one at a time (sequential onloading, blocks on disk), the lazy search
# measures this many of its most promising stale candidates in one pass that reads each block
# once (`measure_many`): a step measured 1 to 5 candidates on the real models, 2.8 on average
# (benchmarks/results/time-plan.md), so a step reads the blocks about once instead of three times
LAZY_MEASURED_TOGETHER = 3


@dataclass(frozen=True)
class LossPart:
    """Loss batches a search measures on: all of them, or a half of their sequences, known by the
    index of its first batch among the loss batches and of its first sequence among their rows
    (what `MeasuredLosses` and the statistics pass's kept outputs are found by)."""

    batches: list[dict[str, Any]]
    first_batch: int = 0
    first_row: int = 0

    def first(self, n_sequences: int) -> "LossPart":
        return LossPart(first_samples(self.batches, n_sequences), self.first_batch, self.first_row)


def loss_check(
    context: SelectionContext, segments: list[list[int]], budgets: list[int]
) -> tuple[list[int], dict[str, Any]]:
    """`loss_search` on the loss batches; with the stability check on (and one pick per step, no
    `loss_confirm` or `decide_among`), the same search is then made on each half of their sequences alone, and the
    record's "stability" says how far the halves' choices agree (sglp_llm.stability). The halves'
    searches read back every measurement the whole's made on their sequences (`MeasuredLosses`):
    they run only where their search leaves the whole's path, on half the tokens."""
    config = context.config
    batches = loss_batches(context.batches, config)
    rows = sum(len(b["input_ids"]) for b in batches)
    # a choice confirmed on held-back tokens or put against peers' is checked as a whole analysis (sglp_llm.api)
    if not (config.stability_check and config.loss_confirm == 1 and not config.decide_among):
        return loss_search(context, segments, budgets, LossPart(batches))
    if rows < 2:
        dropped, record = loss_search(context, segments, budgets, LossPart(batches))
        record["stability"] = {"agreement": None, "reason": "the loss check measured one sequence: nothing to split; "
                                                            "give more --loss-tokens or shorter --seq-len"}
        return dropped, record
    first, second = loss_halves(batches)
    store = MeasuredLosses()
    dropped, record = loss_search(context, segments, budgets, LossPart(first + second), store)
    started, reused = time.perf_counter(), store.reused
    parts = (LossPart(first), LossPart(second, len(first), rows // 2))
    chosen = [
        loss_search(context, segments, budgets, part, store, desc=f"Stability check: {which} half of the loss sequences")[0]
        for which, part in zip(("first", "second"), parts)
    ]
    record["stability"] = halves_agreement(
        chosen, dropped, [token_count(part.batches) for part in parts], time.perf_counter() - started,
        measured_on="loss sequences", reused=store.reused - reused,
    )
    return dropped, record


def loss_halves(batches: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The loss batches' first and second half of their sequences, cut between them (a batch across
    the middle becomes two), so the whole searches on the halves' batches and each half's are the whole's."""
    rows = sum(len(b["input_ids"]) for b in batches)
    return first_samples(batches, rows // 2), skip_samples(batches, rows // 2)


def loss_search(
    context: SelectionContext, segments: list[list[int]], budgets: list[int], part: LossPart,
    store: MeasuredLosses | None = None, desc: str = "SGLP loss check",
) -> tuple[list[int], dict[str, Any]]:
    """Remove one block at a time; the candidates are the blocks of every segment that may still
    give one up (`budgets`: the allocated drops, or each segment's capacity with
    allocation="loss") — all of them with loss_candidates="all", else its `loss_candidates`
    lowest-scored ones by the gradient score — and the one whose removal leaves the lowest
    calibration NLL goes (ties: the shallower block).

    With `loss_lazy`, a candidate's loss measured at an earlier step stands in as a lower bound
    (removing more blocks rarely lowers the loss): only the candidate with the lowest bound is
    measured again, until the lowest is a fresh measurement. That is the full search's choice
    whenever the loss grows with the removed set, at a few forward passes per step instead of
    one per candidate. `loss_bound` tightens the bound to the current loss plus what the
    candidate's removal added when it was measured (a block's damage does not shrink as others
    go): for every candidate ("marginal"), or only for those whose kept neighbours are still the
    same ("local"; removing a block next to a candidate can make the candidate cheaper to lose).
    A tighter bound re-measures fewer candidates after a removal that raised every loss.

    With `loss_screen_samples` (0: off), the first step ranks every candidate on that many
    calibration sequences only, and those estimates stand in as the earlier measurements: only the
    candidates they make promising are measured on the loss batches. With `loss_screen: taylor`
    the estimates are the loss plus each candidate's Taylor gate score instead: no forward at all.
    With `compensation_aware` there is no screen: a removal is measured with its compensation.

    When the removal loss reads blocks one at a time, the lazy search measures the
    `LAZY_MEASURED_TOGETHER` lowest-bound stale candidates in one pass whenever it needs one, and
    uses each result only when the search reaches that candidate: the same choice, fewer reads.

    With `loss_confirm` k > 1, the search only proposes: at each step its k best candidates are
    measured fresh, and the one whose removal leaves the lowest loss on held-back tokens (the
    `loss_tokens` calibration tokens after the search's, `held_back_batches`) goes, so a
    candidate that only fits the search tokens' noise loses.

    With `loss_ties` (`config.settles_ties`), candidates whose losses the loss sequences cannot
    tell apart from the best's are settled by block influence, bordering a removed block first
    by default (`_settle_tie`).

    A screen's estimate is noisier than a measurement on every loss sequence: with
    `loss_screen_errors` it stands as a bound only lowered by `screen_allowance`, so a candidate
    the screen put a little too high is still measured when it may be the best (the default since
    2026-12-07: the worst case held out fell from 1.38 to 1.17 on SmolLM2,
    benchmarks/results/robustness.md). The KL objective never lowers them (its losses keep no
    per-sequence spread), and its steps record no allowance."""
    config, scores = context.config, context.scores
    removal = _removal(context, part, store)
    n_sequences = sum(len(b["input_ids"]) for b in part.batches)
    judge = removal_loss(context.handle, held_back_batches(context), config, config.loss_objective) if config.loss_confirm > 1 else None
    left = dict(enumerate(budgets))
    steps: list[dict[str, Any]] = []
    measured: dict[int, float] = {}  # block -> its loss when last measured
    increase: dict[int, float] = {}  # block -> how much that raised the loss of the network then
    neighbours: dict[int, tuple] = {}  # block -> its kept neighbours when last measured
    current: float | None = None  # the loss of the network as pruned so far, once needed
    tightened = config.loss_bound != "stale"
    together = LAZY_MEASURED_TOGETHER if removal.reads_blocks else 1
    first: dict[int, float] = {}
    screened: set[int] = set()  # blocks whose loss is the screen's estimate, not yet measured on the loss batches
    with tqdm(total=context.n_drop, desc=desc, disable=not context.progress) as bar:
        for _ in range(context.n_drop):
            candidates = [
                block
                for index, segment in enumerate(segments)
                if left[index] > 0
                for block in _shortlist(segment, scores, context.protected | set(removal.removed), config.loss_candidates)
            ]
            fresh: set[int] = set()
            allowances: dict[int, float] = {}  # the step's best so far -> `screen_allowance`
            ahead: dict[int, float] = {}  # measured in a shared pass, not yet reached by the search

            def record(block: int, loss: float) -> None:
                measured[block] = loss
                screened.discard(block)
                if tightened:
                    increase[block] = loss - current
                    neighbours[block] = removal.kept_neighbours(block)

            def measure(block: int) -> None:
                if block not in ahead:
                    group = [block]
                    if together > 1:  # the next most promising not yet measured at this step
                        group += [b for b in sorted(candidates, key=rank) if b not in fresh and b not in ahead and b != block][:together - 1]
                    ahead.update(removal.measure_many(group) if len(group) > 1 else {block: removal.measure(block)})
                record(block, ahead.pop(block))
                fresh.add(block)

            def bound(block: int) -> float:
                lowered = allowance() if block in screened else 0.0  # a screen's estimate, not a measurement
                if block in fresh or block not in increase:
                    return measured[block] - lowered
                if config.loss_bound == "local" and removal.kept_neighbours(block) != neighbours[block]:
                    return measured[block] - lowered
                return max(measured[block], current + increase[block]) - lowered

            def allowance() -> float:
                if not (fresh and config.lowers_screened_estimates):
                    return 0.0
                best = min(fresh, key=lambda b: (measured[b], b))
                if best not in allowances:  # once per step's best: the error is reduced over processes
                    allowances[best] = screen_allowance(removal.increase_error(best), n_sequences,
                                                        config.loss_screen_samples, config.loss_screen_errors)
                return allowances[best]

            def rank(block: int) -> tuple:
                """Unmeasured candidates first (no bound yet), then by bound."""
                return block in measured, bound(block) if block in measured else 0.0, block

            screen = config.first_step_screen
            if current is None and (tightened or screen):
                current = removal.current()  # the unpruned network's loss, at the first step
            if not steps and screen:
                # the gate's first-order estimate costs nothing more: the statistics pass made it
                first = {b: current + scores[b] for b in candidates} if screen == "taylor" else _screen(context, part, candidates, current, store)
                for block, estimate in first.items():
                    record(block, estimate)
                if screen == "sequences":
                    screened.update(first)
            if not config.loss_lazy:
                for block, loss in removal.measure_many(candidates).items():
                    record(block, loss)
                    fresh.add(block)
            width = config.loss_confirm if judge is not None else 1
            while True:
                # unmeasured candidates first: no bound yet; the `width` lowest must be fresh
                finalists = sorted(candidates, key=rank)[:width]
                stale = [b for b in finalists if b not in fresh]
                if not stale:
                    break
                measure(stale[0])
            finalists.sort(key=lambda b: (measured[b], b))
            held_back: dict[int, float] = {}
            tie: dict[str, Any] = {}
            if judge is not None:
                held_back = {b: judge.measure(b) for b in finalists}
                best = min(finalists, key=lambda b: (held_back[b], b))
                judge.remove(best)
            elif config.settles_ties:
                best, tie = _settle_tie(candidates, fresh, measured, bound, measure, removal, context.observed,
                                        config.loss_ties, config.loss_risk, config.loss_tie_errors)
            else:
                best = finalists[0]
            lowered = {"screen_allowance": allowance()} if config.lowers_screened_estimates else {}
            if not steps and not first:
                first = dict(measured)
            removal.remove(best)
            current = measured[best]
            left[next(i for i, s in enumerate(segments) if best in s)] -= 1
            steps.append({"block": best, "loss": measured[best], "candidates": len(candidates), "measured": len(fresh), **lowered,
                          **({"held_back": {str(b): loss for b, loss in held_back.items()}} if held_back else {}), **tie})
            bar.update()
    # each block's loss when removed alone (screened: the estimate; None: not a first-step candidate)
    removal_losses = [first.get(i) for i in range(len(scores))]
    return sorted(removal.removed), {"steps": steps, "removal_losses": removal_losses}


def screen_allowance(increase_error: float, n_sequences: int, screened: int, errors: float) -> float:
    """How far below a screened estimate a candidate's loss on the loss sequences may lie, at
    `errors` of its expected error: a mean over `screened` of the `n_sequences` sequences (drawn
    without replacement) misses the mean over all by about their spread (`increase_error` times
    the square root of `n_sequences`) times the square root of 1/screened - 1/n_sequences."""
    if screened >= n_sequences:
        return 0.0
    return errors * increase_error * (n_sequences / screened - 1) ** 0.5


def _settle_tie(
    candidates: list[int], fresh: set[int], measured: dict[int, float],
    bound: Callable[[int], float], measure: Callable[[int], None], removal: RemovalLoss, influence: list[float],
    rule: str, risk: float = 0.0, tie_errors: float = 1.0,
) -> tuple[int, dict[str, Any]]:
    """The greedy step's removal when the loss cannot tell its best candidates apart: every
    candidate that may lie within `tie_errors` standard errors of the lowest loss's increase
    (`RemovalLoss.increase_error`; the one-standard-error rule) is measured fresh, and among those
    that do, the block with the lowest block influence (`influence`, measured on the original
    network) goes; with `rule` "run-then-block-influence", the lowest of those that border a
    removed block, when any does (a run of removed blocks, as SGLP's groups and angular distance
    remove them). Returns it and the step's record of the tie (empty when there was none).

    With `risk` > 0 the losses compared are each candidate's plus `risk` standard errors of its
    increase (`loss_risk`): every candidate whose bound lies below the best such value is measured."""
    errors: dict[int, float] = {}

    def value(block: int) -> float:
        if not risk:
            return measured[block]
        if block not in errors:
            errors[block] = removal.increase_error(block)
        return measured[block] + risk * errors[block]

    while True:
        best = min(fresh, key=lambda b: (value(b), b))
        margin = tie_errors * removal.increase_error(best)
        unsure = [b for b in candidates if b not in fresh and bound(b) <= value(best) + margin]
        if not unsure:
            break
        measure(min(unsure, key=lambda b: (bound(b), b)))
    tied = sorted(b for b in fresh if value(b) <= value(best) + margin)
    risked = {"risk_adjusted": {str(b): value(b) for b in sorted(fresh, key=lambda b: (value(b), b))[:3]}} if risk else {}
    if len(tied) < 2:
        return best, risked
    removed = set(removal.removed)
    chosen = tie_choice(tied, removed, influence, rule)
    return chosen, {**risked, "tied": tied, "tie_margin": margin, "lowest_loss": best,
                    "block_influence": {str(b): influence[b] for b in tied}, "borders_removed": _borders(chosen, removed)}


def tie_choice(tied: list[int], removed: set[int], influence: list[float], rule: str) -> int:
    """Which of the `tied` blocks `rule` removes, `removed` already gone: the lowest block
    influence, among those bordering a removed block first with "run-then-block-influence"."""
    runs = rule == "run-then-block-influence"
    return min(tied, key=lambda b: (not (runs and _borders(b, removed)), influence[b], b))


def _borders(block: int, removed: set[int]) -> bool:
    return block - 1 in removed or block + 1 in removed


def loss_batches(batches: list[dict[str, Any]], config: Any) -> list[dict[str, Any]]:
    """The calibration sequences the loss check searches on: those of the first `loss_tokens`
    tokens. The statistics pass keeps the block outputs on them (`config.keeps_original_outputs`)."""
    return first_tokens(batches, config.loss_tokens)


def _removal(context: SelectionContext, part: LossPart, store: MeasuredLosses | None) -> RemovalLoss:
    config = context.config
    return removal_loss(context.handle, part.batches, config, config.loss_objective, context.original_outputs,
                        first_batch=part.first_batch, original_row=part.first_row, store=store)


def _screen(
    context: SelectionContext, part: LossPart, candidates: list[int], loss: float, store: MeasuredLosses | None
) -> dict[int, float]:
    """Each candidate's loss when removed alone, estimated on the first `loss_screen_samples`
    sequences: the unpruned network's `loss` on the loss batches plus the increase on those."""
    screen = _removal(context, part.first(context.config.loss_screen_samples), store)
    base = screen.current()
    return {block: loss + estimate - base for block, estimate in screen.measure_many(candidates).items()}


def _shortlist(segment: list[int], scores: list[float], excluded: set[int], size: int | str) -> list[int]:
    """The loss check's candidates in a segment: its `size` lowest-scored blocks that may still
    go, or all of them (in order) with size "all"."""
    free = [i for i in segment if i not in excluded]
    return free if size == "all" else sorted(free, key=lambda i: (scores[i], i))[:size]


def held_back_batches(context: SelectionContext) -> list[dict[str, Any]]:
    """The `loss_tokens` calibration tokens after the loss check's own: a search never sees them,
    so they can judge what it proposes. Refused when the calibration has none left."""
    config = context.config
    held_back = _token_windows(context.batches, config.loss_tokens)[1]
    if not held_back:
        raise ConfigError(
            f"Deciding on held-back tokens (loss_beam, loss_confirm) needs calibration tokens after the first "
            f"loss_tokens={config.loss_tokens}, but those take every calibration sequence; give more calibration "
            "text (--n-samples) or fewer --loss-tokens."
        )
    return held_back


def _token_windows(batches: list[dict[str, Any]], n_tokens: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The first sequences holding `n_tokens` tokens (the search's) and the next ones (held back)."""
    search = first_tokens(batches, n_tokens)
    return search, first_tokens(skip_samples(batches, sum(len(b["input_ids"]) for b in search)), n_tokens)


def held_back_search(context: SelectionContext) -> tuple[list[int], dict[str, Any]]:
    """Beam search of width `loss_beam` over removal sets by the loss on the loss tokens, the
    final choice among the beam's last sets made on held-back tokens: the `loss_tokens`
    calibration tokens that follow the loss tokens, which the search never saw. A set that only
    fits the search tokens' noise loses there.

    Each beam state keeps its own `RemovalLoss` (a candidate costs only the blocks after it);
    sets reached twice are merged. Ties: the shallower set (in sorted order)."""
    config = context.config
    search_batches = loss_batches(context.batches, config)
    held_back = held_back_batches(context)
    free = [b for b in range(len(context.scores)) if b not in context.protected]
    first: dict[int, float] = {}  # each block's loss when removed alone
    beam: list[tuple[tuple[int, ...], list[float], RemovalLoss]] = [
        ((), [], removal_loss(context.handle, search_batches, config, config.loss_objective, context.original_outputs))]
    with tqdm(total=context.n_drop, desc="SGLP held-back beam", disable=not context.progress) as bar:
        for _ in range(context.n_drop):
            extended: dict[tuple[int, ...], tuple[tuple[int, ...], list[float], RemovalLoss]] = {}  # set -> best way there
            for path, losses, removal in beam:
                for block in free:
                    if block in path:
                        continue
                    key = tuple(sorted(path + (block,)))
                    loss = removal.measure(block)
                    if not path:
                        first[block] = loss
                    if key not in extended or loss < extended[key][1][-1]:
                        extended[key] = (path + (block,), losses + [loss], removal)
            chosen = sorted(extended.values(), key=lambda state: (state[1][-1], sorted(state[0])))[: config.loss_beam]
            beam = [(path, losses, parent.branch(path[-1])) for path, losses, parent in chosen]
            bar.update()
    judge = removal_loss(context.handle, held_back, config, config.loss_objective)
    finalists = [
        {"dropped": sorted(path), "search_loss": losses[-1], "held_back_loss": judge.loss_without(path), "path": list(path), "losses": losses}
        for path, losses, _ in beam
    ]
    best = min(finalists, key=lambda f: (f["held_back_loss"], f["dropped"]))
    steps = [{"block": b, "loss": loss} for b, loss in zip(best["path"], best["losses"])]
    record = {
        "steps": steps,
        "removal_losses": [first.get(i) for i in range(len(context.scores))],
        "held_back": {
            "beam": config.loss_beam,
            "search_tokens": token_count(search_batches),
            "held_back_tokens": token_count(held_back),
            "finalists": [{k: v for k, v in f.items() if k not in ("path", "losses")} for f in finalists],
        },
    }
    return best["dropped"], record
