"""Training-free compensation of removed blocks, folded into the kept weights (ReplaceMe, arXiv
2505.02819): the pruned model stays a plain checkpoint.

For each removed contiguous run of blocks a..b, the kept block p = a − 1 writes its MLP output M
into the residual stream, h_p = Y + M (Y: the stream after its attention). One d × d matrix T,
fitted on calibration tokens of the original network, makes Y + M T approximate h_b, what the
run's last block produced: T = argmin ‖M T − (h_b − Y)‖², from two d × d Gram sums in float64
(memory O(d²) per run, no activation kept). Since M is the MLP's down projection x Wᵀ + c,
M T = x (Tᵀ W)ᵀ + Tᵀ c: T folds into W and c, and no parameter is added.

The fold needs the MLP output added to the residual stream as it is. Families that normalise it
first (Gemma 2/3 and OLMo 2's post-feedforward norm) are refused with a message: the check runs
block p once more with its MLP output replaced and compares.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .blocks import find_decoder_blocks
from .capture import block_output
from .config import ConfigError


def removed_runs(dropped: Sequence[int]) -> list[tuple[int, int]]:
    """The contiguous runs (first, last) of the `dropped` blocks, in order."""
    runs: list[tuple[int, int]] = []
    for block in sorted(dropped):
        if runs and runs[-1][1] == block - 1:
            runs[-1] = (runs[-1][0], block)
        else:
            runs.append((block, block))
    return runs


def down_projection(block: nn.Module, index: int) -> nn.Linear:
    """The block's MLP down projection: what T folds into."""
    down = getattr(getattr(block, "mlp", None), "down_proj", None)
    if not isinstance(down, nn.Linear):
        raise ConfigError(
            f"Compensation folds into the MLP down projection (`mlp.down_proj`, a Linear) of the block "
            f"before each removed run; block {index} ({type(block).__name__}) has none. Use "
            "compensation: none for this family."
        )
    return down


@dataclass
class RunFit:
    """The Gram sums of one removed run: MᵀM and Mᵀ(h_b − Y), ‖h_b − Y‖² and ‖M − (h_b − Y)‖²
    (the error of dropping the run plainly, T = I), over `n_tokens` tokens."""

    gram: torch.Tensor
    cross: torch.Tensor
    target: float = 0.0
    plain: float = 0.0
    n_tokens: int = 0

    @classmethod
    def empty(cls, width: int) -> "RunFit":
        zeros = torch.zeros(width, width, dtype=torch.float64)
        return cls(zeros, zeros.clone())

    def add(self, mlp_output: torch.Tensor, target: torch.Tensor) -> None:
        m, z = mlp_output.double().cpu(), target.double().cpu()
        self.gram += m.T @ m
        self.cross += m.T @ z
        self.target += float((z * z).sum())
        self.plain += float(((m - z) ** 2).sum())
        self.n_tokens += len(m)

    def solve(self, ridge: float = 0.0) -> torch.Tensor:
        """T = (MᵀM + λI)⁻¹ Mᵀ(h_b − Y), λ = `ridge` × the mean of MᵀM's diagonal."""
        scale = ridge * float(self.gram.diagonal().mean())
        eye = torch.eye(len(self.gram), dtype=torch.float64)
        return torch.linalg.solve(self.gram + scale * eye, self.cross)

    def relative_residual(self, transform: torch.Tensor) -> float:
        """‖M T − (h_b − Y)‖² / ‖h_b − Y‖² on the fitted tokens."""
        t = transform.double()
        error = float((t * (self.gram @ t)).sum() - 2 * (t * self.cross).sum()) + self.target
        return max(error, 0.0) / self.target


@dataclass
class Compensation:
    """T for the block before each removed run, and the fit's evidence."""

    transforms: dict[int, torch.Tensor] = field(default_factory=dict)  # kept block p -> T
    fits: dict[int, dict[str, Any]] = field(default_factory=dict)  # p -> run, tokens, residuals


@contextmanager
def _mlp_output_replaced(block: nn.Module, index: int, replace: Any) -> Iterator[None]:
    """Pass block `index`'s MLP output through `replace` while inside."""
    down_projection(block, index)  # refuses a block without one
    handle = block.mlp.register_forward_hook(lambda module, args, output: replace(output))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def applied(model: nn.Module, transforms: dict[int, torch.Tensor], layers_path: str | None = None) -> Iterator[None]:
    """Run `model` (unpruned, original block indices) with each block p's MLP output multiplied
    by its T: what the fold must compute."""
    layers = find_decoder_blocks(model, layers_path).layers
    with ExitStack() as stack:
        for p, transform in transforms.items():
            stack.enter_context(_mlp_output_replaced(
                layers[p], p, lambda output, t=transform: output @ t.to(output.device, output.dtype)))
        yield


def _check_added_as_is(block: nn.Module, index: int, args: tuple, kwargs: dict, output: torch.Tensor,
                       mlp_output: torch.Tensor) -> None:
    """Block `index`'s output must be (its output with a zero MLP output) + its MLP output."""
    with torch.no_grad(), _mlp_output_replaced(block, index, torch.zeros_like):
        without = block_output(block(*args, **kwargs))
    error = (output - without - mlp_output).abs().max()
    if error > 1e-4 * output.abs().max().clamp_min(1e-6):
        raise ConfigError(
            f"Compensation needs the MLP output of block {index} ({type(block).__name__}) added to the "
            "residual stream as it is, to fold a d x d map into its down projection; this family "
            "transforms it first (e.g. a post-feedforward norm), so the fold would not be exact. Use "
            "compensation: none for this family."
        )


@torch.no_grad()
def fit_compensation(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    dropped: Sequence[int],
    *,
    layers_path: str | None = None,
    skip_first: bool = True,
    ridge: float = 0.0,
) -> Compensation:
    """Fit T for every removed run of `dropped` on the original network, in one forward pass
    over `batches`; `skip_first` leaves each sequence's first token (the attention sink, whose
    massive activations would dominate the sums) out of the fit."""
    layers = find_decoder_blocks(model, layers_path).layers
    runs = removed_runs(dropped)
    if any(a == 0 for a, _ in runs):
        raise ConfigError("Compensation folds into the block before a removed run; block 0 has none before it. "
                          "Protect it (protect_first >= 1) or use compensation: none.")
    width = model.get_input_embeddings().weight.shape[1]
    fits = {a - 1: RunFit.empty(width) for a, _ in runs}
    last = {a - 1: b for a, b in runs}
    seen: dict[str, Any] = {}
    checked: set[int] = set()

    def on_block(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = block_output(output)
            if index in fits and index not in checked:  # once, on the first batch (the check reruns the block)
                checked.add(index)
                mlp_output = seen[("mlp", index)]
                _check_added_as_is(module, index, args, kwargs, hidden, mlp_output)
                seen[("mlp", index)] = mlp_output
            seen[index] = hidden
        return hook

    def on_mlp(index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen[("mlp", index)] = output
        return hook

    handles = []
    try:
        for p in fits:
            down_projection(layers[p], p)
            handles.append(layers[p].mlp.register_forward_hook(on_mlp(p)))
        for index in {*fits, *last.values()}:
            handles.append(layers[index].register_forward_hook(on_block(index), with_kwargs=True))
        for batch in batches:
            seen.clear()
            model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
            mask = batch["attention_mask"].bool() if batch.get("attention_mask") is not None else torch.ones_like(
                batch["input_ids"], dtype=torch.bool)
            if skip_first:  # each row's first real token
                mask = mask.clone()
                rows = mask.any(dim=1).nonzero().squeeze(-1)
                mask[rows, mask[rows].int().argmax(dim=1)] = False
            for p, fit in fits.items():
                m = seen[("mlp", p)]
                target = seen[last[p]] - (seen[p] - m)  # h_b − Y
                keep = mask.to(m.device)
                fit.add(m[keep], target[keep])
    finally:
        for handle in handles:
            handle.remove()
    result = Compensation()
    for p, fit in fits.items():
        transform = fit.solve(ridge)
        result.transforms[p] = transform
        result.fits[p] = {
            "run": [p + 1, last[p]], "tokens": fit.n_tokens, "ridge": ridge,
            "relative_residual": fit.relative_residual(transform),
            "relative_residual_dropped": fit.plain / fit.target,
        }
    return result


@torch.no_grad()
def fold(model: nn.Module, compensation: Compensation, layers_path: str | None = None) -> Callable[[], None]:
    """Fold each T into its block's down projection, W ← Tᵀ W and c ← Tᵀ c, in place; the
    blocks are those of the unpruned model (original indices). Returns a function that puts the
    original weights back."""
    layers = find_decoder_blocks(model, layers_path).layers
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for p, transform in compensation.transforms.items():
        down = down_projection(layers[p], p)
        t = transform.to(down.weight.device, torch.float64)
        for tensor in (down.weight, down.bias) if down.bias is not None else (down.weight,):
            saved.append((tensor, tensor.detach().clone()))
            tensor.copy_((t.T @ tensor.double()).to(tensor.dtype))

    @torch.no_grad()
    def unfold() -> None:
        for tensor, original in saved:
            tensor.copy_(original)

    return unfold

