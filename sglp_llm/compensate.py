"""Training-free compensation of removed blocks, folded into the kept weights, so the pruned
model stays a plain checkpoint.

For each removed contiguous run of blocks a..b, the kept block p = a − 1 writes its MLP branch's
output M into the residual stream, h_p = Y + M (Y: the stream after its attention). A map T,
fitted on calibration tokens of the original network, makes Y + M T approximate h_b, what the
run's last block produced: T = argmin ‖M T − (h_b − Y)‖², from two d × d Gram sums in float64
(memory O(d²) per run, no activation kept).

- "least_squares" (ReplaceMe, arXiv 2505.02819): T is d × d. M is the MLP's down projection
  x Wᵀ + c, so M T = x (Tᵀ W)ᵀ + Tᵀ c: T folds into W and c. This needs M added to the stream as
  it is; families that normalise it first (Gemma 2/3's and OLMo 2's post-feedforward norm) are
  refused with a message (a check reruns block p with M replaced).
- "rescale" (in the spirit of Prune&Comp, arXiv 2507.18212): T is diagonal, each channel's
  least-squares scale. It folds into the down projection's rows, or into the weight of a
  post-feedforward norm (the branch then ends with that norm), so it serves those families too.
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
    """The block's MLP down projection: what a d × d T folds into."""
    down = getattr(getattr(block, "mlp", None), "down_proj", None)
    if not isinstance(down, nn.Linear):
        raise ConfigError(
            f"Compensation folds into the MLP down projection (`mlp.down_proj`, a Linear) of the block "
            f"before each removed run; block {index} ({type(block).__name__}) has none. Use "
            "compensation: none for this family."
        )
    return down


def branch(block: nn.Module, index: int, method: str) -> nn.Module:
    """The module whose output block `index` adds to the residual stream for `method`: its MLP,
    or for "rescale" a post-feedforward norm after it."""
    norm = getattr(block, "post_feedforward_layernorm", None)
    if method == "rescale" and isinstance(getattr(norm, "weight", None), nn.Parameter):
        return norm
    down_projection(block, index)  # refuses a block without one
    return block.mlp


def _norm_weight_offset(norm: nn.Module, width: int) -> float:
    """c in a norm's output = normalised(x) × (c + weight): 0, or 1 for Gemma's (1 + weight)."""
    with torch.no_grad():
        saved = norm.weight.detach().clone()
        norm.weight.zero_()
        try:
            probe = norm(torch.randn(2, width, dtype=saved.dtype, device=saved.device))
        finally:
            norm.weight.copy_(saved)
    return 0.0 if float(probe.abs().max()) == 0.0 else 1.0


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

    def solve(self, ridge: float = 0.0, diagonal: bool = False) -> torch.Tensor:
        """T = (MᵀM + λI)⁻¹ Mᵀ(h_b − Y), λ = `ridge` × the mean of MᵀM's diagonal; `diagonal`:
        each channel's own scale, diag(Mᵀ(h_b − Y)) / (diag(MᵀM) + λ)."""
        scale = ridge * float(self.gram.diagonal().mean())
        if diagonal:
            return torch.diag(self.cross.diagonal() / (self.gram.diagonal() + scale).clamp_min(1e-30))
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

    method: str
    transforms: dict[int, torch.Tensor] = field(default_factory=dict)  # kept block p -> T
    fits: dict[int, dict[str, Any]] = field(default_factory=dict)  # p -> run, tokens, residuals


@contextmanager
def _output_replaced(module: nn.Module, replace: Any) -> Iterator[None]:
    """Pass `module`'s output through `replace` while inside."""
    handle = module.register_forward_hook(lambda module, args, output: replace(output))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def applied(model: nn.Module, compensation: Compensation, layers_path: str | None = None) -> Iterator[None]:
    """Run `model` (unpruned, original block indices) with each block p's branch output
    multiplied by its T: what the fold must compute."""
    layers = find_decoder_blocks(model, layers_path).layers
    with ExitStack() as stack:
        for p, transform in compensation.transforms.items():
            stack.enter_context(_output_replaced(
                branch(layers[p], p, compensation.method),
                lambda output, t=transform: output @ t.to(output.device, output.dtype)))
        yield


def _check_added_as_is(block: nn.Module, index: int, module: nn.Module, args: tuple, kwargs: dict,
                       output: torch.Tensor, branch_output: torch.Tensor) -> None:
    """Block `index`'s output must be (its output with a zero branch output) + the branch output."""
    with torch.no_grad(), _output_replaced(module, torch.zeros_like):
        without = block_output(block(*args, **kwargs))
    error = (output - without - branch_output).abs().max()
    if error > 1e-4 * output.abs().max().clamp_min(1e-6):
        raise ConfigError(
            f"Compensation needs the MLP output of block {index} ({type(block).__name__}) added to the "
            "residual stream as it is, to fold a d x d map into its down projection; this family "
            "transforms it first (e.g. a post-feedforward norm), so the fold would not be exact. Use "
            "compensation: rescale (a per-channel scale, folded into that norm) or none."
        )


@torch.no_grad()
def fit_compensation(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    dropped: Sequence[int],
    *,
    method: str = "least_squares",
    layers_path: str | None = None,
    skip_first: bool = True,
    ridge: float = 0.0,
) -> Compensation:
    """Fit T (`method`: "least_squares" or "rescale") for every removed run of `dropped` on the
    original network, in one forward pass over `batches`; `skip_first` leaves each sequence's
    first token (the attention sink, whose massive activations would dominate the sums) out."""
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
    branches = {p: branch(layers[p], p, method) for p in fits}

    def on_block(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = block_output(output)
            if index in fits and index not in checked:  # once, on the first batch (the check reruns the block)
                checked.add(index)
                branch_output = seen[("mlp", index)]
                _check_added_as_is(module, index, branches[index], args, kwargs, hidden, branch_output)
                seen[("mlp", index)] = branch_output
            seen[index] = hidden
        return hook

    def on_mlp(index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen[("mlp", index)] = output
        return hook

    handles = []
    try:
        for p in fits:
            handles.append(branches[p].register_forward_hook(on_mlp(p)))
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
    result = Compensation(method)
    for p, fit in fits.items():
        transform = fit.solve(ridge, diagonal=method == "rescale")
        result.transforms[p] = transform
        result.fits[p] = {
            "run": [p + 1, last[p]], "tokens": fit.n_tokens, "ridge": ridge,
            "relative_residual": fit.relative_residual(transform),
            "relative_residual_dropped": fit.plain / fit.target,
        }
    return result


@torch.no_grad()
def fold(model: nn.Module, compensation: Compensation, layers_path: str | None = None) -> Callable[[], None]:
    """Fold each T into block p's weights, in place (original block indices): the down
    projection W ← Tᵀ W and c ← Tᵀ c, or for a diagonal T on a norm's output, the norm's weight
    (offset + w) ← s (offset + w). Returns a function that puts the original weights back."""
    layers = find_decoder_blocks(model, layers_path).layers
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for p, transform in compensation.transforms.items():
        module = branch(layers[p], p, compensation.method)
        if module is layers[p].mlp:
            down = down_projection(layers[p], p)
            t = transform.to(down.weight.device, torch.float64)
            for tensor in (down.weight, down.bias) if down.bias is not None else (down.weight,):
                saved.append((tensor, tensor.detach().clone()))
                tensor.copy_((t.T @ tensor.double()).to(tensor.dtype))
        else:  # a norm's weight, scaled per channel
            weight = module.weight
            offset = _norm_weight_offset(module, weight.shape[-1])
            scale = transform.diagonal().to(weight.device)
            saved.append((weight, weight.detach().clone()))
            weight.copy_((scale * (offset + weight.double()) - offset).to(weight.dtype))

    @torch.no_grad()
    def unfold() -> None:
        for tensor, original in saved:
            tensor.copy_(original)

    return unfold
