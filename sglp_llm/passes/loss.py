"""The model's own loss in a pass, the check that it is finite, which parameters a backward may
give gradients to and whether it recomputes the blocks' activations: shared by the statistics
pass, the loss check, verification and training."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from ..config import ConfigError
from ..model.handle import ModelHandle


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over non-padding tokens, without building a KV cache."""
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The NLL of each of `targets` [...] under `logits` [..., vocab] (float32): the logsumexp over
    the vocabulary minus the target's logit. cross_entropy wants the vocabulary as dimension 1,
    and on a transposed [batch, vocab, positions] view its log-softmax ran across strides and
    copied the whole tensor: 3× slower on Gemma-3's 262k tokens (benchmarks/results/cost.md)."""
    targets = targets.to(logits.device)
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def check_finite(loss: torch.Tensor, what: str = "The calibration loss") -> torch.Tensor:
    """`loss`, unless it is NaN or infinite (float16 overflow, or a calibration token the model
    gives no probability), which would silently corrupt every score and choice made from it."""
    if not torch.isfinite(loss):
        never = (" Or the model gives some calibration token no probability at all (a token it never predicts, "
                 "such as an image placeholder): calibrate on plain text." if loss.item() == float("inf") else "")
        raise FloatingPointError(
            f"{what} is {loss.item()}: the model overflows on this data. "
            f"Load it in float32 or bfloat16 instead of float16 (--dtype).{never}"
        )
    return loss


@contextmanager
def grad_only_for(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Let only `params` collect gradients (saves the memory of embedding/head gradients)."""
    wanted = {id(p) for p in params}
    # by name: accelerate's offloading swaps in new Parameter objects at every forward
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(previous.get(name, p.requires_grad))
            p.grad = None


@contextmanager
def activation_checkpointing(model: nn.Module | ModelHandle) -> Iterator[None]:
    """Hugging Face (non-reentrant) activation checkpointing of the decoder blocks for the
    statistics backward, so block activations are recomputed rather than kept; the model's
    previous state is restored.

    transformers checkpoints a block only in training mode, so the blocks themselves (not their
    submodules: dropout stays off) are put in training mode meanwhile. Checkpointing wraps the
    blocks' `forward`, so the capture hooks do not fire again during the recomputation (and the
    observers ignore calls outside a batch anyway).
    """
    handle = ModelHandle.of(model)
    model, layers = handle.model, handle.layers
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(model).__name__} does not support gradient checkpointing; run without "
            "--gradient-checkpointing (gradient_checkpointing=False)."
        )
    already = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    had_input_hooks = bool(getattr(model, "_require_grads_hooks", None))
    if not already:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    modes = [layer.training for layer in layers]
    try:
        for layer in layers:
            layer.training = True
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode
        if not already:
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
            if not had_input_hooks:
                model.disable_input_require_grads()
