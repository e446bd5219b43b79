"""GradNorm, the zero-cost proxy SGLP uses to decide which blocks of a segment to keep.

Two forms:
- per block: the norm of the causal-LM loss gradient w.r.t. each block's own parameters, from one
  backward per batch. Each parameter's gradient is folded into its block's squared norm the
  moment it is accumulated and then freed, so no full set of gradients ever exists;
- per network (the paper's): the norm over all parameters of a candidate pruned network.

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

from .distributed import all_reduce_state, shard


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
        """Count the batch; a NaN or infinite norm stops the run here, naming the deepest block
        affected (where the backward overflowed: it reaches the shallower ones after it)."""
        bad = (~torch.isfinite(self.squared)).nonzero().flatten().tolist()
        if bad:
            others = f", and so of the {len(bad) - 1} blocks before it" if len(bad) > 1 else ""
            raise FloatingPointError(
                f"The gradient norm of {self.names[bad[-1]]} is NaN or infinite on the calibration "
                f"data{others}: the backward overflows. Load the model in bfloat16 or float32 "
                "instead of float16 (--dtype bfloat16 or --dtype float32)."
            )
        self.n_batches += 1

    def compute(self) -> torch.Tensor:
        if self.n_batches == 0:
            raise ValueError("No batch was scored; the calibration data is empty.")
        return (self.squared / self.n_batches).sqrt()

    def state_dict(self) -> dict:
        """The sums only: states of several processes or runs add up (see sglp_llm.distributed)."""
        return {"squared": self.squared.cpu(), "n_batches": self.n_batches}

    def load_state_dict(self, state: dict) -> None:
        self.squared = state["squared"].to(self.device, torch.float64)
        self.n_batches = state["n_batches"]


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

