"""The healing engine: transformers' `Trainer` with the healing objective as its loss.

The Trainer brings what a hand-written loop lacks: gradient accumulation, bf16 autocast on a GPU,
resuming, and DDP / FSDP under `accelerate launch`. Healing only says what the loss is
(`NextTokenObjective`, `DistillationObjective`) and which windows it trains on (`WindowDataset`:
each row knows its window index, which a teacher cache is keyed by).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .distill import DistillationTerms, TeacherBeside, TeacherCache, hidden_state_error
from ..passes.distributed import all_reduce_state, world_size
from ..passes.head import _predicted
from ..passes.loss import token_nll

# the keys of each step's loss and learning rate in the Trainer's log history
LOSS_KEY = "sglp_loss"
RATE_KEY = "sglp_learning_rate"
# marks the optimizer's parameter groups of the blocks trained in full
FULL_GROUP = "sglp_full_blocks"


class WindowDataset(Dataset):
    """The training windows one per row, each with its index (`window`)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.rows = [
            {"input_ids": batch["input_ids"][r], "attention_mask": batch["attention_mask"][r]}
            for batch in batches for r in range(len(batch["input_ids"]))
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**self.rows[index], "window": torch.tensor(index)}


def next_token_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean NLL of the text's next tokens at the predicted (non-padding) positions."""
    valid = _predicted(batch)
    nll = token_nll(logits[:, :-1].float(), batch["input_ids"][:, 1:])
    return nll[valid].sum() / valid.sum().clamp_min(1)


class NextTokenObjective:
    """The causal-LM loss of the training text (the objective without a teacher)."""

    name = "next-token"

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return next_token_loss(logits, batch)


class DistillationObjective:
    """T² · KL(teacher ‖ student) per predicted token at temperature T, plus the weighted
    next-token and hidden-state terms (`DistillationTerms`)."""

    name = "distillation"

    def __init__(self, teacher: TeacherBeside | TeacherCache, terms: DistillationTerms, kept: list[int]):
        self.teacher, self.terms, self.kept = teacher, terms, kept

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        terms = self.terms
        teacher_outputs = self.teacher.outputs(batch) if isinstance(self.teacher, TeacherBeside) else None
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                        output_hidden_states=terms.hidden_weight > 0)
        count = _predicted(batch).sum().clamp_min(1)
        loss = self.teacher.kl(outputs.logits, batch, teacher_outputs) / count * terms.temperature ** 2
        if terms.next_token_weight:
            loss = loss + terms.next_token_weight * next_token_loss(outputs.logits, batch)
        if terms.hidden_weight:
            loss = loss + terms.hidden_weight * hidden_state_error(
                outputs.hidden_states, teacher_outputs.hidden_states, self.kept, batch["attention_mask"])
        return loss


def train(
    model: nn.Module, dataset: WindowDataset, objective: Callable[[nn.Module, dict], torch.Tensor], config: Any,
    *, progress: bool, max_grad_norm: float,
) -> tuple[list[float], list[float | None], float]:
    """`config.steps` optimizer steps (AdamW at `config.learning_rate` on `config.lr_schedule`
    after `config.warmup_ratio` of the steps, batches of
    `config.batch_size` windows per process, `config.gradient_accumulation_steps` of them per step)
    of `objective` on the trainable parameters of `model`; (the loss of each step, the learning
    rate of each step, seconds)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint

    micro: list[float] = []

    class HealingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = objective(model, inputs)
            micro.append(loss.detach().float().item())
            return loss

        def create_optimizer(self, *args, **kwargs):
            """The Trainer's optimizer, with the weights of blocks trained in full (peft's
            modules_to_save copies) in groups of their own at `config.full_learning_rate`."""
            optimizer = super().create_optimizer(*args, **kwargs)
            full = {id(p) for name, p in self.model.named_parameters() if "modules_to_save" in name}
            for group in [g for g in optimizer.param_groups if not g.get(FULL_GROUP)]:  # once only
                moved = [p for p in group["params"] if id(p) in full]
                if moved:
                    group["params"] = [p for p in group["params"] if id(p) not in full]
                    optimizer.add_param_group({**group, "params": moved, "lr": config.full_learning_rate, FULL_GROUP: True})
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
            return optimizer

    class StepLosses(TrainerCallback):
        """Each step's loss, kept in the Trainer's log history (saved with its checkpoints, so a
        resumed run still reports every step), and a bar in place of the Trainer's."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="Healing",
                            disable=not progress or not state.is_world_process_zero)

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            self.rate = optimizer.param_groups[0]["lr"]  # the rate this step's update uses

        def on_step_end(self, args, state, control, **kwargs):
            # the step's loss over its whole batch: the mean of every process's share
            loss = all_reduce_state({"loss": sum(micro) / max(len(micro), 1)})["loss"] / world_size()
            micro.clear()
            state.log_history.append({"step": state.global_step, LOSS_KEY: loss, RATE_KEY: self.rate})
            self.bar.update()
            self.bar.set_postfix(loss=f"{loss:.4f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    on_cpu = next(model.parameters()).device.type == "cpu"
    checkpoints = getattr(config, "checkpoint_dir", None)
    with tempfile.TemporaryDirectory(prefix="sglp-heal-") as scratch:
        args = TrainingArguments(
            output_dir=checkpoints or scratch,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            max_steps=config.steps,
            learning_rate=config.learning_rate,
            # transformers' "constant" ignores a warmup: "constant_with_warmup" has one
            lr_scheduler_type="constant_with_warmup" if config.lr_schedule == "constant" and config.warmup_ratio
            else config.lr_schedule,
            warmup_steps=math.ceil(config.warmup_ratio * config.steps),  # as transformers rounds a ratio
            weight_decay=0.0,
            max_grad_norm=max_grad_norm,
            seed=config.seed,
            data_seed=config.seed,
            use_cpu=on_cpu,
            bf16=not on_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
            logging_strategy="no",
            save_strategy="steps" if checkpoints else "no",
            save_steps=getattr(config, "checkpoint_every", None),
            save_total_limit=1,
            report_to="none",
            disable_tqdm=True,  # StepLosses shows the bar
            remove_unused_columns=False,
            dataloader_pin_memory=False,
        )
        trainer = HealingTrainer(model=model, args=args, train_dataset=dataset, callbacks=[StepLosses()])
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        resume = get_last_checkpoint(checkpoints) if checkpoints and Path(checkpoints).is_dir() else None
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - started
    model.eval()
    steps = [entry for entry in trainer.state.log_history if LOSS_KEY in entry]
    # a checkpoint from before the rates were logged has none for its steps
    return [entry[LOSS_KEY] for entry in steps], [entry.get(RATE_KEY) for entry in steps], seconds
