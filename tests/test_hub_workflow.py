"""`--push-to-hub` on `prune` and `heal`, offline: which files would be uploaded, what the model
card says, and that the token stays out of the output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoUrl

from sglp_llm.cli import main
from sglp_llm.evaluation.evaluate import EVAL_TEXT
from sglp_llm.output.modelcard import render_healed_card
from tiny_models import save_tiny_model

pytest.importorskip("peft")

SECRET = "hf_doNotPrintThisToken123"
PRUNE_FAST = ["--seq-len", "16", "--n-samples", "8", "--batch-size", "4", "--cka-minibatch-tokens", "16", "--no-progress"]
HEAL_FAST = ["--steps", "4", "--seq-len", "32", "--batch-size", "4", "--eval-max-texts", "2", "--no-progress"]
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
SGLP_FILES = {"sglp_report.json", "sglp_config.json", "cka_heatmap.png", "README.md"}


@pytest.fixture
def hub(monkeypatch):
    """Replace the two network calls of `hub.push_folder`; record each upload's files and card
    as they are at upload time. The token is in the environment, as after `export HF_TOKEN=...`."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    calls = []

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        calls.append({"create": repo_id, "private": private, "token": self.token})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kwargs):
        folder = Path(folder_path)
        calls[-1].update(
            repo_id=repo_id,
            message=commit_message,
            files={str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()},
            card=(folder / "README.md").read_text(),
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(path, "llama", num_layers=8)
    return path


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_prune_pushes_model_report_heatmap_and_card(dense_dir, tmp_path, hub, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(dense_dir), "--drop", "3", "--output", str(out),
                 "--eval-dataset", str(EVAL_TEXT), "--eval-max-texts", "3",
                 "--push-to-hub", "me/tiny-sglp", *PRUNE_FAST])
    assert code == 0
    (upload,) = hub
    assert upload["create"] == upload["repo_id"] == "me/tiny-sglp"
    assert upload["private"] is True and upload["token"] is None  # resolved by huggingface_hub itself
    assert upload["files"] == MODEL_FILES | SGLP_FILES
    dropped = json.loads((out / "sglp_report.json").read_text())["dropped"]
    card = upload["card"]
    assert f"# {dense_dir}, depth-pruned with SGLP (5 of 8 blocks)" in card
    assert f"| dropped (original indices) | {', '.join(map(str, dropped))} |" in card
    assert "[SGLP](https://arxiv.org/abs/2410.14720)" in card
    assert "| metric | dense | pruned |" in card and "| perplexity |" in card
    captured = capsys.readouterr()
    assert "Uploaded to https://huggingface.co/me/tiny-sglp" in captured.out
    assert SECRET not in captured.out + captured.err


def test_heal_pushes_the_merged_model_with_adapter_and_healing_card(dense_dir, tmp_path, hub, capsys):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(dense_dir), "--drop", "3", "--output", str(pruned), *PRUNE_FAST]) == 0
    healed = tmp_path / "healed"
    code = main(["heal", str(pruned), "--output", str(healed), "--merge", "--push-to-hub", "me/tiny-healed",
                 "--public", *HEAL_FAST])
    assert code == 0
    (upload,) = hub
    assert upload["repo_id"] == "me/tiny-healed" and upload["private"] is False
    assert upload["message"] == "Upload LoRA-healed model"
    adapter = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    assert upload["files"] == MODEL_FILES | SGLP_FILES | {"heal_report.json", "heal_config.json"} | adapter
    card = upload["card"]
    assert "depth-pruned with SGLP (5 of 8 blocks) and healed with LoRA" in card
    assert "## Healing" in card and "| steps | 4 × 4 windows of 32 tokens" in card
    assert "| target modules | q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj |" in card
    assert "| metric | before healing | after healing |" in card
    report = json.loads((healed / "heal_report.json").read_text())
    assert f"| held-out perplexity (before → after) | {report['perplexity']['before']['perplexity']:.4f} → " in card
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err


def test_heal_pushes_an_adapter_alone(dense_dir, tmp_path, hub):
    out = tmp_path / "adapter"
    assert main(["heal", str(dense_dir), "--output", str(out), "--push-to-hub", "me/tiny-lora", *HEAL_FAST]) == 0
    (upload,) = hub
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "heal_report.json"} <= upload["files"]
    assert "config.json" not in upload["files"] and "sglp_report.json" not in upload["files"]
    assert "# LoRA adapter for" in upload["card"]


def test_healed_card_names_a_hub_base_model_in_its_front_matter():
    healing = {
        "settings": {"steps": 500, "batch_size": 4, "seq_len": 1024, "learning_rate": 2e-4, "rank": 8,
                     "alpha": 16.0, "dropout": 0.05},
        "training_text": "column 'text' of Hub dataset 'Salesforce/wikitext'",
        "tokens": 2_048_000, "windows": 2000, "passes": 1.0, "target_modules": ["q_proj", "v_proj"],
        "trainable_parameters": 3_407_872, "loss": {"first": 2.9, "last": 2.1},
        "perplexity": {"before": {"perplexity": 19.0, "source": "test split", "n_texts": 40},
                       "after": {"perplexity": 9.5, "source": "test split", "n_texts": 40}},
        "merged": False, "adapter_dir": ".",
    }
    card = render_healed_card("meta-llama/Llama-3.1-8B", healing, evaluation={"before healing": {"perplexity": 19.0}})
    front = _front_matter(card)
    assert front["base_model"] == "meta-llama/Llama-3.1-8B" and front["library_name"] == "peft"
    assert "lora" in front["tags"] and "| held-out perplexity (before → after) | 19.0000 → 9.5000 (40 texts of test split) |" in card
    merged = render_healed_card("/data/my-model", {**healing, "merged": True, "adapter_dir": "adapter"})
    assert "base_model" not in _front_matter(merged) and "AutoModelForCausalLM.from_pretrained" in merged
    # A report from before training was timed has no "seconds": the row is left out, not invented.
    assert "training time" not in card
    assert "| training time | 42 s |" in render_healed_card("/data/my-model", {**healing, "seconds": 41.6})
