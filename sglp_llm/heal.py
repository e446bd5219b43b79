"""Healing: a short LoRA fine-tune that lets the remaining blocks of a pruned model make up for
the removed ones.

Depth pruning leaves blocks that were trained to feed the blocks now gone; a few hundred LoRA
steps on ordinary text win back much of the lost perplexity (ShortGPT, Gromov et al. 2024). The
text is read and packed like calibration data (`sglp_llm.data`), the adapter is trained with peft
(`pip install 'sglp-llm[heal]'`), and it is saved alone or merged into the weights, so a healed
model still loads with plain transformers.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import psutil
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .model.blocks import text_config
from .model.handle import ModelHandle
from .config import ConfigError, SettingsFile
from .data import SELF_GENERATED, STDLIB_DOCS, Sampler, build_batches, load_texts, sampled_calibration
from .recovery.block_recovery import trained_blocks
from .recovery.distill import TEACHER_TARGETS_NAME, DistillationTerms, TeacherBeside, TeacherCache, TeacherError, check_teacher, kept_original_indices, write_teacher_cache
from .passes.distributed import is_main_process, world_size
from .passes.loss import activation_checkpointing
from .passes.sampling import default_calibration, model_sampler
from .model.auto_class import IMAGES, images_record
from .model.loading import ModelLoadError, load_blocks_on_disk, load_model
from .evaluation.evaluate import card_metrics, perplexity_on_source, warn_if_not_held_out
from .output.modelcard import describe_objective, render_healed_card
from .plan import PruningPlan
from .model.rewrite import SGLP_CONFIG_KEY
from .output.save import README_NAME, check_destination, evaluation_columns, save_pruned, write_folder
from .output import verify
from .recovery.training import DistillationObjective, NextTokenObjective, WindowDataset, train

HEAL_CONFIG_NAME = "heal_config.json"
HEAL_REPORT_NAME = "heal_report.json"
ADAPTER_DIR = "adapter"
# LoRA targets of LLaMA, Mistral, Qwen and Gemma blocks: the attention and MLP projections
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the layer types peft's LoRA adapts (GPT-2 style blocks use transformers' Conv1D)
LORA_LAYERS = (nn.Linear, Conv1D)
# gradients are clipped to this norm: one bad batch must not undo a short run
MAX_GRAD_NORM = 1.0
# HealConfig.learning_rate's default per objective: distillation gained most at 1e-3 on both real
# models, next-token LoRA did worse there than at 2e-4 (benchmarks/results/recovery.md)
DEFAULT_LEARNING_RATES = {"distillation": 1e-3, "next-token": 2e-4}
# HealConfig.lr_schedule: transformers' schedulers that need no settings beyond the warmup
LR_SCHEDULES = ("constant", "cosine", "linear")
# the evaluation columns a healing run adds to a pruned model's report and card
BEFORE, AFTER = "before healing", "after healing"


class HealError(ConfigError):
    """Healing cannot run as asked; the message says what to change."""


@dataclass
class HealConfig(SettingsFile):
    """Settings of one healing run: its text, the LoRA adapter, training, held-out text."""

    FILE_NAME = HEAL_CONFIG_NAME
    SECTION = "heal"

    # -- training text: the same kinds of source as calibration (see sglp_llm.data). None: the
    # teacher's own samples when a teacher runs whole in memory (distillation wins back most
    # there: benchmarks/results/recovery.md), else the standard-library docstrings
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    text_column: str = "text"
    seq_len: int = 256

    # -- training: `steps` optimizer steps of `batch_size` windows per process times
    # `gradient_accumulation_steps` (the text is cycled through as often as that takes), AdamW at
    # `learning_rate` on transformers' Trainer (DDP / FSDP under `accelerate launch`), held constant
    # or following `lr_schedule` (a transformers scheduler name: cosine, linear, ...) after
    # `warmup_ratio` of the steps. learning_rate None: the objective's measured best
    # (DEFAULT_LEARNING_RATES)
    steps: int = 200
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = None
    lr_schedule: str = "constant"
    warmup_ratio: float = 0.0
    gradient_checkpointing: bool = False
    seed: int = 0
    # save the Trainer's state (adapter, optimizer, data position, random state) here every
    # checkpoint_every steps; a run with the same settings resumes from the last one
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50

    # -- the objective (see sglp_llm.recovery.distill). teacher: "auto" distils from the model the pruned
    # one was made from (recorded in its config) when it records one, else trains on the next
    # tokens; a directory, .gguf file, packaged name or Hub id: that teacher; "none": the text's
    # next tokens. teacher_top_k: None runs the teacher beside the student; k writes its top-k
    # targets to disk in one pass first, and training reads them (a teacher that does not fit
    # beside the student). The loss: temperature² · KL at `temperature`, plus the text's
    # next-token NLL × next_token_weight, plus each kept block's relative output error to the
    # teacher's at its original index × hidden_weight (teacher beside only)
    teacher: str = "auto"
    temperature: float = 1.0
    teacher_top_k: int | None = None
    # with teacher_top_k, load the teacher (a local safetensors folder) with its blocks on disk:
    # its one pass then holds one block in memory (a teacher far larger than the device)
    teacher_blocks_on_disk: bool = False
    next_token_weight: float = 0.0
    hidden_weight: float = 0.0

    # -- whole blocks trained beside LoRA (every weight; peft's modules_to_save, merged or saved
    # with the adapter), at full_learning_rate on the same schedule. "gaps": the kept block before
    # each removed run (the one block-local recovery trains), as the pruned model's config records
    # them; a list: the pruned model's block indices. None: LoRA only
    full_blocks: str | list[int] | None = None
    full_learning_rate: float = 1e-4

    # -- LoRA; target_modules: names of Linear layers inside the decoder blocks (None: the
    # attention and MLP projections `DEFAULT_TARGETS`, else every Linear layer in the blocks),
    # in every block not trained in full
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    layers_path: str | None = None

    # -- held-out perplexity before and after (None: the evaluation text shipped with the package)
    eval_dataset: str | None = None
    eval_dataset_config: str | None = None
    eval_split: str = "train"
    eval_text_column: str = "text"
    eval_max_texts: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("seq_len", "steps", "batch_size", "gradient_accumulation_steps", "rank", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HealError(f"`{name}` must be a positive integer, got {value!r}.")
        full = self.full_blocks
        if not (full is None or full == "gaps" or (isinstance(full, list) and full and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in full))):
            raise HealError(f"`full_blocks` must be \"gaps\", a list of block indices or null, got {full!r}.")
        for name in ("learning_rate", "alpha", "full_learning_rate"):
            value = getattr(self, name)
            if name == "learning_rate" and value is None:
                continue
            # YAML reads 2e-4 as text (it wants 2.0e-4): say so rather than fail in the optimizer
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise HealError(f"`{name}` must be a positive number (in YAML, e.g. 2.0e-4), got {value!r}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise HealError(f"`lr_schedule` must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}.")
        if not isinstance(self.warmup_ratio, (int, float)) or isinstance(self.warmup_ratio, bool) \
                or not 0 <= self.warmup_ratio < 1:
            raise HealError(f"`warmup_ratio` must be a number in [0, 1), got {self.warmup_ratio!r}.")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) or self.temperature <= 0:
            raise HealError(f"`temperature` must be a positive number, got {self.temperature!r}.")
        for name in ("next_token_weight", "hidden_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise HealError(f"`{name}` must be a number >= 0, got {value!r}.")
        if not isinstance(self.teacher, str) or not self.teacher:
            raise HealError(f"`teacher` must be auto, none, or a model (directory, .gguf, Hub id), got {self.teacher!r}.")
        if self.teacher_top_k is not None and (not isinstance(self.teacher_top_k, int) or isinstance(self.teacher_top_k, bool) or self.teacher_top_k < 1):
            raise HealError(f"`teacher_top_k` must be a positive integer or unset (the teacher beside), got {self.teacher_top_k!r}.")
        if not isinstance(self.teacher_blocks_on_disk, bool):
            raise HealError(f"`teacher_blocks_on_disk` must be true or false, got {self.teacher_blocks_on_disk!r}.")
        if self.teacher_blocks_on_disk and self.teacher_top_k is None:
            raise HealError("A teacher with its blocks on disk runs one pass that caches its targets: set teacher_top_k "
                            "(--teacher-top-k 64) with teacher_blocks_on_disk.")
        if self.teacher == "none" and (self.hidden_weight or self.next_token_weight or self.teacher_top_k):
            raise HealError("`hidden_weight`, `next_token_weight` and `teacher_top_k` shape distillation; with teacher: none leave them unset.")
        if self.hidden_weight and self.teacher_top_k is not None:
            raise HealError("The hidden-state term (`hidden_weight`) needs the teacher beside the student; unset `teacher_top_k`.")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise HealError(f"`dropout` must be a number in [0, 1), got {self.dropout!r}.")
        if not isinstance(self.gradient_checkpointing, bool):
            raise HealError(f"`gradient_checkpointing` must be true or false, got {self.gradient_checkpointing!r}.")
        if self.checkpoint_dir is not None and (not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir):
            raise HealError(f"`checkpoint_dir` must be a folder path or unset, got {self.checkpoint_dir!r}.")
        if not isinstance(self.seed, int):
            raise HealError(f"`seed` must be an integer, got {self.seed!r}.")
        if self.target_modules is not None and (
            not isinstance(self.target_modules, list)
            or not self.target_modules
            or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise HealError(
                "`target_modules` must be a non-empty list of layer names, e.g. [q_proj, v_proj] "
                f"(--target-modules q_proj,v_proj), or unset; got {self.target_modules!r}."
            )
        if self.eval_max_texts is not None and (not isinstance(self.eval_max_texts, int) or self.eval_max_texts < 1):
            raise HealError(f"`eval_max_texts` must be a positive integer or unset, got {self.eval_max_texts!r}.")


@dataclass
class HealResult:
    """A healed model: `model` is the peft model (adapter not merged) until `merge()`."""

    model: Any
    tokenizer: Any
    config: HealConfig
    report: dict[str, Any] = field(default_factory=dict)
    # a model that also reads images: its processor, saved in place of the tokenizer
    processor: Any = None

    def merge(self) -> nn.Module:
        """Fold the adapter into the weights: a plain transformers model again."""
        self.model = self.model.merge_and_unload()
        return self.model

    def evaluation(self) -> dict[str, dict[str, Any]]:
        """Held-out perplexity before and after, as columns of a model card's evaluation table."""
        ppl = self.report["perplexity"]
        return {BEFORE: card_metrics({"perplexity": ppl["before"]}), AFTER: card_metrics({"perplexity": ppl["after"]})}


def _peft():
    try:
        import peft
    except ImportError as err:
        raise HealError("Healing needs peft: pip install 'sglp-llm[heal]' (or pip install peft).") from err
    return peft


def full_block_indices(student: ModelHandle, config: HealConfig) -> list[int]:
    """The student's blocks `config.full_blocks` trains in full (see HealConfig), in its numbering."""
    num_blocks = len(student.layers)
    if config.full_blocks is None:
        return []
    if config.full_blocks != "gaps":
        outside = [i for i in config.full_blocks if i >= num_blocks]
        if outside:
            raise HealError(f"`full_blocks` {outside} are not blocks of this model: it has {num_blocks} (0-{num_blocks - 1}).")
        return sorted(set(config.full_blocks))
    lineage = getattr(text_config(student.model), SGLP_CONFIG_KEY, None) or {}
    if "original_num_hidden_layers" not in lineage:
        raise HealError(
            "`full_blocks: gaps` trains the blocks next to the removed ones, but this model's config records no "
            "pruning (it was not written by sglp-llm); name the blocks instead (--full-blocks 3,7).")
    kept = kept_original_indices(student.model, num_blocks)
    dropped = sorted(set(range(lineage["original_num_hidden_layers"])) - set(kept))
    return sorted(kept.index(k) for k in trained_blocks(lineage["original_num_hidden_layers"], dropped))


def lora_targets(model: nn.Module | ModelHandle, config: HealConfig, skip: Sequence[int] = ()) -> tuple[str, list[str]]:
    """(peft `target_modules` regex, layer names): the chosen Linear layers of the decoder blocks
    only, so that e.g. `lm_head` is never adapted whatever the names, and none in the blocks `skip`
    (trained in full)."""
    blocks = ModelHandle.of(model, layers_path=config.layers_path).blocks
    available = sorted({
        name.rsplit(".", 1)[-1] for name, module in blocks.layers.named_modules() if isinstance(module, LORA_LAYERS)
    })
    if config.target_modules is not None:
        unknown = [t for t in config.target_modules if t not in available]
        if unknown:
            raise HealError(
                f"target module(s) {unknown} are not Linear layers of the decoder blocks "
                f"({blocks.path}); the blocks have {available or 'none'}. Choose among those "
                "(--target-modules q_proj,v_proj)."
            )
        names = list(config.target_modules)
    else:
        names = [t for t in DEFAULT_TARGETS if t in available] or available
    if not names:
        raise HealError(
            f"The decoder blocks ({blocks.path}) hold no Linear layer for LoRA to adapt; this "
            "model cannot be healed with LoRA."
        )
    skipped = "".join(rf"(?!{i}\.)" for i in skip)
    pattern = rf"{re.escape(blocks.path)}\.{skipped}\d+\.(?:.*\.)?(?:{'|'.join(map(re.escape, names))})"
    return pattern, names


def default_training_text(teacher: ModelHandle | None, teacher_tokenizer: Any) -> str:
    """The text healing trains on when none is set: the teacher's own samples where it can
    sample them (`default_calibration`: it runs whole, not from disk), else the standard-library
    docstrings."""
    return STDLIB_DOCS if teacher is None else default_calibration(teacher, teacher_tokenizer)[0]


def windows_read(config: HealConfig) -> int:
    """The windows a run reads: each step's on every process, accumulated."""
    return config.steps * config.batch_size * config.gradient_accumulation_steps * world_size()


def training_batches(model: nn.Module, tokenizer: Any, config: HealConfig, *,
                     sampler: Sampler | None = None) -> tuple[list[dict], str, int]:
    """(batches, text description, distinct windows): up to `windows_read` windows of the
    training text, packed like calibration data, the same however many processes share them;
    training cycles through them where the text has fewer. `SELF_GENERATED`: that many windows
    the teacher (`sampler`) samples, so the student learns the teacher's outputs where the
    teacher's own distribution puts its text."""
    max_positions = getattr(text_config(model), "max_position_embeddings", None)
    if config.dataset == SELF_GENERATED:
        if sampler is None:
            raise HealError(f"Training on {SELF_GENERATED} distils on the teacher's own samples, and this run has no "
                            "teacher: pass --teacher PATH|HUB_ID (the original model), or train on a text source.")
        windows = sampled_calibration(sampler, n_samples=windows_read(config), seq_len=config.seq_len,
                                      batch_size=config.batch_size, seed=config.seed, max_positions=max_positions)
        source = f"the teacher's own samples (from its beginning-of-text token, seed {config.seed})"
        return windows.batches, source, windows.n_samples
    texts, source = load_texts(
        config.dataset, config_name=config.dataset_config, split=config.dataset_split, text_column=config.text_column
    )
    with warnings.catch_warnings():
        # fewer windows than a run reads is fine here: training passes over them again
        warnings.filterwarnings("ignore", message="The calibration text has", category=UserWarning)
        windows = build_batches(
            tokenizer,
            texts,
            seq_len=config.seq_len,
            n_samples=windows_read(config),
            batch_size=config.batch_size,
            seed=config.seed,
            max_positions=max_positions,
            source=source,
        )
    return windows.batches, source, windows.n_samples


def heal(
    model: nn.Module, tokenizer: Any, config: HealConfig | None = None, *, teacher: nn.Module | None = None,
    teacher_tokenizer: Any = None, teacher_kwargs: dict[str, Any] | None = None, progress: bool = True,
) -> HealResult:
    """Train a LoRA adapter on `model` (peft wraps it in place) and measure held-out perplexity
    before and after. The objective is distillation from `teacher` (a model in memory) or from
    the one `config.teacher` names (loaded with `teacher_kwargs`, e.g. dtype), else the text's
    next tokens (see HealConfig.teacher). The result's model carries the adapter;
    `HealResult.merge` folds it in, `save_healed` writes it."""
    config = config or HealConfig()
    peft = _peft()
    _check_resumable(config)
    student = ModelHandle.of(model, layers_path=config.layers_path)
    full = full_block_indices(student, config)
    pattern, names = lora_targets(student, config, skip=full)
    teacher, teacher_tokenizer, teacher_name = _teacher(student, config, teacher, teacher_tokenizer, teacher_kwargs or {})
    teacher_handle = None if teacher is None else ModelHandle.of(teacher)
    sampler = None if teacher is None else model_sampler(teacher_handle, teacher_tokenizer, progress=progress)
    if config.dataset is None:  # the report and card give the text the run used
        config = replace(config, dataset=default_training_text(teacher_handle, teacher_tokenizer))
    batches, source, n_windows = training_batches(model, tokenizer, config, sampler=sampler)
    warn_if_not_held_out(config, config.eval_dataset, config_name=config.eval_dataset_config, split=config.eval_split)
    with tempfile.TemporaryDirectory(prefix="sglp-teacher-") as scratch:
        # the teacher is checked (and any cache written) before anything is trained
        objective, teacher_record = _objective(student, tokenizer, config, batches, teacher, teacher_tokenizer,
                                               teacher_name, Path(scratch), progress)
        before = _held_out_perplexity(model, tokenizer, config, progress)
        if config.learning_rate is None:  # the report and card give the rate the run used
            config = replace(config, learning_rate=DEFAULT_LEARNING_RATES[teacher_record["name"]])

        torch.manual_seed(config.seed)  # LoRA's initial A matrices and dropout
        lora = peft.LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=pattern,
            modules_to_save=[f"{student.blocks.path}.{i}" for i in full] or None,
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            # peft calls transformers' deprecated `is_gradient_checkpointing`: not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            wrapped = peft.get_peft_model(model, lora)
        # peft matches modules_to_save by name suffix: exactly the chosen blocks, or nothing trains
        wrapped_blocks = [name for name, module in wrapped.named_modules()
                          if isinstance(module, peft.utils.other.ModulesToSaveWrapper)]
        if len(wrapped_blocks) != len(full):
            raise HealError(f"Training blocks {full} in full wrapped {wrapped_blocks}: their names are ambiguous in "
                            "this model; train it with LoRA only (no --full-blocks).")
        trainable, total = wrapped.get_nb_trainable_parameters()
        checkpointing = (  # peft adapts the blocks in place: the student's handle still holds them
            activation_checkpointing(student)
            if config.gradient_checkpointing
            else contextlib.nullcontext()
        )
        with checkpointing:
            losses, rates, seconds = train(wrapped, WindowDataset(batches), objective, config, progress=progress,
                                    max_grad_norm=MAX_GRAD_NORM)
    after = _held_out_perplexity(wrapped, tokenizer, config, progress)

    tokens = windows_read(config) * batches[0]["input_ids"].shape[1]
    report = {
        "settings": config.to_dict(),
        "objective": teacher_record,
        "target_modules": names,
        "full_blocks": full,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "training_text": source,
        "windows": n_windows,
        "tokens": tokens,
        "passes": windows_read(config) / n_windows,
        "loss": {"first": losses[0], "last": losses[-1], "per_step": losses},
        "learning_rate_per_step": rates,
        # "after" is measured with the adapter applied, before any merge
        "perplexity": {"before": before, "after": after},
        "seconds": seconds,
    }
    return HealResult(model=wrapped, tokenizer=tokenizer, config=config, report=report)


def _teacher(
    student: ModelHandle, config: HealConfig, teacher: nn.Module | None, teacher_tokenizer: Any,
    teacher_kwargs: dict[str, Any],
) -> tuple[nn.Module | None, Any, str]:
    """(teacher, its tokenizer, its name), loaded here if config.teacher names one; no teacher
    (None, None, why) when training on the next tokens."""
    model = student.model
    lineage = getattr(text_config(model), SGLP_CONFIG_KEY, None) or {}
    if config.teacher == "none":  # whatever teacher is at hand
        return None, None, "teacher: none"
    if teacher is not None:
        return teacher, teacher_tokenizer, getattr(teacher, "name_or_path", None) or "the model passed in"
    wanted = lineage.get("source_model") if config.teacher == "auto" else config.teacher
    if wanted is None:
        return None, None, "teacher: auto, and the model records no source to distil from (pass --teacher PATH|HUB_ID)"
    _check_teacher_fits(student, lineage, config)
    try:
        if config.teacher_blocks_on_disk:
            loaded = load_blocks_on_disk(wanted, dtype=teacher_kwargs.get("dtype", "auto"), device=student.input_device)
        else:
            loaded = load_model(wanted, **teacher_kwargs)
    except (ModelLoadError, OSError, ValueError) as error:
        where = "recorded in the pruned model's config" if config.teacher == "auto" else "given"
        raise TeacherError(
            f"The teacher {wanted} ({where}) cannot be loaded: {error}. Pass the original model with "
            "--teacher PATH|HUB_ID, or --teacher none for the next-token loss."
        ) from error
    return loaded.model, loaded.tokenizer, wanted


def _objective(
    student: ModelHandle, tokenizer: Any, config: HealConfig, batches: list[dict], teacher: nn.Module | None,
    teacher_tokenizer: Any, name: str, scratch: Path, progress: bool,
) -> tuple[Any, dict[str, Any]]:
    """The training objective and what the report says about it: distillation from the teacher
    (its targets cached in `scratch` with teacher_top_k), or next-token when there is none (`name`
    then says why)."""
    if teacher is None:
        return NextTokenObjective(), {"name": "next-token", "why": name}
    model = student.model
    lineage = getattr(text_config(model), SGLP_CONFIG_KEY, None) or {}
    check_teacher(model, teacher.get_output_embeddings().weight.shape[0], teacher_tokenizer, tokenizer)
    num_blocks = len(student.layers)
    kept = kept_original_indices(model, num_blocks)
    if config.hidden_weight:
        teacher_blocks = len(ModelHandle.of(teacher).layers)
        if teacher_blocks != lineage.get("original_num_hidden_layers", num_blocks):
            raise TeacherError(
                f"The hidden-state term matches each kept block with the teacher's at its original index, but the "
                f"teacher has {teacher_blocks} blocks and the student was pruned from "
                f"{lineage.get('original_num_hidden_layers', num_blocks)}; pass the model it was pruned from, or "
                "hidden_weight: 0."
            )
    terms = DistillationTerms(config.temperature, config.next_token_weight, config.hidden_weight)
    record = {"name": "distillation", "teacher": str(name), "temperature": config.temperature,
              "next_token_weight": config.next_token_weight, "hidden_weight": config.hidden_weight}
    if config.teacher_top_k is None:
        return DistillationObjective(TeacherBeside(teacher, terms), terms, kept), {**record, "teacher_runs": "beside"}
    path = write_teacher_cache(teacher, batches, scratch / TEACHER_TARGETS_NAME, top_k=config.teacher_top_k,
                               temperature=config.temperature, progress=progress)
    how = ", one block in memory at a time" if config.teacher_blocks_on_disk else ""
    return DistillationObjective(TeacherCache(path, terms), terms, kept), {
        **record, "teacher_runs": f"cached: top {config.teacher_top_k} tokens per position, written in one pass{how}"}


def _check_resumable(config: HealConfig) -> None:
    """A checkpoint folder belongs to one run's settings: record them there, and refuse to
    resume a run with other settings from it."""
    if config.checkpoint_dir is None or not is_main_process():
        return
    folder = Path(config.checkpoint_dir).expanduser()
    ignored = ("checkpoint_dir", "checkpoint_every")
    if (folder / HEAL_CONFIG_NAME).is_file():
        saved = HealConfig.from_pretrained(folder).to_dict()
        changed = sorted(k for k, v in config.to_dict().items() if k not in ignored and saved.get(k) != v)
        if changed:
            raise HealError(
                f"The checkpoints in {folder} are from a healing run with other settings ({', '.join(changed)}); "
                "resume with the same settings, or choose another --checkpoint-dir."
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)


def _check_teacher_fits(student: ModelHandle, lineage: dict[str, Any], config: HealConfig) -> None:
    """Refuse, before loading it, a teacher that will not fit beside the student: its size is
    the student's plus the dropped blocks' (estimated from the student's mean block)."""
    if config.teacher_top_k is not None:
        return
    blocks = student.layers
    size = sum(p.numel() * p.element_size() for p in student.model.parameters())
    per_block = sum(p.numel() * p.element_size() for p in blocks.parameters()) / max(len(blocks), 1)
    teacher = size + per_block * len(lineage.get("dropped_layers", []))
    device = student.input_device
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    if teacher > free:
        raise TeacherError(
            f"The teacher (about {teacher / 2**30:.1f} GiB) does not fit beside the student in the "
            f"{free / 2**30:.1f} GiB free on {device}: set teacher_top_k (--teacher-top-k 64) to write its "
            "targets to disk in one pass first, or --teacher none for the next-token loss."
        )


def _held_out_perplexity(model: nn.Module, tokenizer: Any, config: HealConfig, progress: bool) -> dict[str, Any]:
    return perplexity_on_source(
        model,
        tokenizer,
        config.eval_dataset,
        text_column=config.eval_text_column,
        split=config.eval_split,
        config_name=config.eval_dataset_config,
        max_texts=config.eval_max_texts,
        progress=progress,
    )


def save_healed(
    output_dir: str | Path,
    result: HealResult,
    *,
    base_model: str,
    merge: bool = False,
    adapter: bool = True,
    plan: PruningPlan | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a healing run to `output_dir` atomically (see `save.write_folder`).

    Without `merge`: the adapter (for `base_model`), tokenizer, `heal_config.json`,
    `heal_report.json` and a model card. With `merge`: the merged model that loads with
    `AutoModelForCausalLM`, the adapter in `adapter/` (unless `adapter=False`, e.g. when its base
    model is saved nowhere) and the same files; with `plan` (the model was pruned with SGLP) the
    folder is a whole pruning output whose report and card also describe the healing and hold the
    held-out perplexity before and after. `base_model` is the model the card names.
    """
    output_dir = Path(output_dir).expanduser().resolve()
    check_destination(output_dir, overwrite=overwrite, model=result.model.get_base_model())
    adapter_dir = (ADAPTER_DIR if adapter else None) if merge else "."
    report = {**result.report, "merged": merge, "adapter_dir": adapter_dir}
    tokenizer = result.tokenizer if result.processor is None else result.processor
    if images := images_record(result.model.get_base_model().config, tokenizer):  # the card's loading code
        report[IMAGES] = images

    def write_heal_files(folder: Path) -> None:
        result.config.save_pretrained(folder)
        (folder / HEAL_REPORT_NAME).write_text(json.dumps(report, indent=2))

    if not merge:
        card = render_healed_card(base_model, report, evaluation=result.evaluation())

        def write_adapter(folder: Path) -> None:
            result.model.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            write_heal_files(folder)
            (folder / README_NAME).write_text(card)  # in place of peft's template card

        return write_folder(output_dir, write_adapter, overwrite=overwrite, model=result.model.get_base_model())

    evaluation = result.evaluation()
    with tempfile.TemporaryDirectory(prefix="sglp-adapter-") as staged:
        if adapter:  # saved before the merge removes it
            result.model.save_pretrained(staged)
            (Path(staged) / README_NAME).unlink(missing_ok=True)  # the folder's card describes it
        merged = result.merge()
        # the merged weights, reloaded from the folder, must compute what the model in memory does
        reference = verify.reference_outputs(ModelHandle.of(merged, layers_path=result.config.layers_path), [],
                                             verify.make_probe(merged, None, seed=result.config.seed))

        def check_reloaded(folder: Path) -> None:
            verify.check_saved(reference, folder, merged)
            report["verification"] = verify.summary(reference)

        def write_extra(folder: Path) -> None:
            write_heal_files(folder)
            if adapter:
                shutil.copytree(staged, folder / ADAPTER_DIR)

        if plan is not None:
            plan.extra["healing"] = report
            columns = {**evaluation_columns(plan.extra.get("evaluation")), **evaluation}
            return save_pruned(
                output_dir, merged, tokenizer, plan, base_model=base_model, overwrite=overwrite,
                evaluation=columns, extra_files=write_extra, check_written=check_reloaded,
            )
        card = render_healed_card(base_model, report, evaluation=evaluation)

        def write_merged(folder: Path) -> None:
            merged.save_pretrained(folder)
            check_reloaded(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            write_extra(folder)
            (folder / README_NAME).write_text(card)

        return write_folder(output_dir, write_merged, overwrite=overwrite, model=merged)


def heal_summary(report: Mapping[str, Any]) -> str:
    """One line for people: loss and held-out perplexity before and after."""
    loss, ppl = report["loss"], report["perplexity"]
    return (
        f"Healed {report['settings']['steps']} steps by {describe_objective(report.get('objective'))} "
        f"({report['tokens']:,} tokens, "
        f"{report['passes']:.2f} passes over {report['windows']} windows, {report['seconds']:.0f} s): loss "
        f"{loss['first']:.3f} -> {loss['last']:.3f}   held-out perplexity "
        f"{ppl['before']['perplexity']:.3f} -> {ppl['after']['perplexity']:.3f}"
    )
