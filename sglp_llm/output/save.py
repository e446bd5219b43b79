"""Write a pruned model with its report, settings, heatmap and model card as one folder, and
later add evaluation results to that folder's report and card.

Everything goes into a temporary folder next to the destination and is renamed into place at the
end, so an interrupted or failed save never leaves a half-written model that looks complete, and
an existing folder is only replaced once its successor is fully written. Evaluation updates
replace the report and the card file by file, each by an atomic rename.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..model.blocks import find_decoder_blocks
from ..model.auto_class import IMAGES, images_record
from ..config import SGLPConfig
from .heatmap import HEATMAP_NAME, plot_cka_heatmap
from .modelcard import render_model_card
from ..plan import REPORT_NAME, PruningPlan
from ..model.shards import save_model
from .verify import check_saved
from .verify import record as record_verification

README_NAME = "README.md"


def save_pruned(
    output_dir: str | Path,
    model: Any,
    tokenizer: Any,
    plan: PruningPlan,
    *,
    base_model: str,
    overwrite: bool = False,
    evaluation: Mapping[str, Any] | None = None,
    extra_files: Callable[[Path], None] | None = None,
    reference: Any = None,
    check_written: Callable[[Path], None] | None = None,
) -> Path:
    """Save `model` (safetensors), `tokenizer` (if any) and the SGLP files to `output_dir`.

    With a `reference` (sglp_llm.output.verify), the written model is reloaded from the temporary folder
    and checked against the original's outputs before anything is moved into place.

    `evaluation` (metric -> value, or column -> {metric: value}) goes into the model card's
    table and into the report as `plan.extra["evaluation"]`. `extra_files(folder)` writes more
    files (a healing run's adapter and report) into the folder before it is moved into place.
    `check_written(folder)` runs right after the weights are written (a healed model's own
    reload check), before any report is.
    """
    output_dir = Path(output_dir).expanduser().resolve()
    check_destination(output_dir, overwrite=overwrite, model=model)
    num_layers = len(find_decoder_blocks(model, plan.layers_path).layers)
    if num_layers != len(plan.kept):
        raise ValueError(
            f"The model has {num_layers} blocks but the plan keeps {len(plan.kept)} of "
            f"{plan.num_blocks}; apply the plan to the model before saving it."
        )
    # Everything that can fail on bad input is built before anything is written.
    config = SGLPConfig.from_dict(plan.config)
    if evaluation:
        plan.extra["evaluation"] = dict(evaluation)
    if images := images_record(model.config, tokenizer):  # the card's loading code
        plan.extra[IMAGES] = images

    def write(folder: Path) -> None:
        save_model(model, folder, plan.kept)
        if reference is not None:
            check_saved(reference, folder, model)
            record_verification(reference, plan)
        if check_written is not None:
            check_written(folder)
        card = render_model_card(plan, base_model=base_model, evaluation=evaluation)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        plan.save(folder / REPORT_NAME)
        config.save_pretrained(folder)
        plot_cka_heatmap(plan, folder / HEATMAP_NAME)
        (folder / README_NAME).write_text(card)
        if extra_files is not None:
            extra_files(folder)

    return write_folder(output_dir, write, overwrite=overwrite, model=model)


def write_folder(
    output_dir: str | Path, write: Callable[[Path], None], *, overwrite: bool = False, model: Any = None
) -> Path:
    """Let `write` fill a temporary sibling folder, then rename it to `output_dir`: the one way
    this package writes an output folder, so none is ever left half-written. `model` is the
    model being saved, whose own folder is refused (see `check_destination`)."""
    output_dir = Path(output_dir).expanduser().resolve()
    check_destination(output_dir, overwrite=overwrite, model=model)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(output_dir, "tmp")
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _move_into_place(tmp, output_dir)
    return output_dir


def record_evaluation(folder: str | Path, metrics: Mapping[str, Any], *, column: str = "pruned") -> Path:
    """Merge `metrics` (metric -> value) into the `column` of the evaluation recorded in a saved
    folder's report, and re-render its model card with the table. Other columns (e.g. the dense
    model's, from `sglp-llm prune --eval-dataset`) and the model files stay as they are.
    """
    report = saved_report(folder)
    folder = report.parent
    plan = PruningPlan.load(report)
    columns = evaluation_columns(plan.extra.get("evaluation"), column)
    columns[column] = {**columns.get(column, {}), **metrics}
    plan.extra["evaluation"] = columns
    card = render_model_card(plan, base_model=plan.model_name or "unknown", evaluation=columns)
    _replace_file(report, plan.save)
    _replace_file(folder / README_NAME, lambda path: path.write_text(card))
    return folder


def evaluation_columns(recorded: Mapping[str, Any] | None, flat_column: str = "pruned") -> dict[str, dict]:
    """A recorded evaluation as column -> {metric: value}. A flat mapping (metric -> value, as
    given to save_pretrained) describes the saved model: it becomes the column `flat_column`."""
    recorded = recorded or {}
    if all(isinstance(v, Mapping) for v in recorded.values()):
        return {k: dict(v) for k, v in recorded.items()}
    return {flat_column: dict(recorded)}


def saved_report(folder: str | Path) -> Path:
    """The report of a folder written by `save_pruned`, or an error saying it is not one."""
    report = Path(folder).expanduser() / REPORT_NAME
    if not report.is_file():
        raise FileNotFoundError(
            f"{folder} has no {REPORT_NAME}: evaluation results can only be recorded in a folder "
            "written by `sglp-llm prune` (or PruneResult.save_pretrained)."
        )
    return report


def _replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """`write` a sibling temporary file, then rename it over `path`: never a half-written file."""
    tmp = _sibling(path, "tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_destination(output_dir: Path, *, overwrite: bool, model: Any = None) -> None:
    """Refuse an output that is a file, a non-empty folder (without overwrite), or the model's
    own folder, a folder inside it or one holding it. Also called before a long analysis so a
    bad --output fails fast."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(
            f"{output_dir} exists and is not a directory; choose another output directory."
        )
    for source in _loaded_from(model) if model is not None else ():
        if source == output_dir or output_dir in source.parents or source in output_dir.parents:
            raise ValueError(
                f"Refusing to write to {output_dir}: the model was loaded from {source}, and "
                "saving there would overwrite, delete or add to its files. Choose another output "
                "directory."
            )
    if not overwrite and output_dir.is_dir() and any(output_dir.iterdir()):
        raise FileExistsError(
            f"{output_dir} already exists and is not empty. Pass overwrite=True (--overwrite on "
            "the command line) to replace it, or choose another output directory."
        )


def _loaded_from(model: Any) -> Iterator[Path]:
    """The local folders the model's weights were read from (none for a Hub id or a fresh model)."""
    names = {getattr(model, "name_or_path", None), getattr(model.config, "_name_or_path", None)}
    for name in names:
        if name and Path(name).expanduser().is_dir():
            yield Path(name).expanduser().resolve()


def _sibling(output_dir: Path, kind: str) -> Path:
    """A hidden, unique path in the same folder as `output_dir`, so renames stay atomic."""
    return output_dir.parent / f".{output_dir.name}.sglp-{kind}-{uuid.uuid4().hex[:12]}"


def _move_into_place(tmp: Path, output_dir: Path) -> None:
    """Rename `tmp` to `output_dir`; an existing `output_dir` is deleted only after that worked."""
    old = _sibling(output_dir, "old") if output_dir.exists() else None
    if old is not None:
        os.rename(output_dir, old)
    try:
        os.rename(tmp, output_dir)
    except BaseException:
        if old is not None:
            os.rename(old, output_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)
