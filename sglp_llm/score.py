"""GradNorm, the zero-cost proxy SGLP uses to decide which blocks of a segment to keep.

Two forms:
- per block: the norm of the causal-LM loss gradient w.r.t. each block's own parameters, from one
  backward per batch. Each parameter's gradient is folded into its block's squared norm the
  moment it is accumulated and then freed, so no full set of gradients ever exists;
- per network (the paper's): the norm over all parameters of a candidate pruned network.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over non-padding tokens, without building a KV cache."""
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss


def check_finite(loss: torch.Tensor, what: str = "The calibration loss") -> torch.Tensor:
    """`loss`, unless it is NaN or infinite (float16 overflow), which would silently corrupt
    every score and choice made from it."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{what} is {loss.item()}: the model overflows on this data. "
            "Load it in float32 or bfloat16 instead of float16 (--dtype)."
        )
    return loss


@contextmanager
def grad_only_for(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Let only `params` collect gradients (saves the memory of embedding/head gradients)."""
    wanted = {id(p) for p in params}
    previous = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in previous:
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag in previous:
            p.requires_grad_(flag)
            p.grad = None


class BlockGradNorms:
    """Running sums of squared gradient norms per parameter group (one group per block),
    fed by post-accumulate-grad hooks.

    Over several batches the score of group l is sqrt(mean_b ||∇_{θ_l} loss_b||²), i.e. the
    plain GradNorm for a single batch.
    """

    def __init__(self, groups: Sequence[Iterable[nn.Parameter]], device: torch.device | str = "cpu") -> None:
        self.groups = [list(group) for group in groups]
        self.device = torch.device(device)
        self.squared = torch.zeros(len(self.groups), dtype=torch.float64, device=self.device)
        self.n_batches = 0

    @classmethod
    def for_blocks(cls, layers: Sequence[nn.Module], device: torch.device | str = "cpu") -> "BlockGradNorms":
        return cls([layer.parameters() for layer in layers], device)

    def parameters(self) -> Iterator[nn.Parameter]:
        for group in self.groups:
            yield from group

    @contextmanager
    def hooks(self) -> Iterator[None]:
        def make_hook(index: int):
            def fold(param: torch.Tensor) -> None:
                self.squared[index] += param.grad.detach().float().pow(2).sum().to(self.device)
                param.grad = None

            return fold

        handles = [
            p.register_post_accumulate_grad_hook(make_hook(i))
            for i, group in enumerate(self.groups)
            for p in group
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def end_batch(self) -> None:
        self.n_batches += 1

    def compute(self) -> torch.Tensor:
        if self.n_batches == 0:
            raise ValueError("No batch was scored; the calibration data is empty.")
        return (self.squared / self.n_batches).sqrt()

    def state_dict(self) -> dict:
        return {"squared": self.squared.cpu(), "n_batches": self.n_batches}

    def load_state_dict(self, state: dict) -> None:
        self.squared = state["squared"].to(self.device)
        self.n_batches = state["n_batches"]


def network_gradnorm(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """The paper's proxy for a whole (candidate) network: sqrt(mean_b Σ_p ||∂loss_b/∂p||²)."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    scorer = BlockGradNorms([params])
    with grad_only_for(model, params), scorer.hooks():
        for batch in batches:
            causal_lm_loss(model, batch).backward()
            scorer.end_batch()
    return float(scorer.compute()[0])

