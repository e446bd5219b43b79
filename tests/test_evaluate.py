"""Evaluation: perplexity against direct references, lm-eval on the shipped task, the CLI."""

from __future__ import annotations

import json
import math
import re
import sys
import warnings
from types import SimpleNamespace

import datasets
import pytest
import torch

from sglp_llm.evaluation import evaluate
from sglp_llm.cli import main
from sglp_llm.config import SGLPConfig
from sglp_llm.evaluation.evaluate import (
    EVAL_TEXT,
    EvaluationError,
    generation_speed,
    perplexity,
    perplexity_on_source,
    run_lm_eval,
    warn_if_not_held_out,
)
from tiny_models import tiny_model

PARAGRAPHS = [json.loads(line)["text"] for line in EVAL_TEXT.read_text().splitlines()]
# Non-ASCII words: bytes-per-byte must count UTF-8 bytes, not characters.
SHORT = "Le café naïve était fermé, so the crème brûlée waited until morning."


def model_for(tokenizer, seed: int = 0):
    return tiny_model("llama", num_layers=2, seed=seed, vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def tokenizer(make_word_tokenizer):
    return make_word_tokenizer([*PARAGRAPHS, SHORT])


@pytest.fixture(scope="module")
def model(tokenizer):
    return model_for(tokenizer)


@pytest.fixture(scope="module")
def model_dir(model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-eval")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------- perplexity
@pytest.mark.parametrize(
    "bos, eos, prefix",
    [(True, True, [1]), (False, True, [2]), (False, False, [])],  # lm-eval's prefix: BOS, else EOS
)
def test_single_window_is_exp_mean_nll_of_one_forward(make_word_tokenizer, bos, eos, prefix):
    tokenizer = make_word_tokenizer([SHORT], bos=bos, eos=eos)
    model = model_for(tokenizer)
    ids = torch.tensor([prefix + ids_of(tokenizer, SHORT)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    token_nll = -logprobs.gather(1, ids[0, 1:, None])[:, 0]

    result = perplexity(model, tokenizer, [SHORT], progress=False)

    n_bytes = len(SHORT.encode("utf-8"))
    assert n_bytes > len(SHORT)
    assert result["n_tokens"] == ids.shape[1] - 1 == len(ids_of(tokenizer, SHORT)) - (not prefix)
    assert result["n_bytes"] == n_bytes
    assert result["nll"] == pytest.approx(token_nll.mean().item(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(token_nll.mean().item()), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(token_nll.sum().item() / math.log(2) / n_bytes, rel=1e-5)
    assert (result["max_length"], result["stride"]) == (128, 64)  # tiny model: 128 positions


def hf_strided(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """Total NLL and token count of the strided loop in the transformers perplexity guide."""
    input_ids = torch.tensor([ids])
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = input_ids[:, begin:end]
        labels = window.clone()
        labels[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())  # the model shifts labels left by one
        total, count, prev_end = total + loss.item() * n, count + n, end
        if end == len(ids):
            break
    return total, count


@pytest.mark.parametrize("max_length, stride", [(16, 5), (16, 8), (10, 9), (6, 1)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_strided_window_equals_transformers_guide_loop(model, max_length, stride, batch_size, tokenizer):
    texts = [PARAGRAPHS[0], SHORT, PARAGRAPHS[1][:40]]
    reference = [hf_strided(model, [1] + ids_of(tokenizer, t), max_length, stride) for t in texts]
    total, count = map(sum, zip(*reference))

    result = perplexity(model, tokenizer, texts, max_length=max_length, stride=stride,
                        batch_size=batch_size, progress=False)

    assert result["n_tokens"] == count == sum(len(ids_of(tokenizer, t)) for t in texts)
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_context_matters_so_windows_are_really_tested(model, tokenizer):
    """A shorter left context changes the score: the reference comparison above can fail."""
    full = perplexity(model, tokenizer, [PARAGRAPHS[0]], progress=False)
    short = perplexity(model, tokenizer, [PARAGRAPHS[0]], max_length=6, stride=5, progress=False)
    assert full["n_tokens"] == short["n_tokens"]
    assert abs(full["nll"] - short["nll"]) > 1e-3


def test_perplexity_on_source_reads_data_like_calibration(model, tmp_path, tokenizer):
    rows = [{"body": t} for t in PARAGRAPHS[:3]]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    result = perplexity_on_source(model, tokenizer, str(path), text_column="body", max_texts=2, progress=False)
    default = perplexity_on_source(model, tokenizer, max_texts=2, progress=False)

    direct = perplexity(model, tokenizer, PARAGRAPHS[:2], progress=False)
    assert {k: result[k] for k in direct} == direct
    assert "eval.jsonl" in result["source"]
    assert {k: default[k] for k in direct} == direct  # the default is the shipped held-out text
    assert default["source"].startswith("built-in evaluation text: 36 English paragraphs")
    assert result["source"].endswith("; scored its first 2 texts")  # what the card's row says
    assert "scored its first" not in perplexity_on_source(model, tokenizer, str(path), text_column="body",
                                                          progress=False)["source"]


@pytest.mark.parametrize(
    "texts, kwargs, message",
    [
        ([], {}, "No text to evaluate: give at least one non-empty text."),
        (["  ", ""], {}, "No text to evaluate"),
        ([SHORT], {"max_length": 129}, "max_length=129 must be at least 2 and at most the model's max_position_embeddings=128"),
        ([SHORT], {"max_length": 1}, "max_length=1 must be at least 2"),
        ([SHORT], {"max_length": 8, "stride": 8}, "stride=8 must be between 1 and max_length - 1 = 7"),
        ([SHORT], {"stride": 0}, "stride=0 must be between 1"),
    ],
)
def test_perplexity_errors(model, texts, kwargs, message, tokenizer):
    with pytest.raises(EvaluationError, match=re.escape(message)):
        perplexity(model, tokenizer, texts, progress=False, **kwargs)


def test_nothing_to_predict_without_bos_or_eos(make_word_tokenizer):
    tokenizer = make_word_tokenizer(["word"], bos=False, eos=False)
    with pytest.raises(EvaluationError, match="give no token to predict .* give longer texts"):
        perplexity(model_for(tokenizer), tokenizer, ["word"], progress=False)


def test_max_texts_must_be_positive(model, tokenizer):
    with pytest.raises(EvaluationError, match=re.escape("max_texts=0 must be at least 1")):
        perplexity_on_source(model, tokenizer, max_texts=0)


@pytest.mark.parametrize(
    "calibration, source, eval_kwargs",
    [
        ({}, "builtin:stdlib-docs", {}),  # no dataset: calibration is the stdlib docs
        ({"dataset": "builtin:fortunes"}, "builtin:fortunes", {}),
        ({"dataset": str(EVAL_TEXT)}, None, {}),  # no source: evaluation is EVAL_TEXT
        ({"dataset": "EVAL_DIR/../tasks/sglp_local_ppl.jsonl"}, str(EVAL_TEXT), {}),  # same file, other spelling
        ({"dataset": "org/texts", "dataset_split": "test"}, "org/texts", {"split": "test"}),
    ],
)
def test_warns_when_evaluation_text_is_calibration_text(calibration, source, eval_kwargs):
    calibration = {k: v.replace("EVAL_DIR", str(EVAL_TEXT.parent)) for k, v in calibration.items()}
    with pytest.warns(UserWarning, match=r"is the calibration text: its perplexity measures fit to the data the "
                                         r"blocks were chosen on, not held-out quality\. Evaluate on another dataset\."):
        warn_if_not_held_out(SGLPConfig(drop=1, **calibration), source, **eval_kwargs)


@pytest.mark.parametrize(
    "calibration, source, eval_kwargs",
    [
        ({}, None, {}),
        ({}, "builtin:fortunes", {}),
        ({"dataset": "org/texts"}, "org/texts", {"split": "test"}),  # another split is held out
        ({"dataset": "org/texts", "dataset_config": "a"}, "org/texts", {"config_name": "b"}),
    ],
)
def test_no_warning_for_held_out_text(calibration, source, eval_kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_not_held_out(SGLPConfig(drop=1, **calibration), source, **eval_kwargs)


# ---------------------------------------------------------------------------------- speed
def test_generation_speed_reads_the_streamed_token_times(model, monkeypatch):
    """A scripted clock, read once per streamed chunk: the prompt, then each of 5 new tokens.
    The warm-up run is slow and must not count; the others differ, so the median is tested."""
    prompt_tokens, new_tokens = 8, 5
    runs = [(50.0, 9.0), (2.0, 0.5), (4.0, 0.25), (3.0, 1.0)]  # (prefill s, s per decoded token)
    stamps = iter(
        t
        for i, (prefill, step) in enumerate(runs)
        for t in [100.0 * i] + [100.0 * i + prefill + step * k for k in range(new_tokens)]
    )
    monkeypatch.setattr(evaluate, "time", SimpleNamespace(perf_counter=lambda: next(stamps)))

    speed = generation_speed(model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=3)

    assert next(stamps, None) is None  # every run streamed the prompt and exactly 5 tokens
    assert speed == {
        "prefill_tokens_per_s": pytest.approx(prompt_tokens / 3.0),
        "decode_tokens_per_s": pytest.approx(2.0),
        "prompt_tokens": 8,
        "new_tokens": 5,
        "repeats": 3,
    }


def test_generation_speed_leaves_the_model_in_its_mode(model):
    model.train()
    try:
        speed = generation_speed(model, prompt_tokens=4, new_tokens=2, repeats=1)
        assert model.training
    finally:
        model.eval()
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"new_tokens": 1}, "Speed needs prompt_tokens >= 1, new_tokens >= 2 and repeats >= 1; got 8, 1 and 5."),
        ({"prompt_tokens": 0}, "Speed needs prompt_tokens >= 1, new_tokens >= 2 and repeats >= 1; got 0, 32 and 5."),
        ({"repeats": 0}, "got 8, 32 and 0."),
        ({"prompt_tokens": 100, "new_tokens": 29}, "prompt_tokens + new_tokens = 129 exceeds the model's "
                                                    "max_position_embeddings=128; use a shorter prompt or fewer new tokens."),
    ],
)
def test_generation_speed_errors(model, kwargs, message):
    with pytest.raises(EvaluationError, match=re.escape(message)):
        generation_speed(model, **{"prompt_tokens": 8, **kwargs})


# ---------------------------------------------------------------------------------- lm-eval


def test_lm_eval_in_memory_matches_own_perplexity(model, tmp_path, monkeypatch, tokenizer):
    """lm-eval's rolling loglikelihood is an independent implementation of the same numbers."""
    monkeypatch.chdir(tmp_path)  # the task's data file must not depend on the working directory
    results = run_lm_eval(model, tokenizer, tasks=["sglp_local_ppl"], limit=3)

    own = perplexity(model, tokenizer, PARAGRAPHS[:3], progress=False)  # one window per text
    metrics = results["sglp_local_ppl"]
    total_nll = own["nll"] * own["n_tokens"]
    words = sum(len(re.split(r"\s+", t)) for t in PARAGRAPHS[:3])
    assert metrics["bits_per_byte"] == pytest.approx(own["bits_per_byte"], rel=1e-4)
    assert metrics["word_perplexity"] == pytest.approx(math.exp(total_nll / words), rel=1e-4)
    assert metrics["byte_perplexity"] == pytest.approx(2 ** own["bits_per_byte"], rel=1e-4)


def test_lm_eval_from_saved_dir_equals_in_memory(model, model_dir, tokenizer):
    from_dir = run_lm_eval(str(model_dir), tasks=["sglp_local_ppl"], limit=2, device="cpu")
    in_memory = run_lm_eval(model, tokenizer, tasks=["sglp_local_ppl"], limit=2)
    assert math.isfinite(from_dir["sglp_local_ppl"]["bits_per_byte"])
    assert from_dir["sglp_local_ppl"] == pytest.approx(in_memory["sglp_local_ppl"], rel=1e-5)


def test_lm_eval_own_task_from_include_path(model, tokenizer, tmp_path):
    (tmp_path / "mine.yaml").write_text(f"include: {EVAL_TEXT.with_suffix('.yaml')}\ntask: my_ppl\n")
    results = run_lm_eval(model, tokenizer, tasks=["my_ppl", "sglp_local_ppl"], include_path=tmp_path, limit=1)
    assert results["my_ppl"] == pytest.approx(results["sglp_local_ppl"], rel=1e-6)
    assert results["my_ppl"]["sample_len"] == 1


def test_unknown_task_suggests_close_names(model, tokenizer):
    with pytest.raises(EvaluationError, match=re.escape(
        "Unknown lm-eval task(s): sglp_local_pp (did you mean sglp_local_ppl?). List the known "
        "ones with `lm-eval ls tasks`; for your own task YAML files give their folder with --include-path."
    )):
        run_lm_eval(model, tokenizer, tasks=["sglp_local_pp"])


@pytest.mark.parametrize(
    "with_tokenizer, kwargs, message",
    [
        (True, {"tasks": []}, "No lm-eval task given: name at least one, e.g. --tasks sglp_local_ppl."),
        (False, {"tasks": ["sglp_local_ppl"]}, "A model given in memory needs its tokenizer: pass tokenizer=..."),
        (True, {"tasks": ["sglp_local_ppl"], "device": "cpu"},
         "device applies only to a model that lm-eval loads from a path; move the in-memory model with model.to(device) instead."),
        (True, {"tasks": ["sglp_local_ppl"], "include_path": "/no/such/dir"},
         "The lm-eval include path '/no/such/dir' is not a directory; give the folder of your task YAML files."),
    ],
)
def test_lm_eval_argument_errors(model, tokenizer, with_tokenizer, kwargs, message):
    with pytest.raises(EvaluationError, match=re.escape(message)):
        run_lm_eval(model, tokenizer if with_tokenizer else None, **kwargs)


def test_missing_lm_eval_says_how_to_install(model, monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(EvaluationError, match=re.escape("run `pip install 'sglp-llm[eval]'`")):
        run_lm_eval(model, tokenizer, tasks=["sglp_local_ppl"])


# ---------------------------------------------------------------------------------- CLI
def test_cli_eval_defaults_to_held_out_text(model, model_dir, tmp_path, capsys, tokenizer):
    out = tmp_path / "results.json"
    assert main(["eval", str(model_dir), "--max-texts", "4", "--output-json", str(out), "--no-progress"]) == 0

    captured = capsys.readouterr()
    assert "No --dataset or --tasks given: perplexity on the built-in held-out English text." in captured.err
    written = json.loads(out.read_text())
    expected = perplexity(model, tokenizer, PARAGRAPHS[:4], progress=False)
    assert written["model"] == str(model_dir)
    assert written["perplexity"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert f"Perplexity {expected['perplexity']:.3f}" in captured.out
    assert "tasks" not in written


def test_cli_eval_dataset_and_tasks(model, model_dir, tmp_path, capsys, tokenizer):
    data = tmp_path / "texts.csv"
    data.write_text("body\n" + "\n".join(f'"{t}"' for t in PARAGRAPHS[5:7]) + "\n")
    out = tmp_path / "results.json"
    argv = ["eval", str(model_dir), "--dataset", str(data), "--text-column", "body", "--max-length", "16",
            "--stride", "4", "--batch-size", "2", "--tasks", "sglp_local_ppl", "--limit", "2",
            "--output-json", str(out), "--no-progress"]
    assert main(argv) == 0

    written = json.loads(out.read_text())
    expected = perplexity(model, tokenizer, PARAGRAPHS[5:7], max_length=16, stride=4, progress=False)
    assert written["perplexity"]["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert written["perplexity"]["stride"] == 4
    assert math.isfinite(written["tasks"]["sglp_local_ppl"]["bits_per_byte"])
    assert "sglp_local_ppl: " in capsys.readouterr().out


def test_cli_eval_reports_errors(model_dir, capsys):
    assert main(["eval", str(model_dir), "--stride", "0", "--no-progress"]) == 2
    assert "sglp-llm: error: stride=0 must be between 1" in capsys.readouterr().err
