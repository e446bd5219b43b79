"""The two entry points: `analyze` (what would SGLP drop, and why) and `prune` (drop it).

One hooked pass over the calibration batches feeds every statistic: the streaming CKA and the
peer baselines' block scores from forward hooks and, for SGLP only, the gradient scores from one
backward per batch (sglp_llm.statistics.score), so the analysis costs about one training step per batch (one
inference step for the baselines). The same pass keeps every block's output on the loss check's
batches, which the loss check starts from (sglp_llm.passes.original_outputs). Then the registered selection the config names chooses the
blocks (sglp_llm.selection.registry): SGLP's groups and rules (sglp_llm.selection.sglp) or a peer's
(sglp_llm.selection.baselines); those that score candidate networks run the model again on the batches.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .model.blocks import last_full_attention, layer_kinds, text_config
from .model.handle import ModelHandle
from .passes.capture import BlockObserver
from .passes.checkpoint import StatisticsCheckpoint, fingerprint
from .statistics.cka import MinibatchCKA
from .recovery.block_recovery import BlockRecovery, recover_blocks
from .recovery.compensate import Compensation, applied, fit_compensation, fold
from .config import ConfigError, SGLPConfig
from .data import CalibrationSet, calibration_digest, prepare_calibration
from .selection.loss_check import loss_batches
from .explain import chosen_by, stages
from .passes.distributed import all_reduce_state, is_main_process, rank, world_size
from .plan import PruningPlan
from .output import verify
from .model.rewrite import SGLP_CONFIG_KEY, removing_blocks
from .statistics.score import BlockGradNorms, GateScores
from .stability import choice_stability
from .selection.decide import decide
from .selection.registry import Selection, SelectionContext, selection_name, selector_for
from .passes.head import loss_vocabulary
from .passes.hooked import hooked_pass
from .passes.original_outputs import OriginalOutputs
from .passes.sampling import default_calibration, model_sampler
from .passes.sequential import sequential_pass
from .model.offload import BLOCK_LOADER_ATTRIBUTE


@dataclass
class BlockStatistics:
    cka: torch.Tensor
    scores: torch.Tensor  # a baseline's per-block score; NaN where it has none
    n_tokens: int
    n_batches: int
    seconds: float = 0.0  # wall time of the pass that measured them
    n_sinks: int = 0  # tokens left out of the CKA sums as attention sinks
    # every gradient score the pass measured (sglp_llm.statistics.score), by name; `scores` is one of them
    gradient_scores: dict[str, list[float]] = field(default_factory=dict)
    # the block outputs on the loss check's batches, which it starts from (None: no loss check)
    original_outputs: OriginalOutputs | None = None


def statistics_key(config: SGLPConfig, n_drop: int) -> tuple:
    """Two analyses with equal keys measure the same statistics, so one pass can serve both
    (e.g. every SGLP variant and drop count in a comparison): the calibration and CKA settings,
    and which score the pass collects (angular distance depends on the run length)."""
    score = config.method if config.method != "sglp" else _gradient_pass(config) or "cka"
    # an SGLP rule whose pass also feeds an observer (the loss check's block influence)
    observed = selection_name(config) if config.method == "sglp" and selector_for(config).observer is not None else None
    run_length = n_drop if config.method == "angular" else None
    fields = (
        "cka_minibatch_tokens", "cka_max_tokens_per_batch", "cka_dtype", "cka_skip_sinks",
        "offload", "layers_path",
    )
    return (score, observed, run_length, *config.calibration_key(), *(getattr(config, name) for name in fields))


def _gradient_pass(config: SGLPConfig) -> str | None:
    """Which backward the statistics pass runs: "gate" (no weight gradients), "gradnorm" (the
    gate scores and the paper's weight-gradient norms) or None (no backward)."""
    if not config.needs_backward:
        return None
    return "gradnorm" if config.gradient_score == "gradnorm" else "gate"


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
    model: nn.Module | ModelHandle,
    calibration: CalibrationSet,
    config: SGLPConfig,
    n_drop: int,
    *,
    progress: bool = True,
) -> BlockStatistics:
    """CKA between all block outputs and the method's block scores, from one pass over the
    batches; the backward (the gradient scores) runs only for SGLP (not for a loss check of every
    block), the baselines run under no_grad.

    Under data parallelism (sglp_llm.passes.distributed) each process runs its share of the batches and
    the sums are reduced; with `config.checkpoint_dir` the sums are saved as the pass goes and a
    rerun resumes from them (sglp_llm.passes.checkpoint). Either way the statistics are those of one
    uninterrupted single-process pass. The blocks run as the handle runs them: one at a time
    (sglp_llm.passes.sequential), or in the model's own forward with hooks on them
    (sglp_llm.passes.hooked)."""
    started = time.perf_counter()
    handle = ModelHandle.for_config(model, config)
    model, layers = handle.model, handle.layers
    num_blocks = len(layers)
    cka = MinibatchCKA(
        num_blocks,
        minibatch_tokens=config.cka_minibatch_tokens,
        max_tokens_per_batch=config.cka_max_tokens_per_batch,
        dtype=getattr(torch, config.cka_dtype),
        seed=config.seed,
        skip_sinks=config.cka_skip_sinks,
    )
    observer = selector_for(config).observer
    score = observer(num_blocks, n_drop) if observer is not None else None
    backward = _gradient_pass(config)
    gates = GateScores(num_blocks) if backward is not None else None
    grads = BlockGradNorms.for_blocks(layers) if backward == "gradnorm" else None
    accumulators = {"cka": cka, "score": score, "gates": gates, "grads": grads}
    accumulators = {name: a for name, a in accumulators.items() if a is not None}
    batches = calibration.batches
    store = None
    if config.checkpoint_dir is not None:
        key = statistics_key(config, n_drop)
        store = StatisticsCheckpoint(config.checkpoint_dir, key, fingerprint(key, batches, handle))
    # the main process holds the sums saved so far; the others add theirs at the end
    done = store.resume(accumulators, load_sums=is_main_process()) if store is not None else 0
    # under data parallelism, batch i of those left goes to process i % world_size
    world, me = world_size(), rank()
    todo = range(done + me, len(batches), world)
    observers: list[BlockObserver] = [_AtIndices(cka, todo)] + ([score] if score is not None else [])
    original = (OriginalOutputs(batches, todo, len(loss_batches(batches, config)), to_cpu=handle.blockwise)
                if config.keeps_original_outputs else None)
    if original is not None:
        observers.append(original)

    def summed() -> dict[str, dict]:
        return {name: all_reduce_state(a.state_dict()) for name, a in accumulators.items()}

    def save(batches_done: int, state: dict[str, dict]) -> None:
        if store is not None and is_main_process():
            store.save(batches_done, state)

    def checkpoint(own_done: int) -> None:
        """After this process's own_done-th batch: the round of world_size batches it ended
        (every round but the last has one batch per process) may be due for a checkpoint."""
        start = done + (own_done - 1) * world
        finished = min(start + world, len(batches))
        every = config.checkpoint_every
        if store is not None and finished < len(batches) and finished // every > start // every:
            save(finished, summed())  # every process takes part in the reduction

    # how the batches run is the handle's: one block at a time, or the model's own forward
    run = (partial(sequential_pass, hidden_states=config.hidden_states, hidden_states_dir=config.hidden_states_dir)
           if handle.blockwise else
           partial(hooked_pass, gradient_checkpointing=config.gradient_checkpointing, after_batch=checkpoint))
    with eval_mode(model):
        if todo:
            arity = run(handle, [batches[i] for i in todo], observers, grads, gates, progress=progress)
            if original is not None:
                original.arity = arity
    state = summed()
    save(len(batches), state)  # a rerun, e.g. after a failed selection, skips the whole pass
    for name, accumulator in accumulators.items():
        accumulator.load_state_dict(state[name])
    cka_matrix = cka.compute().cpu()
    gradient_scores = {name: value.cpu() for name, value in gates.compute().items()} if gates is not None else {}
    if grads is not None:
        gradient_scores["gradnorm"] = grads.compute().cpu()
    if score is not None:
        scores = score.compute().cpu()
    else:
        scores = torch.full((num_blocks,), math.nan, dtype=torch.float64)
    return BlockStatistics(
        cka_matrix, scores, cka.n_tokens, len(batches), time.perf_counter() - started, cka.n_sinks,
        {name: value.tolist() for name, value in gradient_scores.items()}, original,
    )


def analyze(
    model: nn.Module | ModelHandle,
    calibration: Any = None,
    config: SGLPConfig | None = None,
    *,
    tokenizer: Any = None,
    progress: bool = True,
    statistics_cache: dict | None = None,
) -> PruningPlan:
    """Decide which decoder blocks of `model` to drop (by `config.method`); the model is left
    unchanged.

    `calibration` may be None (the config's dataset; unset, the model's own samples where it can
    sample them, else the standard-library docstrings: `default_calibration`), a dataset name or
    local path, a list of strings, pre-tokenized batches, or a `CalibrationSet`.
    `statistics_cache` (a dict kept by the caller) lets analyses that measure the same
    statistics (`statistics_key`) share one pass; the reported times still include it.
    """
    return _analyze(model, calibration, config, tokenizer, progress, statistics_cache)[0]


def _analyze(
    model: nn.Module | ModelHandle, calibration: Any, config: SGLPConfig | None, tokenizer: Any, progress: bool,
    statistics_cache: dict | None,
) -> tuple[PruningPlan, CalibrationSet]:
    """`analyze`, also returning the calibration set (whose tokens `prune` verifies on)."""
    if config is None:
        raise ConfigError("Pass an SGLPConfig, e.g. SGLPConfig(drop=4) or SGLPConfig(ratio=0.25).")
    start = time.perf_counter()
    timings: dict[str, float] = {}
    handle = ModelHandle.for_config(model, config)
    model, blocks = handle.model, handle.blocks
    fallback = None
    if calibration is None and config.dataset is None:  # the plan, report and card name the text used
        source, fallback = default_calibration(handle, tokenizer)
        config = config.replace(dataset=source)
    if config.loss_vocabulary is None:  # chosen for the model: the plan records what the head scored
        config = config.replace(loss_vocabulary=loss_vocabulary(model, config))
    num_blocks = len(blocks.layers)
    n_drop = config.resolve_drop(num_blocks)
    protected = config.protected_blocks(num_blocks)
    full_attention = last_full_attention(layer_kinds(model, num_blocks), n_drop, protected)
    protected |= {full_attention} - {None}
    cache = {} if statistics_cache is None else statistics_cache
    # a family the rewrite cannot handle is refused before the long work (once per model)
    if config.verify and cache.setdefault(("preflight", blocks.path), None) is None:
        t = time.perf_counter()
        verify.preflight(handle, seed=config.seed)
        cache[("preflight", blocks.path)] = timings["preflight_s"] = time.perf_counter() - t

    t = time.perf_counter()
    calibration = prepare_calibration(
        calibration, tokenizer, config,
        max_positions=getattr(text_config(model), "max_position_embeddings", None),
        sampler=model_sampler(handle, tokenizer, progress=progress),
    )
    timings["calibration_data_s"] = time.perf_counter() - t

    key = statistics_key(config, n_drop)
    reused = key in cache
    if not reused:
        cache[key] = collect_block_statistics(handle, calibration, config, n_drop, progress=progress)
    stats = cache[key]
    timings["statistics_s"] = stats.seconds
    reused_seconds = stats.seconds if reused else 0.0

    context = SelectionContext(
        handle=handle,
        batches=[to_device(b, handle.input_device) for b in calibration.batches],
        cka=stats.cka,
        # SGLP's gradient score, else the baseline's (one pass serves every gradient score)
        scores=stats.gradient_scores.get(config.gradient_score, stats.scores.tolist()),
        observed=stats.scores.tolist(),
        n_drop=n_drop,
        protected=protected,
        config=config,
        progress=progress,
        cache=cache,
        cache_key=key,
        original_outputs=stats.original_outputs,
    )
    extra: dict[str, Any] = {"protected": sorted(protected), "statistics_reused": reused,
                             "devices": handle.devices_used(), "calibration_sha256": calibration_digest(calibration.batches)}
    if full_attention is not None:
        extra["kept_as_last_full_attention"] = full_attention
    if fallback:
        extra["calibration_not_sampled"] = fallback
    if config.cka_skip_sinks:
        extra["cka_sinks_left_out"] = stats.n_sinks
    if config.method == "sglp" and stats.gradient_scores:
        extra["gradient_scores"] = stats.gradient_scores
    with eval_mode(model):
        t = time.perf_counter()
        selection = selector_for(config).choose(context)
        elapsed = time.perf_counter() - t
    # hidden states of every block: the cache (kept across a comparison's analyses) holds none
    stats.original_outputs = None
    extra.update(selection.extra)
    timings.update(selection.timings)
    spent = elapsed - sum(selection.timings.values())
    timings["selection_s"] = spent if selection.seconds is None else selection.seconds
    reused_seconds += timings["selection_s"] - spent
    if config.decide_among:
        t = time.perf_counter()
        selection, extra["decision"] = _decide_among_peers(handle, calibration, config, tokenizer, cache, context, selection)
        timings["decision_s"] = time.perf_counter() - t
    # work reused from the cache took no time now, but belongs to the cost of this analysis; the
    # stability check's time is reported apart (stability_s), whichever stage made it
    timings["total_s"] = time.perf_counter() - start + reused_seconds - timings.get("stability_s", 0.0)

    # a peer's choice is over the whole stack, one group
    segments = selection.segments or [list(range(num_blocks))]
    drops = selection.drops or [n_drop]
    plan = PruningPlan(
        num_blocks=num_blocks,
        layers_path=blocks.path,
        cka=stats.cka.tolist(),
        segments=segments,
        scores=[None if math.isnan(x) else x for x in selection.scores],  # JSON has no NaN
        keep_per_segment=[len(s) - d for s, d in zip(segments, drops)],
        dropped=list(selection.dropped),
        kept=[i for i in range(num_blocks) if i not in set(selection.dropped)],
        n_tokens=stats.n_tokens,
        n_batches=stats.n_batches,
        config=config.to_dict(),
        timings=timings,
        segmentation_losses=selection.segmentation_losses,
        score_kind=selection.score_kind,
        model_name=getattr(model, "name_or_path", None) or None,
        calibration_source=calibration.source,
        extra=extra,
    )
    plan.extra["stages"] = stages(plan.config, plan.n_tokens)
    plan.extra["chosen_by"] = {str(block): why for block, why in chosen_by(plan).items()}
    if config.stability_check and "stability" not in plan.extra:  # the loss check checks its own
        halves = config.replace(stability_check=False)
        preflighted = {k: v for k, v in cache.items() if k[0] == "preflight"}
        if progress:  # the halves' analyses take as long as the choice: say what the next bars are
            tqdm.write("Stability check: the same analysis on the halves of the calibration sequences", file=sys.stderr)
        plan.extra["stability"] = choice_stability(
            calibration, plan.dropped, lambda half: _analyze(handle, half, halves, tokenizer, progress, dict(preflighted))[0].dropped,
        )
        if "seconds" in plan.extra["stability"]:
            plan.timings["stability_s"] = plan.extra["stability"]["seconds"]
    return plan, calibration


def _decide_among_peers(
    handle: ModelHandle, calibration: CalibrationSet, config: SGLPConfig, tokenizer: Any, cache: dict,
    context: SelectionContext, selection: Selection,
) -> tuple[Selection, dict[str, Any]]:
    """SGLP's choice against those of the peers `config.decide_among` names, each analysed on the
    same calibration (their statistics passes kept in the cache), decided on the calibration
    tokens after the loss check's (sglp_llm.selection.decide)."""
    peers = {
        method: _analyze(handle, calibration, config.replace(method=method, decide_among=[], stability_check=False),
                         tokenizer, False, cache)[0].dropped
        for method in config.decide_among
    }
    with eval_mode(handle.model):
        winner, record = decide(handle, context.batches, {config.method: selection.dropped, **peers}, config.loss_tokens)
    if winner != config.method:
        drops = [sum(b in segment for b in peers[winner]) for segment in selection.segments] if selection.segments else None
        selection = dataclasses.replace(selection, dropped=sorted(peers[winner]), drops=drops)
    return selection, record


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
    # a model that also reads images: its processor, saved in place of the tokenizer so the folder
    # keeps its image processor and chat template (`LoadedModel.processor`)
    processor: Any = None

    def save_pretrained(self, output_dir: str | Path, *, overwrite: bool = False, evaluation: dict | None = None) -> Path:
        from .output.save import save_pruned

        return save_pruned(
            output_dir, self.model, self.tokenizer if self.processor is None else self.processor, self.plan,
            base_model=self.base_model or self.plan.model_name or "unknown",
            overwrite=overwrite, evaluation=evaluation, reference=self.reference,
        )

    def push_to_hub(self, repo_id: str, *, private: bool = True, token: str | None = None) -> str:
        """Save into a temporary folder and upload it (private unless asked)."""
        import tempfile

        from .output.hub import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            return push_folder(folder, repo_id, private=private, token=token)


def fit_plan_compensation(model: nn.Module | ModelHandle, batches: Sequence[dict[str, torch.Tensor]], plan: PruningPlan,
                          method: str) -> Compensation:
    """Compensation `method` for the plan's dropped blocks, fitted on the calibration batches with
    the plan's settings (ridge, fit, sequential onloading)."""
    handle = ModelHandle.for_plan(model, plan)
    return fit_compensation(
        handle, [to_device(b, handle.input_device) for b in batches], plan.dropped, method=method,
        ridge=plan.config.get("compensation_ridge", 0.0), fit_on=plan.config.get("compensation_fit", "original"),
    )


def _compensation(handle: ModelHandle, batches: Sequence[dict[str, torch.Tensor]] | None, plan: PruningPlan) -> Compensation | None:
    """The plan's compensation fitted on the calibration batches (None when off), recorded in
    the plan: where each T goes and how well it fits."""
    method = plan.config.get("compensation", "none")
    if method == "none":
        return None
    if batches is None:
        raise ConfigError("Compensation is fitted on calibration text: pass the calibration data with the plan.")
    compensation = fit_plan_compensation(handle, batches, plan, method)
    plan.extra["compensation"] = {"method": method, "folded": {str(p): fit for p, fit in compensation.fits.items()}}
    return compensation


def _recovery(handle: ModelHandle, calibration: Any, tokenizer: Any, plan: PruningPlan, progress: bool) -> BlockRecovery | None:
    """The plan's block-local recovery (None when off), trained in place, one block at a time as
    the plan's offloading runs them, and recorded in the plan. Its windows come from the
    calibration source, recover_steps × batch_size of them so that each step reads new text
    (pre-tokenized calibration batches are used as given, cycled)."""
    settings = SGLPConfig.from_dict(plan.config)
    if settings.recover == "none":
        return None
    wanted = settings.recover_steps * settings.batch_size
    with warnings.catch_warnings():  # less text than that is cycled through, as the report says
        warnings.filterwarnings("ignore", message="The calibration text has", category=UserWarning)
        windows = prepare_calibration(calibration, tokenizer, settings.replace(n_samples=wanted),
                                      max_positions=getattr(text_config(handle.model), "max_position_embeddings", None),
                                      sampler=model_sampler(handle, tokenizer, progress=progress))
    recovery = recover_blocks(
        handle, [to_device(b, handle.input_device) for b in windows.batches], plan.dropped,
        steps=settings.recover_steps, learning_rate=settings.recover_learning_rate, progress=progress,
    )
    plan.extra["recovery"] = {**recovery.record(), "text": windows.source, "windows": windows.n_samples,
                              "passes": wanted / windows.n_samples}
    plan.timings["recovery_s"] = recovery.seconds
    return recovery


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
    the dropped blocks skipped (sglp_llm.output.verify); if it does not, the model is put back as it was
    and a VerificationError says so."""
    batches = None
    compensated = plan.config.get("compensation", "none") if plan is not None else getattr(config, "compensation", "none")
    if compensated != "none" and hasattr(model, BLOCK_LOADER_ATTRIBUTE):  # before any analysis
        raise ConfigError(
            "Compensation folds its maps into kept blocks' weights, which a model with its blocks on disk "
            "does not hold in memory; load it in CPU memory with offload: sequential, or use compensation: none."
        )
    if plan is None:
        plan, calibration_set = _analyze(model, calibration, config, tokenizer, progress, None)
        batches = calibration_set.batches
    handle = ModelHandle.for_plan(model, plan)
    if batches is None and calibration is not None:
        batches = prepare_calibration(calibration, tokenizer, SGLPConfig.from_dict(plan.config),
                                      sampler=model_sampler(handle, tokenizer, progress=progress)).batches
    num_blocks = len(handle.layers)
    if num_blocks != plan.num_blocks:
        raise ConfigError(
            f"This plan was made for a model with {plan.num_blocks} blocks, but this model has "
            f"{num_blocks}; analyze this model again."
        )
    params_before = count_parameters(model)
    base_model = plan.model_name or getattr(model, "name_or_path", None)
    compensation = _compensation(handle, batches, plan)
    recovery = _recovery(handle, calibration, tokenizer, plan, progress)
    restore = recovery.restore if recovery else (lambda: None)
    reference = None
    if plan.config.get("verify", True):
        probe = verify.make_probe(model, batches, seed=plan.config.get("seed", 0))
        # the original with the dropped blocks skipped and, compensated, T applied explicitly;
        # recovered, with the trained blocks' weights in place
        with applied(handle, compensation) if compensation else nullcontext():
            reference = verify.reference_outputs(handle, plan.dropped, probe)
    unfold = fold(handle, compensation) if compensation else (lambda: None)
    undo = removing_blocks(handle, plan.dropped)
    if reference is not None:
        try:
            verify.check(reference, handle, verify.PRUNED, indices=plan.kept)
        except BaseException:
            undo()
            unfold()
            restore()
            raise
        verify.record(reference, plan)
    getattr(text_config(model), SGLP_CONFIG_KEY)["settings"] = plan.config
    plan.extra.update(params_before=params_before, params_after=count_parameters(model))
    return PruneResult(model=model, plan=plan, tokenizer=tokenizer, base_model=base_model, reference=reference)
