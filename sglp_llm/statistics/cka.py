"""Streaming linear CKA between all decoder blocks (minibatch estimator of Nguyen et al., 2021).

Full-batch CKA over every calibration token needs n×n Gram matrices; instead each forward batch
is cut into random minibatches of about `minibatch_tokens` tokens, the unbiased HSIC (Song et al.,
2012) is computed for every pair of blocks on each minibatch, and only the L×L sums are kept:
memory is O(L·n_batch·m + L²), whatever the number of calibration tokens.

Each batch's token draw depends only on the seed and the batch's index in the calibration set,
so a pass split over processes (sglp_llm.passes.distributed) or resumed from a checkpoint
(sglp_llm.passes.checkpoint) draws exactly the tokens of one uninterrupted pass.
"""

from __future__ import annotations

import numpy as np
import torch

from ..passes.capture import without_sequence_starts

MIN_TOKENS = 4  # the unbiased HSIC divides by n(n-3)
# with skip_sinks, a token whose hidden-state norm at some block's output exceeds this many times
# the median norm of its minibatch there is an attention sink / massive activation: left out
SINK_NORM_RATIO = 10.0


def unbiased_hsic_matrix(grams: torch.Tensor) -> torch.Tensor:
    """HSIC₁ for every pair of the L Gram matrices `grams` [L, n, n]; returns [L, L]."""
    n = grams.shape[-1]
    tilde = grams.clone()
    tilde.diagonal(dim1=-2, dim2=-1).zero_()
    flat = tilde.reshape(tilde.shape[0], -1)
    row_sums = tilde.sum(dim=-1)  # K̃1, [L, n]
    totals = row_sums.sum(dim=-1)  # 1ᵀK̃1, [L]
    trace_term = flat @ flat.T  # tr(K̃ L̃) for symmetric Gram matrices
    return (
        trace_term
        + torch.outer(totals, totals) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (row_sums @ row_sums.T)
    ) / (n * (n - 3))


def cka_from_hsic(hsic: torch.Tensor) -> torch.Tensor:
    """Normalise an (averaged) HSIC matrix into CKA: HSIC(K,L) / sqrt(HSIC(K,K) HSIC(L,L))."""
    diag = hsic.diagonal().clamp_min(torch.finfo(hsic.dtype).tiny).sqrt()
    return hsic / torch.outer(diag, diag)


class MinibatchCKA:
    """Accumulates HSIC sums between `num_layers` representations, one forward batch at a time.

    With `skip_sinks`, the attention-sink positions are left out of the sums, since their massive
    activations dominate linear CKA (every later block then looks alike): the first token of each
    sequence, and any token whose norm at some block's output exceeds SINK_NORM_RATIO times the
    median norm of its minibatch at that output.

    Call `start_batch(token_mask)`, then `add(layer, hidden)` for every layer (typically from
    forward hooks), then `finish_batch()`. The token selection and minibatch split are shared by
    all layers of a batch, as CKA compares the same tokens across layers. Hidden states may come
    from any device (each block's); the sums live on `device`, in `dtype`.
    """

    def __init__(
        self,
        num_layers: int,
        *,
        minibatch_tokens: int = 512,
        max_tokens_per_batch: int | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        seed: int = 0,
        skip_sinks: bool = False,
    ) -> None:
        self.num_layers = num_layers
        self.skip_sinks = skip_sinks
        self.n_sinks = 0  # tokens left out as sinks (skip_sinks)
        self.minibatch_tokens = minibatch_tokens
        self.max_tokens_per_batch = max_tokens_per_batch
        self.dtype = dtype
        self.device = torch.device(device)
        self.seed = seed
        self.hsic_sum = torch.zeros(num_layers, num_layers, dtype=dtype, device=self.device)
        self.n_minibatches = 0
        self.n_tokens = 0
        self.n_batches = 0  # batches started, the default index of the next one
        self._positions: torch.Tensor | None = None
        self._chunks: list[torch.Tensor] = []
        self._grams: list[list[torch.Tensor] | None] = []

    def start_batch(self, token_mask: torch.Tensor, index: int | None = None) -> None:
        """Choose the tokens of this batch (non-padding, optionally subsampled) and split them;
        `index` is the batch's position in the calibration set (default: batches started so far)."""
        index = self.n_batches if index is None else index
        self.n_batches += 1
        if self.skip_sinks:  # each sequence's first token (after any left padding)
            self.n_sinks += int(token_mask.any(dim=1).sum())
            token_mask = without_sequence_starts(token_mask)
        positions = token_mask.reshape(-1).nonzero().squeeze(-1).cpu()
        order = torch.randperm(len(positions), generator=self._generator(index))
        if self.max_tokens_per_batch is not None:
            order = order[: self.max_tokens_per_batch]
        n = len(order)
        self._positions = positions[order] if n >= MIN_TOKENS else None
        self._chunks = (
            list(torch.arange(n).tensor_split(max(1, n // self.minibatch_tokens)))
            if self._positions is not None
            else []
        )
        self._grams = [None] * self.num_layers

    def _generator(self, index: int) -> torch.Generator:
        """The batch's own random stream, from (seed, index) alone."""
        seed = np.random.SeedSequence([self.seed % 2**64, index]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(seed))

    def add(self, layer: int, hidden: torch.Tensor) -> None:
        """Fold one layer's output [batch, seq, hidden] for the current batch into Gram matrices.
        Outside a batch (e.g. a block recomputed in the backward) nothing happens."""
        if self._positions is None:
            return
        flat = hidden.detach().reshape(-1, hidden.shape[-1])
        selected = flat[self._positions.to(flat.device)].to(self.dtype)
        if not torch.isfinite(selected).all():
            raise FloatingPointError(
                f"Block {layer} produced NaN or infinite activations on the calibration data. "
                "Load the model in bfloat16 or float32 instead of float16 (--dtype bfloat16 or "
                "--dtype float32), or check the calibration text."
            )
        grams = []
        for chunk in self._chunks:
            x = selected[chunk.to(selected.device)]
            grams.append((x @ x.T).to(self.device))
        self._grams[layer] = grams

    def on_block(self, index: int, block_input: torch.Tensor, block_output: torch.Tensor) -> None:
        """The `BlockObserver` entry point: CKA compares block outputs."""
        self.add(index, block_output)

    def finish_batch(self) -> None:
        """Add this batch's HSIC for all pairs to the running sums."""
        if self._positions is None:
            return
        missing = [i for i, g in enumerate(self._grams) if g is None]
        if missing:
            raise RuntimeError(f"No activations were captured for layers {missing} in this batch.")
        outliers = 0
        for c in range(len(self._chunks)):
            grams = torch.stack([g[c] for g in self._grams])
            if self.skip_sinks:
                keep = self._not_outliers(grams)
                outliers += int((~keep).sum())
                if int(keep.sum()) < MIN_TOKENS:
                    continue
                grams = grams[:, keep][:, :, keep]
            self.hsic_sum += unbiased_hsic_matrix(grams)
            self.n_minibatches += 1
        self.n_sinks += outliers
        self.n_tokens += len(self._positions) - outliers
        self._positions, self._chunks, self._grams = None, [], []

    @staticmethod
    def _not_outliers(grams: torch.Tensor) -> torch.Tensor:
        """Which tokens of a minibatch's Gram matrices [L, n, n] are not massive activations; the
        squared norms are the Grams' diagonals."""
        squared_norms = grams.diagonal(dim1=1, dim2=2)
        median = squared_norms.median(dim=1, keepdim=True).values
        return ~(squared_norms > SINK_NORM_RATIO**2 * median).any(dim=0)

    def compute(self) -> torch.Tensor:
        """The L×L CKA matrix from all batches so far."""
        if self.n_minibatches == 0:
            raise ValueError(
                f"No minibatch of at least {MIN_TOKENS} tokens was seen; the calibration data "
                "is empty or all padding."
            )
        return cka_from_hsic(self.hsic_sum / self.n_minibatches)

    def state_dict(self) -> dict:
        """The sums only: states of several processes or runs add up (see sglp_llm.passes.distributed)."""
        return {
            "hsic_sum": self.hsic_sum.cpu(),
            "n_minibatches": self.n_minibatches,
            "n_tokens": self.n_tokens,
            "n_batches": self.n_batches,
            "n_sinks": self.n_sinks,
        }

    def load_state_dict(self, state: dict) -> None:
        self.hsic_sum = state["hsic_sum"].to(self.device, self.dtype)
        self.n_minibatches = state["n_minibatches"]
        self.n_tokens = state["n_tokens"]
        self.n_batches = state["n_batches"]
        self.n_sinks = state.get("n_sinks", 0)
