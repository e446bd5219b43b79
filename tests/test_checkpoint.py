"""Resumable statistics passes: an interrupted run, rerun, ends exactly like an uninterrupted one;
a checkpoint of another run is refused."""

from __future__ import annotations

import pytest
import torch

from sglp_llm import ConfigError, SGLPConfig, analyze
from sglp_llm.api import statistics_key
from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.passes.checkpoint import StatisticsCheckpoint
from tiny_models import tiny_batch, tiny_model

# no forwards after the pass, nor before it (the trial rewrite of sglp_llm.output.verify)
CONFIG = dict(cka_minibatch_tokens=16, seq_len=16, n_samples=8, batch_size=4, scoring="block", verify=False)


def _batches(n=5, first_seed=0):
    return [tiny_batch(batch_size=4, seq_len=16, seed=s) for s in range(first_seed, first_seed + n)]


class Forwards:
    """Counts the forwards of one block, and raises at forward number `fail_at` (from 1)."""

    def __init__(self, model, fail_at=None):
        self.count, self.fail_at = 0, fail_at
        self.handle = find_decoder_blocks(model).layers[2].register_forward_hook(self)

    def __call__(self, *_):
        self.count += 1
        if self.count == self.fail_at:
            raise RuntimeError("interrupted")


def _checkpoint_file(directory):
    (path,) = directory.glob("statistics-*.pt")
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize(("method", "every", "saved_at"), [("sglp", 1, 3), ("sglp", 2, 2), ("block-influence", 1, 3)])
def test_interrupted_pass_resumes_to_exactly_the_uninterrupted_result(tmp_path, method, every, saved_at):
    model = tiny_model("llama", num_layers=6)
    config = SGLPConfig(drop=2, method=method, **CONFIG)
    expected = analyze(model, _batches(), config, progress=False)
    resumable = config.replace(checkpoint_dir=str(tmp_path), checkpoint_every=every)

    interrupt = Forwards(model, fail_at=4)  # during batch 3 of 0..4
    with pytest.raises(RuntimeError, match="interrupted"):
        analyze(model, _batches(), resumable, progress=False)
    interrupt.handle.remove()
    assert _checkpoint_file(tmp_path)["batches_done"] == saved_at
    assert not list(tmp_path.glob(".*.tmp"))

    forwards = Forwards(model)
    resumed = analyze(model, _batches(), resumable, progress=False)
    assert forwards.count == 5 - saved_at, "only the batches not saved run again"
    assert resumed.cka == expected.cka and resumed.scores == expected.scores
    assert resumed.dropped == expected.dropped and resumed.n_tokens == expected.n_tokens
    assert resumed.n_batches == 5 and _checkpoint_file(tmp_path)["batches_done"] == 5


def test_a_finished_pass_is_not_run_again(tmp_path):
    model = tiny_model("llama", num_layers=6)
    config = SGLPConfig(drop=2, checkpoint_dir=str(tmp_path), **CONFIG)
    first = analyze(model, _batches(), config, progress=False)
    forwards = Forwards(model)
    again = analyze(model, _batches(), config, progress=False)
    assert forwards.count == 0
    assert again.cka == first.cka and again.scores == first.scores and again.dropped == first.dropped


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    model = tiny_model("llama", num_layers=6)
    config = SGLPConfig(drop=2, checkpoint_dir=str(tmp_path), **CONFIG)
    analyze(model, _batches(), config, progress=False)
    message = r"was written by another run .* another --checkpoint-dir, or delete the file"
    with pytest.raises(ConfigError, match=message):
        analyze(model, _batches(first_seed=10), config, progress=False)  # other calibration tokens
    with pytest.raises(ConfigError, match=message):
        analyze(model.to(torch.float64), _batches(), config, progress=False)
    with pytest.raises(ConfigError, match=message):
        analyze(tiny_model("llama", num_layers=8).float(), _batches(), config, progress=False)
    # other statistics (settings or kind) keep their own files, as a comparison's passes do
    model.to(torch.float32)
    analyze(model, _batches(), config.replace(cka_minibatch_tokens=8), progress=False)
    analyze(model, _batches(), config.replace(method="block-influence"), progress=False)
    names = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.iterdir())
    assert names == ["statistics-block-influence", "statistics-gradnorm", "statistics-gradnorm"]


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import sglp_llm.passes.checkpoint as checkpoint

    store = StatisticsCheckpoint(tmp_path, ("gradnorm", None), "fingerprint")
    store.save(2, {"cka": {"n": 1}})

    def broken_save(obj, path):
        open(path, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        store.save(3, {"cka": {"n": 2}})
    assert [p.name for p in tmp_path.iterdir()] == [store.path.name]
    assert torch.load(store.path, weights_only=True)["batches_done"] == 2


def test_run_settings_are_flags_and_not_part_of_the_statistics_key(tmp_path):
    from sglp_llm.cli import build_parser, resolve_settings

    args = build_parser().parse_args([
        "analyze", "--drop", "2", "--checkpoint-dir", str(tmp_path), "--checkpoint-every", "3",
        "--gradient-checkpointing",
    ])
    _, config = resolve_settings(args)
    assert (config.checkpoint_dir, config.checkpoint_every, config.gradient_checkpointing) == (str(tmp_path), 3, True)
    assert statistics_key(config, 2) == statistics_key(SGLPConfig(drop=2), 2)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        SGLPConfig(drop=2, checkpoint_every=0)
