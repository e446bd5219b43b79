"""Calibration on the model's own samples (`builtin:self-generated`): what is sampled, how it is
seeded, and how it reaches an analysis, a mixed calibration and the command line."""

from __future__ import annotations

import json

import pytest
import torch

from sglp_llm import SGLPConfig, analyze
from sglp_llm import data
from sglp_llm.cli import main
from sglp_llm.data import SELF_GENERATED, CalibrationError, build_batches, load_texts, prepare_calibration
from sglp_llm.model.handle import ModelHandle
from sglp_llm.output.modelcard import render_model_card
from sglp_llm.passes import sampling
from sglp_llm.passes.sampling import SamplingError, sample_windows
from tiny_models import save_tiny_model, tiny_model, tiny_tokenizer

TOP_P = 0.95


def _inverse_cdf(kept: torch.Tensor) -> torch.Tensor:
    """Each row's draw from `kept` (unnormalised): the first position whose cumulative mass
    exceeds one uniform draw times the row's total."""
    cumulative = kept.double().cumsum(-1)
    uniform = torch.rand(len(kept), 1, dtype=torch.float64) * cumulative[:, -1:]
    return (cumulative <= uniform).sum(-1, keepdim=True)


def _nucleus_reference(model, start: int, eos: int, n: int, seq_len: int, seed: int, chunk: int) -> torch.Tensor:
    """Brute force: the whole prefix through the model at every step (no cache), the end-of-text
    token forbidden, the whole vocabulary sorted and the smallest most-probable set of tokens
    holding TOP_P of the mass kept, one draw per row among them (most probable first) from the
    global generator seeded once (one uniform per row), `chunk` rows at a time."""
    torch.manual_seed(seed)
    out = []
    for first in range(0, n, chunk):
        ids = torch.full((min(chunk, n - first), 1), start)
        for _ in range(seq_len - 1):
            with torch.no_grad():
                logits = model(ids).logits[:, -1].float()
            logits[:, eos] = -torch.inf
            probs = logits.softmax(-1)
            ordered, order = probs.sort(dim=-1, descending=True)
            mass_before = ordered.cumsum(-1) - ordered  # of the strictly more probable tokens
            ids = torch.cat([ids, order.gather(-1, _inverse_cdf(ordered.masked_fill(mass_before >= TOP_P, 0)))], dim=1)
        out.append(ids)
    return torch.cat(out)


def test_windows_are_the_models_nucleus_samples_from_the_start_token_seeded(monkeypatch):
    model, tok = tiny_model(), tiny_tokenizer()
    monkeypatch.setattr(sampling, "SAMPLING_BATCH", 2)  # three chunks: the generator runs on across them
    monkeypatch.setattr(sampling, "NUCLEUS_FIRST_K", 2)  # the nucleus looked for among 2, 16, then every token
    state = torch.random.get_rng_state()
    windows = sample_windows(ModelHandle.of(model), tok, 5, 12, 3, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is untouched
    assert windows.shape == (5, 12) and (windows[:, 0] == tok.bos_token_id).all()
    assert not (windows[:, 1:] == tok.eos_token_id).any()  # never ended early
    reference = _nucleus_reference(model, tok.bos_token_id, tok.eos_token_id, 5, 12, seed=3, chunk=2)
    assert torch.equal(windows, reference)
    assert torch.equal(sample_windows(ModelHandle.of(model), tok, 5, 12, 3, progress=False), windows)
    assert not torch.equal(sample_windows(ModelHandle.of(model), tok, 5, 12, 4, progress=False), windows)


def test_the_draw_looks_among_more_tokens_only_until_the_nucleus_is_found(monkeypatch):
    monkeypatch.setattr(sampling, "NUCLEUS_FIRST_K", 2)
    scores = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 6
    ordered, order = scores.softmax(-1).sort(dim=-1, descending=True)
    mass_before = ordered.cumsum(-1) - ordered
    nucleus = (mass_before < TOP_P).sum(-1)
    assert 16 < nucleus.max() <= 128 < 1000  # found among 128 tokens, after two widenings
    torch.manual_seed(1)
    expected = order.gather(-1, _inverse_cdf(ordered.masked_fill(mass_before >= TOP_P, 0)))
    torch.manual_seed(1)
    drawn = sampling.NucleusDraw(TOP_P, never=[])(torch.zeros(64, 1, dtype=torch.long), scores)
    assert (drawn.isfinite().sum(-1) == 1).all()  # one token singled out per row, for generate's greedy step
    assert torch.equal(drawn.argmax(-1, keepdim=True), expected)


def test_the_models_generation_defaults_do_not_change_what_is_sampled():
    model, tok = tiny_model(), tiny_tokenizer()
    plain = sample_windows(ModelHandle.of(model), tok, 3, 8, 0, progress=False)
    model.generation_config.update(temperature=0.3, top_k=5, repetition_penalty=1.5, no_repeat_ngram_size=2)
    model.train()
    assert torch.equal(sample_windows(ModelHandle.of(model), tok, 3, 8, 0, progress=False), plain)
    assert model.training  # put back as it was


def test_no_token_that_ends_a_text_is_drawn_the_generation_configs_included():
    model, tok = tiny_model(), tiny_tokenizer()
    plain = sample_windows(ModelHandle.of(model), tok, 20, 24, 0, progress=False)
    other_end = int(plain[:, 1:].flatten().mode().values)  # a token drawn often when nothing forbids it
    model.generation_config.eos_token_id = [tok.eos_token_id, other_end]  # as Gemma's lists two
    windows = sample_windows(ModelHandle.of(model), tok, 20, 24, 0, progress=False)
    assert windows.shape == (20, 24) and not torch.isin(windows[:, 1:], torch.tensor([tok.eos_token_id, other_end])).any()


def test_a_device_map_naming_the_disk_samples_and_a_failed_sampling_leaves_the_mode_as_it_was(monkeypatch):
    model, tok = tiny_model(), tiny_tokenizer()
    plain = sample_windows(ModelHandle.of(model), tok, 2, 8, 0, progress=False)
    model.hf_device_map = {"model": "cpu", "lm_head": "disk"}  # accelerate's names: "disk" is no torch device
    assert torch.equal(sample_windows(ModelHandle.of(model), tok, 2, 8, 0, progress=False), plain)
    model.train()

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "generate", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        sample_windows(ModelHandle.of(model), tok, 2, 8, 0, progress=False)
    assert model.training


def test_an_analysis_on_the_models_samples_equals_one_on_those_windows_given_as_batches():
    model, tok = tiny_model(), tiny_tokenizer()
    config = SGLPConfig(drop=2, dataset=SELF_GENERATED, n_samples=6, seq_len=16, batch_size=4,
                        cka_minibatch_tokens=16, stability_check=False)
    plan = analyze(model, None, config, tokenizer=tok, progress=False)
    windows = sample_windows(ModelHandle.of(model), tok, 6, 16, config.seed, progress=False)
    given = analyze(model, [{"input_ids": w} for w in windows.split(4)], config, tokenizer=tok, progress=False)
    assert plan.dropped == given.dropped and plan.n_tokens == given.n_tokens == 96
    assert plan.calibration_source == f"the model's own samples (from its beginning-of-text token, seed {config.seed})"


def test_mixed_with_a_text_the_samples_alternate_with_its_windows():
    model, tok = tiny_model(), tiny_tokenizer()
    config = SGLPConfig(drop=1, dataset=[SELF_GENERATED, data.STDLIB_DOCS], n_samples=4, seq_len=8, batch_size=3)
    sampler = sampling.model_sampler(ModelHandle.of(model), tok, progress=False)
    mixed = prepare_calibration(None, tok, config, sampler=sampler)
    rows = torch.cat([b["input_ids"] for b in mixed.batches])
    samples = sample_windows(ModelHandle.of(model), tok, 2, 8, config.seed, progress=False)
    docs = build_batches(tok, load_texts(data.STDLIB_DOCS)[0], seq_len=8, n_samples=2, batch_size=2, seed=config.seed)
    assert torch.equal(rows, torch.stack([samples[0], docs.batches[0]["input_ids"][0], samples[1],
                                          docs.batches[0]["input_ids"][1]]))
    assert mixed.source.startswith("2 windows of the model's own samples")


def test_refusals_say_what_to_do_instead():
    model, tok = tiny_model(), tiny_tokenizer()
    config = SGLPConfig(drop=1, dataset=SELF_GENERATED, n_samples=2, seq_len=8)
    with pytest.raises(CalibrationError, match="samples the model being pruned, and none was given here"):
        prepare_calibration(None, tok, config)
    with pytest.raises(CalibrationError, match="a calibration source only"):
        load_texts(SELF_GENERATED)  # held-out or training text
    with pytest.raises(SamplingError, match="one block at a time .* Load it with a device map"):
        analyze(model, None, config.replace(offload="sequential"), tokenizer=tok, progress=False)
    tok.bos_token, tok.eos_token = None, None
    with pytest.raises(SamplingError, match="No tokenizer with a beginning- or end-of-text token"):
        sample_windows(ModelHandle.of(model), tok, 2, 8, 0, progress=False)


def test_unset_the_calibration_is_the_models_own_samples_where_it_can_sample_them():
    """The default calibration: the same plan as naming the samples; one block at a time (no
    generate) or with no start token, the docstrings, and the plan says why."""
    model, tok = tiny_model(), tiny_tokenizer()
    config = SGLPConfig(drop=2, n_samples=4, seq_len=16, batch_size=4, cka_minibatch_tokens=16, stability_check=False)
    unset = analyze(model, None, config, tokenizer=tok, progress=False)
    named = analyze(model, None, config.replace(dataset=SELF_GENERATED), tokenizer=tok, progress=False)
    assert unset.config["dataset"] == SELF_GENERATED and unset.calibration_source == named.calibration_source
    assert "the model's own samples" in unset.calibration_source and "calibration_not_sampled" not in unset.extra
    assert (unset.dropped, unset.scores, unset.cka) == (named.dropped, named.scores, named.cka)

    docstrings = analyze(model, None, config.replace(dataset=data.STDLIB_DOCS), tokenizer=tok, progress=False)
    blockwise = analyze(model, None, config.replace(offload="sequential"), tokenizer=tok, progress=False)
    assert blockwise.config["dataset"] == data.STDLIB_DOCS and blockwise.calibration_source == docstrings.calibration_source
    assert "one block at a time" in blockwise.extra["calibration_not_sampled"]
    assert "- not the model's own samples (the default): Sampling the model's own text runs its generate()" in \
        render_model_card(blockwise, base_model="tiny")
    assert "not the model's own samples" not in render_model_card(unset, base_model="tiny")
    assert blockwise.dropped == docstrings.dropped
    tok.bos_token, tok.eos_token = None, None
    no_start = analyze(model, None, config, tokenizer=tok, progress=False)
    assert no_start.config["dataset"] == data.STDLIB_DOCS
    assert "beginning- or end-of-text token" in no_start.extra["calibration_not_sampled"]


def test_the_command_line_calibrates_on_the_models_samples(tmp_path, capsys):
    save_tiny_model(tmp_path / "model")
    report = tmp_path / "report.json"
    code = main(["analyze", "--model", str(tmp_path / "model"), "--drop", "2", "--dataset", SELF_GENERATED,
                 "--seq-len", "16", "--n-samples", "4", "--batch-size", "4", "--cka-minibatch-tokens", "16",
                 "--no-progress", "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    plan = json.loads(report.read_text())
    assert "the model's own samples" in plan["calibration_source"] and plan["config"]["dataset"] == SELF_GENERATED


def test_block_local_recovery_trains_on_new_samples_of_the_original_model():
    import copy

    from sglp_llm import prune
    from sglp_llm.recovery.block_recovery import recover_blocks

    model, tok = tiny_model(num_layers=6), tiny_tokenizer()
    original = copy.deepcopy(model)
    config = SGLPConfig(drop=2, scoring="block", dataset=SELF_GENERATED, seq_len=16, n_samples=8, batch_size=4,
                        cka_minibatch_tokens=16, stability_check=False, recover="blocks", recover_steps=5,
                        recover_learning_rate=1e-3)
    result = prune(model, None, config, tokenizer=tok, progress=False)
    record = result.plan.extra["recovery"]
    assert record["text"].startswith("the model's own samples") and (record["windows"], record["passes"]) == (20, 1)
    # the same training by hand: 20 windows the original samples, its trained blocks compared
    windows = sample_windows(ModelHandle.of(original), tok, 20, 16, config.seed, progress=False)
    by_hand = recover_blocks(original, [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(4)],
                             result.plan.dropped, steps=5, learning_rate=1e-3, progress=False)
    kept = result.plan.kept
    for index in by_hand.trained:
        pruned_block = result.model.model.layers[kept.index(int(index))]
        for (name, a), (_, b) in zip(original.model.layers[int(index)].state_dict().items(),
                                     pruned_block.state_dict().items()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
