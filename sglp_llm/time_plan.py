"""How long an analysis takes, predicted before the model is loaded: the decoder-block forwards and
head evaluations of each phase, counted from the settings, times a throughput measured on this
machine in a few seconds (one block and the head of the model, random weights) or given in FLOP/s.

Counted exactly: the statistics pass, the loss check's screen (it and the search start from the
block outputs the statistics pass keeps), SLEB's search, and whatever the removal loss runs for a
measurement (`CountedRemovalLoss` keeps the same record of
kept outputs as the real one, and counts the blocks a pass would run instead of running them).
Assumed, because the data decide them: how many candidates each step of the lazy search measures
(`MEASURED_PER_STEP`, the removed block and its nearest kept neighbours) and the removal order (a
run in the middle of the stack). Not counted: loading, reading blocks from disk, verification
and writing. `benchmarks/time_plan.py` checks the prediction against measured runs.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .config import AUTO_VOCABULARY, ConfigError, SGLPConfig
from .data import SELF_GENERATED, STDLIB_DOCS, first_samples, sampled_windows
from .model.blocks import last_full_attention
from .passes.head import position_sample, subset_columns
from .passes.memory_plan import meta_model
from .selection.loss_check import LAZY_MEASURED_TOGETHER, loss_batches, loss_halves
from .selection.removal import RemovalLoss

# the lazy search's measurements per step after the first (the first: the screen's promising
# candidates, else every candidate); measured on the real models (benchmarks/results/time-plan.md)
MEASURED_PER_STEP = 3
# the first step's, after a screen whose estimates are lowered by their expected error
# (loss_screen_errors > 0, the default): more candidates stay promising. The mean over the real
# models' runs on the robustness table, 5.6 (SmolLM2 6.5 over 29 runs, 1 to 12; Gemma-3-270M 2.5)
MEASURED_FIRST_WITH_ALLOWANCE = 6
# a backward through a block costs about twice its forward
BACKWARD_COST = 2.0


@dataclass
class Work:
    """Block forwards and head evaluations, counted per token position."""

    block_tokens: int = 0  # one decoder block run on one position
    head_tokens: int = 0  # final norm, lm_head and loss on one position
    # the same with the head narrowed to a batch's vocabulary subset (loss_vocabulary): priced at
    # the share of the head's columns it computes (`narrowed_share`)
    narrowed_head_tokens: int = 0
    # the whole head picking a position's likeliest tokens for that subset (a top-k, no loss)
    likeliest_head_tokens: int = 0
    backward_block_tokens: int = 0  # one block's backward on one position
    # a block run over all the batches of a pass: one read from CPU memory or disk when blocks run
    # one at a time (sequential onloading, blocks on disk); not timed
    block_loads: int = 0

    def add(self, other: "Work") -> None:
        self.block_tokens += other.block_tokens
        self.head_tokens += other.head_tokens
        self.narrowed_head_tokens += other.narrowed_head_tokens
        self.likeliest_head_tokens += other.likeliest_head_tokens
        self.backward_block_tokens += other.backward_block_tokens
        self.block_loads += other.block_loads


@dataclass
class Throughput:
    """Seconds per unit of `Work` on the machine that will run the analysis."""

    block_token_s: float
    head_token_s: float
    source: str
    likeliest_token_s: float | None = None  # None: as a head position

    def seconds(self, work: Work, narrowed_share: float = 1.0) -> float:
        """`work`'s time, a narrowed head position costing `narrowed_share` of a whole one."""
        head = work.head_tokens + narrowed_share * work.narrowed_head_tokens
        likeliest = work.likeliest_head_tokens * (self.head_token_s if self.likeliest_token_s is None else self.likeliest_token_s)
        return (work.block_tokens + BACKWARD_COST * work.backward_block_tokens) * self.block_token_s + head * self.head_token_s + likeliest


@dataclass
class TimePlan:
    phases: dict[str, Work]
    throughput: Throughput
    assumptions: list[str] = field(default_factory=list)
    narrowed_share: float = 1.0  # a narrowed head's columns over the whole head's (`narrowed_share`)

    def seconds(self) -> dict[str, float]:
        return {phase: self.throughput.seconds(work, self.narrowed_share) for phase, work in self.phases.items()}

    def total_s(self) -> float:
        return sum(self.seconds().values())

    def to_dict(self) -> dict[str, Any]:
        return {"total_s": self.total_s(), "seconds": self.seconds(), "phases": {p: asdict(w) for p, w in self.phases.items()},
                "throughput": asdict(self.throughput), "narrowed_share": self.narrowed_share, "assumptions": self.assumptions}

    def text(self) -> str:
        lines = [f"Time plan: about {_duration(self.total_s())} of compute ({self.throughput.source}):"]
        for phase, seconds in self.seconds().items():
            work = self.phases[phase]
            lines.append(f"  {phase}: {_duration(seconds)} ({work.block_tokens / 1e6:.2f}M block-token forwards, "
                         f"{work.head_tokens / 1e6:.2f}M head positions"
                         + (f", {work.narrowed_head_tokens / 1e6:.2f}M narrowed, {work.likeliest_head_tokens / 1e6:.2f}M "
                            "picking the likeliest tokens" if work.narrowed_head_tokens else "")
                         + (f", {work.backward_block_tokens / 1e6:.2f}M block-token backwards" if work.backward_block_tokens else "")
                         + f"; {work.block_loads} block reads when blocks run one at a time)")
        lines += [f"  assumed: {a}" for a in self.assumptions]
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


class CountedRemovalLoss(RemovalLoss):
    """The removal loss's bookkeeping without a model: each pass counts the blocks it would run
    on `tokens` positions (and the head on `scored` of them) and keeps their outputs' places, so
    a sequence of measurements costs what it costs the real `RemovalLoss`; with `original`, it
    starts from every block's output as the statistics pass keeps them for the loss check. With a
    `store` (a set of (removed set, batch key) pairs), a set measured on all its batches' `keys`
    before is read back at no cost, as the real one reads `MeasuredLosses`. With `vocabulary` the
    original network's pass runs the whole head (picking each position's likeliest tokens) and
    every pass the narrowed head, once per batch key (the store shares the subsets)."""

    def __init__(self, num_blocks: int, tokens: int, scored: int, objective: str = "nll", *, blockwise: bool = False,
                 original: bool = False, keys: Sequence[Any] = (), store: set | None = None, vocabulary: int = 0) -> None:
        # no model, no batches: only the state `_run`'s bookkeeping reads (RemovalLoss.__init__ needs a model)
        self.num_blocks, self.tokens, self.scored, self.objective = num_blocks, tokens, scored, objective
        self.reads_blocks = blockwise  # measure_many reads each block once (BlockwiseRemovalLoss)
        self.keys, self.store = list(keys), store
        self.vocabulary, self._subsets = vocabulary, None
        self.removed: list[int] = []
        self._outputs: dict[int, Any] = dict.fromkeys(range(num_blocks), ()) if original else {}
        self._reference = None
        self.work = Work()

    def _run(self, skipped: list[int], start: int | None, stop: int | None = None, keep: bool = True) -> float | None:
        span = self._span(skipped, start, stop)
        self.work.block_tokens += len(span) * self.tokens
        self.work.block_loads += len(span)
        if keep and sorted(skipped) == sorted(self.removed):
            self._outputs.update(dict.fromkeys(span, ()))
        if stop is not None:
            return None
        self._head()
        self._keep(skipped)
        return 0.0

    def _head(self) -> None:
        if self.vocabulary:
            self.work.narrowed_head_tokens += self.scored
        else:
            self.work.head_tokens += self.scored

    def _references(self) -> float | None:
        if not self.vocabulary or self._subsets is not None:
            return None
        self._subsets = []
        subsets = {("subset", key) for key in self.keys}
        if self.store is not None and subsets <= self.store:
            return None
        self.work.likeliest_head_tokens += self.scored  # the whole head picks the likeliest tokens
        loss = self._run([], self._nearest_kept_output(self.num_blocks))
        if self.store is not None:
            self.store.update(subsets)
        return loss

    def _keep(self, skipped: Sequence[int]) -> None:
        if self.store is not None and self.objective == "nll":  # the real one keeps per-sequence NLLs only
            self.store.update((frozenset(skipped), key) for key in self.keys)

    def _stored(self, skipped: Sequence[int]) -> list | None:
        held = self.store is not None and all((frozenset(skipped), key) in self.store for key in self.keys)
        return [] if held else None

    def _mean(self, summed: list, skipped: Sequence[int]) -> float:
        return 0.0


    def measure_many(self, blocks: Sequence[int]) -> dict[int, float]:
        if not self.reads_blocks:
            return super().measure_many(blocks)
        # BlockwiseRemovalLoss.measure_many: the current network up to the deepest block before a
        # candidate not stored, then every such candidate's stream in one pass that reads each block once
        blocks = [block for block in blocks if self._stored(self.removed + [block]) is None]
        if not blocks:
            return {}
        self._references()
        previous = self._outputs_before(blocks)
        read: set[int] = set()
        for block, start in previous.items():
            span = self._span(self.removed + [block], start, None)
            self.work.block_tokens += len(span) * self.tokens
            self._head()
            self._keep(self.removed + [block])
            read.update(span)
        self.work.block_loads += len(read)
        return dict.fromkeys(blocks, 0.0)


def scored_per_window(config: SGLPConfig) -> int:
    """The positions of one full window the loss check's head scores."""
    sample = position_sample(config.seq_len - 1, config.loss_positions, config.seed)
    return config.seq_len - 1 if sample is None else len(sample)


def assumed_order(num_blocks: int, n_drop: int, protected: set[int]) -> list[int]:
    """The removal order the prediction assumes: a run of `n_drop` blocks centred at 60 % of the
    depth (where both benchmarked models lose blocks first), shallowest first."""
    free = [b for b in range(num_blocks) if b not in protected]
    centre = min(range(len(free)), key=lambda i: abs(free[i] - 0.6 * (num_blocks - 1)))
    start = max(0, min(centre - n_drop // 2, len(free) - n_drop))
    return free[start:start + n_drop]


def _reads_blocks(config: SGLPConfig) -> bool:
    """Whether the loss check runs one block at a time (BlockwiseRemovalLoss: a pass reads each
    block once for every candidate it measures)."""
    return config.offload == "sequential"


def _loss_rows(config: SGLPConfig, sequences: int) -> list[int]:
    """The rows of the loss check's batches among `sequences` full calibration windows in batches of
    `batch_size`, cut between their halves for the stability check as the loss check cuts them."""
    window = {"input_ids": torch.zeros(config.seq_len, dtype=torch.long), "attention_mask": torch.ones(config.seq_len, dtype=torch.long)}
    calibration = [{k: v.expand(min(config.batch_size, sequences - start), -1) for k, v in window.items()}
                   for start in range(0, sequences, config.batch_size)]
    batches = loss_batches(calibration, config)
    if config.stability_check and sum(len(b["input_ids"]) for b in batches) >= 2:
        batches = [b for half in loss_halves(batches) for b in half]
    return [len(b["input_ids"]) for b in batches]


def _first_rows(rows: list[int], n: int) -> list[int]:
    """The rows of the batches holding the first `n` of the sequences of batches of `rows` (data.first_samples)."""
    return [len(b["input_ids"]) for b in first_samples([{"input_ids": torch.empty(r, 0)} for r in rows], n)]


def _loss_search(num_blocks: int, config: SGLPConfig, rows: list[int], first_batch: int, protected: set[int],
                 order: Sequence[int], measured_per_step: int | Sequence[int], store: set) -> Work:
    """The loss check's search on the loss batches of `rows` (from index `first_batch` on), removing
    `order`, reading back what `store` holds."""
    seq, per_window = config.seq_len, scored_per_window(config)
    blockwise = _reads_blocks(config)

    def removal(part: list[int]) -> CountedRemovalLoss:
        return CountedRemovalLoss(num_blocks, sum(part) * seq, sum(part) * per_window, config.loss_objective,
                                  blockwise=blockwise, original=True, keys=[(first_batch + i, r) for i, r in enumerate(part)],
                                  store=store, vocabulary=config.loss_vocabulary or 0)

    search = removal(rows)
    candidates = [b for b in range(num_blocks) if b not in protected]
    work = Work()
    screen = config.first_step_screen == "sequences"
    if config.loss_bound != "stale" or screen:
        search.current()
    if screen:
        sample = removal(_first_rows(rows, config.loss_screen_samples))
        sample.current()
        sample.measure_many(candidates)
        work.add(sample.work)
    for step, removed in enumerate(order):
        left = [b for b in candidates if b not in search.removed]
        if not config.loss_lazy:
            search.measure_many(left)
        else:  # no estimates yet at an unscreened first step: every candidate
            per_step = measured_per_step if isinstance(measured_per_step, int) else measured_per_step[step]
            if step == 0 and not screen:
                per_step = len(left)
            elif step == 0 and config.lowers_screened_estimates and isinstance(measured_per_step, int):
                per_step = MEASURED_FIRST_WITH_ALLOWANCE
            # blocks read one at a time: the search measures its candidates LAZY_MEASURED_TOGETHER
            # to a pass (a step's last pass measuring the rest of its group too)
            together = LAZY_MEASURED_TOGETHER if blockwise else 1
            measured = sorted(sorted(left, key=lambda b: (abs(b - removed), b))[:math.ceil(per_step / together) * together])
            for group in (measured[i:i + together] for i in range(0, len(measured), together)):
                search.measure_many(group) if len(group) > 1 else search.measure(group[0])
        search.remove(removed)
    work.add(search.work)
    return work


def _loss_check(phases: dict[str, Work], prefix: str, num_blocks: int, config: SGLPConfig, sequences: int,
                protected: set[int], order: Sequence[int], measured_per_step: int | Sequence[int],
                halves_orders: tuple[Sequence[int], Sequence[int]] | None) -> None:
    """The loss check's work on `sequences` calibration windows, removing `order`; with the
    stability check, its search on each half of the loss windows, removing `halves_orders` and
    reading back what the whole measured on its windows; None: each half reads back the whole's
    first step and measures every later one on its own (it leaves the choice's path after the
    first removal, as the halves did on both real models)."""
    rows, store = _loss_rows(config, sequences), set()
    phases.setdefault(prefix + "loss check", Work()).add(
        _loss_search(num_blocks, config, rows, 0, protected, order, measured_per_step, store))
    if config.stability_check and sum(rows) >= 2:
        if halves_orders is None:  # the unpruned network, each single removal, the vocabulary subsets
            store = {entry for entry in store if entry[0] == "subset" or len(entry[0]) <= 1}
            halves_orders = (order, order)
        first = _first_rows(rows, sum(rows) // 2)
        halves = Work()
        halves.add(_loss_search(num_blocks, config, first, 0, protected, halves_orders[0], measured_per_step, store))
        halves.add(_loss_search(num_blocks, config, rows[len(first):], len(first), protected, halves_orders[1],
                                measured_per_step, store))
        phases.setdefault(prefix + "stability check: the loss check's halves", Work()).add(halves)


def _sleb(num_blocks: int, config: SGLPConfig, sequences: int, protected: set[int], order: Sequence[int]) -> Work:
    """SLEB: every candidate of every step is a whole forward over its calibration windows."""
    windows = sequences if config.sleb_batches is None else min(sequences, config.sleb_batches * config.batch_size)
    network = CountedRemovalLoss(num_blocks, windows * config.seq_len, windows * (config.seq_len - 1))
    network.loss_without([])
    removed: list[int] = []
    for block in order:
        for candidate in (b for b in range(num_blocks) if b not in protected and b not in removed):
            network.loss_without(removed + [candidate])
        removed.append(block)
    return network.work


def _analysis(phases: dict[str, Work], prefix: str, num_blocks: int, config: SGLPConfig, sequences: int,
              protected: set[int], order: Sequence[int], measured_per_step: int | Sequence[int],
              halves_orders: tuple[Sequence[int], Sequence[int]] | None = None) -> None:
    tokens = sequences * config.seq_len
    statistics = Work(block_tokens=tokens * num_blocks, block_loads=num_blocks)
    if config.needs_backward:
        statistics.head_tokens = sequences * (config.seq_len - 1)
        statistics.backward_block_tokens = tokens * num_blocks
        statistics.block_loads *= 2
    phases.setdefault(prefix + "statistics pass", Work()).add(statistics)
    if config.method == "sleb":
        phases.setdefault(prefix + "SLEB search", Work()).add(_sleb(num_blocks, config, sequences, protected, order))
    elif config.method == "sglp" and config.scoring == "loss":
        _loss_check(phases, prefix, num_blocks, config, sequences, protected, order, measured_per_step, halves_orders)


def _check_supported(config: SGLPConfig) -> None:
    unsupported = [
        name for name, value in (
            ("scoring: subset", config.method == "sglp" and config.scoring == "subset"),
            ("loss_beam", config.loss_beam > 1), ("loss_confirm", config.loss_confirm > 1),
            ("decide_among", bool(config.decide_among)), ("compensation_aware", config.compensation_aware),
            ("loss_candidates", config.loss_candidates != "all"), ("loss_screen: taylor", config.loss_screen == "taylor"),
        ) if value
    ]
    if unsupported:
        raise ConfigError(
            f"The time plan predicts the default loss check (its token, position, vocabulary, screen, bound and "
            f"objective settings), "
            f"SLEB and the forward-only peers; not {', '.join(unsupported)}. Leave those at their defaults to plan."
        )


def count_analysis(
    num_blocks: int, config: SGLPConfig, *, order: Sequence[int] | None = None,
    measured_per_step: int | Sequence[int] = MEASURED_PER_STEP,
    halves_orders: tuple[Sequence[int], Sequence[int]] | None = None, layer_kinds: Sequence[str] | None = None,
) -> tuple[dict[str, Work], list[str]]:
    """Each phase's work in `analyze` of a `num_blocks` model with `config` on full windows,
    removing `order` (None: `assumed_order`), the lazy search measuring `measured_per_step`
    candidates at each step (or a count per step), and what the count assumes. The stability check:
    the loss check's search on each half of its sequences, removing `halves_orders` (None: assumed
    to leave the choice's path after its first removal, `_loss_check`), else the whole analysis
    on each half of the calibration. `loss_vocabulary` None counts the whole vocabulary's head
    (`plan_time` settles it for the model's shape). `layer_kinds`: the blocks' kinds
    (`model.blocks.layer_kinds`), which may protect a hybrid's last full-attention block as in `analyze`."""
    config.validate()
    _check_supported(config)
    n_drop = config.resolve_drop(num_blocks)
    protected = config.protected_blocks(num_blocks)
    protected |= {last_full_attention(layer_kinds, n_drop, protected)} - {None}
    assumptions = []
    if order is None:
        order = assumed_order(num_blocks, n_drop, protected)
        assumptions.append(f"the blocks go in the order {list(order)}")
    if config.method == "sglp" and config.scoring == "loss" and config.loss_lazy and isinstance(measured_per_step, int):
        together = (f" ({LAZY_MEASURED_TOGETHER} to a pass over the blocks, read once for all of them)"
                    if _reads_blocks(config) else "")
        assumptions.append(f"each step of the lazy search after the first measures {measured_per_step} candidates{together}")
        if config.lowers_screened_estimates:
            assumptions.append(f"its first step measures {MEASURED_FIRST_WITH_ALLOWANCE} after the screen (the screen's allowance "
                               "leaves more candidates promising)")
    phases: dict[str, Work] = {}
    if config.dataset is None:  # analyze's default (passes.sampling.default_calibration)
        blockwise = config.offload == "sequential"
        config = config.replace(dataset=STDLIB_DOCS if blockwise else SELF_GENERATED)
        assumptions.append("no dataset set: " + ("the docstrings (the model runs one block at a time)" if blockwise else
                                                 "the model's own samples (not a device map that offloads to disk, "
                                                 "where the docstrings are used instead)"))
    sampled = sampled_windows(config)
    if sampled:  # generate() runs every block and the head on each new position, one at a time
        positions = sampled * (config.seq_len - 1)
        phases["sampling the model's own text"] = Work(block_tokens=positions * num_blocks, head_tokens=positions)
        assumptions.append("sampling the model's own text is priced as forwards over its positions; decoding one "
                           "position at a time runs slower than that (on a GPU most)")
    _analysis(phases, "", num_blocks, config, config.n_samples, protected, order, measured_per_step, halves_orders)
    if config.stability_check and config.method == "sglp" and config.scoring == "loss":
        if halves_orders is None:
            assumptions.append("the stability check's search on each half of the loss windows reads back the choice's "
                               "first step and measures every later step on its own, on half the tokens (its path "
                               "leaves the choice's after the first removal, as on both benchmarked models; a stable "
                               "choice's halves read back more)")
    elif config.stability_check and config.n_samples >= 2:  # the whole analysis again on each half
        for sequences in (config.n_samples // 2, config.n_samples - config.n_samples // 2):
            _analysis(phases, "stability check: ", num_blocks, config.replace(stability_check=False), sequences,
                      protected, order, measured_per_step)
    return phases, assumptions


# ------------------------------------------------------------------------------ throughput
@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from the architecture, read once from the model built on the meta device."""

    num_blocks: int
    block_params: int  # the largest decoder block's
    hidden_size: int
    head_params: int
    vocab_size: int  # the head's outputs
    linear_head: bool  # a plain linear layer (one a vocabulary subset can narrow)
    layer_kinds: tuple[str, ...] | None = None  # `model.blocks.layer_kinds`

    @classmethod
    def of(cls, model_config: Any, layers_path: str | None = None) -> "ModelShape":
        from .model.blocks import find_decoder_blocks, layer_kinds, text_config

        model = meta_model(model_config, torch.float32)
        layers = find_decoder_blocks(model, layers_path).layers
        head = model.get_output_embeddings()
        kinds = layer_kinds(model, len(layers))
        return cls(len(layers), max(sum(p.numel() for p in b.parameters()) for b in layers),
                   text_config(model).hidden_size, head.weight.numel(), head.weight.shape[0], isinstance(head, nn.Linear),
                   tuple(kinds) if kinds is not None else None)

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """(one block's, the head's) forward FLOPs per position: 2 per weight, plus attention's
        scores and weighted sum over about half the window."""
        return float(2 * self.block_params + 2 * seq_len * self.hidden_size), float(2 * self.head_params)


def throughput_from_flops(shape: ModelShape, flops_per_s: float, seq_len: int) -> Throughput:
    """A given sustained FLOP/s rate (e.g. a GPU's) turned into seconds per block-token and head position."""
    block, head = shape.flops_per_token(seq_len)
    return Throughput(block / flops_per_s, head / flops_per_s, f"given: {flops_per_s / 1e12:g} TFLOP/s sustained")


@torch.no_grad()
def measure_throughput(model_config: Any, *, dtype: torch.dtype, device: str, seq_len: int, layers_path: str | None = None) -> Throughput:
    """Time one decoder block, the head's loss and its pick of each position's likeliest tokens
    (the vocabulary subset's top-k) on a one-block copy of the model (random weights, so nothing
    is read), on one window, best of two after a warm-up."""
    from .model.auto_class import auto_model_class
    from .passes.head import head_nll, likeliest_tokens, output_of
    from .model.handle import ModelHandle
    from .model.rewrite import remove_blocks

    # the rewrite edits the config it finds: a copy's, so the caller's still counts every block
    meta = ModelHandle.of(meta_model(copy.deepcopy(model_config), dtype), layers_path=layers_path)
    remove_blocks(meta, range(1, len(meta.layers)))  # the config of a one-block model, by the rewrite's rules
    model = auto_model_class(meta.model.config).from_config(meta.model.config, dtype=dtype).to(device).eval()
    handle = ModelHandle.of(model, layers_path=layers_path)
    tokens = min(seq_len, 256)
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = {"input_ids": torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device),
             "attention_mask": torch.ones(1, tokens, dtype=torch.long, device=device)}
    block_s, head_s, likeliest_s = [], [], []
    for _ in range(3):
        started = time.perf_counter()
        final, arity = output_of(model, handle.layers[-1], batch)
        _synchronize(device)
        block_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        head_nll(handle, batch, final, arity)
        _synchronize(device)
        head_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        likeliest_tokens(handle, batch, final, arity, AUTO_VOCABULARY)
        _synchronize(device)
        likeliest_s.append(time.perf_counter() - started)
    return Throughput(min(block_s[1:]) / tokens, min(head_s[1:]) / (tokens - 1),
                      f"measured on {device} in {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} torch thread(s)",
                      min(likeliest_s[1:]) / (tokens - 1))


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def narrowed_share(config: SGLPConfig, vocab_size: int) -> float:
    """The share of the head's columns a full loss batch's vocabulary subset holds
    (`head.subset_columns` at `loss_vocabulary` k)."""
    positions = config.batch_size * scored_per_window(config)
    return subset_columns(config.loss_vocabulary, positions, vocab_size) / vocab_size


def plan_time(shape: ModelShape, config: SGLPConfig, throughput: Throughput, *, order: Sequence[int] | None = None) -> TimePlan:
    """The time plan of `analyze` on a model of this shape at `throughput`."""
    # as `analyze` settles it once the model is loaded (`head.loss_vocabulary`)
    config = config.replace(loss_vocabulary=config.resolve_loss_vocabulary(shape.linear_head, shape.vocab_size))
    phases, assumptions = count_analysis(shape.num_blocks, config, order=order, layer_kinds=shape.layer_kinds)
    share = 1.0
    if config.loss_vocabulary and config.method == "sglp" and config.scoring == "loss":
        share = narrowed_share(config, shape.vocab_size)
        assumptions.append(f"the head narrowed to each loss batch's {config.loss_vocabulary} likeliest tokens per position "
                           f"computes {share:.1%} of its columns (measured on two models' docstrings)")
    return TimePlan(phases, throughput, assumptions + ["compute only: loading, reading blocks (counted, not timed), "
                                                      "verification and writing left out"], share)
