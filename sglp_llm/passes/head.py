"""The causal-LM loss from a final hidden state, a chunk of positions at a time.

A model's head (final norm, lm_head, logit softcapping) turns the last block's output into
vocabulary logits: for LLaMA-3 (128k tokens) or Gemma-3 (262k) a float32 tensor of the whole batch
is gigabytes, more than a decoder block. Here the model's own forward runs with every block
stubbed out (the last one hands over the stored final hidden state) and `logits_to_keep` selecting
a chunk of positions, so at most `max_logits_bytes` of float32 logits exist at a time, and the
number is the model's own loss (softcapping and all), summed over chunks.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..config import ConfigError
from ..model.blocks import text_config
from ..model.handle import ModelHandle
from .capture import StopForward, as_returned, block_arity, block_input, block_output, stubbed_blocks
from .loss import causal_lm_loss, check_finite, token_nll

# at most this many bytes of float32 logits per chunk of positions
MAX_LOGITS_BYTES = 256 * 2**20
# with a vocabulary subset, this many of the tokens outside it are sampled to estimate the rest's
# share of the softmax's normaliser (`vocabulary_subset`)
RESTS_SAMPLED = 1024


@contextmanager
def final_hidden_state(layers: nn.ModuleList, final: torch.Tensor, arity: int) -> Iterator[None]:
    """Run the model's own head on `final`: every block is a stub that passes its input on, the
    last one hands `final` instead."""

    def pass_through(index: int, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        hidden = block_input(args, kwargs)
        if index == len(layers) - 1:
            hidden = final.to(hidden.device)
        return as_returned(hidden, arity)

    with stubbed_blocks(layers, pass_through):
        yield


def chunk_positions(model: nn.Module, batch_size: int, max_logits_bytes: int | None = None) -> int | None:
    """How many positions of a batch one chunk holds (None: all of them, for a model whose forward
    cannot select positions); `max_logits_bytes` defaults to MAX_LOGITS_BYTES."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None
    max_logits_bytes = MAX_LOGITS_BYTES if max_logits_bytes is None else max_logits_bytes
    vocab = getattr(text_config(model), "vocab_size", None) or model.get_output_embeddings().weight.shape[0]
    return max(1, max_logits_bytes // (batch_size * vocab * 4))


@dataclass
class VocabularySubset:
    """The tokens a head scores on one batch instead of its whole vocabulary. Each sequence keeps
    every token among the original network's likeliest at any of its positions and its own next
    tokens; the rest of the vocabulary is stood for by a seeded sample of it (the same for every
    sequence and batch), each sampled logit weighted by how many of the sequence's rest it stands
    for, so the softmax's normaliser, and with it the NLL, is estimated without bias from far fewer
    columns. A sequence's number depends on that sequence alone, not on the batch it is in
    (`vocabulary_subset`)."""

    token_ids: torch.Tensor  # [n] the columns the head computes: every sequence's kept tokens and the sample
    log_weights: torch.Tensor  # [rows, n] 0 for a sequence's kept tokens, log(rest / sampled) for the sample, -inf elsewhere
    column: torch.Tensor  # [vocab] each token's column (-1: not computed)
    _head: dict = field(default_factory=dict, repr=False)  # the narrowed head, once built

    @contextmanager
    def scoring(self, model: nn.Module) -> Iterator[None]:
        """The model's head narrowed to these tokens meanwhile: its own forward (final norm,
        softcapping) then yields their logits only."""
        obstacle = narrowing_obstacle(model)
        if obstacle:
            raise ConfigError(f"{obstacle}: it cannot be narrowed to a vocabulary subset. Set loss_vocabulary to 0.")
        head = model.get_output_embeddings()
        if "narrow" not in self._head:
            ids = self.token_ids.to(head.weight.device)
            narrow = nn.Linear(head.in_features, len(ids), bias=head.bias is not None, device=head.weight.device, dtype=head.weight.dtype)
            with torch.no_grad():
                narrow.weight.copy_(head.weight[ids])
                if head.bias is not None:
                    narrow.bias.copy_(head.bias[ids])
            self._head["narrow"] = narrow
        model.set_output_embeddings(self._head["narrow"])
        try:
            yield
        finally:
            model.set_output_embeddings(head)


def narrowing_obstacle(model: nn.Module) -> str | None:
    """Why the model's head cannot score a `VocabularySubset` (None: it can): only a plain linear
    layer whose weights are here can be cut to a few rows (an accelerate hook could swap its
    weights back in or move its input elsewhere)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return f"The head of {type(model).__name__} is a {type(head).__name__}, not a linear layer"
    if head.weight.is_meta or hasattr(head, "_hf_hook"):
        return f"The head of {type(model).__name__} is placed by an accelerate device map (offloaded or hooked)"
    return None


def loss_vocabulary(model: nn.Module, config: Any, objective: str | None = None) -> int:
    """`config.loss_vocabulary` settled for this model (`SGLPConfig.resolve_loss_vocabulary`): how
    many likeliest tokens per position the NLL's head scores (`VocabularySubset`), 0 for the whole
    vocabulary (a subset holds about `subset_columns` of them per batch)."""
    narrowable = narrowing_obstacle(model) is None
    vocab_size = model.get_output_embeddings().out_features if narrowable else 0
    return config.resolve_loss_vocabulary(narrowable, vocab_size, objective)


def subset_columns(k: int, positions: int, vocab_size: int) -> int:
    """About how many columns a batch's `VocabularySubset` holds at `k` likeliest tokens over
    `positions` scored positions: measured on SmolLM2-135M's and Gemma-3-270M's docstring windows
    at k = 32, the sample plus about 4·k·√positions kept tokens (2,800 at one window of 256
    tokens, 5,100 at 4, 7,000 at 8; within 15 % from 255 to 4,092 positions)."""
    return min(vocab_size, round(RESTS_SAMPLED + 4 * k * math.sqrt(positions)))


def vocabulary_subset(likeliest: list[torch.Tensor], targets: torch.Tensor, vocab_size: int, sampled: int, seed: int) -> VocabularySubset:
    """The `VocabularySubset` of a batch: each row keeps its `likeliest` tokens (one tensor per row,
    any shape) and its `targets` [rows, positions]; `sampled` tokens of the vocabulary, drawn with
    `seed`, stand for each row's rest."""
    drawn = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))[:sampled]
    kept = [torch.cat([top.flatten().cpu(), row.cpu()]).unique() for top, row in zip(likeliest, targets)]
    token_ids = torch.cat(kept + [drawn]).unique()
    column = torch.full((vocab_size,), -1, dtype=torch.long)
    column[token_ids] = torch.arange(len(token_ids))
    log_weights = torch.full((len(kept), len(token_ids)), -math.inf)
    for row, tokens in enumerate(kept):
        rest = drawn[~torch.isin(drawn, tokens)]  # the sample's tokens outside this row's own
        if len(rest):
            log_weights[row, column[rest]] = math.log((vocab_size - len(tokens)) / len(rest))
        log_weights[row, column[tokens]] = 0.0
    return VocabularySubset(token_ids, log_weights, column)


def likeliest_tokens(model: nn.Module | ModelHandle, batch: dict[str, torch.Tensor], final: torch.Tensor, arity: int,
                     k: int, positions: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The `k` likeliest next tokens under the head on `final` at each of `batch`'s predicted
    (non-padding) positions (of `positions`, when given): for each row, [its positions, k], on the CPU."""
    valid = _predicted(batch)
    rows: list[list[torch.Tensor]] = [[] for _ in range(len(valid))]
    for chunk, logits in _head_logits(ModelHandle.of(model), batch, final, arity, None, positions):
        top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices.cpu()
        for row, mask in enumerate(valid[:, chunk].cpu()):
            rows[row].append(top[row][mask])
    return [torch.cat(parts) for parts in rows]


def _head_logits(
    handle: ModelHandle,
    batch: dict[str, torch.Tensor],
    final: torch.Tensor,
    arity: int,
    max_logits_bytes: int | None,
    positions: torch.Tensor | None = None,
    vocabulary: VocabularySubset | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The head's logits on `final` a chunk of positions at a time: (positions, logits
    [batch, len(positions), vocab]) for every position that predicts a next token, or only for
    `positions` (sorted); with a `vocabulary` subset, its tokens' logits only."""
    model = handle.model
    input_ids = batch["input_ids"]
    n_positions = input_ids.shape[1] - 1  # the last position predicts nothing
    scored = torch.arange(n_positions, device=input_ids.device) if positions is None else positions.to(input_ids.device)
    selectable = chunk_positions(model, input_ids.shape[0], max_logits_bytes)
    if selectable is not None and vocabulary is not None:  # chunks sized for the narrower logits
        selectable = max(selectable, selectable * len(vocabulary.column) // max(len(vocabulary.token_ids), 1))
    chunk = selectable or len(scored)
    narrowed = vocabulary.scoring(model) if vocabulary is not None else nullcontext()
    with final_hidden_state(handle.layers, final, arity), narrowed:
        for start in range(0, len(scored), chunk):
            part = scored[start:start + chunk]
            kwargs = {"logits_to_keep": part} if selectable is not None else {}
            logits = model(input_ids=input_ids, attention_mask=batch.get("attention_mask"), use_cache=False, **kwargs).logits
            yield part, logits if kwargs else logits[:, part]


def position_sample(n_positions: int, share: float, seed: int) -> torch.Tensor | None:
    """About `share` of a window's `n_positions` predicting positions, spread evenly: one drawn
    (seeded) from each of that many equal strata. None: every position (`share` 1)."""
    if share >= 1:
        return None
    k = max(1, round(share * n_positions))
    edges = torch.div(torch.arange(k + 1) * n_positions, k, rounding_mode="floor")
    generator = torch.Generator().manual_seed(seed)
    offsets = (torch.rand(k, generator=generator) * (edges[1:] - edges[:-1])).long()
    return edges[:-1] + offsets


def _predicted(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Which positions of `batch` predict a (non-padding) next token: [batch, length - 1]."""
    mask = batch.get("attention_mask")
    targets = batch["input_ids"][:, 1:]
    return torch.ones_like(targets, dtype=torch.bool) if mask is None else mask[:, 1:].bool()


def head_nll(
    model: nn.Module | ModelHandle,
    batch: dict[str, torch.Tensor],
    final: torch.Tensor,
    arity: int,
    *,
    max_logits_bytes: int | None = None,
    backward: bool = False,
    positions: torch.Tensor | None = None,
    per_sequence: bool = False,
    vocabulary: VocabularySubset | None = None,
) -> tuple[torch.Tensor, int | torch.Tensor]:
    """The summed next-token NLL of `batch`'s predicted (non-padding) tokens and their count, the
    head run on the final hidden state `final` (the model's forward with its blocks, as they
    are now, stubbed); only at `positions` when given (`position_sample`). With `backward`, the
    gradient of the mean NLL goes back into `final` chunk by chunk, so no two chunks' logits are
    alive at once; the sum is returned detached. With `per_sequence`, both are tensors of one
    entry per row of the batch (how much the loss varies between sequences says how far a
    difference between two losses can be trusted). With a `vocabulary` subset, the NLL over its
    tokens (`VocabularySubset`: an estimate)."""
    targets = batch["input_ids"][:, 1:]
    valid = _predicted(batch)
    counts = (valid if positions is None else valid[:, positions.to(valid.device)]).sum(dim=1)
    count = int(counts.sum())
    total = None
    for chunk, logits in _head_logits(ModelHandle.of(model), batch, final, arity, max_logits_bytes, positions, vocabulary):
        wanted = targets[:, chunk]
        logits = logits.float()
        if vocabulary is not None:
            if logits.shape[-1] != len(vocabulary.token_ids):
                raise ConfigError(f"{type(ModelHandle.of(model).model).__name__}'s forward does not return its head's "
                                  "outputs as logits, so its vocabulary cannot be narrowed; set loss_vocabulary to 0.")
            logits = logits + vocabulary.log_weights[:, None, :].to(logits.device)
            wanted = vocabulary.column[wanted.cpu()]
        nll = token_nll(logits, wanted)
        part = torch.where(valid[:, chunk].to(nll.device), nll, 0.0).sum(dim=1)
        if not per_sequence:
            part = part.sum()
        if backward:
            (part.sum() / count).backward()
            part = part.detach()
        total = part if total is None else total + part.to(total.device)
    return (total, counts.to(total.device)) if per_sequence else (total, count)


@dataclass
class ReferenceDistribution:
    """The original model's next-token distribution on one batch, kept small: at each predicted
    position its `k` most likely tokens' log-probabilities and the log of the rest's mass.

    The KL divergence from it to a pruned model's distribution, both coarsened to those k tokens
    and one "any other token" class, is never more than the full KL (coarsening loses
    information) and equals it when k is the vocabulary size."""

    token_ids: torch.Tensor  # [rows, k] int64: the top tokens of every predicted position, flattened
    log_probs: torch.Tensor  # [rows, k] float32
    rest_log_mass: torch.Tensor  # [rows] float32: log(1 - the top tokens' mass)

    def rows(self, rows: slice | torch.Tensor, device: torch.device | None = None) -> "ReferenceDistribution":
        """The distribution at some of its rows (a slice or an index tensor), on `device`."""
        return ReferenceDistribution(*(t[rows].to(device) for t in (self.token_ids, self.log_probs, self.rest_log_mass)))


def coarse_kl(reference: ReferenceDistribution, log_probs: torch.Tensor) -> torch.Tensor:
    """The summed KL(reference ‖ log_probs) over rows, both coarsened to the reference's top
    tokens and the rest: `log_probs` [rows, vocab] is another model's next-token log-probabilities
    at the same positions (differentiable)."""
    top, rest = _coarse_log_probs(log_probs, reference.token_ids.long())
    p_top, p_rest = reference.log_probs, reference.rest_log_mass
    return (p_top.exp() * (p_top - top)).sum() + (p_rest.exp() * (p_rest - rest)).sum()


def _coarse_log_probs(log_probs: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`log_probs` [rows, vocab] coarsened to the classes `token_ids` [rows, k] and the rest:
    (their log-probabilities [rows, k], the rest's log-mass [rows])."""
    top = log_probs.gather(1, token_ids)
    # log(1 - sum(exp(top))), kept finite when the top tokens hold (almost) all the mass
    rest = torch.log1p(-torch.exp(torch.logsumexp(top, dim=1)).clamp(max=1 - 1e-7))
    return top, rest


def _predicted_log_probs(
    handle: ModelHandle, batch: dict[str, torch.Tensor], final: torch.Tensor,
    arity: int, max_logits_bytes: int | None, positions: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """The head's next-token log-probabilities on `final` at `batch`'s predicted (non-padding)
    positions (of `positions`, when given), a chunk at a time: [positions in the chunk, vocab],
    rows in batch-major order."""
    valid = _predicted(batch)
    for chunk, logits in _head_logits(handle, batch, final, arity, max_logits_bytes, positions):
        yield torch.log_softmax(logits.float(), dim=-1)[valid[:, chunk].to(logits.device)]


def reference_distribution(
    model: nn.Module | ModelHandle,
    batch: dict[str, torch.Tensor],
    final: torch.Tensor,
    arity: int,
    top_k: int,
    *,
    max_logits_bytes: int | None = None,
    positions: torch.Tensor | None = None,
) -> ReferenceDistribution:
    """The `ReferenceDistribution` of the head on `final` (the original model's last block
    output) at `batch`'s predicted positions (of `positions`, when given), on the CPU."""
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for log_probs in _predicted_log_probs(ModelHandle.of(model), batch, final, arity, max_logits_bytes, positions):
        token_ids = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1).indices
        top, rest = _coarse_log_probs(log_probs, token_ids)
        parts.append((token_ids.cpu(), top.cpu(), rest.cpu()))
    return ReferenceDistribution(*(torch.cat(column) for column in zip(*parts)))


def head_kl(
    model: nn.Module | ModelHandle,
    batch: dict[str, torch.Tensor],
    final: torch.Tensor,
    arity: int,
    reference: ReferenceDistribution,
    *,
    max_logits_bytes: int | None = None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """The summed KL divergence KL(reference ‖ head on `final`) over `batch`'s predicted
    positions (those of `positions`, the reference's, when given) and their count, both
    distributions coarsened to the reference's top tokens and the rest (`ReferenceDistribution`)."""
    total, row = None, 0
    for log_probs in _predicted_log_probs(ModelHandle.of(model), batch, final, arity, max_logits_bytes, positions):
        rows = slice(row, row + log_probs.shape[0])
        row = rows.stop
        part = coarse_kl(reference.rows(rows, log_probs.device), log_probs)
        total = part if total is None else total + part
    return total, row


def output_of(model: nn.Module, layer: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """`layer`'s output in the model's forward on `batch`, the forward stopped there (hooks
    registered on it before run first), and how many items the blocks return (`capture.block_arity`)."""

    found: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        found.update(hidden=block_output(output), arity=block_arity(output))
        raise StopForward

    handle = layer.register_forward_hook(hook)
    try:
        causal_lm_loss(model, batch)
    except StopForward:
        pass
    finally:
        handle.remove()
    return found["hidden"], found["arity"]


def head_gradient(
    model: nn.Module | ModelHandle, batch: dict[str, torch.Tensor], final: torch.Tensor, arity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean next-token loss on the final hidden state `final` (refused when not finite) and
    its gradient there, taken a chunk of positions at a time."""

    leaf = final.detach().requires_grad_()
    total, count = head_nll(model, batch, leaf, arity, backward=True)
    return check_finite(total / count), leaf.grad


def backward_through_head(
    model: nn.Module | ModelHandle, batch: dict[str, torch.Tensor], final: torch.Tensor, arity: int
) -> torch.Tensor:
    """Backpropagate the mean next-token loss from `final`, the last block's output with its
    graph: the head's gradient (`head_gradient`), then one backward down the blocks. Returns
    the loss."""
    loss, gradient = head_gradient(model, batch, final, arity)
    final.backward(gradient)
    return loss
