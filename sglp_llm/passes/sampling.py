"""Text sampled from the model itself: a calibration source no one text decides.

A model's own samples follow its distribution over everything it was trained on, not one source's
(SmolLM2-135M writes English prose, Gemma-3-270M a web mix of languages and code), so a choice
calibrated on them does not fit one kind of text (issue 23, benchmarks/robustness.py). Each window
is sampled from the beginning-of-text token with nucleus sampling (top-p 0.95, temperature 1, no
top-k and no repetition penalty, whatever the model's generation config suggests), never ended
early, and seeded: the same model and seed give the same windows.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from ..data import SELF_GENERATED, STDLIB_DOCS, CalibrationError, Sampler
from ..model.handle import ModelHandle
from .distributed import from_main_process

TOP_P = 0.95
# windows sampled together: their key-value cache is the memory sampling needs beside the model
SAMPLING_BATCH = 32
# the most probable tokens the nucleus is first looked for among (widened 8× until it is found)
NUCLEUS_FIRST_K = 256


class NucleusDraw(LogitsProcessor):
    """Draws each row's next token from the smallest most-probable set holding `top_p` of the
    mass and returns scores that single it out, so generate's greedy step takes it. Top-p
    sampling, its nucleus found with top-k instead of sorting the whole vocabulary: with
    Gemma-3's 262k tokens, generate's sort and draw took ~70 % of sampling."""

    def __init__(self, top_p: float, never: list[int]):
        self.top_p = top_p
        self.never = torch.tensor(never, dtype=torch.long)  # e.g. the end of text: no window ends early

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        never = self.never.to(scores.device)
        probs = scores.float().index_fill(-1, never, -torch.inf).softmax(-1)
        # one uniform per row against the nucleus's cumulative mass: the draw does not depend on
        # how many tokens were looked among
        uniform = torch.rand(len(probs), 1, dtype=torch.float64, device=probs.device)
        drawn = torch.empty(len(probs), dtype=torch.long, device=probs.device)
        rows = torch.arange(len(probs), device=probs.device)  # those whose nucleus is not found yet
        k = min(NUCLEUS_FIRST_K, probs.shape[-1])
        while len(rows):
            # only the rows still looking are widened: at Gemma-3's first tokens a few rows need
            # thousands of tokens while most find their nucleus among the first k
            top, index = (probs if len(rows) == len(probs) else probs[rows]).topk(k, dim=-1)  # most probable first
            found = (top.sum(-1) >= self.top_p) | (k == probs.shape[-1])
            drawn[rows[found]] = self._draw(top[found], index[found], uniform[rows[found]])
            rows, k = rows[~found], min(8 * k, probs.shape[-1])
        return torch.full_like(scores, -torch.inf).scatter(-1, drawn[:, None], 0.0)

    def _draw(self, top: torch.Tensor, index: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """Each row's token: `top` [rows, k] its most probable tokens' probabilities (descending,
        holding its nucleus), `index` their ids, `uniform` [rows, 1] its draw."""
        mass_before = top.cumsum(-1) - top  # of the strictly more probable tokens
        cumulative = top.masked_fill(mass_before >= self.top_p, 0).double().cumsum(-1)
        position = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True).clamp(max=top.shape[-1] - 1)
        return index.gather(-1, position)[:, 0]


class SamplingError(CalibrationError):
    """The model cannot sample its own text here; the message says what to do instead."""


def sample_windows(handle: ModelHandle, tokenizer, n_samples: int, seq_len: int, seed: int, *,
                   progress: bool = True) -> torch.Tensor:
    """[n_samples, seq_len] token ids sampled from the model, each row starting with the
    beginning-of-text token (end-of-text where the tokenizer has none). The global random state
    is left as it was."""
    obstacle = sampling_obstacle(handle, tokenizer)
    if obstacle:
        raise SamplingError(obstacle)
    start = _start_token(tokenizer)
    model, device = handle.model, handle.input_device
    ends = _end_of_text_tokens(model, tokenizer)
    # every GPU a device map spreads the model over draws from its own generator
    # (a device map may also name "disk", which is no torch device)
    devices = [torch.device(d) for d in handle.devices_used() if d.startswith("cuda")]
    rows, training = [], model.training
    model.eval()  # no dropout in what is sampled
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for first in tqdm(range(0, n_samples, SAMPLING_BATCH), total=math.ceil(n_samples / SAMPLING_BATCH),
                              desc="Sampling the model's own text", disable=not progress):
                prompt = torch.full((min(SAMPLING_BATCH, n_samples - first), 1), start, dtype=torch.long, device=device)
                rows.append(model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), do_sample=False, num_beams=1,
                    logits_processor=LogitsProcessorList([NucleusDraw(TOP_P, ends)]),
                    repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=seq_len - 1,
                    pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else start,
                ).cpu())
    finally:
        model.train(training)
    # data parallel: every process calibrates on the same windows, the main process's draws (other
    # GPUs' kernels may round differently and draw other tokens)
    return from_main_process(torch.cat(rows))


def sampling_obstacle(handle: ModelHandle, tokenizer) -> str | None:
    """Why this model cannot sample its own text here, with what to do instead (None: it can)."""
    if handle.blockwise:
        return ("Sampling the model's own text runs its generate(), which needs its blocks where its forward runs "
                "them; this model runs one block at a time (offload: sequential or blocks on disk). Load it with a "
                "device map instead (accelerate offloads what does not fit), or calibrate on a text source.")
    if tokenizer is None or _start_token(tokenizer) is None:
        return ("No tokenizer with a beginning- or end-of-text token to start samples from was given; "
                "calibrate on a text source instead.")
    return None


def default_calibration(handle: ModelHandle, tokenizer) -> tuple[str, str | None]:
    """(source, why not the model's own text): the calibration text when none is set. The
    model's own samples, the source that held best on text nobody calibrated on
    (benchmarks/results/robustness.md), wherever the model can sample them at the cost of a
    forward per token: not one block at a time, and not from a device map's disk, where every
    sampled token would read all the weights again. Elsewhere the standard-library docstrings."""
    obstacle = sampling_obstacle(handle, tokenizer)
    if obstacle is None and "disk" in handle.devices_used():
        obstacle = ("its device map keeps weights on disk, and every sampled token would read them all again "
                    f"(set the dataset to {SELF_GENERATED} to sample all the same)")
    return (STDLIB_DOCS, obstacle) if obstacle else (SELF_GENERATED, None)


def _start_token(tokenizer) -> int | None:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _end_of_text_tokens(model, tokenizer) -> list[int]:
    """Every token that ends a text for generate: the tokenizer's and the generation config's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends = configured if isinstance(configured, (list, tuple)) else [configured]
    return sorted({t for t in [*ends, tokenizer.eos_token_id] if t is not None})


def model_sampler(handle: ModelHandle, tokenizer, *, progress: bool = True) -> Sampler:
    """The `Sampler` that `SELF_GENERATED` calibration draws from: this model's own text."""
    return partial(sample_windows, handle, tokenizer, progress=progress)
