"""Training-free compensation of removed blocks, folded into the kept weights, so the pruned
model stays a plain checkpoint.

For each removed contiguous run of blocks a..b, the kept block p = a − 1 writes its MLP branch's
output M into the residual stream, h_p = Y + M (Y: the stream after its attention). A map T makes
Y + M T approximate h_b, what the run's last block produced in the original network:
T = argmin ‖M T − (h_b − Y)‖² over calibration tokens, from two d × d Gram sums in float64.
Every token is fitted, each sequence's first (the attention sink) included: left out, its massive
activations pass through a T that never saw them, which broke SmolLM2 at 30 % dropped
(perplexity over 10⁵; benchmarks/results/compensation.md).

- "least_squares" (ReplaceMe, arXiv 2505.02819): T is d × d and folds into the MLP's output
  projections (W ← Tᵀ W, c ← Tᵀ c): the down projection, or every expert's and the shared
  expert's in a mixture of experts, whose output is a routed sum of them. This needs M added to
  the stream as it is; families that normalise it first (Gemma 2/3's and OLMo 2's
  post-feedforward norm) are refused with a message (a check reruns block p with M zeroed).
- "cosine" (ReplaceMe's variant): T minimises the mean cosine distance between M T and h_b − Y,
  from the least-squares T by full-batch L-BFGS; the cosine cannot fix T's scale, so the scale
  is then least squares. It needs M and h_b − Y of the fitted tokens in memory.
- "rescale" (in the spirit of Prune&Comp, arXiv 2507.18212): T is diagonal, each channel's
  least-squares scale. It folds into the output projections' rows, or into the weight of a
  post-feedforward norm (the branch then ends with that norm), so it serves those families too.

The fit walks the network block by block over all calibration batches (each block run once per
stream, so it also serves sequential onloading), with T either fitted on the original network
(`fit_on="original"`: M and Y from the original's block p) or run by run on the network pruned
and compensated so far (`fit_on="pruned"`: later runs see the earlier ones' T, as the pruned
model will). Under data parallelism each process walks its share of the batches and the sums are
reduced. Memory: O(d²) per run, plus M and Y of the run being fitted for every batch.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..model.handle import ModelHandle
from ..passes.capture import block_output, token_mask
from ..config import COMPENSATION_FITS, ConfigError
from ..passes.distributed import all_reduce_state, shard
from ..passes.sequential import _record_calls
from ..model.offload import onloaded

DIAGONAL = ("rescale",)  # methods whose T is diagonal
COSINE_STEPS = 100  # L-BFGS iterations


def removed_runs(dropped: Sequence[int]) -> list[tuple[int, int]]:
    """The contiguous runs (first, last) of the `dropped` blocks, in order."""
    runs: list[tuple[int, int]] = []
    for block in sorted(dropped):
        if runs and runs[-1][1] == block - 1:
            runs[-1] = (runs[-1][0], block)
        else:
            runs.append((block, block))
    return runs


# Names of the modules (Linear) or fused expert tensors whose outputs the MLP sums into its
# output: LLaMA-like down_proj, Mixtral-style w2, GPT-2 c_proj, fc2, GPT-NeoX dense_4h_to_h, wo.
OUTPUT_PROJECTIONS = ("down_proj", "w2", "c_proj", "fc2", "dense_4h_to_h", "wo", "output_linear")


def output_projections(mlp: nn.Module, width: int) -> list[tuple[torch.Tensor, int]]:
    """Every tensor of `mlp` that writes its output, with the axis of size `width` that output
    runs along: the down projection of a dense MLP (weight and bias), of every expert (a
    ModuleList of experts, or one fused [experts, d, k] tensor and its bias) and of a shared
    expert. The output is a sum of these projections weighted by numbers computed from the input
    (routing, a shared expert's gate), so M T is each projection's output times T."""
    found: list[tuple[torch.Tensor, int]] = []
    for name, module in mlp.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and last in OUTPUT_PROJECTIONS and module.out_features == width:
            found += [(module.weight, 0)] + ([(module.bias, 0)] if module.bias is not None else [])
            continue
        for key, tensor in module.named_parameters(recurse=False):
            base = key.removesuffix("_bias")
            if base not in OUTPUT_PROJECTIONS or isinstance(module, nn.Linear):
                continue
            axes = [axis for axis in (-2, -1) if tensor.dim() >= 2 and tensor.shape[axis] == width]
            if key.endswith("_bias") and tensor.shape[-1] == width:
                found.append((tensor, -1))
            elif axes:  # [experts, d, k] as F.linear reads it, else [experts, k, d]
                found.append((tensor, axes[0]))
    return found


def _fold_points(block: nn.Module, index: int, width: int) -> list[tuple[torch.Tensor, int]]:
    points = output_projections(getattr(block, "mlp", None) or nn.Module(), width)
    if not points:
        raise ConfigError(
            f"Compensation folds into the output projections of the MLP (e.g. `mlp.down_proj`, each expert's "
            f"down projection) of the block before each removed run; block {index} "
            f"({type(block).__name__}) has none this tool recognises. Use compensation: none for this family."
        )
    if any(tensor.is_meta for tensor, _ in points):
        raise ConfigError(
            f"Block {index}'s MLP weights are not in memory (offloaded or on disk), so a compensation "
            "cannot be folded into them; load the model in memory (or with offload: sequential) or use "
            "compensation: none."
        )
    return points


def branch(block: nn.Module, index: int, method: str, width: int) -> nn.Module:
    """The module whose output block `index` adds to the residual stream for `method`: its MLP,
    or for a diagonal T a post-feedforward norm after it."""
    norm = getattr(block, "post_feedforward_layernorm", None)
    if method in DIAGONAL and isinstance(getattr(norm, "weight", None), nn.Parameter):
        return norm
    _fold_points(block, index, width)  # refuses a block without one
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
        m, z = mlp_output.double(), target.double()
        self.gram += (m.T @ m).cpu()
        self.cross += (m.T @ z).cpu()
        self.target += float((z * z).sum())
        self.plain += float(((m - z) ** 2).sum())
        self.n_tokens += len(m)

    def reduced(self) -> "RunFit":
        """The sums over all data-parallel processes (this one alone: itself)."""
        return RunFit(**all_reduce_state(self.__dict__))

    def solve(self, ridge: float = 0.0, diagonal: bool = False) -> torch.Tensor:
        """T = (MᵀM + λI)⁻¹ Mᵀ(h_b − Y), λ = `ridge` × the mean of MᵀM's diagonal; `diagonal`:
        each channel's own scale, diag(Mᵀ(h_b − Y)) / (diag(MᵀM) + λ)."""
        scale = ridge * float(self.gram.diagonal().mean())
        if diagonal:
            return torch.diag(self.cross.diagonal() / (self.gram.diagonal() + scale).clamp_min(1e-30))
        eye = torch.eye(len(self.gram), dtype=torch.float64)
        return torch.linalg.solve(self.gram + scale * eye, self.cross)

    def least_squares_scale(self, transform: torch.Tensor) -> float:
        """The c minimising ‖c M T − (h_b − Y)‖²: ⟨M T, h_b − Y⟩ / ‖M T‖²."""
        t = transform.double()
        return float((t * self.cross).sum() / (t * (self.gram @ t)).sum().clamp_min(1e-30))

    def relative_residual(self, transform: torch.Tensor) -> float:
        """‖M T − (h_b − Y)‖² / ‖h_b − Y‖² on the fitted tokens."""
        t = transform.double()
        error = float((t * (self.gram @ t)).sum() - 2 * (t * self.cross).sum()) + self.target
        return max(error, 0.0) / self.target


def mean_cosine_distance(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], transform: torch.Tensor) -> torch.Tensor:
    """Σ (1 − cos(m T, z)) over the tokens of `pairs` (M, h_b − Y) and all processes, / tokens."""
    total = sum(_cosine_distances(m, z, transform.to(m.device)).sum().cpu() for m, z in pairs)
    count = sum(len(m) for m, _ in pairs)
    sums = all_reduce_state({"total": total.double(), "count": count})
    return sums["total"] / sums["count"]


def _cosine_distances(m: torch.Tensor, z: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    return 1 - nn.functional.cosine_similarity(m.float() @ transform, z.float(), dim=-1, eps=1e-8)


def _fit_cosine(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], start: torch.Tensor, steps: int) -> torch.Tensor:
    """Full-batch L-BFGS (at most `steps` iterations, strong Wolfe line search) on the mean
    cosine distance from `start`, in float32; the loss and gradient are summed over the batches
    and processes, so every process takes the same steps. (On SmolLM2 it reached in 10 s the
    distance 1,000 Adam steps reach in 78.)"""
    device = pairs[0][0].device if pairs else torch.device("cpu")
    transform = start.float().to(device).contiguous().requires_grad_(True)
    optimizer = torch.optim.LBFGS([transform], max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)
    count = all_reduce_state({"count": sum(len(m) for m, _ in pairs)})["count"]

    def closure() -> torch.Tensor:
        transform.grad = torch.zeros_like(transform)
        loss = torch.zeros((), dtype=torch.float64)
        for m, z in pairs:
            with torch.enable_grad():
                part = _cosine_distances(m, z, transform).sum() / count
                part.backward()
            loss += part.detach().double().cpu()
        summed = all_reduce_state({"loss": loss, "grad": transform.grad})
        transform.grad = summed["grad"].contiguous()
        return summed["loss"].float()

    optimizer.step(closure)
    return transform.detach().double().cpu()


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


def _width(model: nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[1]


@contextmanager
def applied(model: nn.Module | ModelHandle, compensation: Compensation) -> Iterator[None]:
    """Run `model` (unpruned, original block indices) with each block p's branch output
    multiplied by its T: what the fold must compute."""
    handle = ModelHandle.of(model)
    layers = handle.layers
    with ExitStack() as stack:
        for p, transform in compensation.transforms.items():
            stack.enter_context(_output_replaced(
                branch(layers[p], p, compensation.method, _width(handle.model)),
                lambda output, t=transform: output @ t.to(output.device, output.dtype)))
        yield


def _check_added_as_is(index: int, block: nn.Module, module: nn.Module, rerun: Callable[[], Any],
                       output: torch.Tensor, branch_output: torch.Tensor) -> None:
    """Block `index`'s output must be (its output with a zero branch output) + the branch output."""
    with _output_replaced(module, torch.zeros_like):
        without = block_output(rerun())
    error = (output - without - branch_output).abs().max()
    if error > 1e-4 * output.abs().max().clamp_min(1e-6):
        raise ConfigError(
            f"Compensation needs the MLP output of block {index} ({type(block).__name__}) added to the "
            "residual stream as it is, to fold a d x d map into its output projections; this family "
            "transforms it first (e.g. a post-feedforward norm), so the fold would not be exact. Use "
            "compensation: rescale (a per-channel scale, folded into that norm) or none."
        )


@torch.no_grad()
def fit_compensation(
    model: nn.Module | ModelHandle,
    batches: Sequence[dict[str, torch.Tensor]],
    dropped: Sequence[int],
    *,
    method: str = "least_squares",
    skip_first: bool = False,
    ridge: float = 0.0,
    fit_on: str = "original",
    cosine_steps: int = COSINE_STEPS,
) -> Compensation:
    """Fit T (`method`) for every removed run of `dropped` over `batches`, on the original
    network or (`fit_on="pruned"`) run by run on the pruned, compensated one; `skip_first`
    leaves each sequence's first token (the attention sink) out, as measured against in the
    module's docstring. The blocks run one at a time as the handle runs them (under sequential
    onloading, on its onload device; else each where it is, in memory or where a device map put it)."""
    if fit_on not in COMPENSATION_FITS:
        raise ConfigError(f"`compensation_fit` must be one of {COMPENSATION_FITS}, got {fit_on!r}.")
    handle = ModelHandle.of(model)
    model, layers = handle.model, handle.layers
    runs = removed_runs(dropped)
    if any(a == 0 for a, _ in runs):
        raise ConfigError("Compensation folds into the block before a removed run; block 0 has none before it. "
                          "Protect it (protect_first >= 1) or use compensation: none.")
    width = _width(model)
    removed = set(dropped)
    before = {a - 1: b for a, b in runs}  # kept block p -> the run's last block
    after = {b: a - 1 for a, b in runs}
    branches = {p: branch(layers[p], p, method, width) for p in before}
    batches = shard(batches)
    device, loader = handle.block_device, handle.block_loader
    recorded = [_record_calls(handle, batch) for batch in batches]
    calls = [c for _, c in recorded]
    original = [first.to(device) for first, _ in recorded]  # the original network's stream
    # the pruned network's: fitted on the original, the same list; run by run, the same tensors until a run
    pruned = original if fit_on == "original" else list(original)
    masks = [token_mask(batch, skip_first) for batch in batches]
    pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # p -> (M, Y) of each batch
    result = Compensation(method)
    for index in range(max(before.values(), default=-1) + 1):
        block = layers[index]
        with onloaded(loader, index, block, device):
            for j, batch_calls in enumerate(calls):
                call = batch_calls[index]
                diverged = pruned[j] is not original[j]
                if index in before:
                    captured: list[torch.Tensor] = []
                    with _output_replaced(branches[index], lambda output: captured.append(output) or output):
                        output = block_output(call.run(block, pruned[j]))
                    m = captured[0]
                    if j == 0:
                        _check_added_as_is(index, block, branches[index], lambda: call.run(block, pruned[j]), output, m)
                    pending.setdefault(index, []).append((m, output - m))
                    if diverged:
                        original[j] = block_output(call.run(block, original[j]))
                        pruned[j] = output
                    else:
                        original[j] = pruned[j] = output
                    continue
                output = block_output(call.run(block, original[j]))
                if fit_on == "pruned" and index in removed:
                    original[j] = output  # the pruned stream skips the block
                elif diverged:
                    original[j], pruned[j] = output, block_output(call.run(block, pruned[j]))
                else:
                    original[j] = pruned[j] = output
        if index in after:
            p = after[index]
            pairs = pending.pop(p)
            fit, transform = _solve(width, pairs, original, masks, method, ridge, cosine_steps)
            result.transforms[p] = transform
            result.fits[p] = {"run": [p + 1, index], "fit_on": fit_on, **fit}
            if fit_on == "pruned":  # the compensated stream goes on from here
                for j, (m, y) in enumerate(pairs):
                    pruned[j] = y + m @ transform.to(m.device, m.dtype)
    return result


def _solve(width: int, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], targets: Sequence[torch.Tensor],
           masks: Sequence[torch.Tensor], method: str, ridge: float, cosine_steps: int) -> tuple[dict[str, Any], torch.Tensor]:
    """T for one run from each batch's (M, Y) and h_b, and the fit's evidence."""
    fit = RunFit.empty(width)
    kept = []
    for (m, y), h, mask in zip(pairs, targets, masks):
        keep = mask.to(m.device)
        kept.append((m[keep], (h.to(m.device) - y)[keep]))
        fit.add(*kept[-1])
    fit = fit.reduced()
    transform = fit.solve(ridge, diagonal=method in DIAGONAL)
    evidence: dict[str, Any] = {"tokens": fit.n_tokens, "ridge": ridge}
    if method == "cosine":
        evidence["cosine_distance_least_squares"] = float(mean_cosine_distance(kept, transform.float()))
        direction = _fit_cosine(kept, transform, cosine_steps)
        transform = direction * fit.least_squares_scale(direction)
        evidence["cosine_distance"] = float(mean_cosine_distance(kept, transform.float()))
    evidence.update(relative_residual=fit.relative_residual(transform), relative_residual_dropped=fit.plain / fit.target)
    return evidence, transform


def _transformed(tensor: torch.Tensor, axis: int, transform: torch.Tensor) -> torch.Tensor:
    """`tensor` with its output axis multiplied by T (a weight W along axis 0: Tᵀ W)."""
    moved = tensor.double().movedim(axis, -1) @ transform.to(tensor.device, torch.float64)
    return moved.movedim(-1, axis).to(tensor.dtype)


def _probe_tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2


@torch.no_grad()
def fold(model: nn.Module | ModelHandle, compensation: Compensation) -> Callable[[], None]:
    """Fold each T into block p's weights, in place (original block indices): every output
    projection of its MLP (W ← Tᵀ W, c ← Tᵀ c), or for a diagonal T on a norm's output, the
    norm's weight (offset + w) ← s (offset + w). Each fold is checked on a random input to the
    branch (its output must be the old output times T) and everything is undone, with a message,
    when one is not exact. Returns a function that puts the original weights back."""
    handle = ModelHandle.of(model)
    layers = handle.layers
    width = _width(handle.model)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def unfold() -> None:
        for tensor, original in saved:
            tensor.copy_(original)

    generator = torch.Generator().manual_seed(0)
    try:
        for p, transform in compensation.transforms.items():
            module = branch(layers[p], p, compensation.method, width)
            weight = next(module.parameters())
            probe = torch.randn(1, 8, width, generator=generator).to(weight.device, weight.dtype)
            expected = module(probe).double() @ transform.to(weight.device, torch.float64)
            if module is layers[p].mlp:
                for tensor, axis in _fold_points(layers[p], p, width):
                    saved.append((tensor, tensor.detach().clone()))
                    tensor.copy_(_transformed(tensor, axis, transform))
            else:  # a norm's weight, scaled per channel
                offset = _norm_weight_offset(module, width)
                saved.append((module.weight, module.weight.detach().clone()))
                scale = transform.diagonal().to(module.weight.device)
                module.weight.copy_((scale * (offset + module.weight.double()) - offset).to(module.weight.dtype))
            error = (module(probe).double() - expected).abs().max()
            if error > _probe_tolerance(weight.dtype) * expected.abs().max().clamp_min(1e-6):
                raise ConfigError(
                    f"The compensation of block {p} ({type(layers[p]).__name__}) did not fold exactly into "
                    f"{type(module).__name__}'s weights (relative error {float(error / expected.abs().max()):.2e}): "
                    "this family's MLP output is not a sum of the projections this tool folds into. Use "
                    "compensation: none for it."
                )
    except BaseException:
        unfold()
        raise
    return unfold
