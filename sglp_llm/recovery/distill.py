"""Distillation from the original model: the pruned model (the student) learns the original's
(the teacher's) next-token distribution instead of the text's next tokens alone.

The teacher's distribution carries far more per token than the one token the text has next, and
the original model is the best teacher a pruned model can have (Minitron; issue 24: on SmolLM2 the
KL objective closed three times the gap next-token LoRA did at the same cost). The teacher's
targets come from one of two places:

- `TeacherBeside`: the teacher runs on each training batch next to the student; its whole
  distribution (and, for the hidden-state term, its blocks' outputs) is used;
- `TeacherCache`: one teacher pass first writes, for every training window, its `top_k` most
  likely tokens' tempered log-probabilities and the rest's log-mass to a safetensors file, and the
  teacher leaves memory; training reads the targets and measures the KL over those k tokens and
  one "any other token" class (`head.coarse_kl`), which equals the full KL when k is the
  vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..config import ConfigError
from ..model.devices import input_device
from ..model.handle import ModelHandle
from ..passes.head import ReferenceDistribution, _coarse_log_probs, _predicted, coarse_kl, final_hidden_state
from ..passes.sequential import final_hidden_states
from ..model.rewrite import SGLP_CONFIG_KEY

TEACHER_TARGETS_NAME = "teacher_targets.safetensors"


class TeacherError(ConfigError):
    """The teacher cannot teach this student; the message says what to change."""


@dataclass
class DistillationTerms:
    """What the student is trained on: `temperature` for the KL to the teacher (the loss is
    multiplied by its square, so gradients keep their scale), plus optional weighted terms."""

    temperature: float = 1.0
    next_token_weight: float = 0.0  # the text's next-token NLL, added with this weight
    hidden_weight: float = 0.0  # each kept block's output against the teacher's at its original index


def tempered_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def full_kl(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """The summed KL(teacher ‖ student) over rows of full next-token log-probabilities."""
    return (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum()


def kept_original_indices(student: nn.Module, num_blocks: int) -> list[int]:
    """The original index of each of the student's blocks, from the lineage the rewrite records
    in its config (an unpruned student: 0..n-1)."""
    from ..model.blocks import text_config

    lineage = getattr(text_config(student), SGLP_CONFIG_KEY, None) or {}
    kept = lineage.get("kept_layers", list(range(num_blocks)))
    if len(kept) != num_blocks:
        raise TeacherError(
            f"The student's config records {len(kept)} kept blocks but it has {num_blocks}; its "
            f"`{SGLP_CONFIG_KEY}` entry does not describe it, so its blocks cannot be matched with the teacher's."
        )
    return list(kept)


def check_teacher(student: nn.Module, teacher_vocab: int, teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Refuse a teacher whose next-token distribution is over other tokens than the student's."""
    student_vocab = student.get_output_embeddings().weight.shape[0]
    if teacher_vocab != student_vocab:
        raise TeacherError(
            f"The teacher predicts {teacher_vocab} tokens and the student {student_vocab}: distillation needs the "
            "same vocabulary. Pass the model this one was pruned from (--teacher PATH|HUB_ID), or --teacher none "
            "for the next-token loss."
        )
    if teacher_tokenizer is not None and student_tokenizer is not None:
        if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
            raise TeacherError(
                "The teacher's tokenizer maps text to other ids than the student's: distillation needs the same "
                "tokenizer. Pass the model this one was pruned from (--teacher PATH|HUB_ID), or --teacher none."
            )


class TeacherBeside:
    """A teacher that runs on each batch next to the student (both in memory)."""

    def __init__(self, teacher: nn.Module, terms: DistillationTerms):
        self.teacher, self.terms = teacher.eval(), terms
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def outputs(self, batch: dict[str, torch.Tensor]) -> Any:
        inputs = {k: v.to(input_device(self.teacher)) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        return self.teacher(**inputs, use_cache=False, output_hidden_states=self.terms.hidden_weight > 0)

    def kl(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor], teacher_outputs: Any) -> torch.Tensor:
        valid = _predicted(batch)
        t = self.terms.temperature
        teacher = tempered_log_probs(teacher_outputs.logits[:, :-1].to(student_logits.device), t)[valid]
        return full_kl(teacher, tempered_log_probs(student_logits[:, :-1], t)[valid])


class TeacherCache:
    """The teacher's top-k targets of every training window, on disk (`write_teacher_cache`)."""

    def __init__(self, path: str | Path, terms: DistillationTerms):
        self.path, self.terms = Path(path), terms
        with safe_open(self.path, "pt") as cached:
            metadata = cached.metadata() or {}
        if float(metadata.get("temperature", "nan")) != terms.temperature:
            raise TeacherError(
                f"The teacher cache {self.path} holds targets at temperature {metadata.get('temperature')}, not "
                f"{terms.temperature}; write it again at this temperature."
            )
        if terms.hidden_weight > 0:
            raise TeacherError(
                "The hidden-state term needs the teacher beside the student (its blocks' outputs are not cached); "
                "set hidden_weight: 0 with a teacher cache."
            )

    def targets(self, windows: torch.Tensor, valid: torch.Tensor) -> ReferenceDistribution:
        """The targets of the windows `windows` (indices) at their predicted positions `valid`."""
        with safe_open(self.path, "pt") as cached:
            columns = [torch.stack([cached.get_slice(name)[int(w)] for w in windows.tolist()])
                       for name in ("token_ids", "log_probs", "rest_log_mass")]
        return ReferenceDistribution(*(column[valid.cpu()] for column in columns))

    def kl(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor], teacher_outputs: Any = None) -> torch.Tensor:
        valid = _predicted(batch)
        student = tempered_log_probs(student_logits[:, :-1], self.terms.temperature)[valid]
        targets = self.targets(batch["window"], valid)
        return coarse_kl(targets.rows(slice(None), student.device), student)


def _teacher_logits(teacher: nn.Module, batches: list[dict[str, torch.Tensor]], progress: bool) -> Iterator[torch.Tensor]:
    """The teacher's logits [rows, positions − 1, vocab] of each batch: one forward per batch, or,
    for a teacher with its blocks on disk (`offload.load_with_blocks_on_disk`), one block in
    memory at a time over all batches, then its head on each batch's final state."""
    handle = ModelHandle.of(teacher)
    batches = [{k: batch[k].to(handle.input_device) for k in ("input_ids", "attention_mask")} for batch in batches]
    if not handle.blockwise:
        for batch in tqdm(batches, desc="Teacher targets", disable=not progress):
            yield teacher(**batch, use_cache=False).logits[:, :-1]
        return
    finals, arity = final_hidden_states(handle, batches, progress=progress, desc="Teacher targets, block by block")
    for batch, final in zip(batches, finals):
        with final_hidden_state(handle.layers, final, arity):
            yield teacher(**batch, use_cache=False).logits[:, :-1]


@torch.no_grad()
def write_teacher_cache(
    teacher: nn.Module, windows: Iterable[dict[str, torch.Tensor]], path: str | Path, *, top_k: int,
    temperature: float, progress: bool = True,
) -> Path:
    """One pass of `teacher` over the training windows (batches whose rows are windows 0, 1, ...
    in order): each predicted position's `top_k` tempered log-probabilities and the rest's
    log-mass, written to `path` (safetensors: token_ids, log_probs [windows, positions, k],
    rest_log_mass [windows, positions]). A teacher with its blocks on disk needs one block in
    memory, and one hidden state per window."""
    teacher.eval()
    columns: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for logits in _teacher_logits(teacher, list(windows), progress):
        log_probs = tempered_log_probs(logits, temperature)
        k = min(top_k, log_probs.shape[-1])
        token_ids = log_probs.topk(k, dim=-1).indices
        rows, positions = token_ids.shape[:2]
        top, rest = _coarse_log_probs(log_probs.reshape(rows * positions, -1), token_ids.reshape(rows * positions, k))
        columns.append((token_ids.to(torch.int32).cpu(), top.reshape(rows, positions, k).cpu(), rest.reshape(rows, positions).cpu()))
    tensors = {name: torch.cat(column).contiguous() for name, column in zip(("token_ids", "log_probs", "rest_log_mass"), zip(*columns))}
    path = Path(path)
    save_file(tensors, str(path), metadata={"temperature": repr(float(temperature)), "top_k": str(top_k)})
    return path


def hidden_state_error(student_hidden: tuple, teacher_hidden: tuple, kept: list[int], valid: torch.Tensor) -> torch.Tensor:
    """The mean over kept blocks (but the last, whose output the KL already judges and which some
    models hand over normalised) and over windows of each block's squared error to the teacher's
    output at its original index, relative to the teacher's: Σ‖s − t‖² / Σ‖t‖² over the window's
    non-padding positions. Per window, so that processes sharing a batch (DDP) average to the
    whole batch's value."""
    errors = []
    for position, original in enumerate(kept[:-1]):
        s = student_hidden[position + 1].float()
        t = teacher_hidden[original + 1].float().to(s.device)
        mask = valid.to(s.device, torch.float32).unsqueeze(-1)
        errors.append((((s - t) ** 2 * mask).sum((1, 2)) / ((t ** 2) * mask).sum((1, 2)).clamp_min(1e-12)).mean())
    return torch.stack(errors).mean() if errors else torch.zeros(())
