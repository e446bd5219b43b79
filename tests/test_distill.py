"""Distillation healing: the loss against a direct computation, the teacher cache against the
teacher beside, the teacher found from the pruned model's record, and every teacher refused
clearly with nothing written."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sglp_llm.cli import main
from sglp_llm.data import SELF_GENERATED, STDLIB_DOCS
from sglp_llm.recovery.distill import DistillationTerms, TeacherBeside, TeacherCache, TeacherError, write_teacher_cache
from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.heal import HealConfig, HealError, heal
from sglp_llm.model.offload import load_with_blocks_on_disk
from sglp_llm.model.rewrite import removing_blocks
from sglp_llm.output.modelcard import describe_schedule
from sglp_llm.recovery.training import DistillationObjective, WindowDataset
from test_heal import pruned_dir  # noqa: F401  (the fixture)
from tiny_models import VOCAB, save_tiny_model, tiny_batch, tiny_model, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from tiny_architectures import tiny_causal_lm  # noqa: E402

PRUNE_FAST = ["--seq-len", "16", "--n-samples", "8", "--batch-size", "4", "--cka-minibatch-tokens", "16", "--no-progress",
              "--no-stability-check"]
HEAL_FAST = ["--steps", "6", "--seq-len", "32", "--batch-size", "4", "--learning-rate", "0.003",
             "--eval-max-texts", "2", "--no-progress"]
DROPPED = [2, 5]


def _student_and_teacher(seed: int = 0):
    """A tiny llama (the teacher) and the same model without blocks 2 and 5 (the student)."""
    teacher = tiny_model("llama", num_layers=8, seed=seed)
    student = tiny_model("llama", num_layers=8, seed=seed)
    removing_blocks(student, DROPPED)
    return student, teacher


def _direct_loss(student, teacher, batch, temperature, next_token_weight, hidden_weight):
    """The same loss written out from the two models' outputs, position by position."""
    with torch.no_grad():
        t_out = teacher(**batch, output_hidden_states=True)
    s_out = student(**batch, output_hidden_states=True)
    kept = [i for i in range(8) if i not in DROPPED]
    kl, nll, count = 0.0, 0.0, 0
    for row in range(batch["input_ids"].shape[0]):
        for pos in range(batch["input_ids"].shape[1] - 1):
            if not batch["attention_mask"][row, pos + 1]:
                continue
            p = torch.softmax(t_out.logits[row, pos] / temperature, -1)
            log_q = torch.log_softmax(s_out.logits[row, pos] / temperature, -1)
            kl = kl + (p * (p.log() - log_q)).sum()
            nll = nll - torch.log_softmax(s_out.logits[row, pos], -1)[batch["input_ids"][row, pos + 1]]
            count += 1
    # per window (its non-padding positions), then the mean over windows and kept blocks
    mask = batch["attention_mask"].bool()
    hidden = torch.stack([
        ((s_out.hidden_states[j + 1][row][mask[row]] - t_out.hidden_states[i + 1][row][mask[row]]) ** 2).sum()
        / (t_out.hidden_states[i + 1][row][mask[row]] ** 2).sum()
        for j, i in enumerate(kept[:-1]) for row in range(len(mask))
    ]).mean()
    return kl / count * temperature ** 2 + next_token_weight * nll / count + hidden_weight * hidden


def test_the_distillation_loss_equals_a_direct_computation():
    student, teacher = _student_and_teacher()
    batch = tiny_batch(batch_size=3, seq_len=10, pad_last=3)
    terms = DistillationTerms(temperature=2.0, next_token_weight=0.3, hidden_weight=0.7)
    objective = DistillationObjective(TeacherBeside(teacher, terms), terms, [0, 1, 3, 4, 6, 7])
    got = objective(student, batch)
    torch.testing.assert_close(got, _direct_loss(student, teacher, batch, 2.0, 0.3, 0.7), rtol=1e-5, atol=1e-6)
    # the gradient flows into the student only
    got.backward()
    assert any(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_the_teacher_cache_at_the_whole_vocabulary_equals_the_teacher_beside(tmp_path):
    """k = vocabulary: the coarse KL over the cached tokens is the full KL, loss and gradient."""
    student, teacher = _student_and_teacher()
    batches = [tiny_batch(batch_size=2, seq_len=10, seed=s, pad_last=2 * s) for s in range(2)]
    terms = DistillationTerms(temperature=1.5)
    path = write_teacher_cache(teacher, batches, tmp_path / "t.safetensors", top_k=VOCAB, temperature=1.5, progress=False)
    beside = DistillationObjective(TeacherBeside(teacher, terms), terms, [0, 1, 3, 4, 6, 7])
    cached = DistillationObjective(TeacherCache(path, terms), terms, [0, 1, 3, 4, 6, 7])
    dataset = WindowDataset(batches)
    rows = [dataset[i] for i in (3, 0)]  # windows out of order, as a shuffled batch
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    grads = []
    for objective in (beside, cached):
        student.zero_grad()
        loss = objective(student, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a smaller k keeps only the top tokens: never more than the full KL
    small = write_teacher_cache(teacher, batches, tmp_path / "s.safetensors", top_k=8, temperature=1.5, progress=False)
    with torch.no_grad():
        assert DistillationObjective(TeacherCache(small, terms), terms, [])(student, batch) <= grads[0][0] + 1e-6
    with pytest.raises(TeacherError, match="temperature 1.5, not 2.0"):
        TeacherCache(path, DistillationTerms(temperature=2.0))


# gemma3: a tied head, sliding and full attention; BLOOM's blocks return attention weights unasked
# and CPM-Ant's loop unpacks (hidden, attention) from each: stand-ins shaped as the blocks' outputs
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "bloom", "cpmant"])
def test_a_teacher_with_its_blocks_on_disk_writes_the_same_targets(family, tmp_path):
    """One block in memory at a time, then the head on each window's final state: the cache of
    the teacher held whole."""
    teacher = tiny_model(family, num_layers=6) if family in ("llama", "gemma3_text") else tiny_causal_lm(family)
    teacher.save_pretrained(tmp_path / "teacher")
    lazy = load_with_blocks_on_disk(tmp_path / "teacher")
    batches = [tiny_batch(batch_size=2, seq_len=10, seed=s, pad_last=2 * s) for s in range(2)]
    whole = write_teacher_cache(teacher, batches, tmp_path / "whole.safetensors", top_k=8, temperature=2.0, progress=False)
    on_disk = write_teacher_cache(lazy, batches, tmp_path / "disk.safetensors", top_k=8, temperature=2.0, progress=False)
    expected, got = load_file(whole), load_file(on_disk)
    assert torch.equal(got["token_ids"], expected["token_ids"])
    for name in ("log_probs", "rest_log_mass"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)
    assert all(p.is_meta for p in find_decoder_blocks(lazy).layers.parameters())  # every block went back


def test_heal_reads_the_recorded_teacher_block_by_block(pruned, tmp_path):
    dense, folder = pruned
    out = tmp_path / "healed"
    assert main(["heal", str(folder), "--output", str(out), *HEAL_FAST, "--teacher-top-k", "16",
                 "--teacher-blocks-on-disk"]) == 0
    objective = json.loads((out / "heal_report.json").read_text())["objective"]
    assert objective["teacher_runs"] == "cached: top 16 tokens per position, written in one pass, one block in memory at a time"
    # a teacher run one block at a time cannot sample its own text: the default text is the docstrings
    assert json.loads((out / "heal_report.json").read_text())["training_text"].startswith("built-in default: docstrings")
    with pytest.raises(HealError, match="set teacher_top_k"):
        HealConfig(teacher_blocks_on_disk=True)


def test_training_on_the_cache_at_the_whole_vocabulary_gives_the_same_adapter():
    results = []
    for top_k in (None, VOCAB):
        student, teacher = _student_and_teacher()
        config = HealConfig(steps=3, seq_len=16, batch_size=2, learning_rate=3e-3, eval_max_texts=1, teacher_top_k=top_k)
        healed = heal(student, tiny_tokenizer(), config, teacher=teacher, teacher_tokenizer=tiny_tokenizer(), progress=False)
        results.append(healed)
    assert results[0].report["objective"]["teacher_runs"] == "beside"
    assert results[1].report["objective"]["teacher_runs"].startswith(f"cached: top {VOCAB}")
    assert results[0].report["loss"]["per_step"] == pytest.approx(results[1].report["loss"]["per_step"], rel=1e-4)
    a = {k: v for k, v in results[0].model.state_dict().items() if "lora" in k}
    b = {k: v for k, v in results[1].model.state_dict().items() if "lora" in k}
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)  # Adam scales tiny differences up


@pytest.fixture(scope="module")
def pruned(pruned_dir):
    """test_heal's tiny LLaMA pruned from 8 to 5 blocks, and the folder it was pruned from."""
    source = json.loads((pruned_dir / "config.json").read_text())["sglp"]["source_model"]
    return Path(source), pruned_dir


def test_heal_distils_from_the_model_the_pruned_one_was_made_from(pruned, tmp_path, capsys):
    dense, folder = pruned
    assert dense.is_absolute() and json.loads((dense / "config.json").read_text())["num_hidden_layers"] == 8
    out = tmp_path / "healed"
    assert main(["heal", str(folder), "--output", str(out), *HEAL_FAST]) == 0
    assert f"by distillation from {dense.resolve()}" in capsys.readouterr().out
    report = json.loads((out / "heal_report.json").read_text())
    assert report["objective"]["name"] == "distillation" and report["objective"]["teacher"] == str(dense.resolve())
    # the student learns the teacher: its KL to it falls
    assert report["loss"]["last"] < report["loss"]["first"]
    assert "| objective | distillation from" in (out / "README.md").read_text()
    none = tmp_path / "plain"
    assert main(["heal", str(folder), "--output", str(none), *HEAL_FAST, "--teacher", "none"]) == 0
    assert json.loads((none / "heal_report.json").read_text())["objective"]["name"] == "next-token"


def test_bad_teachers_are_refused_and_nothing_is_written(pruned, tmp_path, capsys, monkeypatch):
    dense, folder = pruned
    other = tmp_path / "other-vocab"
    save_tiny_model(other, "llama", num_layers=8, vocab_size=VOCAB + 8)
    cases = [
        (["--teacher", str(other)], f"The teacher predicts {VOCAB + 8} tokens and the student {VOCAB}"),
        (["--teacher", str(tmp_path / "missing")], "cannot be loaded"),
        (["--hidden-weight", "1", "--teacher-top-k", "4"], "needs the teacher beside the student"),
    ]
    for flags, message in cases:
        out = tmp_path / "out"
        assert main(["heal", str(folder), "--output", str(out), *HEAL_FAST, *flags]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()

    # a teacher that does not fit beside the student is refused before it is loaded
    import sys

    monkeypatch.setattr(sys.modules["sglp_llm.heal"].psutil, "virtual_memory", lambda: type("M", (), {"available": 1000})())
    out = tmp_path / "out"
    assert main(["heal", str(folder), "--output", str(out), *HEAL_FAST]) == 2
    err = capsys.readouterr().err
    assert "does not fit beside the student" in err and "--teacher-top-k" in err
    assert not out.exists()
    # ... and taught from its cached targets instead
    assert main(["heal", str(folder), "--output", str(out), *HEAL_FAST, "--teacher-top-k", "16"]) == 0
    assert json.loads((out / "heal_report.json").read_text())["objective"]["teacher_runs"].startswith("cached: top 16")


def test_a_recorded_source_that_is_gone_is_refused(tmp_path, capsys):
    dense = tmp_path / "dense"
    save_tiny_model(dense, "llama", num_layers=6)
    folder = tmp_path / "pruned"
    assert main(["prune", "--model", str(dense), "--drop", "2", "--output", str(folder), *PRUNE_FAST]) == 0
    import shutil

    shutil.rmtree(dense)
    out = tmp_path / "out"
    assert main(["heal", str(folder), "--output", str(out), *HEAL_FAST]) == 2
    err = capsys.readouterr().err
    assert "recorded in the pruned model's config" in err and "--teacher none" in err
    assert not out.exists()


def test_teacher_none_trains_on_the_next_tokens_even_with_a_teacher_at_hand():
    losses, texts = {}, {}
    for teacher in ("none", "auto"):
        student, original = _student_and_teacher()
        config = HealConfig(steps=2, seq_len=16, batch_size=2, eval_max_texts=1, teacher=teacher)
        healed = heal(student, tiny_tokenizer(), config, teacher=original, teacher_tokenizer=tiny_tokenizer(), progress=False)
        losses[healed.report["objective"]["name"]] = healed.report["loss"]["first"]
        texts[teacher] = healed.report["settings"]["dataset"]
    assert set(losses) == {"next-token", "distillation"}
    # with no teacher there is nothing to sample: the default text is the docstrings
    assert texts == {"none": STDLIB_DOCS, "auto": SELF_GENERATED}
    # the next-token loss of a random model is about log(vocabulary); its KL to a near twin is small
    assert losses["next-token"] > 3 > 10 * losses["distillation"]


def test_the_learning_rate_is_the_objectives_default_unless_set():
    def adapter(teacher, **settings):
        student, original = _student_and_teacher()
        config = HealConfig(steps=2, seq_len=16, batch_size=2, eval_max_texts=1, teacher=teacher, **settings)
        healed = heal(student, tiny_tokenizer(), config, teacher=original, teacher_tokenizer=tiny_tokenizer(), progress=False)
        return healed.report, {k: v for k, v in healed.model.state_dict().items() if "lora_B" in k}

    for teacher, rate in (("none", 2e-4), ("auto", 1e-3)):
        report, unset = adapter(teacher)
        assert report["settings"]["learning_rate"] == rate and HealConfig().learning_rate is None
        _, explicit = adapter(teacher, learning_rate=rate)
        for key in unset:
            torch.testing.assert_close(unset[key], explicit[key], rtol=0, atol=0)
    _, other = adapter("auto", learning_rate=3e-3)  # the rate reaches the optimizer
    assert not torch.allclose(other[key], explicit[key])


def test_a_model_with_no_record_heals_on_the_next_tokens():
    model = tiny_model("llama", num_layers=4)
    healed = heal(model, tiny_tokenizer(), HealConfig(steps=1, seq_len=16, batch_size=2, eval_max_texts=1), progress=False)
    assert healed.report["objective"]["name"] == "next-token"
    assert "records no source" in healed.report["objective"]["why"]


def test_a_decaying_schedule_sets_each_steps_rate_and_the_report_and_card_say_so():
    def healed(**settings):
        student, original = _student_and_teacher()
        config = HealConfig(steps=4, seq_len=16, batch_size=2, eval_max_texts=1, learning_rate=1e-3, **settings)
        return heal(student, tiny_tokenizer(), config, teacher=original, teacher_tokenizer=tiny_tokenizer(), progress=False)

    def lora_b(result):
        return {k: v for k, v in result.model.state_dict().items() if "lora_B" in k}

    constant, cosine, warm = healed(), healed(lr_schedule="cosine"), healed(lr_schedule="cosine", warmup_ratio=0.25)
    assert constant.report["learning_rate_per_step"] == [1e-3] * 4
    # cosine from the peak to 0 over the steps after the warmup, the warmup rising linearly from 0
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    assert cosine.report["learning_rate_per_step"] == pytest.approx(expected)
    assert warm.report["learning_rate_per_step"] == pytest.approx(
        [0.0] + [1e-3 * 0.5 * (1 + math.cos(math.pi * s / 3)) for s in range(3)])
    # the rates reach the optimizer: the first step at rate 0 leaves lora_B (zero at start) as it was
    # for one step, so the warm adapter differs from the cold cosine one
    key = next(iter(lora_b(constant)))
    assert not torch.allclose(lora_b(constant)[key], lora_b(cosine)[key])
    assert not torch.allclose(lora_b(cosine)[key], lora_b(warm)[key])
    card = describe_schedule(warm.report["settings"])
    assert card == "0.001, decaying to 0 (cosine) after a warmup over 25% of the steps"
    assert describe_schedule({"learning_rate": 2e-4}) == "0.0002"  # settings saved before schedules
    with pytest.raises(HealError, match="lr_schedule"):
        HealConfig(lr_schedule="exponential")
    with pytest.raises(HealError, match="warmup_ratio"):
        HealConfig(warmup_ratio=1.0)


def test_distillation_trains_by_default_on_what_the_teacher_samples():
    from sglp_llm.model.handle import ModelHandle
    from sglp_llm.passes.sampling import sample_windows

    student, teacher = _student_and_teacher()
    config = HealConfig(steps=3, seq_len=16, batch_size=2, eval_max_texts=1, seed=5)  # no dataset: the default
    windows = sample_windows(ModelHandle.of(teacher), tiny_tokenizer(), 6, 16, 5, progress=False)
    # the first step's loss is the KL on two of those samples, in the Trainer's shuffled order
    # (LoRA starts as the identity; every window is whole, so a pair's loss is its two KLs' mean)
    kls = [_direct_loss(student, teacher, {"input_ids": w[None], "attention_mask": torch.ones_like(w[None])},
                        1.0, 0.0, 0.0).item() for w in windows]
    healed = heal(student, tiny_tokenizer(), config, teacher=teacher, teacher_tokenizer=tiny_tokenizer(), progress=False)
    assert healed.report["training_text"] == "the teacher's own samples (from its beginning-of-text token, seed 5)"
    assert healed.report["settings"]["dataset"] == SELF_GENERATED  # the report says which text the default chose
    assert healed.report["windows"] == 6
    first = healed.report["loss"]["first"]
    assert any(first == pytest.approx((a + b) / 2, rel=1e-5) for i, a in enumerate(kls) for b in kls[i + 1:]), (first, kls)
    with pytest.raises(HealError, match="distils on the teacher's own samples, and this run has no teacher"):
        heal(tiny_model("llama", num_layers=4), tiny_tokenizer(), replace(config, dataset=SELF_GENERATED), progress=False)
