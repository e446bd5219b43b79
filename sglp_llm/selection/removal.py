"""The calibration loss of a network with some decoder blocks removed: what SLEB and SGLP's loss
check rank candidate removals by.

`calibration_nll` runs the whole network for every candidate, as SLEB's reference does.
`RemovalLoss` serves a greedy search, where every candidate is "the current network minus one more
block": up to that block nothing changes, so the current network's output there is kept from one
forward (the original network's, from the statistics pass: sglp_llm.passes.original_outputs) and
only the blocks after it run. Removing block i then costs the blocks after i and the
head instead of a whole forward, and the number is the same, because the model's own forward
(masks, position embeddings, final norm, head, loss) still runs around stubbed-out blocks.
`BlockwiseRemovalLoss` is the same for a model run one block at a time (sequential onloading,
blocks on disk): each pass goes block by block over all the loss batches, so a block is read once
per pass. The head's loss is taken a chunk of positions at a time (sglp_llm.passes.head).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..model.handle import ModelHandle
from ..passes.capture import as_returned, block_arity, block_output, stubbed_blocks
from ..recovery.compensate import Compensation, applied, fit_compensation, removed_runs
from ..config import LOSS_OBJECTIVES
from ..passes.distributed import all_reduce_state, shard
from ..model.rewrite import skip_blocks
from ..passes.head import (RESTS_SAMPLED, ReferenceDistribution, VocabularySubset, head_kl, head_nll, likeliest_tokens,
                           loss_vocabulary, output_of, position_sample, reference_distribution, vocabulary_subset)
from ..passes.loss import check_finite
from ..passes.original_outputs import OriginalOutputs
from ..passes.sequential import _record_calls
from ..model.offload import onloaded


class MeasuredLosses:
    """Per-sequence losses of removed sets on loss batches, shared by searches over the same batches
    (the loss check and its search on each half of its sequences, sglp_llm.selection.loss_check):
    a set measured on a batch once is read back, not run again. A batch is known by its index among
    the loss batches and its rows (a screen's batch holds the first rows of one); the numbers read
    back are the ones the same batch gave, so a search that reads them chooses as one that runs."""

    def __init__(self) -> None:
        self._losses: dict[tuple[frozenset[int], tuple[int, int]], tuple[torch.Tensor, torch.Tensor]] = {}
        self.reused = 0  # measurements read back instead of run
        # batch key -> the tokens its head scores (`RemovalLoss` with `vocabulary`), from the original network
        self.subsets: dict[tuple[int, int], VocabularySubset] = {}

    def get(self, skipped: Sequence[int], keys: Sequence[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        found = [self._losses.get((frozenset(skipped), key)) for key in keys]
        return None if any(f is None for f in found) else found

    def put(self, skipped: Sequence[int], keys: Sequence[tuple[int, int]], summed: Sequence[tuple[Any, Any]]) -> None:
        for key, part in zip(keys, summed):
            if torch.is_tensor(part[1]):  # per-sequence losses (the NLL objective)
                self._losses.setdefault((frozenset(skipped), key), part)


# the original model's distribution is kept at this many most likely tokens per position (and the
# rest's mass) for the KL objective: 2048 tokens of a 262k vocabulary then take 25 MB, not 2 GB
KL_TOP_K = 1024


def _token_mean(summed: Iterable[tuple[Any, Any]], skipped: Sequence[int]) -> float:
    """The mean loss per predicted token from per-batch (loss sum, count), each a number or one
    per sequence, summed over processes; refused when not finite (float16 overflow)."""
    total, n_tokens = 0.0, 0
    for nll, count in summed:
        total += float(torch.as_tensor(nll).sum())
        n_tokens += int(torch.as_tensor(count).sum())
    sums = all_reduce_state({"total": total, "n_tokens": n_tokens})
    without = f" without blocks {sorted(skipped)}" if skipped else ""
    return check_finite(torch.tensor(sums["total"] / sums["n_tokens"]), f"The calibration loss{without}").item()


def network_nll(model: nn.Module | ModelHandle, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """The summed next-token NLL of `batch`'s predicted tokens and their count: the blocks run in
    the model's own forward, the head a chunk of positions at a time (sglp_llm.passes.head)."""
    handle = ModelHandle.of(model)
    final, arity = output_of(handle.model, handle.layers[-1], batch)
    total, count = head_nll(handle, batch, final, arity)
    return total.item(), count


@torch.no_grad()
def calibration_nll(
    model: nn.Module | ModelHandle,
    batches: Sequence[dict[str, torch.Tensor]],
    skipped: Sequence[int],
) -> float:
    """Mean next-token NLL per predicted (non-padding) token over `batches`, with the `skipped`
    blocks removed.

    Under data parallelism each process runs its share of `batches` and the (NLL sum, count) sums
    are reduced, so every process gets the same value and makes the same choice."""
    handle = ModelHandle.of(model)
    with skip_blocks(handle, skipped):
        return _token_mean((network_nll(handle, batch) for batch in shard(batches)), skipped)


class RemovalLoss:
    """`calibration_nll(model, batches, removed + [block])` for the current `removed` set, reusing
    the current network's hidden states: `measure(block)` runs only the blocks after `block`.

    With `objective="kl"` the loss is not the NLL of the calibration text's next tokens but the
    KL divergence from the original model's next-token distribution (kept at its `KL_TOP_K` most
    likely tokens, `head.ReferenceDistribution`) to the pruned network's, per predicted token:
    how much a removal changes what the model says, rather than how well it fits this text.

    A kept output of block p stays valid while the removed blocks below p stay the same, so a
    greedy step (`remove`) keeps the outputs below the new removal and drops the others, to be
    recomputed from the nearest kept one when next needed (keeping every output on the way, so
    candidates measured in any order share the work). Memory: at most one hidden state per batch
    for each kept block.

    With `position_share` < 1 the head scores only that share of each window's positions, the
    same ones for every candidate (`head.position_sample`, seeded by `seed` and the batch's
    index): the blocks still run on every position, the head (most of a measurement with a
    large vocabulary) on a few. With `vocabulary` k > 0 the head scores, on each batch, only the
    tokens among the original network's k likeliest at any of its positions, its next tokens and
    `RESTS_SAMPLED` of the others standing for the rest (`head.VocabularySubset`): every position,
    a few columns of the head, an estimate of the NLL.

    With the NLL objective every measurement also keeps its per-sequence losses, so a search can
    tell a removal's extra damage from the sampling noise of the calibration sequences
    (`increase_error`), and, given a `store` (`MeasuredLosses`), shares them with other searches
    over the same batches: `batches` are then the loss batches from index `first_batch` on, and a
    set the store holds for all of them is read back instead of run."""

    # a pass reads its blocks from outside the device (BlockwiseRemovalLoss): measuring several
    # candidates in one pass (`measure_many`) saves reads
    reads_blocks = False

    def __init__(
        self, model: nn.Module | ModelHandle, batches: Sequence[dict[str, torch.Tensor]], objective: str = "nll",
        *, position_share: float = 1.0, seed: int = 0, original: OriginalOutputs | None = None,
        first_batch: int = 0, original_row: int = 0, store: MeasuredLosses | None = None, vocabulary: int = 0,
    ) -> None:
        if objective not in LOSS_OBJECTIVES:
            raise ValueError(f"objective={objective!r}; choose one of {LOSS_OBJECTIVES}")
        if vocabulary and objective != "nll":
            raise ValueError("A vocabulary subset narrows the NLL's head; the KL objective compares whole distributions.")
        self.handle = ModelHandle.of(model)
        self.seed, self.vocabulary = seed, vocabulary
        self._subsets: list[VocabularySubset] | None = None  # each batch's, from the original network's pass
        # drawn before sharding, so every process count scores the same positions of a batch
        self.positions = shard([position_sample(b["input_ids"].shape[1] - 1, position_share, seed + first_batch + i)
                                for i, b in enumerate(batches)])
        self.batches = shard(batches)
        self.keys = shard([(first_batch + i, len(b["input_ids"])) for i, b in enumerate(batches)])
        self.store = store
        self.num_blocks = len(self.handle.layers)
        self.removed: list[int] = []
        self.objective = objective
        self._arity = 0  # how many items the blocks return (`capture.block_arity`), once a pass has run them
        # kept block -> its output in the current network (as the block returns it), for each batch
        self._outputs: dict[int, list[Any]] = {}
        # `original`: the statistics pass kept the original network's outputs on these batches
        kept = original.for_batches(batches, original_row) if original is not None else None
        if kept is not None:
            self._arity = original.arity
            self._outputs = {block: [self._as_returned(o) for o in outputs] for block, outputs in kept.items()}
        # objective "kl": the original model's distribution on each batch, from its first pass
        self._reference: list[ReferenceDistribution] | None = None
        # removed set -> this process's per-sequence mean NLL of the network without it
        self._sequences: dict[frozenset[int], torch.Tensor] = {}

    def _as_returned(self, output: torch.Tensor) -> Any:
        """A kept hidden state as the block returns it: the model's own forward reads it."""
        return as_returned(output, self._arity)

    def _loss(self, index: int, final: torch.Tensor, arity: int) -> tuple[float, int]:
        """The summed loss of batch `index` from its final hidden state, and its count."""
        batch, positions = self.batches[index], self.positions[index]
        if self.objective == "nll":
            subset = None
            if self.vocabulary:
                if len(self._subsets) < len(self.batches):  # the original network's pass (`_references`)
                    likeliest = likeliest_tokens(self.handle, batch, final, arity, self.vocabulary, positions)
                    vocab_size = self.handle.model.get_output_embeddings().weight.shape[0]
                    self._subsets.append(vocabulary_subset(likeliest, batch["input_ids"][:, 1:], vocab_size, RESTS_SAMPLED, self.seed))
                subset = self._subsets[index]
            total, count = head_nll(self.handle, batch, final, arity, positions=positions, per_sequence=True,
                                    vocabulary=subset)
            return total.cpu(), count.cpu()
        if len(self._reference) < len(self.batches):  # the original network's pass (`_references`)
            self._reference.append(reference_distribution(self.handle, batch, final, arity, KL_TOP_K, positions=positions))
            return 0.0, int(self._reference[-1].rest_log_mass.numel())
        total, count = head_kl(self.handle, batch, final, arity, self._reference[index], positions=positions)
        return total.item(), count

    def _mean(self, summed: list[tuple[Any, Any]], skipped: Sequence[int]) -> float:
        """`_token_mean` of one pass's per-batch sums, keeping its per-sequence losses (NLL)."""
        if self.store is not None:
            self.store.put(skipped, self.keys, summed)
        if summed and torch.is_tensor(summed[0][1]):
            totals, counts = (torch.cat([part[i] for part in summed]) for i in (0, 1))
            self._sequences[frozenset(skipped)] = totals.double() / counts.clamp(min=1)
        return _token_mean(summed, skipped)

    def _stored(self, skipped: Sequence[int]) -> list[tuple[Any, Any]] | None:
        """This process's per-batch sums for the network without `skipped`, when the store has them."""
        found = None if self.store is None else self.store.get(skipped, self.keys)
        if found is not None:
            self.store.reused += 1
        return found

    def _read_back(self, skipped: Sequence[int]) -> float | None:
        """The loss of the network without `skipped` from the store, when it holds it."""
        stored = self._stored(skipped)
        return None if stored is None else self._mean(stored, skipped)

    def increase_error(self, block: int) -> float:
        """The standard error of the extra loss that removing `block` from the current network was
        measured to add: the spread over the calibration sequences (of every process) of each
        sequence's own increase, over the square root of their number. Two removals whose losses
        differ by less cannot be told apart on this sample. 0 with fewer than two sequences."""
        if self.objective != "nll":
            raise ValueError("Per-sequence losses are kept for the NLL objective only.")
        if frozenset(self.removed) not in self._sequences:
            self.current()
        increase = self._sequences[frozenset(self.removed + [block])] - self._sequences[frozenset(self.removed)]
        sums = all_reduce_state({"n": len(increase), "sum": float(increase.sum()), "squares": float((increase**2).sum())})
        n = sums["n"]
        if n < 2:
            return 0.0
        variance = max(sums["squares"] - sums["sum"] ** 2 / n, 0.0) / (n - 1)
        return (variance / n) ** 0.5

    def _references(self) -> float | None:
        """Before the first measurement, one pass of the original network takes what the loss is
        measured against: its distributions (objective "kl") or each batch's vocabulary subset
        (`vocabulary`; or the store's, made by a search over the same batches), keeping its block
        outputs for the measurements. Returns that pass's loss (None: no pass was needed)."""
        if self.vocabulary and self._subsets is None and self.store is not None:
            found = [self.store.subsets.get(key) for key in self.keys]
            self._subsets = None if any(f is None for f in found) else found
        kl, subsets = self.objective == "kl" and self._reference is None, self.vocabulary and self._subsets is None
        if not (kl or subsets):
            return None
        if self.removed:
            raise RuntimeError("The loss is measured against the original network: measure before removing.")
        self._reference = [] if kl else self._reference
        self._subsets = [] if subsets else self._subsets
        loss = self._run([], self._nearest_kept_output(self.num_blocks))
        if self.store is not None and subsets:
            self.store.subsets.update(zip(self.keys, self._subsets))
        # the KL pass measured nothing yet (the reference is being made): its number is no loss
        return None if kl else loss

    def branch(self, block: int) -> "RemovalLoss":
        """A copy with `block` removed as well, for a search that follows several sets at once:
        it shares the model, the batches, the reference and the outputs still valid."""
        other = copy.copy(self)
        other.removed = list(self.removed)
        other.remove(block)
        return other

    def remove(self, block: int) -> None:
        self.removed.append(block)
        # outputs from this block on were computed with it in place
        self._outputs = {p: outputs for p, outputs in self._outputs.items() if p < block}

    def _previous_kept(self, block: int) -> int | None:
        return max((i for i in range(block) if i not in self.removed), default=None)

    def kept_neighbours(self, block: int) -> tuple[int | None, int | None]:
        """The kept blocks just before and after `block` in the current network."""
        after = min((i for i in range(block + 1, self.num_blocks) if i not in self.removed), default=None)
        return self._previous_kept(block), after

    def _span(self, skipped: list[int], start: int | None, stop: int | None) -> list[int]:
        """The blocks a pass of the network without `skipped` runs: after `start` (whose kept
        output stands in for the blocks up to it) up to `stop` (None: to the last block)."""
        kept = [i for i in range(self.num_blocks) if i not in skipped]
        begin = 0 if start is None else kept.index(start) + 1
        return kept[begin:len(kept) if stop is None else kept.index(stop) + 1]

    def _nearest_kept_output(self, below: int) -> int | None:
        return max((i for i in self._outputs if i < below), default=None)

    @torch.no_grad()
    def _run(self, skipped: list[int], start: int | None, stop: int | None = None, keep: bool = True) -> float | None:
        """One pass of the network without `skipped` over the batches, blocks up to `start`
        replaced by its kept output; the loss, or with `stop`, none: the pass ends after that
        block. With `keep`, the outputs of the current network's blocks are kept as they run."""
        kept = [i for i in range(self.num_blocks) if i not in skipped]
        start_position = -1 if start is None else kept.index(start)
        keeping = keep and sorted(skipped) == sorted(self.removed)
        stored: dict[int, list[Any]] = {}
        summed: list[tuple[float, int]] = []
        batch_index = 0

        def call(position: int, block: nn.Module, args: tuple, kwargs: dict) -> Any:
            if position <= start_position:
                return self._outputs[start][batch_index]
            output = block(*args, **kwargs)
            if keeping:
                stored.setdefault(kept[position], []).append(output)
            return output

        with skip_blocks(self.handle, skipped):
            layers = self.handle.layers
            last = kept.index(stop) if stop is not None else len(kept) - 1
            for batch_index, batch in enumerate(self.batches):
                with stubbed_blocks(layers, call):
                    final, arity = output_of(self.handle.model, layers[last], batch)
                if stop is None:
                    summed.append(self._loss(batch_index, final, arity))
        self._outputs.update(stored)
        return None if stop is not None else self._mean(summed, skipped)

    def loss_without(self, skipped: Sequence[int]) -> float:
        """The calibration NLL of the whole network without the `skipped` blocks (one full pass,
        as SLEB's reference measures every candidate)."""
        self._references()
        return self._run(sorted(skipped), None, keep=False)

    def current(self) -> float:
        """The calibration NLL of the current network, from its deepest kept output."""
        read_back = self._read_back(self.removed)
        if read_back is not None:
            return read_back
        original = self._references()  # the original network's pass: its loss, when it measured one
        return original if original is not None else self._run(list(self.removed), self._nearest_kept_output(self.num_blocks))

    def measure(self, block: int) -> float:
        """The calibration NLL of the current network without `block` as well."""
        if block in self.removed:
            raise ValueError(f"Block {block} is removed already.")
        read_back = self._read_back(self.removed + [block])
        if read_back is not None:
            return read_back
        self._references()
        previous = self._previous_kept(block)
        if previous is not None and previous not in self._outputs:
            self._run(list(self.removed), self._nearest_kept_output(previous), stop=previous)
        return self._run(self.removed + [block], previous)

    def _outputs_before(self, blocks: Sequence[int]) -> dict[int, int | None]:
        """Each of `blocks`' kept block before it (None: none), the current network's outputs of
        all of them made ready in one pass up to the deepest (a one-pass `measure_many`)."""
        previous = {block: self._previous_kept(block) for block in blocks}
        deepest = max((p for p in previous.values() if p is not None), default=None)
        if deepest is not None and any(p not in self._outputs for p in previous.values() if p is not None):
            self._run(list(self.removed), self._nearest_kept_output(deepest), stop=deepest)
        return previous

    def measure_many(self, blocks: Sequence[int]) -> dict[int, float]:
        """`measure` of each of `blocks` (a screen, a search that measures every candidate)."""
        return {block: self.measure(block) for block in blocks}


class BlockwiseRemovalLoss(RemovalLoss):
    """`RemovalLoss` with one block at a time on the handle's onload device (a model given as a
    module: its input device, blocks moved from where they are): every block's call (masks, position
    embeddings) is recorded once per batch from the model's own forward with stubbed blocks, and
    a pass onloads each block it needs once, runs it on every batch and offloads it. The same
    numbers as the in-memory pass, since the kept blocks see the calls they see there.

    Memory: the current network's output of each kept block for every batch is kept on the CPU
    (at most blocks × loss tokens × hidden size values, in the model's dtype), plus one block's
    input per batch on `device` while a pass runs."""

    reads_blocks = True

    def __init__(
        self, model: nn.Module | ModelHandle, batches: Sequence[dict[str, torch.Tensor]], objective: str = "nll",
        *, position_share: float = 1.0, seed: int = 0, original: OriginalOutputs | None = None,
        first_batch: int = 0, original_row: int = 0, store: MeasuredLosses | None = None, vocabulary: int = 0,
    ) -> None:
        super().__init__(ModelHandle.of(model).one_block_at_a_time(), batches, objective, position_share=position_share,
                         seed=seed, original=original, first_batch=first_batch, original_row=original_row, store=store,
                         vocabulary=vocabulary)
        self.layers = self.handle.layers
        self.device = self.handle.onload_device
        self.loader = self.handle.loader
        self._inputs: list[torch.Tensor] = []  # the first block's input for each batch
        self._calls = []
        for batch in self.batches:
            first, calls = _record_calls(self.handle, batch)
            self._inputs.append(first)
            self._calls.append(calls)

    def _as_returned(self, output: torch.Tensor) -> Any:
        return output.cpu()  # a pass here runs the blocks itself: the hidden state alone

    @torch.no_grad()
    def _run(self, skipped: list[int], start: int | None, stop: int | None = None, keep: bool = True) -> float | None:
        keeping = keep and sorted(skipped) == sorted(self.removed)
        hidden = list(self._inputs) if start is None else list(self._outputs[start])
        for index in self._span(skipped, start, stop):
            block = self.layers[index]
            with onloaded(self.loader, index, block, self.device):
                for b, state in enumerate(hidden):
                    output = self._calls[b][index].run(block, state.to(self.device))
                    self._arity = block_arity(output)
                    hidden[b] = block_output(output)
            if keeping:
                self._outputs[index] = [state.cpu() for state in hidden]
        if stop is not None:
            return None
        summed = [self._loss(b, final.to(self.device), self._arity) for b, final in enumerate(hidden)]
        return self._mean(summed, skipped)


    @torch.no_grad()
    def measure_many(self, blocks: Sequence[int]) -> dict[int, float]:
        """`measure` of each of `blocks` in one block-by-block pass: every candidate's stream goes
        through a block while it is onloaded, so each block is read once for all of them instead
        of once per candidate. Memory: one hidden state per batch and candidate, on the CPU."""
        if any(block in self.removed for block in blocks):
            raise ValueError(f"Blocks {sorted(set(blocks) & set(self.removed))} are removed already.")
        stored = {block: self._stored(self.removed + [block]) for block in blocks}
        # means in the order of `blocks`, whichever were stored: every process reduces alike
        summed = {block: found for block, found in stored.items() if found is not None}
        summed.update(self._run_streams([block for block, found in stored.items() if found is None]))
        return {block: self._mean(summed[block], self.removed + [block]) for block in blocks}

    def _run_streams(self, blocks: Sequence[int]) -> dict[int, list[tuple[Any, Any]]]:
        """Each of `blocks`' per-batch sums, all candidates' streams run in one block-by-block pass."""
        if not blocks:
            return {}
        self._references()
        previous = self._outputs_before(blocks)
        streams = {block: list(self._inputs) if p is None else list(self._outputs[p]) for block, p in previous.items()}
        first = min((-1 if p is None else p) for p in previous.values()) + 1
        for index in (i for i in range(first, self.num_blocks) if i not in self.removed):
            running = [b for b in blocks if b != index and (previous[b] is None or previous[b] < index)]
            if not running:
                continue
            block = self.layers[index]
            with onloaded(self.loader, index, block, self.device):
                for candidate in running:
                    for b, state in enumerate(streams[candidate]):
                        output = self._calls[b][index].run(block, state.to(self.device))
                        self._arity = block_arity(output)
                        streams[candidate][b] = block_output(output).cpu()
        return {
            candidate: [self._loss(b, final.to(self.device), self._arity) for b, final in enumerate(hidden)]
            for candidate, hidden in streams.items()
        }


class CompensatedRemovalLoss(RemovalLoss):
    """`RemovalLoss` of the network with each removed run compensated (sglp_llm.recovery.compensate): a
    removed set is measured with its maps fitted on the loss batches and applied, so the choice
    sees what the compensated model will compute. Fitted on the original network, a run's map
    depends on the run alone and is fitted once; run by run, every set is fitted again. Each
    measurement is a whole forward: a map changes the block before its run, so no kept output
    of the current network stays valid."""

    def __init__(self, model: nn.Module | ModelHandle, batches: Sequence[dict[str, torch.Tensor]],
                 objective: str = "nll", *, method: str, ridge: float, fit_on: str, position_share: float = 1.0,
                 seed: int = 0, first_batch: int = 0, vocabulary: int = 0) -> None:
        super().__init__(model, batches, objective, position_share=position_share, seed=seed, first_batch=first_batch,
                         vocabulary=vocabulary)
        self._unsharded = list(batches)  # the fit shards and reduces by itself
        self._fit = dict(method=method, ridge=ridge, fit_on=fit_on)
        self._runs: dict[tuple[int, int], Compensation] = {}  # fit_on="original": run -> its map

    def compensation(self, skipped: Sequence[int]) -> Compensation:
        if self._fit["fit_on"] == "pruned":
            return fit_compensation(self.handle, self._unsharded, skipped, **self._fit)
        result = Compensation(self._fit["method"])
        for a, b in removed_runs(skipped):
            if (a, b) not in self._runs:
                self._runs[a, b] = fit_compensation(self.handle, self._unsharded, range(a, b + 1), **self._fit)
            result.transforms.update(self._runs[a, b].transforms)
            result.fits.update(self._runs[a, b].fits)
        return result

    def loss_without(self, skipped: Sequence[int]) -> float:
        self._references()  # of the original network, uncompensated
        with applied(self.handle, self.compensation(skipped)):
            return super().loss_without(skipped)

    def current(self) -> float:
        return self.loss_without(self.removed)

    def measure(self, block: int) -> float:
        if block in self.removed:
            raise ValueError(f"Block {block} is removed already.")
        return self.loss_without(self.removed + [block])


def removal_loss(
    handle: ModelHandle, batches: Sequence[dict[str, torch.Tensor]], config: Any, objective: str = "nll",
    original: OriginalOutputs | None = None, *, first_batch: int = 0, original_row: int = 0,
    store: MeasuredLosses | None = None,
) -> RemovalLoss:
    """The removal loss (`objective`) of the handle's model, its head on `config.loss_positions`
    of each window's positions: with each candidate compensated (`config.compensation_aware`);
    block by block when its blocks run one at a time; else in the model's own forward. It starts
    from the `original` network's outputs where the statistics pass kept them for these batches
    (from the loss sequences' row `original_row` on), and shares its measurements through `store`
    (`batches`: the loss batches from `first_batch` on)."""
    positions = dict(position_share=config.loss_positions, seed=config.seed, first_batch=first_batch,
                     vocabulary=loss_vocabulary(handle.model, config, objective))
    if config.compensation_aware:  # every measurement a whole forward with maps fitted on `batches`: nothing shared
        return CompensatedRemovalLoss(handle, batches, objective, method=config.compensation,
                                      ridge=config.compensation_ridge, fit_on=config.compensation_fit, **positions)
    shared = dict(original=original, original_row=original_row, store=store)
    if handle.blockwise:
        return BlockwiseRemovalLoss(handle, batches, objective, **shared, **positions)
    return RemovalLoss(handle, batches, objective, **shared, **positions)
