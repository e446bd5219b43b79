"""Evaluate a (pruned) model: strided perplexity and bits-per-byte, lm-eval tasks, and
generation speed.

Perplexity is computed here rather than through lm-eval so that it needs nothing beyond
transformers and accepts the same data sources as calibration (`data.load_texts`). lm-eval
(`pip install 'sglp-llm[eval]'`) runs benchmark tasks, including `sglp_local_ppl`, shipped in
`sglp_llm/evaluation/tasks/`, which works offline.
"""

from __future__ import annotations

import difflib
import math
import os
import statistics
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from ..model.devices import input_device
from ..model.blocks import text_config
from ..config import ConfigError, SGLPConfig
from ..passes.loss import token_nll
from ..data import BUILTIN_PREFIX, STDLIB_DOCS, _nonempty_strings, load_texts

TASKS_DIR = Path(__file__).parent / "tasks"
# The held-out text that `perplexity_on_source` uses when no source is given: written for this
# package, unlike any calibration source (the model's own samples, the stdlib docstrings), so it
# measures unseen text.
EVAL_TEXT = TASKS_DIR / "sglp_local_ppl.jsonl"
DEFAULT_MAX_LENGTH = 1024


class EvaluationError(ConfigError):
    """The evaluation cannot run as asked; the message says what to change."""


def local_task_dataset(data_files: dict[str, str], **_metadata: Any) -> datasets.DatasetDict:
    """lm-eval `custom_dataset` for the shipped tasks: each split's JSONL `text` rows.

    lm-eval hands `data_files` to `datasets` as is, which resolves them against the working
    directory; here they are resolved in `TASKS_DIR`, so the tasks run from anywhere.
    lm-eval also passes the task metadata, which is not needed.
    """
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({"text": load_texts(str(TASKS_DIR / name))[0]})
            for split, name in data_files.items()
        }
    )


# ---------------------------------------------------------------------------------- perplexity
def _windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first target) of the strided windows over `n` token positions.

    Windows of `max_length` tokens start every `stride` tokens; each scores the positions
    after the previous window's end, so every position but the first is scored exactly once,
    with at least `max_length - stride` tokens of left context (fewer only at the start).
    """
    windows: list[tuple[int, int, int]] = []
    prev_end = 0
    for start in range(0, n, stride):
        end = min(start + max_length, n)
        windows.append((start, end, max(prev_end, start + 1)))
        prev_end = end
        if end == n:
            break
    return windows


def _check_lengths(max_length: int, stride: int, max_positions: int | None) -> None:
    if max_length < 2 or (max_positions is not None and max_length > max_positions):
        upper = f" and at most the model's max_position_embeddings={max_positions}" if max_positions else ""
        raise EvaluationError(f"max_length={max_length} must be at least 2{upper}; choose another --max-length.")
    if not 1 <= stride < max_length:
        raise EvaluationError(
            f"stride={stride} must be between 1 and max_length - 1 = {max_length - 1}, so that each "
            "window keeps some left context; choose another --stride."
        )


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, float | int]:
    """Token perplexity and bits-per-byte of `model` on `texts`.

    Each text is scored on its own (no context from other texts), after a leading BOS token
    (EOS when the tokenizer has no BOS), as lm-eval does, so that every text token is predicted
    and bits-per-byte covers every byte. Texts longer than `max_length` (default: the model's
    max positions, at most 1024) are scored with Hugging Face's strided sliding window:
    windows start every `stride` tokens (default `max_length // 2`) and each token is scored
    once, in the first window that reaches it.
    """
    max_positions = getattr(text_config(model), "max_position_embeddings", None)
    if max_length is None:
        max_length = min(max_positions or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    if stride is None:
        stride = max_length // 2
    _check_lengths(max_length, stride, max_positions)
    texts = _nonempty_strings(texts)
    if not texts:
        raise EvaluationError("No text to evaluate: give at least one non-empty text.")
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = [] if prefix_id is None else [prefix_id]
    encoded = [prefix + ids for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
    windows = [(ids, *window) for ids in encoded for window in _windows(len(ids), max_length, stride)]

    device = input_device(model)
    was_training = model.training
    model.eval()
    total_nll, n_tokens = 0.0, 0
    try:
        batches = range(0, len(windows), batch_size)
        for i in tqdm(batches, desc="Perplexity", disable=not progress):
            batch = windows[i : i + batch_size]
            width = max(end - start for _, start, end, _ in batch)
            # Right padding: causal attention keeps the pads out of every real position.
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            # scored[b, j]: the token at window position j + 1 counts (logit j predicts it)
            scored = torch.zeros(len(batch), width - 1, dtype=torch.bool)
            for row, (ids, start, end, first) in enumerate(batch):
                input_ids[row, : end - start] = torch.tensor(ids[start:end])
                scored[row, first - start - 1 : end - start - 1] = True
            logits = model(input_ids=input_ids.to(device), use_cache=False).logits
            nll = token_nll(logits[:, :-1].float(), input_ids[:, 1:])
            total_nll += nll[scored.to(nll.device)].sum().item()
            n_tokens += int(scored.sum())
    finally:
        model.train(was_training)
    if n_tokens == 0:
        raise EvaluationError(
            "The texts give no token to predict (each is a single token and the tokenizer has "
            "no BOS or EOS token to start from); give longer texts."
        )
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return {
        "perplexity": math.exp(total_nll / n_tokens),
        "nll": total_nll / n_tokens,
        "n_tokens": n_tokens,
        "bits_per_byte": total_nll / math.log(2) / n_bytes,
        "n_bytes": n_bytes,
        "n_texts": len(texts),
        "max_length": max_length,
        "stride": stride,
    }


def load_eval_texts(
    source: str | None = None,
    *,
    text_column: str = "text",
    split: str = "train",
    config_name: str | None = None,
    max_texts: int | None = None,
) -> tuple[list[str], str]:
    """The texts to score and their description, read like calibration data (`data.load_texts`).

    `source` is a local file or directory, a Hub dataset or a built-in text; None means the
    built-in evaluation text (`EVAL_TEXT`, not the calibration default, so the model is measured
    on unseen text). `max_texts` keeps the first texts only.
    """
    if max_texts is not None and max_texts < 1:
        raise EvaluationError(f"max_texts={max_texts} must be at least 1 (or None for all texts).")
    texts, description = load_texts(
        str(EVAL_TEXT) if source is None else source,
        config_name=config_name,
        split=split,
        text_column=text_column,
    )
    if source is None:
        description = f"built-in evaluation text: {len(texts)} English paragraphs ({EVAL_TEXT.name})"
    return texts[:max_texts], description


def perplexity_on_source(
    model: nn.Module,
    tokenizer: Any,
    source: str | None = None,
    *,
    text_column: str = "text",
    split: str = "train",
    config_name: str | None = None,
    max_texts: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """`perplexity` on the texts of `source` (see `load_eval_texts`); `kwargs` go to
    `perplexity`, and the result also names the source."""
    texts, description = load_eval_texts(
        source, text_column=text_column, split=split, config_name=config_name, max_texts=max_texts
    )
    if max_texts is not None:  # the report and card say what was scored, not only where from
        description = f"{description}; scored its first {len(texts)} texts"
    return {**perplexity(model, tokenizer, texts, **kwargs), "source": description}


def warn_if_not_held_out(
    config: SGLPConfig, source: str | None, *, config_name: str | None = None, split: str = "train"
) -> None:
    """Warn when the evaluation text (`source`, None: `EVAL_TEXT`) is the calibration text of
    `config`: the blocks were chosen to fit it, so its perplexity flatters the pruned model."""
    sources = config.dataset if isinstance(config.dataset, list) else [config.dataset or STDLIB_DOCS]
    calibration = {_text_identity(s, config.dataset_config, config.dataset_split) for s in sources}
    if _text_identity(source or str(EVAL_TEXT), config_name, split) in calibration:
        warnings.warn(
            f"The evaluation text {source or str(EVAL_TEXT)!r} is the calibration text: its "
            "perplexity measures fit to the data the blocks were chosen on, not held-out "
            "quality. Evaluate on another dataset.",
            UserWarning,
            stacklevel=2,
        )


def _text_identity(source: str, config_name: str | None, split: str) -> tuple[Any, ...]:
    """What makes two text sources the same: the resolved path of a local file or folder, the
    name of a built-in text, the name, config and split of a Hub dataset."""
    if source.startswith(BUILTIN_PREFIX):
        return (source,)
    path = Path(source).expanduser()
    if path.exists():
        return (path.resolve(),)
    return (source, config_name, split)


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    *,
    perplexity_source: str | None = None,
    with_perplexity: bool = True,
    tasks: list[str] | None = None,
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    progress: bool = True,
    **text_kwargs: Any,
) -> dict[str, Any]:
    """{"perplexity": ..., "tasks": ...} of a model in memory: `perplexity_on_source` (when
    `with_perplexity`, `text_kwargs` go to it) and `run_lm_eval` (when `tasks` are given)."""
    results: dict[str, Any] = {}
    if with_perplexity:
        results["perplexity"] = perplexity_on_source(
            model, tokenizer, perplexity_source, batch_size=batch_size, progress=progress, **text_kwargs
        )
    if tasks:
        results["tasks"] = run_lm_eval(
            model, tokenizer, tasks=tasks, include_path=include_path, limit=limit, batch_size=batch_size
        )
    return results


def card_metrics(results: Mapping[str, Any]) -> dict[str, Any]:
    """`evaluate_model` results as one column of the model card's evaluation table (and of the
    report's `extra["evaluation"]`): metric -> value, the perplexity text named in its own row."""
    metrics: dict[str, Any] = {}
    if "perplexity" in results:
        ppl = results["perplexity"]
        metrics.update(
            perplexity=ppl["perplexity"], bits_per_byte=ppl["bits_per_byte"], perplexity_text=ppl["source"]
        )
    for task, values in results.get("tasks", {}).items():
        metrics.update({f"{task}/{name}": value for name, value in values.items()})
    return metrics


# ---------------------------------------------------------------------------------- speed
class _TokenClock(BaseStreamer):
    """The time of each chunk `generate` streams: the prompt, then every new token. Tokens are
    streamed from the host once computed, so each stamp follows the work of its step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """Nothing is buffered, so nothing to flush."""


@torch.no_grad()
def generation_speed(
    model: nn.Module,
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, float | int]:
    """Prefill and decode throughput (tokens/s) of greedy `generate` with the KV cache, batch 1,
    on a random prompt: medians over `repeats` runs after one warm-up run.

    Prefill is the prompt length over the time from the prompt to the first new token; decode
    is the other new tokens over the time from the first new token to the last. Both come from
    the same `generate` call, so they measure what a user of the model gets.
    """
    if prompt_tokens < 1 or new_tokens < 2 or repeats < 1:
        raise EvaluationError(
            f"Speed needs prompt_tokens >= 1, new_tokens >= 2 and repeats >= 1; got "
            f"{prompt_tokens}, {new_tokens} and {repeats}."
        )
    max_positions = getattr(text_config(model), "max_position_embeddings", None)
    if max_positions is not None and prompt_tokens + new_tokens > max_positions:
        raise EvaluationError(
            f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the model's "
            f"max_position_embeddings={max_positions}; use a shorter prompt or fewer new tokens."
        )
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab, (1, prompt_tokens), generator=generator).to(input_device(model))
    was_training = model.training
    model.eval()
    prefill, decode = [], []
    try:
        for run in range(repeats + 1):
            clock = _TokenClock()
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                streamer=clock,
            )
            if run:  # run 0 warms up (allocations, kernel selection)
                prompt_at, first_at, last_at = clock.times[0], clock.times[1], clock.times[-1]
                prefill.append(prompt_tokens / (first_at - prompt_at))
                decode.append((len(clock.times) - 2) / (last_at - first_at))
    finally:
        model.train(was_training)
    return {
        "prefill_tokens_per_s": statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
    }


# ---------------------------------------------------------------------------------- lm-eval
def _task_manager(tasks: list[str], include_path: str | os.PathLike | None):
    """An lm-eval TaskManager that knows `tasks`, or an error naming the unknown ones.

    The shipped tasks are always known. Indexing lm-eval's ~14k built-in task files takes
    seconds, so when every task is found in the include folders alone, the built-ins are not
    indexed.
    """
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR]
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise EvaluationError(
                f"The lm-eval include path {str(include_path)!r} is not a directory; give the "
                "folder of your task YAML files."
            )
        paths.append(Path(include_path))
    manager = TaskManager(include_path=paths, include_defaults=False)
    if set(tasks) <= set(manager.all_subtasks):
        return manager
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        close = sorted({m for t in unknown for m in difflib.get_close_matches(t, manager.all_tasks, n=3)})
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise EvaluationError(
            f"Unknown lm-eval task(s): {', '.join(unknown)}{hint}. List the known ones with "
            "`lm-eval ls tasks`; for your own task YAML files give their folder with --include-path."
        )
    return manager


def run_lm_eval(
    model_or_path: nn.Module | str | os.PathLike,
    tokenizer: Any = None,
    *,
    tasks: list[str],
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    device: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` and return {task: {metric: value}} (stderr and aliases left out;
    `sample_len` is the number of documents scored).

    `model_or_path` is a model directory (or Hub id) that lm-eval loads itself, on `device`,
    or a model in memory with its `tokenizer`, evaluated where it is. `include_path` is a folder
    of extra task YAML files; the tasks shipped in `sglp_llm/evaluation/tasks/` are always available.
    `limit` caps the documents per task (a fraction when below 1), for quick checks.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise EvaluationError(f"lm-eval is not installed ({err}); run `pip install 'sglp-llm[eval]'`.") from err
    if not tasks:
        raise EvaluationError("No lm-eval task given: name at least one, e.g. --tasks sglp_local_ppl.")
    manager = _task_manager(list(tasks), include_path)
    if isinstance(model_or_path, (str, os.PathLike)):
        model, model_args = "hf", {"pretrained": str(model_or_path)}
    else:
        if tokenizer is None:
            raise EvaluationError("A model given in memory needs its tokenizer: pass tokenizer=...")
        if device is not None:
            raise EvaluationError(
                "device applies only to a model that lm-eval loads from a path; move the "
                "in-memory model with model.to(device) instead."
            )
        model, model_args = HFLM(pretrained=model_or_path, tokenizer=tokenizer, batch_size=batch_size), None
    output = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        batch_size=batch_size,
        device=device,
        log_samples=False,
        bootstrap_iters=0,  # the stderrs it would compute are left out of the result
    )
    return {
        task: {
            key.removesuffix(",none"): float(value)
            for key, value in metrics.items()
            if "_stderr" not in key and isinstance(value, (int, float))
        }
        for task, metrics in output["results"].items()
    }
