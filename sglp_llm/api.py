"""The two entry points: `analyze` (what would SGLP drop, and why) and `prune` (drop it).

One hooked pass over the calibration batches feeds every statistic: the streaming CKA and the
peer baselines' block scores from forward hooks and, for SGLP only, the per-block GradNorm from
gradient hooks during one backward per batch, so the analysis costs about one training step per
batch (one inference step for the baselines). Segmentation and selection then work on the L×L
matrix and L scores alone, except the methods that score candidate pruned networks (SGLP's subset
search, SLEB), which run the model again on the calibration batches.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .baselines import BASELINES, SelectionContext
from .blocks import DecoderBlocks, find_decoder_blocks, text_config
from .capture import BlockObserver, StopForward, capture_blocks, stop_after
from .checkpoint import StatisticsCheckpoint, fingerprint
from .cka import MinibatchCKA
from .config import CALIBRATION_FIELDS, ConfigError, SGLPConfig
from .data import CalibrationSet, first_samples, prepare_calibration
from .devices import activation_checkpointing
from .distributed import all_reduce_state, is_main_process, rank, world_size
from .plan import PruningPlan
from .removal import RemovalLoss
from . import verify
from .rewrite import SGLP_CONFIG_KEY, removing_blocks, skip_blocks
from .score import BlockGradNorms, causal_lm_loss, check_finite, grad_only_for, network_gradnorm
from .segment import redundancy, segment_blocks
from .select import allocate_drops, best_subset, choose_drops, enumerate_keep_sets
from .sequential import sequential_pass


@dataclass
class BlockStatistics:
    cka: torch.Tensor
    scores: torch.Tensor  # the method's per-block score; NaN where it has none
    n_tokens: int
    n_batches: int
    seconds: float = 0.0  # wall time of the pass that measured them
    n_sinks: int = 0  # tokens left out of the CKA sums as attention sinks


def statistics_key(config: SGLPConfig, n_drop: int) -> tuple:
    """Two analyses with equal keys measure the same statistics, so one pass can serve both
    (e.g. every SGLP variant and drop count in a comparison): the calibration and CKA settings,
    and which score the pass collects (angular distance depends on the run length)."""
    score = config.method if config.method != "sglp" else "gradnorm" if config.uses_gradnorm else "cka"
    run_length = n_drop if config.method == "angular" else None
    fields = (
        *CALIBRATION_FIELDS, "cka_minibatch_tokens", "cka_max_tokens_per_batch", "cka_dtype", "cka_skip_sinks",
        "offload", "layers_path",
    )
    return (score, run_length, *(getattr(config, name) for name in fields))


def input_device(model: nn.Module) -> torch.device:
    """Where token ids must go: the device of the input embeddings (first device of a map), or
    for embeddings that accelerate offloads, the device they run on."""
    embeddings = model.get_input_embeddings()
    # one table, or several (one per codebook, e.g. MusicGen)
    device = next(embeddings.parameters()).device
    if device.type == "meta":
        device = torch.device(getattr(getattr(embeddings, "_hf_hook", None), "execution_device", "cpu"))
    return device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """No dropout while scoring, so scores and choices are deterministic; the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _AtIndices:
    """Hands `cka` each batch's index in the calibration set, so a process's share of the
    batches, or the batches left after a resume, draw the tokens of one uninterrupted pass."""

    def __init__(self, cka: MinibatchCKA, indices: Sequence[int]) -> None:
        self.cka = cka
        self._indices = iter(indices)

    def start_batch(self, token_mask: torch.Tensor) -> None:
        self.cka.start_batch(token_mask, next(self._indices))

    def on_block(self, index: int, block_input: torch.Tensor, block_output: torch.Tensor) -> None:
        self.cka.on_block(index, block_input, block_output)

    def finish_batch(self) -> None:
        self.cka.finish_batch()

    def compute(self) -> torch.Tensor:
        return self.cka.compute()


def collect_block_statistics(
    model: nn.Module,
    blocks: DecoderBlocks,
    calibration: CalibrationSet,
    config: SGLPConfig,
    n_drop: int,
    *,
    progress: bool = True,
) -> BlockStatistics:
    """CKA between all block outputs and the method's block scores, from one pass over the
    batches; the backward (GradNorm) runs only for SGLP (not for a loss check of every block), the
    baselines run under no_grad.

    Under data parallelism (sglp_llm.distributed) each process runs its share of the batches and
    the sums are reduced; with `config.checkpoint_dir` the sums are saved as the pass goes and a
    rerun resumes from them (sglp_llm.checkpoint). Either way the statistics are those of one
    uninterrupted single-process pass."""
    started = time.perf_counter()
    num_blocks = len(blocks.layers)
    cka = MinibatchCKA(
        num_blocks,
        minibatch_tokens=config.cka_minibatch_tokens,
        max_tokens_per_batch=config.cka_max_tokens_per_batch,
        dtype=getattr(torch, config.cka_dtype),
        seed=config.seed,
        skip_sinks=config.cka_skip_sinks,
    )
    baseline = BASELINES.get(config.method)  # None for SGLP
    score = (
        baseline.observer(num_blocks, n_drop)
        if baseline is not None and baseline.observer is not None
        else None
    )
    grads = BlockGradNorms.for_blocks(blocks.layers) if config.uses_gradnorm else None
    accumulators = {"cka": cka, "score": score, "grads": grads}
    accumulators = {name: a for name, a in accumulators.items() if a is not None}
    batches = calibration.batches
    store = None
    if config.checkpoint_dir is not None:
        key = statistics_key(config, n_drop)
        store = StatisticsCheckpoint(config.checkpoint_dir, key, fingerprint(key, batches, model, blocks.layers))
    # the main process holds the sums saved so far; the others add theirs at the end
    done = store.resume(accumulators, load_sums=is_main_process()) if store is not None else 0
    # under data parallelism, batch i of those left goes to process i % world_size
    world, me = world_size(), rank()
    todo = range(done + me, len(batches), world)
    observers: list[BlockObserver] = [_AtIndices(cka, todo)] + ([score] if score is not None else [])

    def feed(index: int, block_input: torch.Tensor, block_output: torch.Tensor) -> None:
        for observer in observers:
            observer.on_block(index, block_input, block_output)

    def summed() -> dict[str, dict]:
        return {name: all_reduce_state(a.state_dict()) for name, a in accumulators.items()}

    def save(batches_done: int, state: dict[str, dict]) -> None:
        if store is not None and is_main_process():
            store.save(batches_done, state)

    device = input_device(model)
    with eval_mode(model):
        if config.offload == "sequential":
            if todo:
                sequential_pass(
                    model, blocks.layers, [batches[i] for i in todo], observers, grads,
                    device=config.onload_device, progress=progress,
                )
        else:
            with ExitStack() as stack:
                stack.enter_context(capture_blocks(blocks.layers, feed))
                if grads is None:  # no loss needed: stop after the last block's statistics
                    stack.enter_context(torch.no_grad())
                    stack.enter_context(stop_after(blocks.layers[-1]))
                else:
                    stack.enter_context(grad_only_for(model, grads.parameters()))
                    stack.enter_context(grads.hooks())
                    if config.gradient_checkpointing:
                        stack.enter_context(activation_checkpointing(model, blocks.layers))
                # one round: batches start .. start + world - 1, one per process
                for start in tqdm(range(done, len(batches), world), desc="SGLP calibration", disable=not progress):
                    if start + me < len(batches):
                        batch = to_device(batches[start + me], device)
                        for observer in observers:
                            observer.start_batch(batch["attention_mask"].bool())
                        try:
                            loss = check_finite(causal_lm_loss(model, batch))
                        except StopForward:  # without GradNorm: after the last block
                            pass
                        for observer in observers:
                            observer.finish_batch()
                        if grads is not None:
                            loss.backward()
                            grads.end_batch()
                    finished = min(start + world, len(batches))
                    every = config.checkpoint_every
                    if store is not None and finished < len(batches) and finished // every > start // every:
                        save(finished, summed())  # every process takes part in the reduction
    state = summed()
    save(len(batches), state)  # a rerun, e.g. after a failed selection, skips the whole pass
    for name, accumulator in accumulators.items():
        accumulator.load_state_dict(state[name])
    cka_matrix = cka.compute().cpu()
    if grads is not None:
        scores = grads.compute().cpu()
    elif score is not None:
        scores = score.compute().cpu()
    else:
        scores = torch.full((num_blocks,), math.nan, dtype=torch.float64)
    return BlockStatistics(cka_matrix, scores, cka.n_tokens, len(batches), time.perf_counter() - started, cka.n_sinks)


def _protected(num_blocks: int, config: SGLPConfig) -> set[int]:
    return set(range(config.protect_first)) | set(range(num_blocks - config.protect_last, num_blocks))


def _capacities(segments: list[list[int]], protected: set[int]) -> list[int]:
    """How many blocks each segment may give up: never all of it, never a protected block."""
    return [min(len(s) - 1, sum(1 for i in s if i not in protected)) for s in segments]


def _segment(cka: torch.Tensor, config: SGLPConfig, n_drop: int, protected: set[int]):
    """Fisher segmentation; an automatic k is lowered until the drop count fits the segments."""
    kwargs = dict(
        feature=config.segment_feature, threshold=config.auto_k_threshold,
        auto_k=config.auto_k, min_size=config.min_segment_size,
    )
    result = segment_blocks(
        cka.numpy(), num_segments=config.num_segments, max_segments=config.max_segments, **kwargs
    )
    while config.num_segments is None and result.k > 1 and sum(_capacities(result.segments, protected)) < n_drop:
        result = segment_blocks(cka.numpy(), num_segments=result.k - 1, **kwargs)
    return result


def _subset_search(
    context: SelectionContext, segments: list[list[int]], drops: list[int]
) -> tuple[list[int], dict[str, Any]]:
    """The paper's selection: in each segment keep the subset whose pruned network has the
    highest GradNorm (other segments intact)."""
    model, config, protected = context.model, context.config, context.protected
    batches = context.batches[: config.subset_batches]
    dropped: list[int] = []
    searched: dict[str, Any] = {}
    for segment, n_drop in zip(segments, drops):
        if n_drop == 0:
            continue
        keep_sets = enumerate_keep_sets(
            segment, len(segment) - n_drop, protected=protected,
            max_candidates=config.max_candidates, seed=config.seed,
        )
        scores = {}
        desc = f"SGLP subset search {segment[0]}-{segment[-1]}"
        for keep in tqdm(keep_sets, desc=desc, disable=not context.progress):
            with skip_blocks(model, [i for i in segment if i not in keep], layers_path=config.layers_path):
                scores[tuple(keep)] = network_gradnorm(model, batches)
        best = best_subset(scores)
        dropped += [i for i in segment if i not in best]
        searched[f"{segment[0]}-{segment[-1]}"] = {
            "candidates": len(scores), "best_keep": list(best), "best_score": scores[best],
        }
    return sorted(dropped), searched


def _loss_check(
    context: SelectionContext, segments: list[list[int]], budgets: list[int]
) -> tuple[list[int], dict[str, Any]]:
    """Segment-restricted loss check: remove one block at a time; the candidates are the blocks
    of every segment that may still give one up (`budgets`: the allocated drops, or each
    segment's capacity with allocation="loss") — all of them with loss_candidates="all", else
    its `loss_candidates` lowest-GradNorm ones — and the one whose removal leaves the lowest
    calibration NLL goes (ties: the shallower block). SLEB's criterion within the segments, with
    stale measurements reused (below) and a candidate costing only the blocks after it
    (sglp_llm.removal.RemovalLoss).

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
    candidates they make promising are measured on the loss batches."""
    config, scores = context.config, context.scores
    batches = context.batches[: config.loss_batches]
    removal = RemovalLoss(context.model, batches, config.layers_path)
    left = dict(enumerate(budgets))
    steps: list[dict[str, Any]] = []
    measured: dict[int, float] = {}  # block -> its loss when last measured
    increase: dict[int, float] = {}  # block -> how much that raised the loss of the network then
    neighbours: dict[int, tuple] = {}  # block -> its kept neighbours when last measured
    current: float | None = None  # the loss of the network as pruned so far, once needed
    tightened = config.loss_bound != "stale"
    first: dict[int, float] = {}
    with tqdm(total=context.n_drop, desc="SGLP loss check", disable=not context.progress) as bar:
        for _ in range(context.n_drop):
            candidates = [
                block
                for index, segment in enumerate(segments)
                if left[index] > 0
                for block in _shortlist(segment, scores, context.protected | set(removal.removed), config.loss_candidates)
            ]
            fresh: set[int] = set()

            def record(block: int, loss: float) -> None:
                measured[block] = loss
                if tightened:
                    increase[block] = loss - current
                    neighbours[block] = removal.kept_neighbours(block)

            def measure(block: int) -> None:
                record(block, removal.measure(block))
                fresh.add(block)

            def bound(block: int) -> float:
                if block in fresh or block not in increase:
                    return measured[block]
                if config.loss_bound == "local" and removal.kept_neighbours(block) != neighbours[block]:
                    return measured[block]
                return max(measured[block], current + increase[block])

            if current is None and (tightened or config.loss_screen_samples):
                current = removal.current()  # the unpruned network's loss, at the first step
            if not steps and config.loss_screen_samples:
                first = _screen(context, batches, candidates, current)
                for block, estimate in first.items():
                    record(block, estimate)
            if not config.loss_lazy:
                for block in candidates:
                    measure(block)
            while True:
                # unmeasured candidates first: no bound yet
                best = min(candidates, key=lambda b: (b in measured, bound(b) if b in measured else 0.0, b))
                if best in fresh:
                    break
                measure(best)
            if not steps and not first:
                first = dict(measured)
            removal.remove(best)
            current = measured[best]
            left[next(i for i, s in enumerate(segments) if best in s)] -= 1
            steps.append({"block": best, "loss": measured[best], "candidates": len(candidates), "measured": len(fresh)})
            bar.update()
    # each block's loss when removed alone (screened: the estimate; None: not a first-step candidate)
    removal_losses = [first.get(i) for i in range(len(scores))]
    return sorted(removal.removed), {"steps": steps, "removal_losses": removal_losses}


def _screen(
    context: SelectionContext, batches: list[dict[str, Any]], candidates: list[int], loss: float
) -> dict[int, float]:
    """Each candidate's loss when removed alone, estimated on the first `loss_screen_samples`
    sequences: the unpruned network's `loss` on the loss batches plus the increase on those."""
    samples = first_samples(batches, context.config.loss_screen_samples)
    screen = RemovalLoss(context.model, samples, context.config.layers_path)
    base = screen.current()
    return {block: loss + screen.measure(block) - base for block in candidates}


def _shortlist(segment: list[int], scores: list[float], excluded: set[int], size: int | str) -> list[int]:
    """The loss check's candidates in a segment: its `size` lowest-GradNorm blocks that may still
    go, or all of them (in order) with size "all"."""
    free = [i for i in segment if i not in excluded]
    return free if size == "all" else sorted(free, key=lambda i: (scores[i], i))[:size]


def _sglp_selection(
    context: SelectionContext, timings: dict[str, float], extra: dict[str, Any]
) -> tuple[list[list[int]], list[int], list[int], list[float]]:
    """SGLP's stages 2 and 3: segments, drops per segment, dropped blocks, segmentation losses."""
    config, n_drop, protected = context.config, context.n_drop, context.protected
    t = time.perf_counter()
    segmentation = _segment(context.cka, config, n_drop, protected)
    segments = segmentation.segments
    weights = None
    if config.drop_allocation == "redundancy":
        cka = context.cka.numpy()
        weights = [len(s) * redundancy(cka, s) for s in segments]
    capacities = _capacities(segments, protected)
    drops = allocate_drops([len(s) for s in segments], n_drop, weights=weights, capacity=capacities)
    timings["segmentation_s"] = time.perf_counter() - t

    t = time.perf_counter()
    extra["k"] = segmentation.k
    if config.scoring == "subset":
        dropped, extra["subset_search"] = _subset_search(context, segments, drops)
    elif config.scoring == "loss":
        budgets = capacities if config.drop_allocation == "loss" else drops
        dropped, extra["loss_check"] = _loss_check(context, segments, budgets)
        drops = [sum(1 for b in dropped if b in s) for s in segments]
    else:
        dropped = choose_drops(segments, context.scores, drops, protected=protected)
    timings["selection_s"] = time.perf_counter() - t
    return segments, drops, dropped, list(segmentation.losses)


def analyze(
    model: nn.Module,
    calibration: Any = None,
    config: SGLPConfig | None = None,
    *,
    tokenizer: Any = None,
    progress: bool = True,
    statistics_cache: dict | None = None,
) -> PruningPlan:
    """Decide which decoder blocks of `model` to drop (by `config.method`); the model is left
    unchanged.

    `calibration` may be None (the config's dataset, or the built-in default text), a dataset
    name or local path, a list of strings, pre-tokenized batches, or a `CalibrationSet`.
    `statistics_cache` (a dict kept by the caller) lets analyses that measure the same
    statistics (`statistics_key`) share one pass; the reported times still include it.
    """
    return _analyze(model, calibration, config, tokenizer, progress, statistics_cache)[0]


def _analyze(
    model: nn.Module, calibration: Any, config: SGLPConfig | None, tokenizer: Any, progress: bool,
    statistics_cache: dict | None,
) -> tuple[PruningPlan, CalibrationSet]:
    """`analyze`, also returning the calibration set (whose tokens `prune` verifies on)."""
    if config is None:
        raise ConfigError("Pass an SGLPConfig, e.g. SGLPConfig(drop=4) or SGLPConfig(ratio=0.25).")
    start = time.perf_counter()
    timings: dict[str, float] = {}
    blocks = find_decoder_blocks(model, config.layers_path)
    num_blocks = len(blocks.layers)
    n_drop = config.resolve_drop(num_blocks)
    protected = _protected(num_blocks, config)
    cache = {} if statistics_cache is None else statistics_cache
    # a family the rewrite cannot handle is refused before the long work (once per model)
    if config.verify and cache.setdefault(("preflight", blocks.path), None) is None:
        t = time.perf_counter()
        verify.preflight(model, config.to_dict(), config.layers_path)
        cache[("preflight", blocks.path)] = timings["preflight_s"] = time.perf_counter() - t

    t = time.perf_counter()
    calibration = prepare_calibration(
        calibration, tokenizer, config,
        max_positions=getattr(text_config(model), "max_position_embeddings", None),
    )
    timings["calibration_data_s"] = time.perf_counter() - t

    key = statistics_key(config, n_drop)
    reused = key in cache
    if not reused:
        cache[key] = collect_block_statistics(model, blocks, calibration, config, n_drop, progress=progress)
    stats = cache[key]
    timings["statistics_s"] = stats.seconds
    reused_seconds = stats.seconds if reused else 0.0

    device = input_device(model)
    context = SelectionContext(
        model=model,
        batches=[to_device(b, device) for b in calibration.batches],
        cka=stats.cka,
        scores=stats.scores.tolist(),
        n_drop=n_drop,
        protected=protected,
        config=config,
        progress=progress,
        cache=cache,
        cache_key=key,
    )
    extra: dict[str, Any] = {"protected": sorted(protected), "statistics_reused": reused}
    if config.cka_skip_sinks:
        extra["cka_sinks_left_out"] = stats.n_sinks
    baseline = BASELINES.get(config.method)  # None for SGLP
    with eval_mode(model):
        if baseline is None:
            segments, drops, dropped, losses = _sglp_selection(context, timings, extra)
            scores, score_kind = context.scores, "gradnorm"
            if not config.uses_gradnorm:  # the loss check measured every candidate at its first step
                losses_alone = extra["loss_check"]["removal_losses"]
                scores, score_kind = [math.nan if x is None else x for x in losses_alone], "loss_without_block"
        else:
            t = time.perf_counter()
            selection = baseline.choose(context)
            segments, drops, losses = [list(range(num_blocks))], [n_drop], []
            dropped, scores, score_kind = selection.dropped, selection.scores, baseline.score_kind
            extra.update(selection.extra)
            elapsed = time.perf_counter() - t
            timings["selection_s"] = elapsed if selection.seconds is None else selection.seconds
            reused_seconds += timings["selection_s"] - elapsed
    # work reused from the cache took no time now, but belongs to the cost of this analysis
    timings["total_s"] = time.perf_counter() - start + reused_seconds

    plan = PruningPlan(
        num_blocks=num_blocks,
        layers_path=blocks.path,
        cka=stats.cka.tolist(),
        segments=segments,
        scores=[None if math.isnan(x) else x for x in scores],  # JSON has no NaN
        keep_per_segment=[len(s) - d for s, d in zip(segments, drops)],
        dropped=list(dropped),
        kept=[i for i in range(num_blocks) if i not in set(dropped)],
        n_tokens=stats.n_tokens,
        n_batches=stats.n_batches,
        config=config.to_dict(),
        timings=timings,
        segmentation_losses=losses,
        score_kind=score_kind,
        model_name=getattr(model, "name_or_path", None) or None,
        calibration_source=calibration.source,
        extra=extra,
    )
    return plan, calibration


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class PruneResult:
    """The pruned model (the input model, changed in place), its plan, and how to save it."""

    model: nn.Module
    plan: PruningPlan
    tokenizer: Any = None
    base_model: str | None = None
    # the original's outputs with the dropped blocks skipped: the saved folder is checked against
    # them once reloaded (None: verification was turned off)
    reference: verify.Reference | None = None

    def save_pretrained(self, output_dir: str | Path, *, overwrite: bool = False, evaluation: dict | None = None) -> Path:
        from .save import save_pruned

        return save_pruned(
            output_dir, self.model, self.tokenizer, self.plan,
            base_model=self.base_model or self.plan.model_name or "unknown",
            overwrite=overwrite, evaluation=evaluation, reference=self.reference,
        )

    def push_to_hub(self, repo_id: str, *, private: bool = True, token: str | None = None) -> str:
        """Save into a temporary folder and upload it (private unless asked)."""
        import tempfile

        from .hub import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            return push_folder(folder, repo_id, private=private, token=token)


def prune(
    model: nn.Module,
    calibration: Any = None,
    config: SGLPConfig | None = None,
    *,
    tokenizer: Any = None,
    plan: PruningPlan | None = None,
    progress: bool = True,
) -> PruneResult:
    """Analyze (unless a `plan` is given) and remove the chosen blocks from `model` in place.

    With `verify` (the default), the pruned model must compute what the original computes with
    the dropped blocks skipped (sglp_llm.verify); if it does not, the model is put back as it was
    and a VerificationError says so."""
    batches = None
    if plan is None:
        plan, calibration_set = _analyze(model, calibration, config, tokenizer, progress, None)
        batches = calibration_set.batches
    elif calibration is not None:
        settings = SGLPConfig.from_dict(plan.config)
        batches = prepare_calibration(calibration, tokenizer, settings).batches
    num_blocks = len(find_decoder_blocks(model, plan.layers_path).layers)
    if num_blocks != plan.num_blocks:
        raise ConfigError(
            f"This plan was made for a model with {plan.num_blocks} blocks, but this model has "
            f"{num_blocks}; analyze this model again."
        )
    params_before = count_parameters(model)
    base_model = plan.model_name or getattr(model, "name_or_path", None)
    reference = None
    if plan.config.get("verify", True):
        probe = verify.make_probe(model, batches, seed=plan.config.get("seed", 0))
        reference = verify.reference_outputs(model, plan.dropped, probe, plan.config, plan.layers_path)
    undo = removing_blocks(model, plan.dropped, layers_path=plan.layers_path)
    if reference is not None:
        try:
            verify.check(reference, model, verify.PRUNED, indices=plan.kept, device=plan.config.get("onload_device"))
        except BaseException:
            undo()
            raise
        verify.record(reference, plan)
    getattr(text_config(model), SGLP_CONFIG_KEY)["settings"] = plan.config
    plan.extra.update(params_before=params_before, params_after=count_parameters(model))
    return PruneResult(model=model, plan=plan, tokenizer=tokenizer, base_model=base_model, reference=reference)
