"""Proving a rewrite before anything is written: the pruned model must compute exactly what the
original model computes with the dropped blocks skipped.

Removing blocks also renumbers the kept ones, shrinks the config's block count and edits per-block
config fields; any family whose code reads those in a way the rewrite does not know (a scale from
the block count, an initialisation from the block index, a stack whose blocks share state) would
silently compute something else. So before the rewrite the original runs on a short probe with
each dropped block's output replaced by its input (forward hooks: the block is skipped), and its
logits and greedy continuations, with and without the KV cache, become the reference. The
pruned model must reproduce them, and so must the saved folder once reloaded. Under sequential
onloading (and with blocks on disk) the models run block by block, as the analysis does, and
their logits are compared.
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..model.blocks import UnsupportedModelError, text_config
from ..model.devices import input_device
from ..model.handle import ModelHandle
from ..model.offload import BLOCK_LOADER_ATTRIBUTE, load_with_blocks_on_disk, onloaded
from ..model.rewrite import removing_blocks
from ..passes.capture import as_returned, block_arity, block_input, block_output, extra_items, refuse_carried_state
from ..passes.head import final_hidden_state
from ..passes.loss import causal_lm_loss
from ..passes.sequential import _record_calls

# greedy tokens generated from the probe's first sequence, with and without the KV cache
NEW_TOKENS = 4
# probe tokens per sequence when the model has no sliding window to cross
PROBE_TOKENS = 24
PROBE_SEQUENCES = 2
# the largest difference allowed (logits, hidden states), relative to the largest reference value: equal
# computations agree to rounding, a wrong model differs by far more
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
HALF_TOLERANCE = 2e-2


# what each check ran, as the report names it and as people read it
PRUNED, RELOADED = "The pruned model", "The saved model, reloaded"
CHECK_NAMES = {PRUNED: "the pruned model in memory", RELOADED: "the saved folder reloaded with from_pretrained"}


class VerificationError(ValueError):
    """The pruned model does not compute what the original does with the dropped blocks skipped."""


@dataclass
class Probe:
    """The verification input: `input_ids` [PROBE_SEQUENCES, T] of calibration tokens."""

    input_ids: torch.Tensor

    @property
    def batch(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": torch.ones_like(self.input_ids)}


@dataclass
class Outputs:
    """What a model computed on the probe (CPU, float32): the logits (of the last position when
    the final hidden states of every position are there instead: a large vocabulary makes full
    logits the costliest part) and greedy continuations."""

    logits: torch.Tensor
    greedy: dict[str, torch.Tensor] = field(default_factory=dict)  # "cache"/"no cache" -> new ids
    hidden: torch.Tensor | None = None  # the last entry of `hidden_states`, every position


@dataclass
class Reference:
    """The original model's outputs with the dropped blocks skipped, and what they were run on."""

    probe: Probe
    outputs: Outputs
    dtype: torch.dtype
    # run one block at a time: on this device (the checks run the same way); None: whole forwards
    onload_device: torch.device | None
    seconds: float
    checks: dict[str, Any] = field(default_factory=dict)  # filled as the pruned models pass

    @property
    def blockwise(self) -> bool:
        return self.onload_device is not None


def sliding_window(config: Any) -> int | None:
    """The attention window a probe must cross, when the model has an active one."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def make_probe(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]] | None, seed: int = 0) -> Probe:
    """PROBE_SEQUENCES sequences of calibration tokens (seeded random ids without calibration),
    long enough that the probe and its continuation cross the model's sliding window."""
    config = text_config(model)
    length = PROBE_TOKENS
    window = sliding_window(config)
    if window is not None:
        length = max(length, window + 8)
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and max_positions > 0:
        length = max(2, min(length, max_positions - NEW_TOKENS))
    needed = PROBE_SEQUENCES * length
    tokens = (
        torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches]).cpu()
        if batches else torch.empty(0, dtype=torch.long)
    )
    if tokens.numel() == 0:
        vocab = int(getattr(config, "vocab_size", 2) or 2)
        tokens = torch.randint(0, vocab, (needed,), generator=torch.Generator().manual_seed(seed))
    tokens = tokens.repeat(math.ceil(needed / tokens.numel()))[:needed]
    return Probe(tokens.view(PROBE_SEQUENCES, length))


@contextmanager
def skipped(layers: Sequence[nn.Module], dropped: Sequence[int]) -> Iterator[None]:
    """Run the model as if the `dropped` blocks were not there: each still runs (so nothing the
    model's loop expects from it is missing) but hands its input on in place of its output."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = block_input(args, kwargs)
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        if isinstance(output, list):
            return [hidden, *output[1:]]
        return hidden

    handles = [layers[i].register_forward_hook(hook, with_kwargs=True) for i in dropped]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _greedy(model: nn.Module, input_ids: torch.Tensor, use_cache: bool) -> torch.Tensor:
    """NEW_TOKENS greedy tokens (no early stop), whatever the model's generation defaults."""
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        use_cache=use_cache,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=getattr(model.generation_config, "pad_token_id", None) or 0,
    )
    return generated[:, input_ids.shape[1]:].cpu()


def model_outputs(model: nn.Module, probe: Probe, *, generate: bool = True) -> Outputs:
    """The model's logits on the probe and, with `generate`, its greedy continuations."""
    device = input_device(model)
    batch = {k: v.to(device) for k, v in probe.batch.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden = None
            if "logits_to_keep" in inspect.signature(model.forward).parameters:
                output = model(**batch, use_cache=False, logits_to_keep=1, output_hidden_states=True)
                if output.hidden_states:
                    hidden = output.hidden_states[-1].float().cpu()
            if hidden is None:
                output = model(**batch, use_cache=False)
            greedy = {}
            if generate:
                # with the cache from the whole probe (its sliding-window path); without, from its
                # start: each step is a plain forward, whose every position the logits check covered
                prompt = batch["input_ids"][:1]
                greedy = {
                    "cache": _greedy(model, prompt, True), "no cache": _greedy(model, prompt[:, :PROBE_TOKENS], False),
                }
    finally:
        model.train(was_training)
    return Outputs(output.logits.float().cpu(), greedy, hidden)


def blockwise_outputs(
    model: nn.Module | ModelHandle,
    probe: Probe,
    *,
    indices: Sequence[int] | None = None,
    skip: Sequence[int] = (),
) -> Outputs:
    """The logits of a model run one block at a time (sequential onloading, blocks on disk): its
    own forward records every block's call, each block not in `skip` is onloaded and run, and the
    model's head runs on the final hidden state. `indices`: the blocks' indices for the model's
    loader (a pruned model's blocks keep their source indices on disk)."""
    handle = ModelHandle.of(model).one_block_at_a_time()
    model, layers, loader, device = handle.model, handle.layers, handle.loader, handle.onload_device
    indices = list(indices) if indices is not None else list(range(len(layers)))
    batch = {k: v.to(handle.input_device) for k, v in probe.batch.items()}
    skip = set(skip)
    arity = 0
    with torch.no_grad():
        first, calls = _record_calls(handle, batch)
        hidden = first.to(device)
        for index, block in enumerate(layers):
            if index in skip:
                continue
            with onloaded(loader, indices[index], block, device):
                output = calls[index].run(block, hidden)
            arity = block_arity(output)
            hidden = block_output(output)
        with final_hidden_state(layers, hidden, arity):
            logits = model(**batch, use_cache=False).logits
    return Outputs(logits.float().cpu())


def _dtype(model: nn.Module) -> torch.dtype:
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return min(floats, key=lambda d: torch.finfo(d).bits) if floats else torch.float32


def _reason(error: BaseException) -> str:
    """An exception as one line for a message: its type and first line."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _run(handle: ModelHandle, probe: Probe, generate: bool, what: str, **blockwise_args: Any) -> Outputs:
    """The outputs of the handle's model on the probe, run as the handle runs it; a crash becomes
    a VerificationError naming `what`."""
    try:
        if handle.blockwise:
            return blockwise_outputs(handle, probe, **blockwise_args)
        return model_outputs(handle.model, probe, generate=generate)
    except (VerificationError, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - any failure means the rewrite is not proven
        raise VerificationError(
            f"{what} of this {type(handle.model).__name__} could not run on the verification input "
            f"({_reason(error)}). Nothing was "
            "written; the rewrite does not support this family. (--no-verify skips this check at your "
            "own risk.)"
        ) from error


def reference_outputs(
    model: nn.Module | ModelHandle, dropped: Sequence[int], probe: Probe, *, generate: bool = True,
) -> Reference:
    """Run the original `model` on `probe` with the `dropped` blocks skipped (before the rewrite),
    as its handle runs it (block by block or whole); `generate`: also its greedy continuations
    (not block by block)."""
    started = time.perf_counter()
    handle = ModelHandle.of(model)
    blockwise = handle.blockwise
    generate = generate and not blockwise
    what = "The original model with the dropped blocks skipped"
    try:
        with skipped(handle.layers, [] if blockwise else dropped):
            outputs = _run(handle, probe, generate, what, **({"skip": dropped} if blockwise else {}))
    except VerificationError:
        # a model that fails without any block skipped is not the rewrite's doing: say that
        _run(handle, probe, generate, "The original model (nothing skipped)")
        raise
    return Reference(probe, outputs, _dtype(handle.model), handle.onload_device, time.perf_counter() - started)


# what a forward the model cannot take raises (a missing input, a shape its loop does not expect, ...)
FORWARD_ERRORS = (ValueError, IndexError, TypeError, RuntimeError, AttributeError, KeyError)


def _check_loss(handle: ModelHandle, probe: Probe) -> None:
    """Every analysis computes the next-token loss from input_ids and labels: a model whose
    forward does not (an audio decoder with codebooks, ...) is refused here with the reason, and
    so is one whose blocks hand a state of their own to the next (HY-V4's top-k indices)."""

    model = handle.model
    batch = {k: v.to(handle.input_device) for k, v in probe.batch.items()}
    carried: list[Any] = []
    hook = handle.layers[0].register_forward_hook(
        lambda module, args, output: carried.append(output))
    try:
        with torch.no_grad():
            loss = causal_lm_loss(model, batch)
    except FORWARD_ERRORS as error:
        if isinstance(error, torch.OutOfMemoryError):
            raise
        raise UnsupportedModelError(
            f"The next-token loss of this {type(model).__name__} could not be computed ({_reason(error)}): "
            "sglp-llm needs a causal LM "
            "whose forward takes input_ids, attention_mask and labels and returns that loss."
        ) from error
    finally:
        hook.remove()
    if carried and extra_items(carried[0]) and not _same_loss_without_extras(handle, batch, loss):
        refuse_carried_state(model, carried[0])


def _same_loss_without_extras(handle: ModelHandle, batch: dict[str, torch.Tensor], loss: torch.Tensor) -> bool:
    """Whether the model computes the same `loss` when every block returns None beside its hidden
    states, as a stand-in for a skipped block does: true where the rest is attention weights the
    model keeps only when asked (BLOOM, Falcon, GPT-Neo, MPT, ... return them unasked), false where it
    is a state the next block reads (HY-V4's top-k indices), which no stand-in and no pruned model can give."""

    def without_extras(module: nn.Module, args: tuple, output: Any) -> Any:
        return as_returned(block_output(output), block_arity(output))

    hooks = [layer.register_forward_hook(without_extras) for layer in handle.layers]
    try:
        with torch.no_grad():
            again = causal_lm_loss(handle.model, batch)
    except FORWARD_ERRORS as error:
        if isinstance(error, torch.OutOfMemoryError):
            raise
        return False
    finally:
        for hook in hooks:
            hook.remove()
    return bool(torch.allclose(again, loss, rtol=1e-5, atol=1e-6))


def preflight(model: nn.Module | ModelHandle, *, seed: int = 0) -> None:
    """Before any analysis, a trial rewrite (a third and two thirds of the way down removed) must
    reproduce the original with those blocks skipped, so a family the rewrite cannot handle is
    refused in seconds rather than after the analysis. Run block by block (a model larger than
    memory) only the rewrite's own checks run: the full check waits for the real removal."""
    handle = ModelHandle.of(model)
    num_blocks = len(handle.layers)
    trial = sorted({num_blocks // 3, (2 * num_blocks) // 3} - {num_blocks - 1}) if num_blocks > 1 else []
    if not trial:
        return
    reference = None
    if not handle.blockwise:
        # one sequence: still across the sliding window (the block-index dependence a trial
        # exposes); the check after the real removal runs the whole probe, and generation
        probe = Probe(make_probe(handle.model, None, seed=seed).input_ids[:1])
        _check_loss(handle, Probe(probe.input_ids[:, :PROBE_TOKENS]))
        reference = reference_outputs(handle, trial, probe, generate=False)
    undo = removing_blocks(handle, trial)
    try:
        if reference is not None:
            check(reference, handle, f"A trial rewrite (blocks {trial} removed)")
    finally:
        undo()


def compare(reference: Reference, outputs: Outputs, what: str, architecture: str) -> dict[str, Any]:
    """Check `outputs` against the reference; the largest differences, or a VerificationError."""
    ref = reference.outputs
    if outputs.logits.shape != ref.logits.shape:
        raise VerificationError(
            f"{what} of this {architecture} gives logits of shape {tuple(outputs.logits.shape)}, "
            f"the original with the dropped blocks skipped {tuple(ref.logits.shape)}."
        )
    tolerance = TOLERANCE.get(reference.dtype, HALF_TOLERANCE)
    problem, difference = None, 0.0
    pairs = [("logits", outputs.logits, ref.logits)]
    if ref.hidden is not None and outputs.hidden is not None and outputs.hidden.shape == ref.hidden.shape:
        pairs.insert(0, ("final hidden states", outputs.hidden, ref.hidden))
    for name, got, want in pairs:
        # a model that overflows does so in both: compare where the reference is finite
        finite = torch.isfinite(want)
        scale = want[finite].abs().max().item() if finite.any() else 1.0
        gap = (got - want)[finite].abs().max().item() if finite.any() else 0.0
        if not torch.equal(finite, torch.isfinite(got)):
            problem = f"its {name} are not finite where the original's are, or the other way round"
        elif not math.isfinite(gap) or gap > tolerance * (scale or 1.0):
            problem = f"its {name} differ by up to {gap:.3g} (largest {scale:.3g})"
        difference = max(difference, gap / (scale or 1.0))
        if problem:
            break
    for name, tokens in ref.greedy.items():
        if problem is None and not torch.equal(outputs.greedy[name], tokens):
            problem = f"its greedy generation {'with' if name == 'cache' else 'without'} the KV cache picks other tokens"
    if problem is not None:
        raise VerificationError(
            f"{what} of this {architecture} does not compute what the original model computes with "
            f"the dropped blocks skipped: {problem}. Nothing was written. This family's code depends "
            "on the block count or on block indices in a way the rewrite does not handle; please "
            "open an issue with the model id. (--no-verify skips this check at your own risk.)"
        )
    return {"max_relative_difference": difference, "greedy_equal": bool(ref.greedy)}


def check(reference: Reference, model: nn.Module | ModelHandle, what: str, *,
          indices: Sequence[int] | None = None) -> dict[str, Any]:
    """Run `model` (pruned) the way the reference ran and compare; records the result."""
    started = time.perf_counter()
    handle = ModelHandle.of(model, offload="sequential" if reference.blockwise else "none",
                            onload_device=reference.onload_device)
    outputs = _run(
        handle, reference.probe, bool(reference.outputs.greedy), what,
        **({"indices": indices} if reference.blockwise else {}),
    )
    result = compare(reference, outputs, what, type(handle.model).__name__)
    result["seconds"] = time.perf_counter() - started
    reference.checks[what] = result
    return result


def _reload(folder: Any, model: nn.Module) -> nn.Module:
    """The saved folder loaded as a user would, placed like `model`: plain `from_pretrained`,
    or with the blocks left on disk when `model` was run that way."""
    from transformers import AutoModelForCausalLM


    if hasattr(model, BLOCK_LOADER_ATTRIBUTE):
        return load_with_blocks_on_disk(folder, device=model.get_input_embeddings().weight.device)
    devices = {p.device for p in model.parameters()}
    placement: dict[str, Any] = {}
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        placement = {"device_map": "auto"}
    elif devices != {torch.device("cpu")} and len(devices) == 1:
        placement = {"device_map": {"": str(next(iter(devices)))}}
    # the Auto class where it knows this config (what lm-eval and most users load with), else the
    # model's own class (a text model whose config the Auto mapping leaves out)
    loader = AutoModelForCausalLM if type(model.config) in AutoModelForCausalLM._model_mapping else type(model)
    return loader.from_pretrained(
        folder,
        dtype="auto",
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        # the model's own code already ran, so the user allowed it
        trust_remote_code=type(model).__module__.startswith("transformers_modules"),
        **placement,
    )


def check_saved(reference: Reference, folder: Any, model: nn.Module) -> dict[str, Any]:
    """Reload the folder just written and check it against the reference (the load's time
    counts in the check's)."""
    started = time.perf_counter()
    try:
        reloaded = _reload(folder, model)
    except Exception as error:  # noqa: BLE001 - a folder that does not load must not be written
        raise VerificationError(
            f"The saved {type(model).__name__} could not be reloaded with from_pretrained "
            f"({_reason(error)}). Nothing was "
            "written."
        ) from error
    try:
        result = check(reference, reloaded, RELOADED)
    finally:
        del reloaded
    result["seconds"] = time.perf_counter() - started
    return result


def record(reference: Reference, plan: Any) -> None:
    """Put the verification so far into the plan's report and timings."""
    plan.extra["verification"] = summary(reference)
    plan.timings["verify_s"] = plan.extra["verification"]["seconds"]


def summary(reference: Reference) -> dict[str, Any]:
    """The verification record for the report: what was compared, how closely, at what cost."""
    checks = reference.checks
    return {
        "probe": list(reference.probe.input_ids.shape),
        "compared": "logits (block by block)" if reference.blockwise else
        ("final hidden states and last-position logits" if reference.outputs.hidden is not None else "logits")
        + f", and {NEW_TOKENS} greedy tokens with and without the KV cache",
        "checks": checks,
        "seconds": reference.seconds + sum(c["seconds"] for c in checks.values()),
    }


def describe(record: dict[str, Any] | None) -> str:
    """One sentence for people: what the verification compared and found, at what cost."""
    if not record:
        return "Not verified (verification was turned off)."
    checks = record["checks"]
    worst = max((c["max_relative_difference"] for c in checks.values()), default=0.0)
    who = " and ".join(CHECK_NAMES.get(name, name) for name in checks)
    return (
        f"Verified: {who} reproduce the original model with the dropped blocks skipped "
        f"({record['compared']} on {record['probe'][0]} x {record['probe'][1]} calibration tokens; "
        f"largest difference {worst:.2g} of the largest value); {record['seconds']:.1f} s."
    )
