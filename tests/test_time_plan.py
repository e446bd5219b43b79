"""The time plan's counts against the block forwards and head positions an analysis really runs,
counted with hooks on a tiny model; its throughput and its words."""

from __future__ import annotations

import pytest
import torch

from sglp_llm import SGLPConfig, analyze
from sglp_llm.config import ConfigError
from sglp_llm.model.blocks import layer_kinds
from sglp_llm.model.handle import ModelHandle
from sglp_llm.selection.removal import RemovalLoss
from sglp_llm.time_plan import CountedRemovalLoss, ModelShape, Throughput, count_analysis, plan_time
from sglp_llm.data import SELF_GENERATED, STDLIB_DOCS
from tiny_models import tiny_batch, tiny_config, tiny_model, tiny_tokenizer

SEQ, WINDOWS, BLOCKS = 16, 8, 7


class Counter:
    """Positions each decoder block and the head ran on, from forward pre-hooks."""

    def __init__(self, model):
        self.block_tokens = self.head_tokens = 0
        handle = ModelHandle.of(model)
        self.layer_kinds = layer_kinds(model, len(handle.layers))  # what count_analysis needs of the model beside
        self.hooks = [layer.register_forward_pre_hook(self._block, with_kwargs=True) for layer in handle.layers]
        self.hooks.append(model.get_output_embeddings().register_forward_pre_hook(self._head))

    def _block(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.block_tokens += hidden.shape[0] * hidden.shape[1]

    def _head(self, module, args):
        self.head_tokens += args[0].shape[0] * args[0].shape[1]


def _run(family: str, seeds=range(WINDOWS // 2), vocab_size: int | None = None, **settings):
    model = tiny_model(family, num_layers=BLOCKS, **({"vocab_size": vocab_size} if vocab_size else {}))
    batches = [tiny_batch(batch_size=2, seq_len=SEQ, seed=s) for s in seeds]
    # the batches stand for a text source: nothing sampled
    config = SGLPConfig(seq_len=SEQ, n_samples=WINDOWS, batch_size=2, verify=False,
                        **{"dataset": STDLIB_DOCS, "loss_tokens": 4 * SEQ, **settings})
    counter = Counter(model)
    plan = analyze(model, batches, config, progress=False)
    return config, plan, counter


def _order(plan):
    """The blocks in the order the search removed them."""
    steps = plan.extra["sleb_steps"] if "sleb_steps" in plan.extra else plan.extra["loss_check"]["steps"]
    return [step["block"] for step in steps]


def _total(phases):
    return sum(w.block_tokens for w in phases.values()), sum(w.head_tokens for w in phases.values())


def test_the_full_search_counts_equal_the_forwards_run():
    """Every candidate measured at every step (loss_lazy off), after the screen, on a quarter of
    each window's positions: given the order the search took, the count is exact."""
    config, plan, counter = _run("gemma3_text", drop=3, loss_lazy=False, loss_positions=0.25, stability_check=False)
    phases, _ = count_analysis(BLOCKS, config, order=_order(plan), layer_kinds=counter.layer_kinds)
    assert _total(phases) == (counter.block_tokens, counter.head_tokens)
    assert phases["statistics pass"].block_tokens == WINDOWS * SEQ * BLOCKS


def _halves_orders(monkeypatch) -> list[list[int]]:
    """Each stability-check half's removal order, as its search records it (filled as analyze runs)."""
    from sglp_llm.selection import loss_check

    orders: list[list[int]] = []
    search = loss_check.loss_search

    def recorded(*args, desc="SGLP loss check", **kwargs):
        dropped, record = search(*args, desc=desc, **kwargs)
        if desc.startswith("Stability check"):
            orders.append([step["block"] for step in record["steps"]])
        return dropped, record

    monkeypatch.setattr(loss_check, "loss_search", recorded)
    return orders


@pytest.mark.parametrize("seeds", [[0, 1, 0, 1], [0, 1, 2, 3]])
def test_the_stability_checks_halves_are_counted_exactly_given_their_orders(monkeypatch, seeds):
    """With every candidate measured at every step, each half's search, given the order it took,
    reads back what the whole measured on its windows: what the plan counts. Halves that repeat
    the whole's windows take its path and read back all but the second half's screen; halves on
    windows of their own leave it. Unknown orders are assumed to leave the path after the first
    removal: never less than the path's count."""
    orders = _halves_orders(monkeypatch)
    config, plan, counter = _run("llama", seeds=seeds, drop=3, loss_lazy=False, loss_ties="none", loss_tokens=8 * SEQ)
    phases, said = count_analysis(BLOCKS, config, order=_order(plan), halves_orders=tuple(orders),
                                  layer_kinds=counter.layer_kinds)
    assert list(phases) == ["statistics pass", "loss check", "stability check: the loss check's halves"]
    assert _total(phases) == (counter.block_tokens, counter.head_tokens)
    assert not any("stability check's search" in a for a in said)
    halves = phases["stability check: the loss check's halves"]
    assumed, assumption = count_analysis(BLOCKS, config, order=_order(plan), layer_kinds=counter.layer_kinds)
    assert any("reads back the choice's first step" in a for a in assumption)
    if seeds == [0, 1, 0, 1]:
        assert orders == [_order(plan), _order(plan)]
        # the second half's screen: its first window, from the kept outputs (the head only) and each candidate removed
        assert halves.head_tokens == (1 + BLOCKS - len(plan.extra["protected"])) * (SEQ - 1)
        assert assumed["stability check: the loss check's halves"].block_tokens > halves.block_tokens
    else:
        assert orders[0] != _order(plan) or orders[1] != _order(plan)


def test_a_narrowed_head_is_counted_exactly(monkeypatch):
    """loss_vocabulary None, a large vocabulary: the original network's pass runs the whole head
    on each loss batch (its likeliest tokens), every measurement the narrowed head; the halves
    read the whole's subsets back (a screen's batch of one row makes its own)."""
    from contextlib import contextmanager

    from sglp_llm.config import NARROWED_FROM
    from sglp_llm.passes.head import VocabularySubset

    narrowed = [0]
    scoring = VocabularySubset.scoring

    @contextmanager
    def counted(self, model):
        with scoring(self, model):
            hook = model.get_output_embeddings().register_forward_pre_hook(
                lambda module, args: narrowed.__setitem__(0, narrowed[0] + args[0].shape[0] * args[0].shape[1]))
            try:
                yield
            finally:
                hook.remove()

    monkeypatch.setattr(VocabularySubset, "scoring", counted)
    orders = _halves_orders(monkeypatch)
    config, plan, counter = _run("llama", seeds=[0, 1, 0, 1], drop=3, loss_lazy=False, loss_ties="none",
                                 loss_tokens=8 * SEQ, vocab_size=NARROWED_FROM, loss_vocabulary=None)
    assert plan.config["loss_vocabulary"] == 32 and plan.extra["stability"]["halves"] == [plan.dropped, plan.dropped]
    phases, _ = count_analysis(BLOCKS, config.replace(loss_vocabulary=32), order=_order(plan), halves_orders=tuple(orders),
                               layer_kinds=counter.layer_kinds)
    assert sum(w.block_tokens for w in phases.values()) == counter.block_tokens
    assert sum(w.head_tokens + w.likeliest_head_tokens for w in phases.values()) == counter.head_tokens
    assert sum(w.head_tokens for w in phases.values()) == 0  # the whole head only picks the likeliest tokens
    assert sum(w.narrowed_head_tokens for w in phases.values()) == narrowed[0] > 0
    # the whole head: every loss sequence once, and each screen's window (the whole's, which the
    # first half reads back, and the second half's)
    assert counter.head_tokens == (8 + 2) * (SEQ - 1)


def test_a_peers_statistics_passes_with_the_stability_check_are_counted_exactly():
    config, plan, counter = _run("llama", drop=2, method="block-influence")
    phases, _ = count_analysis(BLOCKS, config, layer_kinds=counter.layer_kinds)
    assert list(phases) == ["statistics pass", "stability check: statistics pass"]
    assert _total(phases) == (counter.block_tokens, counter.head_tokens) == (2 * WINDOWS * SEQ * BLOCKS, 0)


def test_sleb_is_counted_exactly():
    config, plan, counter = _run("qwen2", drop=2, method="sleb", stability_check=False)
    phases, _ = count_analysis(BLOCKS, config, order=_order(plan), layer_kinds=counter.layer_kinds)
    assert _total(phases) == (counter.block_tokens, counter.head_tokens)


@pytest.mark.parametrize("offload", ["none", "sequential"])
def test_the_counted_removal_loss_runs_what_the_real_one_runs(monkeypatch, offload):
    """Any sequence of the removal loss's calls (the lazy search's, the stability check's) costs
    the counted one what it costs the real one; with blocks run one at a time (the lazy search
    then measures candidates together), its block reads too."""
    from sglp_llm.model.offload import MoveBlocks
    from sglp_llm.selection.removal import BlockwiseRemovalLoss

    calls: list[tuple[int, str, object]] = []
    depth = [0]  # only the outermost call: measure_many may call measure
    for owner, name in [(RemovalLoss, n) for n in ("current", "measure", "measure_many", "remove", "loss_without")] + [
            (BlockwiseRemovalLoss, "measure_many")]:
        original = getattr(owner, name)

        def logged(self, *args, _name=name, _original=original):
            if not isinstance(self, CountedRemovalLoss) and not depth[0]:
                # outputs before any call: the statistics pass kept the original network's
                seeded = bool(self._outputs) and not self.removed
                calls.append((self, _name, args, sum(b["input_ids"].numel() for b in self.batches), seeded))
            depth[0] += 1
            try:
                return _original(self, *args)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(owner, name, logged)
    reads = []
    original_onload = MoveBlocks.onload
    monkeypatch.setattr(MoveBlocks, "onload", lambda self, index, block, device: (reads.append(index), original_onload(self, index, block, device)))
    config, plan, counter = _run("llama", drop=3, offload=offload)  # the default: lazy, screened, with the stability check
    replicas: dict[int, CountedRemovalLoss] = {}
    first_seeded: dict[int, bool] = {}
    store: set = set()
    for owner, name, args, tokens, seeded in calls:  # each owner kept alive by `calls`: ids stay apart
        key = id(owner)
        seeded = first_seeded.setdefault(key, seeded)
        replica = replicas.setdefault(key, CountedRemovalLoss(BLOCKS, tokens, tokens // SEQ * (SEQ - 1), blockwise=offload == "sequential",
                                                              original=seeded, keys=owner.keys, store=store))
        getattr(replica, name)(*args)
    # the search and its screen, in the whole and in each half, all start from the statistics pass's outputs
    assert len(first_seeded) == 6 and all(first_seeded.values())
    counted = sum(r.work.block_tokens for r in replicas.values())
    assert counted + WINDOWS * SEQ * BLOCKS == counter.block_tokens  # and the one statistics pass
    assert sum(r.work.head_tokens for r in replicas.values()) == counter.head_tokens
    if offload == "sequential":  # the statistics pass reads every block once
        assert sum(r.work.block_loads for r in replicas.values()) + BLOCKS == len(reads)
        assert any(name == "measure_many" for _, name, *_ in calls)


def test_the_plan_predicts_the_default_and_says_what_it_assumes():
    config, model_config = SGLPConfig(drop=6), tiny_config("llama", num_layers=30)
    plan = plan_time(ModelShape.of(model_config), config, Throughput(1e-6, 2e-6, "given"))
    # no dataset set: the model's own samples are drawn first (32 windows, 255 new positions each)
    assert list(plan.phases) == ["sampling the model's own text", "statistics pass", "loss check",
                                 "stability check: the loss check's halves"]
    assert plan.phases["sampling the model's own text"].head_tokens == 32 * 255
    assert "no dataset set: the model's own samples" in plan.text()
    one_at_a_time = plan_time(ModelShape.of(model_config), config.replace(offload="sequential"), Throughput(1e-6, 2e-6, "given"))
    assert "sampling the model's own text" not in one_at_a_time.phases and "the docstrings" in one_at_a_time.text()
    # the statistics pass: 32 windows of 256 tokens through 30 blocks, no head (no backward)
    assert plan.phases["statistics pass"].block_tokens == 32 * 256 * 30 and plan.phases["statistics pass"].head_tokens == 0
    assert plan.seconds()["statistics pass"] == pytest.approx(32 * 256 * 30 * 1e-6)
    assert plan.total_s() == pytest.approx(sum(plan.seconds().values()))
    text = plan.text()
    assert "each step of the lazy search after the first measures 3 candidates" in text and "the blocks go in the order" in text
    assert "to a pass" not in text and "3 to a pass" in one_at_a_time.text()
    # a quarter of the positions scored: the loss check's head work falls to about a quarter
    quarter = plan_time(ModelShape.of(model_config), config.replace(loss_positions=0.25), Throughput(1e-6, 2e-6, "given"))
    assert quarter.phases["loss check"].head_tokens == pytest.approx(plan.phases["loss check"].head_tokens / 4, rel=0.01)
    assert quarter.phases["loss check"].block_tokens == plan.phases["loss check"].block_tokens
    # a count per step (a run's record) instead of the assumed 3: fewer measurements, less work
    fewer, said = count_analysis(30, config, measured_per_step=[1] * 6)
    assert fewer["loss check"].block_tokens < plan.phases["loss check"].block_tokens
    assert not any("lazy search" in a for a in said)
    # the screen's allowance (the default) is assumed to leave 6 candidates to measure at the first
    # step, the rest 3 each; with the screened estimates as bounds, 3 at every step
    assumed, said = count_analysis(30, config)
    assert any("its first step measures 6 after the screen" in a for a in said)
    listed, _ = count_analysis(30, config, measured_per_step=[6] + [3] * 5)
    assert vars(assumed["loss check"]) == vars(listed["loss check"])
    bounds, said = count_analysis(30, config.replace(loss_screen_errors=0))
    assert vars(bounds["loss check"]) == vars(count_analysis(30, config, measured_per_step=[3] * 6)[0]["loss check"])
    assert bounds["loss check"].block_tokens < assumed["loss check"].block_tokens
    assert not any("first step measures" in a for a in said)
    # the KL objective has no per-sequence losses to lower its estimates by: 3 at every step
    kl = config.replace(loss_objective="kl")
    phases, said = count_analysis(30, kl)
    assert vars(phases["loss check"]) == vars(count_analysis(30, kl, measured_per_step=[3] * 6)[0]["loss check"])
    assert not any("first step measures" in a for a in said)
    with pytest.raises(ConfigError, match="not loss_beam"):
        count_analysis(30, SGLPConfig(drop=3, loss_beam=2))


def test_the_plan_prices_a_narrowed_head_at_its_share_of_the_columns():
    """loss_vocabulary None on a 49k vocabulary: as analyze settles it, 32 likeliest tokens; the
    loss check's head positions are narrowed (the likeliest-token pass excepted) and cost the
    stated share of a whole one; set to 0, the whole head."""
    from sglp_llm.time_plan import narrowed_share

    shape = ModelShape.of(tiny_config("llama", num_layers=30, vocab_size=49152))
    config = SGLPConfig(drop=6, dataset=STDLIB_DOCS, loss_vocabulary=None)
    rate = Throughput(1e-6, 2e-6, "given")
    narrowed, whole = plan_time(shape, config, rate), plan_time(shape, config.replace(loss_vocabulary=0), rate)
    share = narrowed_share(config.replace(loss_vocabulary=32), 49152)
    assert narrowed.narrowed_share == share == round(1024 + 4 * 32 * (4 * 255) ** 0.5) / 49152
    check, full = narrowed.phases["loss check"], whole.phases["loss check"]
    assert check.block_tokens == full.block_tokens and full.narrowed_head_tokens == 0
    # the whole head picks the likeliest tokens once on each loss window and the screen's window;
    # every pass the whole head ran for is a narrowed one
    assert check.likeliest_head_tokens == (2048 // 256 + 1) * 255 and check.head_tokens == 0
    assert check.narrowed_head_tokens == full.head_tokens
    assert narrowed.seconds()["loss check"] == pytest.approx(
        check.block_tokens * 1e-6 + (check.likeliest_head_tokens + share * check.narrowed_head_tokens) * 2e-6)
    # a measured rate for the pick of the likeliest tokens prices those positions
    picked = Throughput(1e-6, 2e-6, "given", likeliest_token_s=1e-6)
    assert picked.seconds(check, share) == pytest.approx(rate.seconds(check, share) - check.likeliest_head_tokens * 1e-6)
    assert "computes 10.4% of its columns" in narrowed.text() and "narrowed" not in whole.text()


def test_a_measured_throughput_prices_a_block_below_the_head_of_a_large_vocabulary():
    from sglp_llm.time_plan import measure_throughput, throughput_from_flops

    config = tiny_config("gemma3_text", num_layers=4, vocab_size=4096)
    measured = measure_throughput(config, dtype=torch.float32, device="cpu", seq_len=32)
    assert measured.block_token_s > 0 and measured.head_token_s > 0 and measured.likeliest_token_s > 0
    assert "measured on cpu" in measured.source
    shape = ModelShape.of(config)
    model = tiny_model("gemma3_text", num_layers=4, vocab_size=4096)  # the same config, real weights
    assert shape.num_blocks == 4 and shape.block_params == sum(p.numel() for p in model.model.layers[0].parameters())
    assert shape.head_params == config.hidden_size * 4096
    given = throughput_from_flops(shape, 1e12, seq_len=32)
    # 2 FLOPs per weight: the head's (hidden x vocab) per position at 1 TFLOP/s
    assert given.head_token_s == pytest.approx(2 * config.hidden_size * 4096 / 1e12)
    assert given.likeliest_token_s is None  # priced as a head position


def test_plan_time_reads_no_weights_and_prints_the_plan(tmp_path, monkeypatch, capsys):
    import json

    import sglp_llm.model.loading as loading
    from sglp_llm.cli import main

    tiny_model("llama", num_layers=6).save_pretrained(tmp_path / "model")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("--plan-time loaded the model"))
    report = tmp_path / "time.json"
    assert main(["analyze", "--model", str(tmp_path / "model"), "--drop", "2", "--seq-len", "64", "--plan-time",
                 "--throughput", "2.5", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "Time plan: about" in out and "loss check:" in out and "stability check: the loss check's halves:" in out
    saved = json.loads(report.read_text())
    assert saved["phases"]["statistics pass"]["block_tokens"] == 32 * 64 * 6
    assert saved["throughput"]["source"] == "given: 2.5 TFLOP/s sustained"
    assert saved["total_s"] == pytest.approx(sum(saved["seconds"].values()))


def test_blocks_run_one_at_a_time_are_counted_with_their_reads(monkeypatch):
    """Sequential onloading: the same forwards, and each pass reads a block once; the screen's
    candidates share one pass."""
    from sglp_llm.model.offload import MoveBlocks

    reads = []
    original = MoveBlocks.onload
    monkeypatch.setattr(MoveBlocks, "onload", lambda self, index, block, device: (reads.append(index), original(self, index, block, device)))
    config, plan, counter = _run("llama", drop=2, loss_lazy=False, offload="sequential", stability_check=False)
    phases, _ = count_analysis(BLOCKS, config, order=_order(plan), layer_kinds=counter.layer_kinds)
    assert _total(phases) == (counter.block_tokens, counter.head_tokens)
    assert sum(w.block_loads for w in phases.values()) == len(reads)


@pytest.mark.parametrize("dataset", [None, SELF_GENERATED, [SELF_GENERATED, STDLIB_DOCS, SELF_GENERATED]])
def test_sampling_the_models_own_text_is_counted_exactly(dataset):
    """generate() runs every block and the head on each sampled position but the last; the mixed
    calibration samples only its self-generated shares (3 + 2 of 7 windows here)."""
    model = tiny_model("llama", num_layers=BLOCKS)
    config = SGLPConfig(drop=2, method="block-influence", dataset=dataset, seq_len=SEQ, n_samples=7, batch_size=2,
                        verify=False, stability_check=False)
    counter = Counter(model)
    analyze(model, None, config, tokenizer=tiny_tokenizer(), progress=False)
    phases, assumptions = count_analysis(BLOCKS, config, layer_kinds=counter.layer_kinds)
    assert _total(phases) == (counter.block_tokens, counter.head_tokens)
    sampled = 5 if isinstance(dataset, list) else 7  # unset: the model's own samples
    assert phases["sampling the model's own text"].head_tokens == sampled * (SEQ - 1)
    assert any("decoding one position at a time" in a for a in assumptions)
