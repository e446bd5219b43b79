"""Gradient scores of decoder blocks, from one backward of the calibration loss.

- The gate scores (`GateScores`): write block i as h + α·Δᵢ(h); at α = 1, dL/dα = Σ_tokens
  ⟨∂L/∂h_out, Δᵢ⟩. "taylor" is −dL/dα, the first-order estimate of how much the loss rises when
  the block is removed (α: 1 → 0); "fisher" is the per-sequence second moment E[(dL/dα)²], the
  GradNorm proxy taken on that gate. Both need only the gradient of each block's output, not of
  any weight, so the backward skips every weight gradient.
- The paper's GradNorm, per block: the norm of the loss gradient w.r.t. each block's own
  parameters. Each parameter's gradient is folded into its block's squared norm the moment it is
  accumulated and then freed, so no full set of gradients ever exists;
- and per network (the paper's subset search): the norm over all parameters of a candidate network.

Squares are summed in float32 or wider whatever the weights' dtype, and a non-finite norm (the
float16 backward overflows) is an error naming the block, not a silently useless score.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..passes.capture import block_input, block_output
from ..passes.loss import causal_lm_loss, grad_only_for
from ..passes.distributed import all_reduce_state, shard


class _ParameterUse(TorchFunctionMode):
    """Calls `seen(param)` for every Parameter a torch function receives: the only way to reach
    the Parameters that accelerate's offloading hooks create for each forward and drop after it."""

    def __init__(self, seen: Callable[[nn.Parameter], None]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for arg in (*args, *kwargs.values()):
            for item in arg if isinstance(arg, (list, tuple)) else (arg,):
                if isinstance(item, nn.Parameter):
                    self.seen(item)
        return func(*args, **kwargs)


def refuse_overflow(values: torch.Tensor, what: str, names: Sequence[str] | None = None) -> None:
    """Stop on a NaN or infinite per-block gradient statistic, naming the deepest block affected
    (where the backward overflowed: it reaches the shallower ones after it); `what` formats the
    block's name into the statistic's."""
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        name = names[bad[-1]] if names is not None else f"block {bad[-1]}"
        others = f", and so of the {len(bad) - 1} blocks before it" if len(bad) > 1 else ""
        raise FloatingPointError(
            f"{what.format(name)} is NaN or infinite on the calibration data{others}: the backward "
            "overflows. Load the model in bfloat16 or float32 instead of float16 (--dtype bfloat16 "
            "or --dtype float32)."
        )


class BlockGradNorms:
    """Running sums of squared gradient norms per group (one group per block), fed by
    post-accumulate-grad hooks.

    A group is a module or an iterable of parameters. For a module whose weights accelerate
    offloads (parameters on the meta device, loaded for each forward), the gradients go to
    Parameters that exist only for that forward; they are found while the module runs, so the
    forward and the backward must both run inside `hooks()`.

    Over several batches the score of group l is sqrt(mean_b ||∇_{θ_l} loss_b||²), i.e. the
    plain GradNorm for a single batch.
    """

    def __init__(
        self,
        groups: Sequence[nn.Module | Iterable[nn.Parameter]],
        device: torch.device | str = "cpu",
        names: Sequence[str] | None = None,
    ) -> None:
        self.modules = [group if isinstance(group, nn.Module) else None for group in groups]
        self.groups = [
            [p for p in group.parameters() if p.is_floating_point()] if isinstance(group, nn.Module) else list(group)
            for group in groups
        ]
        self.names = list(names) if names is not None else [f"block {i}" for i in range(len(self.groups))]
        self.device = torch.device(device)
        self.squared = torch.zeros(len(self.groups), dtype=torch.float64, device=self.device)
        self.n_batches = 0

    @classmethod
    def for_blocks(cls, layers: Sequence[nn.Module], device: torch.device | str = "cpu") -> "BlockGradNorms":
        return cls(list(layers), device)

    def for_one_block(self, block: nn.Module, device: torch.device | str) -> "BlockGradNorms":
        """A scorer of `block` alone, for a pass that runs one block at a time; its sum is then
        added to this one's entry for the block."""
        return type(self)([block.parameters()], device=device)

    def parameters(self) -> Iterator[nn.Parameter]:
        for group in self.groups:
            yield from group

    def _fold(self, index: int) -> Callable[[torch.Tensor], None]:
        def fold(param: torch.Tensor) -> None:
            # float32 or wider: a bfloat16/float16 square sum loses digits or overflows
            dtype = torch.promote_types(param.grad.dtype, torch.float32)
            norm = torch.linalg.vector_norm(param.grad.detach(), dtype=dtype)
            self.squared[index] += norm.to(self.device, torch.float64).pow(2)
            param.grad = None

        return fold

    @contextmanager
    def hooks(self) -> Iterator[None]:
        handles = [
            p.register_post_accumulate_grad_hook(self._fold(i))
            for i, group in enumerate(self.groups)
            for p in group
        ]
        offloaded = [
            i for i, module in enumerate(self.modules)
            if module is not None and any(p.is_meta for p in self.groups[i])
        ]
        if offloaded:
            warnings.warn(
                f"accelerate offloads weights of {', '.join(self.names[i] for i in offloaded[:3])}"
                f"{', ...' if len(offloaded) > 3 else ''}: the backward keeps every onloaded weight on the execution device from its "
                "forward on, so offloading saves no memory for GradNorm. For a model larger than the "
                "device use offload=\"sequential\" (--offload sequential)."
            )
        try:
            with self._offloaded_hooks(offloaded, handles) if offloaded else nullcontext():
                yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def _offloaded_hooks(self, indices: list[int], handles: list[Any]) -> Iterator[None]:
        """Hook the Parameters that the modules `indices` use while they run (see the class)."""
        running: list[int] = []
        known = {id(p) for p in self.parameters()}
        hooked: dict[int, weakref.ref] = {}

        def seen(param: nn.Parameter) -> None:
            if not running or not param.requires_grad or param.is_meta or id(param) in known:
                return
            ref = hooked.get(id(param))
            if ref is not None and ref() is param:
                return
            hooked[id(param)] = weakref.ref(param)
            handles.append(param.register_post_accumulate_grad_hook(self._fold(running[-1])))

        def enter(index: int) -> Callable[..., None]:
            def hook(*_: Any) -> None:
                running.append(index)

            return hook

        def leave(*_: Any) -> None:
            running.pop()

        module_hooks = []
        for i in indices:
            module_hooks.append(self.modules[i].register_forward_pre_hook(enter(i)))
            module_hooks.append(self.modules[i].register_forward_hook(leave))
        try:
            with _ParameterUse(seen):
                yield
        finally:
            for handle in module_hooks:
                handle.remove()

    def end_batch(self) -> None:
        """Count the batch; a NaN or infinite norm stops the run here (`refuse_overflow`)."""
        refuse_overflow(self.squared, "The gradient norm of {}", self.names)
        self.n_batches += 1

    def compute(self) -> torch.Tensor:
        if self.n_batches == 0:
            raise ValueError("No batch was scored; the calibration data is empty.")
        return (self.squared / self.n_batches).sqrt()

    def state_dict(self) -> dict:
        """The sums only: states of several processes or runs add up (see sglp_llm.passes.distributed)."""
        return {"squared": self.squared.cpu(), "n_batches": self.n_batches}

    def load_state_dict(self, state: dict) -> None:
        self.squared = state["squared"].to(self.device, torch.float64)
        self.n_batches = state["n_batches"]


class GateScores:
    """Running sums for the gate scores of every block (see the module docstring).

    Fed `start_batch(token_mask)`, then `on_gradient(index, delta, grad_output)` for each block as
    the backward reaches its output (`delta` = block output − block input); a pass that runs
    several batches' backwards interleaved passes each batch's `start_batch` result along.
    The backward is of the batch's mean loss over its N predicted tokens, so N·Σ_t⟨g_t, Δ_t⟩ over
    one sequence's tokens is the derivative of that sequence's summed token loss: exact per
    sequence, whatever the batching. `compute()` gives taylor = −(Σ over sequences)/(all predicted
    tokens), the derivative of the calibration set's mean token loss, and fisher = the mean over
    sequences of (derivative of the sequence's own mean loss)².
    """

    def __init__(self, num_blocks: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.total = torch.zeros(num_blocks, dtype=torch.float64, device=self.device)
        self.squared = torch.zeros(num_blocks, dtype=torch.float64, device=self.device)
        self.n_tokens = 0
        self.n_sequences = 0
        self._predicted: torch.Tensor | None = None
        self._seen: set[int] = set()  # blocks whose output is hooked in this batch (see hooks)

    def start_batch(self, token_mask: torch.Tensor) -> torch.Tensor:
        """Count the batch; returns its predicted tokens per sequence."""
        self._seen.clear()
        # position t predicts token t + 1: each sequence's first token is never a target
        self._predicted = token_mask[:, 1:].sum(1).to(self.device, torch.float64)
        self.n_tokens += int(self._predicted.sum())
        self.n_sequences += int((self._predicted > 0).sum())
        return self._predicted

    def on_gradient(
        self, index: int, delta: torch.Tensor, grad_output: torch.Tensor, predicted: torch.Tensor | None = None
    ) -> None:
        predicted = self._predicted if predicted is None else predicted
        dtype = torch.promote_types(grad_output.dtype, torch.float32)
        per_sequence = (grad_output.to(dtype) * delta.to(grad_output.device, dtype)).sum(dim=(1, 2))
        summed = per_sequence.to(self.device, torch.float64) * predicted.sum()
        self.total[index] += summed.sum()
        scored = predicted > 0
        self.squared[index] += (summed[scored] / predicted[scored]).pow(2).sum()

    def check_finite(self) -> None:
        """After a backward: stop on an overflow (`refuse_overflow`)."""
        refuse_overflow(self.squared, "The gradient at the output of {}")

    def compute(self) -> dict[str, torch.Tensor]:
        if self.n_sequences == 0:
            raise ValueError("No sequence was scored; the calibration data is empty.")
        return {"taylor": -self.total / self.n_tokens, "fisher": self.squared / self.n_sequences}

    def state_dict(self) -> dict:
        """The sums only: states of several processes or runs add up (see sglp_llm.passes.distributed)."""
        return {"total": self.total.cpu(), "squared": self.squared.cpu(),
                "n_tokens": self.n_tokens, "n_sequences": self.n_sequences}

    def load_state_dict(self, state: dict) -> None:
        self.total = state["total"].to(self.device, torch.float64)
        self.squared = state["squared"].to(self.device, torch.float64)
        self.n_tokens, self.n_sequences = state["n_tokens"], state["n_sequences"]

    @contextmanager
    def hooks(self, layers: Sequence[nn.Module]) -> Iterator[None]:
        """Feed the scores from a plain forward and backward of the whole model: each block's Δ is
        taken in its forward and paired with its output's gradient when the backward reaches it.
        The first block's input is made to require grad, so the backward runs with no weight
        needing a gradient; a block run again in the same batch (activation checkpointing
        recomputes it in the backward) is counted once."""

        def track(index: int):
            def hook(module, args, kwargs, output):
                if index in self._seen:
                    return
                self._seen.add(index)
                hidden, out = block_input(args, kwargs), block_output(output)
                if out.requires_grad:
                    delta = (out - hidden).detach()
                    out.register_hook(lambda grad: self.on_gradient(index, delta, grad))

            return hook

        def needs_grad(module, args, kwargs):
            hidden = block_input(args, kwargs)
            if not self._seen and not hidden.requires_grad and hidden.is_floating_point():
                hidden.requires_grad_()

        handles = [layers[0].register_forward_pre_hook(needs_grad, with_kwargs=True)]
        handles += [layer.register_forward_hook(track(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def network_gradnorm(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """The paper's proxy for a whole (candidate) network: sqrt(mean_b Σ_p ||∂loss_b/∂p||²).

    Under data parallelism each process scores its share of `batches` and the sums are reduced,
    so every process gets the same value."""
    scorer = BlockGradNorms([model], names=["the network"])
    with grad_only_for(model, scorer.parameters()), scorer.hooks():
        for batch in shard(batches):
            causal_lm_loss(model, batch).backward()
            scorer.end_batch()
    scorer.load_state_dict(all_reduce_state(scorer.state_dict()))
    return float(scorer.compute()[0])

