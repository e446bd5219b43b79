"""Calibration data: load text, tokenize, pack into fixed-length windows, batch.

SGLP only needs a few thousand tokens of ordinary text to measure block similarity and
gradients, so every source (the built-in default, local files, a Hub dataset, texts or batches
given in Python) ends up as the same `CalibrationSet` of packed, unpadded windows.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import platform
import random
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any, Callable

import datasets
import torch

from .config import ConfigError, SGLPConfig

# File suffix -> the `datasets` builder that reads it.
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_SUPPORTED = ", ".join(BUILDERS)

# Stdlib modules whose docstrings make the built-in default text: pure-Python modules present in
# every CPython build, well documented in plain English. Order fixes the text, so keep it sorted.
DEFAULT_MODULES = (
    "argparse", "ast", "asyncio", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "enum", "fractions", "functools", "gettext", "heapq", "html.parser",
    "http.client", "http.cookiejar", "inspect", "ipaddress", "json", "logging",
    "logging.handlers", "mailbox", "optparse", "pathlib", "pickle", "pprint", "queue", "random",
    "shlex", "shutil", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "tokenize", "traceback", "typing", "unittest", "unittest.mock", "urllib.parse",
    "urllib.request", "uuid", "warnings", "xml.etree.ElementTree", "zipfile",
)
# Docstrings shorter than this are mostly one-liners ("Return self.") that add little language.
_MIN_DOC_CHARS = 200

# Built-in text sources, named like `--dataset builtin:fortunes`.
BUILTIN_PREFIX = "builtin:"
STDLIB_DOCS = "builtin:stdlib-docs"
FORTUNES = "builtin:fortunes"
# Debian's `fortunes` package: plain-text files of entries separated by lines holding only "%".
FORTUNES_DIR = Path("/usr/share/games/fortunes")
LICENSES = "builtin:licenses"
# the Python language reference's prose (pydoc's topics), in every CPython install like the docstrings
PYTHON_REFERENCE = "builtin:python-reference"
# the model's own samples (sglp_llm.passes.sampling): a source that needs the model, not a text
SELF_GENERATED = "builtin:self-generated"
# (n_samples, seq_len, seed) -> [n_samples, seq_len] token ids sampled from the model being pruned
Sampler = Callable[[int, int, int], torch.Tensor]
# Debian's base-files: the full text of the common free-software licences, legal English
LICENSES_DIR = Path("/usr/share/common-licenses")
# Overstriking marks bold and underline for terminals: a backspace steps back over the character
# before it, which the next character then overprints.
_BACKSPACED = re.compile(r"[^\x08\n]\x08")


class CalibrationError(ConfigError):
    """Calibration data is missing, unreadable or too small; the message says what to change."""


@dataclass
class CalibrationSet:
    """Tokenized calibration batches, each a dict of `input_ids` and `attention_mask` [B, T]."""

    batches: list[dict[str, torch.Tensor]]
    n_tokens: int
    source: str
    n_samples: int
    seq_len: int

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# ---------------------------------------------------------------------------------- loading
def load_texts(
    source: str | None,
    *,
    config_name: str | None = None,
    split: str = "train",
    text_column: str = "text",
) -> tuple[list[str], str]:
    """The non-empty texts of `source` and a one-line description of where they came from.

    `source` is None (the built-in default text, same as "builtin:stdlib-docs"),
    "builtin:fortunes" (Debian's fortunes, see `fortune_texts`), a local file or directory, or a
    Hub dataset name. A `.txt` file is one text (its paragraphs stay together, so packing keeps their
    context); `.json`/`.jsonl`/`.csv`/`.parquet` give one text per row from `text_column`.
    `config_name` and `split` apply to Hub datasets only; local files are one split.
    """
    if source is None or source == STDLIB_DOCS:
        return default_texts()
    if source == FORTUNES:
        return fortune_texts()
    if source == LICENSES:
        return license_texts()
    if source == PYTHON_REFERENCE:
        return python_reference_texts()
    if source == SELF_GENERATED:
        raise CalibrationError(
            f"{SELF_GENERATED!r} is text sampled from the model being pruned: a calibration source only "
            "(held-out and training text must be a text source)."
        )
    if source.startswith(BUILTIN_PREFIX):
        raise CalibrationError(
            f"Unknown built-in text {source!r}; the built-in texts are {STDLIB_DOCS!r}, "
            f"{PYTHON_REFERENCE!r}, {FORTUNES!r} and {LICENSES!r}, and {SELF_GENERATED!r} samples the model."
        )
    path = Path(source).expanduser()
    if path.exists():
        return _load_local(path, text_column)
    if _looks_like_path(source):
        raise CalibrationError(
            f"Calibration path {source!r} does not exist. Give an existing file or directory "
            f"({_SUPPORTED}) or a Hugging Face dataset name."
        )
    return _load_hub(source, config_name, split, text_column)


def default_texts() -> tuple[list[str], str]:
    """Docstrings of `DEFAULT_MODULES`: English text that every Python install has offline.

    Deterministic for one Python version (docstrings change between versions).
    """
    seen: set[str] = set()
    texts: list[str] = []

    def add(obj: Any) -> None:
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str):
            doc = inspect.cleandoc(doc)
            if len(doc) >= _MIN_DOC_CHARS and doc not in seen:
                seen.add(doc)
                texts.append(doc)

    n_modules = 0
    # Reading every attribute touches deprecated aliases (e.g. typing.io): not the user's concern.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in DEFAULT_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # a trimmed-down Python build: the other modules still give text
                continue
            n_modules += 1
            add(module)
            for obj in _own_objects(module):
                add(obj)
    if not texts:
        raise CalibrationError(
            "The built-in calibration text (Python standard-library docstrings) is empty: this "
            "Python strips docstrings (run without -OO) or lacks the modules. Give a dataset "
            "with --dataset or a local text file."
        )
    description = (
        f"built-in default: docstrings of {n_modules} Python {platform.python_version()} "
        "standard-library modules (no dataset given)"
    )
    return texts, description


def python_reference_texts() -> tuple[list[str], str]:
    """The topics of the Python language reference that `help()` shows (pydoc_data): prose
    about the language rather than docstrings about an API."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    texts = [text for text in topics.values() if text.strip()]
    if not texts:
        raise CalibrationError(
            f"This Python has no pydoc_data topics (a trimmed-down build), so {PYTHON_REFERENCE!r} is empty; "
            f"use {STDLIB_DOCS!r} or give a dataset."
        )
    return texts, f"built-in Python {platform.python_version()} language reference: {len(texts)} topics (pydoc_data)"


def fortune_texts() -> tuple[list[str], str]:
    """The entries of Debian's `fortunes` package (`FORTUNES_DIR`): English text that is not code
    documentation, so it can hold out against the stdlib-docs calibration default.

    Files are read in name order (the `.dat` indexes, `.u8` links and the offensive `off/`
    folder are skipped) and their entries interleaved round-robin, one from each file in turn,
    so the first N entries (`--max-texts`) span every category. Deterministic.
    """
    files = (
        sorted(
            f for f in FORTUNES_DIR.iterdir()
            if f.is_file() and f.suffix not in (".dat", ".u8") and not f.name.startswith(".")
        )
        if FORTUNES_DIR.is_dir()
        else []
    )
    if not files:
        raise CalibrationError(
            f"{FORTUNES!r} needs Debian's fortunes text in {FORTUNES_DIR}, which is missing or "
            "empty: install it with `apt-get install fortunes`, or give another dataset."
        )
    per_file = [_fortune_entries(f.read_text(encoding="utf-8", errors="replace")) for f in files]
    texts = _round_robin(per_file)
    description = f"built-in fortunes: {len(texts)} entries from {len(files)} files in {FORTUNES_DIR}"
    return _nonempty(texts, description), description


def license_texts() -> tuple[list[str], str]:
    """The paragraphs (of at least `_MIN_DOC_CHARS`) of the licence texts in `LICENSES_DIR`, legal
    English unlike docstrings or fortunes: a third held-out source. Files are read in name order
    (links to them skipped) and their paragraphs interleaved as in `fortune_texts`. Deterministic."""
    files = (
        sorted(f for f in LICENSES_DIR.iterdir() if f.is_file() and not f.is_symlink() and not f.name.startswith("."))
        if LICENSES_DIR.is_dir()
        else []
    )
    if not files:
        raise CalibrationError(
            f"{LICENSES!r} needs the licence texts in {LICENSES_DIR} (Debian's base-files), which are missing; "
            "give another dataset."
        )
    per_file = [
        [p.strip() for p in re.split(r"\n\s*\n", f.read_text(encoding="utf-8", errors="replace")) if len(p.strip()) >= _MIN_DOC_CHARS]
        for f in files
    ]
    texts = _round_robin(per_file)
    description = f"built-in licences: {len(texts)} paragraphs from {len(files)} files in {LICENSES_DIR}"
    return _nonempty(texts, description), description


def _round_robin(per_file: list[list[str]]) -> list[str]:
    """One entry of each file in turn, so that the first N entries span every file."""
    return [entry for round_ in zip_longest(*per_file) for entry in round_ if entry is not None]


def _fortune_entries(content: str) -> list[str]:
    """The non-empty entries of one fortune file, as printed (see `_without_overstriking`)."""
    entries = re.split(r"^%$", _without_overstriking(content), flags=re.MULTILINE)
    return [e.strip("\n") for e in entries if e.strip()]


def _without_overstriking(text: str) -> str:
    """The text a terminal shows: each backspace erases the character before it ("_\\bx",
    "x\\bx" and "___\\b\\b\\bxyz" are underlined or bold "x" and "xyz")."""
    while True:
        text, n = _BACKSPACED.subn("", text)
        if n == 0:
            return text.replace("\x08", "")  # a backspace at the start of a line erases nothing


def _own_objects(module: Any) -> Iterator[Any]:
    """Public classes (with their public members) and functions defined in `module`, sorted.

    Re-exported objects are skipped: they would repeat another module's docstrings.
    """
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if obj.__module__ != module.__name__:
            continue
        yield obj
        if inspect.isclass(obj):
            yield from (m for n, m in sorted(vars(obj).items()) if not n.startswith("_"))


def _looks_like_path(source: str) -> bool:
    """True for strings that cannot be a Hub name (`name` or `owner/name`)."""
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in BUILDERS
    )


def _load_local(path: Path, text_column: str) -> tuple[list[str], str]:
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise CalibrationError(
                f"{str(path)!r} is not a supported calibration file; use one of {_SUPPORTED}."
            )
        files = [path]
    else:
        # Recursive, sorted, skipping hidden files and folders (.git, .cache, editor files).
        files = sorted(
            f
            for f in path.rglob("*")
            if f.is_file()
            and f.suffix.lower() in BUILDERS
            and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
        if not files:
            raise CalibrationError(
                f"Directory {str(path)!r} holds no calibration files of a supported type "
                f"({_SUPPORTED}); add some or point to another directory."
            )
    by_builder: dict[str, list[str]] = {}
    for f in files:
        by_builder.setdefault(BUILDERS[f.suffix.lower()], []).append(str(f))
    texts: list[str] = []
    # Local files are read once per run: keep them in memory and out of the user's HF cache.
    with tempfile.TemporaryDirectory(prefix="sglp-data-") as cache_dir:
        for builder, data_files in by_builder.items():
            dataset = datasets.load_dataset(
                builder,
                data_files=data_files,
                split="train",
                cache_dir=cache_dir,
                keep_in_memory=True,
                **({"sample_by": "document"} if builder == "text" else {}),
            )
            # A .txt file has no columns: its whole content is the text.
            column = "text" if builder == "text" else text_column
            texts += _column_texts(dataset, column, f"{builder} files under {str(path)!r}")
    description = f"{len(texts)} texts from {len(files)} local file(s) at {str(path)!r}"
    return _nonempty(texts, description), description


def _load_hub(
    name: str, config_name: str | None, split: str, text_column: str
) -> tuple[list[str], str]:
    where = f"Hub dataset {name!r} (config {config_name!r}, split {split!r})"
    try:
        dataset = datasets.load_dataset(name, config_name, split=split)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        raise CalibrationError(
            f"Could not load the calibration data {where}: {err}. Check the name, "
            "--dataset-config and --split and your network, or give a local file or "
            "directory."
        ) from err
    texts = _column_texts(dataset, text_column, where)
    description = f"column {text_column!r} of {where}"
    return _nonempty(texts, description), description


def _column_texts(dataset: datasets.Dataset, column: str, where: str) -> list[str]:
    if column not in dataset.column_names:
        raise CalibrationError(
            f"The calibration data ({where}) has no column {column!r}; its columns are "
            f"{dataset.column_names}. Choose the text column with --text-column."
        )
    return _nonempty_strings(dataset[column])


def _nonempty_strings(values: Any) -> list[str]:
    """The strings among `values` that hold more than whitespace (CSV gaps read as None)."""
    return [v for v in values if isinstance(v, str) and v.strip()]


def _nonempty(texts: list[str], description: str) -> list[str]:
    if not texts:
        raise CalibrationError(
            f"The calibration data ({description}) has no non-empty text; check the files or "
            "the --text-column."
        )
    return texts


# ---------------------------------------------------------------------------------- batching
def build_batches(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    seq_len: int,
    n_samples: int,
    batch_size: int,
    seed: int,
    max_positions: int | None = None,
    source: str = "texts given in Python",
) -> CalibrationSet:
    """Pack `texts` into `n_samples` random non-overlapping windows of `seq_len` tokens.

    Texts are tokenized without special tokens and joined with the eos token (when the
    tokenizer has one), so windows span document boundaries and need no padding. When the
    tokenizer itself starts inputs with bos (LLaMA-style), every window starts with bos and
    holds `seq_len - 1` text tokens, as the model sees text in normal use. Windows are chosen
    with `random.Random(seed)`: the same texts, tokenizer and seed give the same batches.
    """
    _check_seq_len(seq_len, max_positions)
    if tokenizer is None:
        raise CalibrationError(
            "Calibration text needs a tokenizer: pass the model's tokenizer, or give "
            "pre-tokenized batches instead of text."
        )
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    stream: list[int] = []
    for i, ids in enumerate(encoded):
        stream += (eos if i else []) + ids
    bos = tokenizer.bos_token_id
    prefix = [bos] if bos is not None and tokenizer("")["input_ids"][:1] == [bos] else []
    body = seq_len - len(prefix)
    n_windows = len(stream) // body
    if n_windows == 0:
        raise CalibrationError(
            f"The calibration text has only {len(stream)} tokens, fewer than seq_len={seq_len}; "
            "use more text or a smaller --seq-len."
        )
    if n_windows < n_samples:
        warnings.warn(
            f"The calibration text has {len(stream)} tokens: only {n_windows} windows of "
            f"seq_len={seq_len}, fewer than n_samples={n_samples}; using all {n_windows}. Add "
            "text for the full sample.",
            stacklevel=2,
        )
    chosen = random.Random(seed).sample(range(n_windows), min(n_samples, n_windows))
    windows = torch.tensor([prefix + stream[i * body : (i + 1) * body] for i in chosen])
    batches = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for ids in windows.split(batch_size)
    ]
    return CalibrationSet(
        batches=batches,
        n_tokens=windows.numel(),
        source=source,
        n_samples=len(chosen),
        seq_len=seq_len,
    )


def sampled_calibration(
    sampler: Sampler | None, *, n_samples: int, seq_len: int, batch_size: int, seed: int, max_positions: int | None = None
) -> CalibrationSet:
    """`n_samples` windows of `seq_len` tokens sampled from the model being pruned (`SELF_GENERATED`)."""
    _check_seq_len(seq_len, max_positions)
    if sampler is None:
        raise CalibrationError(
            f"{SELF_GENERATED!r} samples the model being pruned, and none was given here: pass the model "
            "(analyze, prune and the CLI do), or calibrate on a text source."
        )
    windows = sampler(n_samples, seq_len, seed)
    return CalibrationSet(
        batches=[{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in windows.split(batch_size)],
        n_tokens=windows.numel(),
        source=f"the model's own samples (from its beginning-of-text token, seed {seed})",
        n_samples=len(windows),
        seq_len=seq_len,
    )


def source_shares(n_samples: int, n_sources: int) -> list[int]:
    """Each of `n_sources` mixed sources' windows of `n_samples`: equal shares, the first ones
    taking the remainder."""
    return [n_samples // n_sources + (i < n_samples % n_sources) for i in range(n_sources)]


def sampled_windows(config: SGLPConfig) -> int:
    """How many of the calibration windows `config` describes the model samples (`SELF_GENERATED`)."""
    sources = config.dataset if isinstance(config.dataset, (list, tuple)) else [config.dataset]
    return sum(n for source, n in zip(sources, source_shares(config.n_samples, len(sources))) if source == SELF_GENERATED)


def mixed_calibration(
    sources: Sequence[str], tokenizer: Any, config: SGLPConfig, *, max_positions: int | None = None,
    sampler: Sampler | None = None,
) -> CalibrationSet:
    """`config.n_samples` windows split evenly over `sources` (the first ones take the remainder),
    each source's drawn as from it alone, then alternated: any first tokens of the set (the loss
    check's) hold every source, so no one text decides the choice alone."""
    counts = source_shares(config.n_samples, len(sources))
    if not all(counts):
        raise CalibrationError(
            f"n_samples={config.n_samples} windows cannot be shared by {len(sources)} calibration sources: "
            "give at least one window per source."
        )
    parts = []
    for source, count in zip(sources, counts):
        if source == SELF_GENERATED:
            parts.append(sampled_calibration(sampler, n_samples=count, seq_len=config.seq_len, batch_size=1,
                                             seed=config.seed, max_positions=max_positions))
            continue
        texts, description = load_texts(source, config_name=config.dataset_config, split=config.dataset_split,
                                        text_column=config.text_column)
        parts.append(build_batches(tokenizer, texts, seq_len=config.seq_len, n_samples=count, batch_size=1,
                                   seed=config.seed, max_positions=max_positions, source=description))
    rows = [part.batches[i] for i in range(max(counts)) for part in parts if i < len(part.batches)]
    batches = [{key: torch.cat([row[key] for row in rows[i : i + config.batch_size]]) for key in rows[0]}
               for i in range(0, len(rows), config.batch_size)]
    return CalibrationSet(
        batches=batches,
        n_tokens=sum(part.n_tokens for part in parts),
        source=", alternating with ".join(f"{part.n_samples} windows of {part.source}" for part in parts),
        n_samples=len(rows),
        seq_len=config.seq_len,
    )


def first_samples(batches: Sequence[dict[str, torch.Tensor]], n: int) -> list[dict[str, torch.Tensor]]:
    """The first `n` sequences of `batches` (all of them if fewer), in batches of the same rows."""
    taken: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        if n <= 0:
            break
        rows = len(batch["input_ids"])
        taken.append({key: value[:n] for key, value in batch.items()} if n < rows else batch)
        n -= rows
    return taken


def hash_batches(digest: "hashlib._Hash", batches: Sequence[dict[str, torch.Tensor]]) -> None:
    """Feed every tensor of `batches` (name, shape, dtype and values) to `digest`."""
    for batch in batches:
        for name in sorted(batch):
            tensor = batch[name].detach().cpu().contiguous()
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.numpy().tobytes())


def calibration_digest(batches: Sequence[dict[str, torch.Tensor]]) -> str:
    """The sha256 of every calibration token and mask: two plans that carry the same digest were
    calibrated on the same text. The model's own samples (`SELF_GENERATED`) are seeded, but a
    nucleus draw can flip on a rounding difference of another machine or library version and
    change the rest of its window, so the same seed can give other text, and another plan."""
    digest = hashlib.sha256()
    hash_batches(digest, batches)
    return digest.hexdigest()


def token_count(batches: Sequence[dict[str, torch.Tensor]]) -> int:
    """The (non-padding) tokens of `batches`."""
    return int(sum(int(b["attention_mask"].sum()) for b in batches))


def skip_samples(batches: Sequence[dict[str, torch.Tensor]], n: int) -> list[dict[str, torch.Tensor]]:
    """`batches` without their first `n` sequences (a batch across the cut keeps its other rows)."""
    kept: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        rows = len(batch["input_ids"])
        if n < rows:
            kept.append({key: value[max(n, 0):] for key, value in batch.items()} if n > 0 else batch)
        n -= rows
    return kept


def first_tokens(batches: Sequence[dict[str, torch.Tensor]], n_tokens: int) -> list[dict[str, torch.Tensor]]:
    """The first sequences of `batches` that hold at least `n_tokens` (non-padding) tokens, or all
    of them: the same sequences whatever the batch size."""
    rows = 0
    for batch in batches:
        for count in batch["attention_mask"].sum(dim=1).tolist():
            if n_tokens <= 0:
                return first_samples(batches, rows)
            n_tokens -= count
            rows += 1
    return first_samples(batches, rows)


def _check_seq_len(seq_len: int, max_positions: int | None) -> None:
    if max_positions is not None and seq_len > max_positions:
        raise CalibrationError(
            f"seq_len={seq_len} is longer than the model's max_position_embeddings="
            f"{max_positions}; use --seq-len {max_positions} or less."
        )


def _from_batches(
    batches: Sequence[Mapping[str, Any]], max_positions: int | None
) -> CalibrationSet:
    """Validate pre-tokenized batches; a missing `attention_mask` means no padding."""
    checked = []
    for i, batch in enumerate(batches):
        ids = batch.get("input_ids")
        if not (
            isinstance(ids, torch.Tensor)
            and ids.dim() == 2
            and ids.numel() > 0
            and not ids.is_floating_point()
            and not ids.is_complex()
        ):
            got = (
                f"shape {list(ids.shape)}, {ids.dtype}"
                if isinstance(ids, torch.Tensor)
                else type(ids).__name__
            )
            raise CalibrationError(
                f"Pre-tokenized batch {i}: `input_ids` must be a non-empty 2-D integer tensor "
                f"[batch, seq_len], got {got}."
            )
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        elif not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
            got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise CalibrationError(
                f"Pre-tokenized batch {i}: `attention_mask` must be a tensor of the shape of "
                f"`input_ids` {list(ids.shape)}, got {got}."
            )
        checked.append({"input_ids": ids.long(), "attention_mask": mask.long()})
    seq_len = max(b["input_ids"].shape[1] for b in checked)
    _check_seq_len(seq_len, max_positions)
    return CalibrationSet(
        batches=checked,
        n_tokens=token_count(checked),
        source=f"{len(checked)} pre-tokenized batches given in Python",
        n_samples=sum(b["input_ids"].shape[0] for b in checked),
        seq_len=seq_len,
    )


def prepare_calibration(
    calibration: Any,
    tokenizer: Any,
    config: SGLPConfig,
    *,
    max_positions: int | None = None,
    sampler: Sampler | None = None,
) -> CalibrationSet:
    """Turn whatever the user gave as calibration data into a `CalibrationSet`.

    `calibration` is None (use `config.dataset`, or the built-in text when that is unset; a list
    of sources there mixes them, see `mixed_calibration`), a path or Hub dataset name
    (`SELF_GENERATED`: windows `sampler` draws from the model), a list of texts, a list of
    pre-tokenized batches (dicts with `input_ids` and optional `attention_mask`), or a
    `CalibrationSet` (returned as is).
    """
    if isinstance(calibration, CalibrationSet):
        _check_seq_len(calibration.seq_len, max_positions)
        return calibration
    if calibration is None and isinstance(config.dataset, (list, tuple)):
        return mixed_calibration(config.dataset, tokenizer, config, max_positions=max_positions, sampler=sampler)
    if (config.dataset if calibration is None else calibration) == SELF_GENERATED:
        return sampled_calibration(sampler, n_samples=config.n_samples, seq_len=config.seq_len,
                                   batch_size=config.batch_size, seed=config.seed, max_positions=max_positions)
    if calibration is None or isinstance(calibration, str):
        texts, source = load_texts(
            config.dataset if calibration is None else calibration,
            config_name=config.dataset_config,
            split=config.dataset_split,
            text_column=config.text_column,
        )
    elif isinstance(calibration, (list, tuple)) and calibration:
        if all(isinstance(item, Mapping) for item in calibration):
            return _from_batches(calibration, max_positions)
        if not all(isinstance(item, str) for item in calibration):
            raise CalibrationError(
                "A calibration list must hold only texts (str) or only pre-tokenized batches "
                "(dicts with `input_ids`), not a mix or other types."
            )
        source = "texts given in Python"
        texts = _nonempty(_nonempty_strings(calibration), source)
    else:
        raise CalibrationError(
            "Calibration data must be None (use the config's dataset), a path or Hub dataset "
            "name, a non-empty list of texts or of pre-tokenized batches, or a CalibrationSet; "
            f"got {type(calibration).__name__}"
            f"{' (empty)' if isinstance(calibration, (list, tuple)) else ''}."
        )
    return build_batches(
        tokenizer,
        texts,
        seq_len=config.seq_len,
        n_samples=config.n_samples,
        batch_size=config.batch_size,
        seed=config.seed,
        max_positions=max_positions,
        source=source,
    )
