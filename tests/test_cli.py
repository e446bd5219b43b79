"""The `sglp-llm` command line on a tiny saved model: outputs, recipes, refusals."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from sglp_llm.cli import build_parser, main
from tiny_models import save_tiny_model, tiny_batch, tiny_tokenizer

FAST = ["--seq-len", "16", "--n-samples", "8", "--batch-size", "4", "--cka-minibatch-tokens", "16", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(path, "llama", num_layers=8)
    return path


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_prune_writes_a_loadable_smaller_model(model_dir, text_file, tmp_path, capsys):
    before = _digest(model_dir)
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(model_dir), "--drop", "2", "--dataset", str(text_file),
                 "--output", str(out), "--report", str(tmp_path / "r.json"), *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Blocks: 8 -> 6" in printed and str(out) in printed
    assert _digest(model_dir) == before, "the input model's files must never change"
    for name in ("config.json", "model.safetensors", "sglp_report.json", "sglp_config.json", "README.md", "cka_heatmap.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "sglp_report.json").read_text())
    assert report == json.loads((tmp_path / "r.json").read_text())
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert pruned.config.num_hidden_layers == 6
    assert pruned.config.sglp["kept_layers"] == report["kept"]
    # logits equal the original with the dropped blocks skipped
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    for i in report["dropped"]:
        original.model.layers[i].register_forward_hook(lambda m, a, k, o: a[0] if a else k["hidden_states"], with_kwargs=True)
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(pruned(**batch).logits, original(**batch).logits, rtol=1e-5, atol=1e-5)


def test_analyze_prints_the_plan_and_writes_nothing_else(model_dir, text_file, tmp_path, capsys):
    code = main(["analyze", "--model", str(model_dir), "--ratio", "0.25", "--dataset", str(text_file),
                 "--report", str(tmp_path / "plan.json"), *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "plan.json").read_text())
    assert f"drop 2 blocks: {report['dropped']}" in printed
    assert "segment" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_recipe_fills_settings_and_flags_override(model_dir, text_file, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model_dir}\nsglp:\n  drop: 3\n  dataset: {text_file}\n  seq_len: 16\n  n_samples: 8\n  cka_minibatch_tokens: 16\n")
    assert main(["analyze", "--recipe", str(recipe), "--no-progress", "--report", str(tmp_path / "a.json")]) == 0
    assert len(json.loads((tmp_path / "a.json").read_text())["dropped"]) == 3
    assert main(["analyze", "--recipe", str(recipe), "--ratio", "0.25", "--no-progress", "--report", str(tmp_path / "b.json")]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert len(b["dropped"]) == 2 and b["config"]["ratio"] == 0.25 and b["config"]["drop"] is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["analyze", "--model", "MODEL"], "--drop N or --ratio R"),
        (["prune", "--model", "MODEL", "--drop", "2"], "--output DIR"),
        (["analyze", "--model", "MODEL", "--drop", "9"], "Cannot drop 9 of 8 blocks"),
        (["analyze", "--model", "MODEL", "--drop", "2", "--seq-len", "4096"], "--seq-len"),
        (["analyze", "--recipe", "missing.yaml", "--drop", "2"], "does not exist"),
    ],
)
def test_errors_are_reported_clearly(model_dir, text_file, argv, message, capsys):
    argv = [str(model_dir) if a == "MODEL" else a for a in argv] + ["--dataset", str(text_file), "--no-progress"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_recipe_key(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("modle: x\nsglp: {drop: 2}\n")
    assert main(["analyze", "--recipe", str(recipe)]) == 2
    assert "Unknown recipe key(s) ['modle']" in capsys.readouterr().err


def test_existing_output_needs_overwrite(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = ["prune", "--model", str(model_dir), "--drop", "2", "--dataset", str(text_file), "--output", str(out), *FAST]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(argv + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("extra, private", [([], True), (["--public"], False)])
def test_push_to_hub_uploads_the_saved_folder(model_dir, text_file, tmp_path, monkeypatch, capsys, extra, private):
    import sglp_llm.output.hub

    calls = []

    def fake_push(folder, repo_id, *, private=True, token=None, commit_message=None):
        calls.append((folder, repo_id, private, sorted(p.name for p in folder.iterdir())))
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(sglp_llm.output.hub, "push_folder", fake_push)
    out = tmp_path / "out"
    argv = ["prune", "--model", str(model_dir), "--drop", "2", "--dataset", str(text_file), "--output", str(out),
            "--push-to-hub", "me/tiny-sglp", *extra, *FAST]
    assert main(argv) == 0
    ((folder, repo_id, was_private, files),) = calls
    assert folder == out.resolve() and repo_id == "me/tiny-sglp" and was_private is private
    assert {"config.json", "model.safetensors", "README.md", "sglp_report.json"} <= set(files)
    assert "Uploaded to https://huggingface.co/me/tiny-sglp" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, dropped, protected",
    [
        (["--method", "last"], {5, 6}, [0, 7]),  # the deepest unprotected blocks
        (["--method", "last", "--protect-last", "0"], {6, 7}, [0]),
        (["--method", "sglp", "--protect-first", "3", "--protect-last", "2"], {3, 4, 5}, [0, 1, 2, 6, 7]),
    ],
)
def test_method_and_protection_flags_reach_the_plan(model_dir, text_file, tmp_path, flags, dropped, protected):
    argv = ["analyze", "--model", str(model_dir), "--drop", "2", "--dataset", str(text_file),
            "--report", str(tmp_path / "plan.json"), *flags, *FAST]
    assert main(argv) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["config"]["method"] == flags[1]
    assert len(plan["dropped"]) == 2 and set(plan["dropped"]) <= dropped
    assert plan["extra"]["protected"] == protected


def test_unknown_method_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "--drop", "2", "--method", "shortgpt"])
    assert "argument --method: invalid choice: 'shortgpt'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    """Two held-out texts sources, in words the tiny tokenizer knows."""
    root = tmp_path_factory.mktemp("held-out")
    first = ["the value of a new list is returned", "if the file is not found an error is raised",
             "this class is used to create a new object"]
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in first))
    (root / "b.txt").write_text("a function that returns the name of the module for each object")
    return root / "a.jsonl", root / "b.txt", first


def _ppl(folder, texts):
    from sglp_llm.evaluation.evaluate import perplexity

    model = AutoModelForCausalLM.from_pretrained(folder)
    return perplexity(model, tiny_tokenizer(), texts, progress=False)


def test_prune_evaluates_before_and_after_then_eval_updates_the_card(model_dir, text_file, eval_files, tmp_path, capsys):
    held_out, other, texts = eval_files
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(model_dir), "--drop", "2", "--dataset", str(text_file), "--output", str(out),
            "--eval-dataset", str(held_out), "--eval-max-texts", "2", *FAST]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    dense, pruned = _ppl(model_dir, texts[:2]), _ppl(out, texts[:2])
    assert f"dense model: Perplexity {dense['perplexity']:.3f}" in printed
    assert f"pruned model: Perplexity {pruned['perplexity']:.3f}" in printed
    evaluation = json.loads((out / "sglp_report.json").read_text())["extra"]["evaluation"]
    assert evaluation["dense"]["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-5)
    assert evaluation["pruned"]["bits_per_byte"] == pytest.approx(pruned["bits_per_byte"], rel=1e-5)
    assert "a.jsonl" in evaluation["pruned"]["perplexity_text"]
    card = (out / "README.md").read_text()
    assert f"| perplexity | {evaluation['dense']['perplexity']:.4f} | {evaluation['pruned']['perplexity']:.4f} |" in card

    before = _digest(out)
    assert main(["eval", str(out), "--dataset", str(other), "--update-card", "--no-progress"]) == 0
    assert f"Results recorded in {out / 'sglp_report.json'}" in capsys.readouterr().out
    again = _ppl(out, [other.read_text()])
    updated = json.loads((out / "sglp_report.json").read_text())["extra"]["evaluation"]
    assert updated["dense"] == evaluation["dense"]
    assert updated["pruned"]["perplexity"] == pytest.approx(again["perplexity"], rel=1e-5)
    assert "b.txt" in updated["pruned"]["perplexity_text"]
    card = (out / "README.md").read_text()
    assert f"| perplexity | {updated['dense']['perplexity']:.4f} | {updated['pruned']['perplexity']:.4f} |" in card
    after = _digest(out)
    assert {k for k in after if after[k] != before[k]} == {"sglp_report.json", "README.md"}
    assert set(after) == set(before)


def test_eval_of_a_pruned_folder_suggests_update_card(model_dir, text_file, eval_files, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--drop", "2", "--dataset", str(text_file),
                 "--output", str(out), *FAST]) == 0
    report = (out / "sglp_report.json").read_text()
    assert main(["eval", str(out), "--dataset", str(eval_files[1]), "--no-progress"]) == 0
    assert (f"{out} holds an SGLP report: add --update-card to record these results in it and in its "
            "model card.") in capsys.readouterr().err
    assert (out / "sglp_report.json").read_text() == report


def test_update_card_needs_a_pruned_folder(model_dir, capsys):
    assert main(["eval", str(model_dir), "--update-card", "--no-progress"]) == 2
    assert (f"sglp-llm: error: {model_dir} has no sglp_report.json: evaluation results can only be "
            "recorded in a folder written by `sglp-llm prune`") in capsys.readouterr().err


def test_eval_and_heal_take_the_model_as_prune_does_or_positional(model_dir, eval_files, tmp_path, capsys):
    results = []
    for how in ([str(model_dir)], ["--model", str(model_dir)], [str(model_dir), "--model", str(model_dir)]):
        out = tmp_path / f"eval-{len(results)}.json"
        assert main(["eval", *how, "--dataset", str(eval_files[1]), "--output-json", str(out), "--no-progress"]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1] == results[2]
    for command in (["eval"], ["heal", "--output", str(tmp_path / "healed")]):
        with pytest.raises(SystemExit) as refused:
            main([*command, "--no-progress"])
        assert refused.value.code == 2
        assert (f"error: {command[0]} needs the model to read: sglp-llm {command[0]} MODEL (or --model MODEL)"
                in capsys.readouterr().err)
        with pytest.raises(SystemExit):
            main([*command, str(model_dir), "--model", str(tmp_path), "--no-progress"])
        assert f"got two models ({model_dir} and {tmp_path}): give it one, positional or --model" in capsys.readouterr().err
    assert not (tmp_path / "healed").exists()


def test_no_progress_hides_the_libraries_bars_too(model_dir, eval_files, capsys):
    import datasets
    import transformers

    transformers.utils.logging.enable_progress_bar()
    datasets.enable_progress_bars()
    try:
        assert main(["eval", str(model_dir), "--dataset", str(eval_files[1])]) == 0
        assert "Loading weights" in capsys.readouterr().err  # transformers' bar, shown without the flag
        assert main(["eval", str(model_dir), "--dataset", str(eval_files[1]), "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert "it/s" not in err and "Loading weights" not in err
    finally:
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()


def test_prune_warns_when_evaluating_on_the_calibration_text(model_dir, text_file, tmp_path):
    argv = ["prune", "--model", str(model_dir), "--drop", "2", "--dataset", str(text_file),
            "--output", str(tmp_path / "out"), "--eval-dataset", str(text_file), *FAST]
    with pytest.warns(UserWarning, match="is the calibration text"):
        assert main(argv) == 0


@pytest.mark.filterwarnings("ignore:The calibration text has")  # the docstrings at 16 tokens: plenty, but be safe
def test_without_a_dataset_the_docstrings_are_held_out_unless_the_model_cannot_sample(model_dir, tmp_path, capsys):
    """No --dataset: the model's own samples, so evaluating on the docstrings is fine; one block at
    a time the docstrings are the calibration, the CLI says why, and evaluating on them warns."""
    argv = ["prune", "--model", str(model_dir), "--drop", "2", "--eval-dataset", "builtin:stdlib-docs",
            "--eval-max-texts", "2", *FAST]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert main([*argv, "--output", str(tmp_path / "sampled")]) == 0
    assert "No --dataset given: calibrating on the model's own samples (builtin:self-generated: 8 windows of 16 tokens" \
        in capsys.readouterr().err
    with pytest.warns(UserWarning, match="'builtin:stdlib-docs' is the calibration text"):
        assert main([*argv, "--offload", "sequential", "--output", str(tmp_path / "blockwise")]) == 0
    err = capsys.readouterr().err
    assert "No --dataset given: calibrating on the built-in docstrings (builtin:stdlib-docs), not on the model's own " \
           "samples: Sampling the model's own text runs its generate()" in err
    report = json.loads((tmp_path / "blockwise" / "sglp_report.json").read_text())
    assert report["config"]["dataset"] == "builtin:stdlib-docs" and "one block at a time" in report["extra"]["calibration_not_sampled"]


def test_prune_with_blocks_on_disk_equals_the_in_memory_prune(model_dir, text_file, tmp_path, capsys):
    # the default selection (the loss check), run block by block from disk
    flags = ["--model", str(model_dir), "--drop", "2", "--dataset", str(text_file), *FAST]
    before = _digest(model_dir)
    assert main(["prune", *flags, "--output", str(tmp_path / "memory")]) == 0
    assert main(["prune", *flags, "--offload", "sequential", "--blocks-on-disk", "--onload-device", "cpu",
                 "--output", str(tmp_path / "disk")]) == 0
    assert "stay on disk" in capsys.readouterr().err
    assert _digest(model_dir) == before
    reports = [json.loads((tmp_path / name / "sglp_report.json").read_text()) for name in ("memory", "disk")]
    assert reports[1]["dropped"] == reports[0]["dropped"]
    steps = [report["extra"]["loss_check"]["steps"] for report in reports]
    assert [s["block"] for s in steps[1]] == [s["block"] for s in steps[0]]
    assert [s["loss"] for s in steps[1]] == pytest.approx([s["loss"] for s in steps[0]], rel=1e-5)
    assert reports[1]["config"]["onload_device"] == "cpu"
    models = [AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("memory", "disk")]
    assert models[0].state_dict().keys() == models[1].state_dict().keys()
    assert all(torch.equal(v, models[1].state_dict()[k]) for k, v in models[0].state_dict().items())
    assert (tmp_path / "disk" / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--scoring", "block"], "needs --offload sequential"),
        (["--offload", "sequential", "--scoring", "subset"], "the subset search (--scoring subset) runs the whole network"),
        (["--offload", "sequential", "--scoring", "block", "--device-map", "cpu"], "use one"),
        (["--offload", "sequential", "--scoring", "block", "--eval-dataset", "stdlib-docs"], "cannot be evaluated or healed"),
        (["--onload-device", "cuda:0"], "offload to \"sequential\""),
    ],
)
def test_blocks_on_disk_refusals(model_dir, text_file, tmp_path, flags, message, capsys):
    argv = ["prune", "--model", str(model_dir), "--drop", "2", "--dataset", str(text_file), "--blocks-on-disk",
            "--output", str(tmp_path / "out"), *flags, *FAST]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_blocks_on_disk_needs_a_local_folder(text_file, tmp_path, capsys):
    argv = ["analyze", "--model", "owner/model", "--drop", "2", "--blocks-on-disk", "--offload", "sequential",
            "--scoring", "block", "--dataset", str(text_file), *FAST]
    assert main(argv) == 2
    assert "hf download" in capsys.readouterr().err


def test_eval_refuses_accelerate_launch(model_dir, monkeypatch, capsys):
    """(heal runs under it: tests/test_distributed.py)"""
    monkeypatch.setattr("sglp_llm.passes.distributed.world_size", lambda: 2)
    assert main(["eval", str(model_dir), "--no-progress"]) == 2
    assert "`sglp-llm eval` runs in one process" in capsys.readouterr().err


def test_loss_check_flags_reach_the_config():
    from sglp_llm.cli import build_parser, resolve_settings

    args = build_parser().parse_args(["analyze", "--drop", "2", "--groups", "--allocation", "size", "--loss-candidates", "3",
                                      "--loss-tokens", "512", "--loss-bound", "local", "--loss-screen-samples", "4",
                                      "--loss-screen-errors", "2.5", "--loss-risk", "1", "--offload", "sequential", "--onload-device", "cpu"])
    _, config = resolve_settings(args)
    assert (config.allocation, config.loss_candidates, config.loss_tokens, config.onload_device) == ("size", 3, 512, "cpu")
    assert (config.loss_bound, config.loss_screen_samples, config.loss_screen_errors, config.loss_risk) == ("local", 4, 2.5, 1.0)


def test_compensation_flags_reach_the_config():
    from sglp_llm.cli import build_parser, resolve_settings

    args = build_parser().parse_args(["analyze", "--drop", "2", "--compensation", "cosine", "--compensation-ridge", "0.1",
                                      "--compensation-fit", "pruned", "--compensation-aware"])
    _, config = resolve_settings(args)
    assert (config.compensation, config.compensation_ridge, config.compensation_fit) == ("cosine", 0.1, "pruned")
    assert config.compensation_aware is True
    _, plain = resolve_settings(build_parser().parse_args(["analyze", "--drop", "2"]))
    assert (plain.compensation, plain.compensation_fit, plain.compensation_aware) == ("none", "original", False)


def test_recover_flags_reach_the_report_and_card(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--drop", "2", "--dataset", str(text_file), "--output", str(out),
                 "--recover", "blocks", "--recover-steps", "3", "--recover-learning-rate", "0.001", *FAST]) == 0
    report = json.loads((out / "sglp_report.json").read_text())
    assert (report["config"]["recover"], report["config"]["recover_steps"]) == ("blocks", 3)
    recovery = report["extra"]["recovery"]
    assert recovery["steps"] == 3 and recovery["learning_rate"] == 0.001 and recovery["trained"]
    assert "3 AdamW steps at lr 0.001" in (out / "README.md").read_text()


def test_prune_eval_speed_reports_parameters_and_throughput_before_and_after(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--drop", "2", "--dataset", str(text_file), "--output", str(out),
                 "--eval-speed", *FAST]) == 0
    evaluation = json.loads((out / "sglp_report.json").read_text())["extra"]["evaluation"]
    saved = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    assert evaluation["dense"]["parameters"] == sum(p.numel() for p in original.parameters())
    assert evaluation["pruned"]["parameters"] == sum(p.numel() for p in saved.parameters())
    assert evaluation["pruned"]["parameters"] < evaluation["dense"]["parameters"]
    for column in ("dense", "pruned"):
        assert evaluation[column]["prefill_tokens_per_s"] > 0 and evaluation[column]["decode_tokens_per_s"] > 0
    card = (out / "README.md").read_text()
    assert "| decode_tokens_per_s |" in card and f"| parameters | {evaluation['dense']['parameters']} |" in card
    assert "tokens/s" in capsys.readouterr().out


def test_prune_says_what_it_verified_and_no_verify_skips_it(model_dir, text_file, tmp_path, capsys):
    common = ["prune", "--model", str(model_dir), "--drop", "2", "--dataset", str(text_file), *FAST]
    assert main([*common, "--output", str(tmp_path / "checked")]) == 0
    assert "Verified: the pruned model in memory and the saved folder reloaded with from_pretrained reproduce the original" in capsys.readouterr().out
    report = json.loads((tmp_path / "checked" / "sglp_report.json").read_text())
    assert report["config"]["verify"] is True and report["timings"]["verify_s"] > 0
    assert main([*common, "--output", str(tmp_path / "unchecked"), "--no-verify"]) == 0
    assert "Not verified" in capsys.readouterr().out
    report = json.loads((tmp_path / "unchecked" / "sglp_report.json").read_text())
    assert report["config"]["verify"] is False and "verification" not in report["extra"]


def test_a_rewrite_that_fails_verification_writes_nothing(model_dir, text_file, tmp_path, monkeypatch, capsys):
    import sglp_llm.model.rewrite as rewrite

    monkeypatch.setattr(rewrite, "LAYER_INDEX_ATTRIBUTES", ())  # renumbering skipped
    monkeypatch.setattr(rewrite, "_keep_block_constants", lambda blocks, kept: {})
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--drop", "2", "--dataset", str(text_file),
                 "--output", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "of this LlamaForCausalLM" in err and "Nothing was written" in err
    assert not [p for p in tmp_path.iterdir() if "pruned" in p.name], "no output, no temporary folder"


def test_objective_and_stability_flags_reach_the_config():
    from sglp_llm.cli import build_parser, resolve_settings

    _, config = resolve_settings(build_parser().parse_args(["analyze", "--drop", "2", "--loss-objective", "kl", "--no-stability-check"]))
    assert (config.loss_objective, config.stability_check) == ("kl", False)
    _, plain = resolve_settings(build_parser().parse_args(["analyze", "--drop", "2"]))
    assert plain.stability_check is True


def test_analyze_states_the_stability_and_warns_exactly_when_the_halves_disagree(model_dir, text_file, tmp_path, capsys):
    report = tmp_path / "plan.json"
    assert main(["analyze", "--model", str(model_dir), "--drop", "3", "--dataset", str(text_file), *FAST,
                 "--report", str(report)]) == 0
    out, err = capsys.readouterr()
    stability = json.loads(report.read_text())["extra"]["stability"]
    a, b = stability["halves"]
    assert f"drops {a} and {b}" in out
    assert stability["agreement"] == len(set(a) & set(b)) / 3
    assert ("Warning: The choice is unstable" in err) == (stability["agreement"] < 0.5)


@pytest.mark.parametrize("command", ["prune", "analyze"])
def test_help_shows_the_everyday_options_and_help_all_every_option(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    everyday = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([command, "--help-all"])
    every = capsys.readouterr().out
    assert "--drop" in everyday and "--dataset" in everyday and "--help-all" in everyday
    assert "--loss-bound" not in everyday and "--compensation-ridge" not in everyday
    assert "more options" in everyday and "--loss-bound" in every and "--compensation-ridge" in every
    assert len(every.splitlines()) > 3 * len(everyday.splitlines())
    # a hidden option still works
    assert build_parser().parse_args([command, "--loss-bound", "stale"]).loss_bound == "stale"


def test_dataset_flag_takes_one_source_or_several_to_mix():
    from sglp_llm.cli import resolve_settings

    def dataset(*values):
        return resolve_settings(build_parser().parse_args(["analyze", "--drop", "1", "--dataset", *values]))[1].dataset

    assert dataset("builtin:fortunes") == "builtin:fortunes"
    assert dataset("builtin:stdlib-docs", "builtin:python-reference") == ["builtin:stdlib-docs", "builtin:python-reference"]


# what other tools' commands in the package's messages take (pip, hf download, lm_eval)
OTHER_TOOLS_FLAGS = {"--no-deps", "--local-dir", "--model_args", "--batch_size"}


def test_every_command_and_flag_the_messages_name_exists():
    """A message that tells the user to run `sglp-llm evaluate` or pass --dataset-split sends them
    to an error: every `sglp-llm <command>` and `--flag` in the package's text must be real
    (`--eval-*` names a family of flags)."""
    import argparse
    import re
    from pathlib import Path

    import sglp_llm

    parser = build_parser(show_all=True)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    flags = {o for sub in commands.values() for a in sub._actions for o in a.option_strings}
    wrong = []
    for path in sorted(Path(sglp_llm.__file__).parent.rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"`?sglp-llm ([a-z]+)\b", text):
            if m.group(0).startswith("`") and m.group(1) not in commands:
                wrong.append(f"{path.name}: {m.group(0)}")
        for m in re.finditer(r"sglp-llm ([a-z]+)\)", text):  # a command named at a sentence's end
            if m.group(1) not in commands:
                wrong.append(f"{path.name}: {m.group(0)}")
        for m in re.finditer(r"(?<![\w-])(--[a-z][\w-]*)(\*?)", text):
            flag, family = m.groups()
            known = any(f.startswith(flag) for f in flags) if family else flag in flags | OTHER_TOOLS_FLAGS
            if not known:
                wrong.append(f"{path.name}: {flag}{family}")
    assert not wrong, wrong
