"""`compare`: each cell recomputed independently on a really pruned copy, the outputs, the CLI."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from sglp_llm import data
from sglp_llm.api import analyze
from sglp_llm.cli import main
from sglp_llm.compare import Comparison, compare, default_eval_source, parse_variant
from sglp_llm.config import ConfigError, SGLPConfig
from sglp_llm.evaluation.evaluate import perplexity
from sglp_llm.model.rewrite import remove_blocks
from tiny_models import tiny_model, tiny_tokenizer

CONFIG = SGLPConfig(drop=1, seq_len=16, n_samples=8, batch_size=4, cka_minibatch_tokens=16)
SPEED = dict(prompt_tokens=4, new_tokens=3, repeats=1)
HELD_OUT = [
    "the value of a new list is returned",
    "if the file is not found an error is raised",
    "this class is used to create a new object for each name",
]
VARIANT = {"groups": True, "segment_feature": "rows", "num_segments": 2}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    path = tmp_path_factory.mktemp("held-out") / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in HELD_OUT))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer, held_out):
    """One comparison: two methods and an SGLP variant at two drop counts (given unsorted)."""
    model = tiny_model("llama", num_layers=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = compare(
        model, tokenizer, CONFIG, drops=[3, 1], methods=["block-influence", "last"],
        variants={"sglp-rows": VARIANT}, eval_source=str(held_out), progress=False, **SPEED,
    )
    out = result.save(tmp_path_factory.mktemp("compare") / "out")
    return model, state, result, out


def pruned_copy(dropped):
    """The compared model rebuilt from scratch (same seed) with the blocks really removed."""
    return remove_blocks(tiny_model("llama", num_layers=8), dropped)


def test_every_cell_equals_the_model_pruned_with_its_plan(run, tokenizer):
    _, _, result, _ = run
    assert [(r["method"], r["drop"]) for r in result.runs] == [
        ("block-influence", 1), ("block-influence", 3), ("last", 1), ("last", 3), ("sglp-rows", 1), ("sglp-rows", 3),
    ]
    for cell in result.runs:
        model = pruned_copy(cell["dropped"])
        expected = perplexity(model, tokenizer, HELD_OUT, progress=False)
        assert len(cell["dropped"]) == cell["drop"]
        assert cell["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
        assert cell["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-5)
        assert cell["params"] == sum(p.numel() for p in model.parameters())
        assert cell["analysis_s"] == cell["timings"]["total_s"] > 0 and "selection_s" in cell["timings"]
        assert cell["prefill_tokens_per_s"] > 0 and cell["decode_tokens_per_s"] > 0
    dense = perplexity(tiny_model("llama", num_layers=8), tokenizer, HELD_OUT, progress=False)
    assert result.dense["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-5)
    assert result.dense["params"] == sum(p.numel() for p in tiny_model("llama", num_layers=8).parameters())
    assert result.dense["prefill_tokens_per_s"] > 0 and result.dense["decode_tokens_per_s"] > 0
    assert len({c["perplexity"] for c in result.runs}) > 1  # the cells really differ


def test_each_method_chose_its_own_blocks(run):
    _, _, result, _ = run
    dropped = {(r["method"], r["drop"]): r["dropped"] for r in result.runs}
    assert dropped["last", 1] == [6] and dropped["last", 3] == [4, 5, 6]
    variant = CONFIG.replace(drop=3, **VARIANT)
    assert dropped["sglp-rows", 3] == analyze(tiny_model("llama", num_layers=8), None, variant,
                                             tokenizer=tiny_tokenizer(), progress=False).dropped
    assert {r["method"]: r["base_method"] for r in result.runs} == {
        "block-influence": "block-influence", "last": "last", "sglp-rows": "sglp",
    }


def test_the_model_is_left_dense_and_unchanged(run):
    model, state, _, _ = run
    assert len(model.model.layers) == model.config.num_hidden_layers == 8
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(8))
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_plot_lists_methods_best_first_and_keeps_the_competitive_range(tmp_path):
    """Ranked by the mean log-ratio to each drop count's best, so a method measured at the easy
    drop count only does not rank first for it; the top is 4x the largest per-drop best."""
    perplexities = {"good": {1: 10.0, 2: 20.0}, "partial": {1: 11.0}, "exploded": {1: 100.0, 2: 1e6},
                    "close": {1: 10.5, 2: 20.5}}
    runs = [{"method": m, "base_method": "sglp", "drop": d, "perplexity": p}
            for m, cells in perplexities.items() for d, p in cells.items()]
    comparison = Comparison(model="m", num_blocks=8, drops=[1, 2], calibration={}, evaluation={},
                            speed={}, dense={"perplexity": 5.0}, runs=runs)
    assert comparison.plot_order_and_ceiling() == (["good", "close", "partial", "exploded"], 80.0)
    assert comparison.plot(tmp_path / "p.png").read_bytes().startswith(PNG_SIGNATURE)


def test_outputs_json_markdown_and_plot(run):
    _, _, result, out = run
    written = json.loads((out / "compare.json").read_text())
    assert written == json.loads(json.dumps(result.to_dict()))
    assert written["drops"] == [1, 3] and written["num_blocks"] == 8
    assert written["evaluation"]["n_texts"] == 3 and "eval.jsonl" in written["evaluation"]["source"]
    assert written["variants"] == {"sglp-rows": VARIANT}

    md = (out / "compare.md").read_text()
    cells = {(r["method"], r["drop"]): r for r in result.runs}
    ppl_table = md.split("## Held-out perplexity\n\n")[1].split("\n\n")[0].splitlines()
    assert ppl_table[:2] == ["| method | drop 1 | drop 3 |", "|---|---|---|"]
    assert ppl_table[2:] == [
        f"| {m} | {cells[m, 1]['perplexity']:.3f} | {cells[m, 3]['perplexity']:.3f} |"
        for m in ("block-influence", "last", "sglp-rows")
    ]
    assert f"| last | {cells['last', 1]['analysis_s']:.1f} | {cells['last', 3]['analysis_s']:.1f} |" in md
    assert "| last | 6 | 4, 5, 6 |" in md
    assert f"dense model: perplexity {result.dense['perplexity']:.3f}" in md
    assert f"eval.jsonl'; scored 3 texts, {result.dense['n_tokens']:,} tokens" in md
    assert "variants (SGLP runs with other settings): sglp-rows: groups=True, segment_feature=rows, num_segments=2" in md
    assert (out / "compare.png").read_bytes().startswith(PNG_SIGNATURE)


def test_ratios_become_distinct_drop_counts(tokenizer, held_out):
    result = compare(tiny_model("llama", num_layers=8), tokenizer, CONFIG, ratios=[0.25, 0.13, 0.125],
                     methods=["last"], eval_source=str(held_out), progress=False, **SPEED)
    assert result.drops == [1, 2]
    assert [r["dropped"] for r in result.runs] == [[6], [5, 6]]


@pytest.mark.filterwarnings("ignore:The calibration text has")  # the held-out file is short
@pytest.mark.parametrize("calibration", ["docstrings", "held-out file"])
def test_warns_when_held_out_text_is_the_calibration_text(tokenizer, held_out, calibration):
    if calibration == "docstrings":
        config, source = CONFIG.replace(dataset="builtin:stdlib-docs"), "builtin:stdlib-docs"
    else:
        config, source = CONFIG.replace(dataset=str(held_out)), str(held_out)
    with pytest.warns(UserWarning, match=re.escape(f"The evaluation text {source!r} is the calibration text")):
        compare(tiny_model("llama", num_layers=8), tokenizer, config, drops=[1], methods=["last"],
                eval_source=source, eval_max_texts=2, progress=False, **SPEED)


def test_by_default_every_contender_calibrates_on_the_models_own_samples(tokenizer):
    """Unset, the calibration is the model's own text (as analyze's), so the docstrings are
    held out: no warning, and every run names the samples."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = compare(tiny_model("llama", num_layers=8), tokenizer, CONFIG, drops=[1], methods=["last", "sglp"],
                         eval_source="builtin:stdlib-docs", eval_max_texts=2, progress=False, **SPEED)
    assert set(result.calibration) == {"last", "sglp"}
    assert all(source.startswith("the model's own samples") for source in result.calibration.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"methods": ["last", "shortgpt"]}, "Unknown or no method(s) ['shortgpt']: choose from sglp, block-influence"),
        ({"methods": []}, "Unknown or no method(s) []: choose from"),
        ({"variants": {"last": {"seed": 1}}}, "Variant name 'last' is already taken by a method or variant; rename it."),
        ({"variants": {"v": {"drop": 2}}}, "Variant 'v' sets drop or ratio: the drop counts of a comparison come "
                                           "from --drops or --ratios and are the same for every method."),
        ({"variants": {"v": {"segment": "rows"}}}, "Unknown setting(s) ['segment']"),
        ({"drops": None}, "Give the drop counts to compare: drops (e.g. 3,6,9) or ratios (e.g. 0.1,0.2,0.3), not both."),
        ({"ratios": [0.1]}, "Give the drop counts to compare"),
        ({"drops": []}, "Give the drop counts to compare"),
        ({"drops": [1, 7]}, "Cannot drop 7 of 8 blocks: at most 5 can go"),
        ({"variants": {"v": {"protect_first": 5}}}, "Cannot drop 2 of 8 blocks: at most 1 can go (protect_first=5"),
    ],
)
def test_errors_come_before_any_analysis(tokenizer, monkeypatch, kwargs, message):
    import sglp_llm.compare

    monkeypatch.setattr(sglp_llm.compare, "analyze", lambda *a, **k: pytest.fail("analysis started"))
    monkeypatch.setattr(sglp_llm.compare, "perplexity", lambda *a, **k: pytest.fail("evaluation started"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        compare(tiny_model("llama", num_layers=8), tokenizer, CONFIG, **{"drops": [1, 2], "methods": ["last"], **kwargs})


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("sglp-rows:segment_feature=rows", ("sglp-rows", {"segment_feature": "rows"})),
        (" k2 : num_segments=2, cka_dtype=float32,max_segments=null",
         ("k2", {"num_segments": 2, "cka_dtype": "float32", "max_segments": None})),
        ("fast:ratio=0.5,scoring=subset", ("fast", {"ratio": 0.5, "scoring": "subset"})),
    ],
)
def test_parse_variant(spec, expected):
    assert parse_variant(spec) == expected


@pytest.mark.parametrize("spec", ["rows", ":seed=1", "v:", "v:seed", "v:=1", "v:seed=", "v:seed=1,", "v:seed=@x"])
def test_parse_variant_rejects_malformed_specs(spec):
    with pytest.raises(ConfigError, match=re.escape(
        f"Variant {spec!r} is not of the form name:key=value,key=value, e.g. sglp-rows:segment_feature=rows."
    )):
        parse_variant(spec)


def test_default_eval_source_is_fortunes_when_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FORTUNES_DIR", tmp_path)
    assert default_eval_source() == "builtin:fortunes"
    monkeypatch.setattr(data, "FORTUNES_DIR", tmp_path / "missing")
    assert default_eval_source() is None


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", num_layers=8).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CLI_FAST = ["--seq-len", "16", "--n-samples", "8", "--batch-size", "4", "--cka-minibatch-tokens", "16",
            "--prompt-tokens", "4", "--new-tokens", "2", "--repeats", "1", "--no-progress"]


def test_cli_compare_writes_the_three_files(model_dir, held_out, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(model_dir), "--drops", "2,1", "--methods", "last,random",
            "--variant", "k1:groups=true,num_segments=1", "--eval-dataset", str(held_out), "--eval-max-texts", "2",
            "--compensations", "none,rescale", "--output", str(out), *CLI_FAST]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    written = json.loads((out / "compare.json").read_text())
    assert [(r["method"], r["drop"]) for r in written["runs"]] == [
        (name, drop) for method in ("last", "random", "k1") for drop in (1, 2) for name in (method, method + "+rescale")
    ]
    assert written["evaluation"]["n_texts"] == 2 and written["model"] == str(model_dir)
    expected = perplexity(pruned_copy(written["runs"][2]["dropped"]), tiny_tokenizer(), HELD_OUT[:2], progress=False)
    assert written["runs"][2]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert "| method | drop 1 | drop 2 |" in printed
    assert f"Comparison written to {out}: compare.json, compare.md, compare.png" in printed
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "compare.png"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--drops", "1,x", "--output", "OUT"], "--drops takes comma-separated int values, e.g. --drops 3,6,9; got '1,x'."),
        (["--ratios", "0.1;0.2", "--output", "OUT"], "--ratios takes comma-separated float values"),
        (["--drops", "1"], "Say where to write the comparison: --output DIR"),
        (["--drops", "1", "--output", "OUT", "--variant", "a:seed=1", "--variant", "a:seed=2"],
         "Each --variant needs its own name; got ['a', 'a']."),
        (["--drops", "1", "--output", "OUT", "--variant", "a"], "Variant 'a' is not of the form"),
        (["--drops", "1", "--output", "FULL"], "already exists and is not empty"),
        (["--drops", "1", "--output", "OUT", "--offload", "sequential", "--blocks-on-disk"], "needs the model whole"),
    ],
)
def test_cli_compare_errors(model_dir, tmp_path, capsys, argv, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.md").write_text("x")
    paths = {"OUT": str(tmp_path / "out"), "FULL": str(tmp_path / "full")}
    assert main(["compare", "--model", str(model_dir), *[paths.get(a, a) for a in argv], "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_compare_needs_drops_or_ratios(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--output", "x"])
    assert "one of the arguments --drops --ratios is required" in capsys.readouterr().err


def test_resume_keeps_measured_runs_and_on_result_sees_each_step(run, tokenizer, held_out, monkeypatch):
    import sglp_llm.compare as compare_module

    _, _, full, _ = run
    partial = compare_module.Comparison(**{**full.to_dict(), "runs": full.runs[:3]})
    assert "–" in partial.markdown()  # missing cells render, so a partial result can be saved
    calls = []
    monkeypatch.setattr(compare_module, "perplexity", lambda *a, **k: calls.append(1) or perplexity(*a, **k))
    seen = []
    resumed = compare(
        tiny_model("llama", num_layers=8), tokenizer, CONFIG, drops=[3, 1], methods=["block-influence", "last"],
        variants={"sglp-rows": VARIANT}, eval_source=str(held_out), progress=False, resume=partial,
        on_result=lambda c: seen.append(len(c.runs)), **SPEED,
    )
    assert len(calls) == len(full.runs) - 3  # neither the dense model nor the kept runs again
    assert seen == list(range(4, len(full.runs) + 1))
    key = lambda r: (r["method"], r["drop"])
    for a, b in zip(sorted(resumed.runs, key=key), sorted(full.runs, key=key)):
        assert a["dropped"] == b["dropped"] and a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)


def test_comparison_loads_what_it_saved(run):
    from sglp_llm.compare import Comparison

    _, _, result, out = run
    assert Comparison.load(out) == result


def test_intermediate_saves_keep_resumed_runs_not_reached_yet(run, tokenizer, held_out):
    _, _, full, _ = run
    last_run = full.runs[-1]  # reached last: every intermediate save must still hold it
    from sglp_llm.compare import Comparison

    partial = Comparison(**{**full.to_dict(), "runs": [last_run]})
    saved = []
    compare(
        tiny_model("llama", num_layers=8), tokenizer, CONFIG, drops=[3, 1], methods=["block-influence", "last"],
        variants={"sglp-rows": VARIANT}, eval_source=str(held_out), progress=False, resume=partial,
        on_result=lambda c: saved.append(c.runs), **SPEED,
    )
    assert all(last_run in runs for runs in saved)


def test_cli_compare_writes_from_the_main_process_only(model_dir, held_out, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sglp_llm.passes.distributed.is_main_process", lambda: False)
    argv = ["compare", "--model", str(model_dir), "--drops", "1", "--methods", "last", "--eval-dataset",
            str(held_out), "--eval-max-texts", "2", "--output", str(tmp_path / "cmp"), *CLI_FAST]
    assert main(argv) == 0
    assert not (tmp_path / "cmp").exists() and "Comparison written" not in capsys.readouterr().out


def test_resuming_with_other_variants_keeps_the_earlier_descriptions(run, tokenizer, held_out):
    _, _, full, _ = run
    assert "sglp-rows" in full.variants and "sglp-rows" in full.calibration
    resumed = compare(
        tiny_model("llama", num_layers=8), tokenizer, CONFIG, drops=[3, 1], methods=["last"],
        variants={"k1": {"groups": True, "num_segments": 1}}, eval_source=str(held_out), progress=False, resume=full, **SPEED,
    )
    assert resumed.variants == {**full.variants, "k1": {"groups": True, "num_segments": 1}}
    assert set(resumed.calibration) == set(full.calibration) | {"k1"}
    assert {r["method"] for r in resumed.runs} >= {r["method"] for r in full.runs} | {"k1"}


def test_compensations_cross_every_plan_and_equal_prune_with_that_compensation(tokenizer, held_out):
    from sglp_llm import prune

    model = tiny_model("llama", num_layers=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = compare(model, tokenizer, CONFIG, drops=[2], methods=["last", "block-influence"],
                     compensations=["none", "least_squares", "rescale"], eval_source=str(held_out), progress=False,
                     **SPEED)
    assert [(r["method"], r["base_method"], r["compensation"]) for r in result.runs] == [
        ("last", "last", "none"), ("last+least_squares", "last", "least_squares"), ("last+rescale", "last", "rescale"),
        ("block-influence", "block-influence", "none"),
        ("block-influence+least_squares", "block-influence", "least_squares"),
        ("block-influence+rescale", "block-influence", "rescale"),
    ]
    for cell in result.runs:
        settings = CONFIG.replace(drop=2, method=cell["base_method"], compensation=cell["compensation"])
        pruned = prune(tiny_model("llama", num_layers=8), None, settings, tokenizer=tokenizer, progress=False)
        assert pruned.plan.dropped == cell["dropped"]
        expected = perplexity(pruned.model, tokenizer, HELD_OUT, progress=False)["perplexity"]
        assert cell["perplexity"] == pytest.approx(expected, rel=1e-5), cell["method"]
    assert len({round(c["perplexity"], 6) for c in result.runs}) == 6  # each compensation changes the model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # folded, then taken out
    assert "| last+rescale |" in result.markdown()


def test_a_compensation_that_cannot_fold_is_reported_not_measured(tokenizer, held_out):
    result = compare(tiny_model("gemma2", num_layers=6), tokenizer, CONFIG, drops=[1], methods=["last"],
                     compensations=["least_squares", "rescale"], eval_source=str(held_out), progress=False, **SPEED)
    assert [r["method"] for r in result.runs] == ["last+rescale"]
    assert "added to the residual stream as it is" in result.refused["last+least_squares"]
    assert "not measured, the compensation refused: last+least_squares:" in result.markdown()
    with pytest.raises(ConfigError, match="Unknown compensation"):
        compare(tiny_model("llama", num_layers=4), tokenizer, CONFIG, drops=[1], methods=["last"],
                compensations=["lstsq"], eval_source=str(held_out), progress=False, **SPEED)
