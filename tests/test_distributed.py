"""Data-parallel calibration: two processes (gloo, CPU) launched with `accelerate launch` reach
the single-process plan, and only the main process writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sglp_llm.passes.distributed import all_reduce_state, is_main_process, shard, world_size
from tiny_models import save_tiny_model, tiny_model

HERE = Path(__file__).parent
WORKLOAD = HERE / "data_parallel_run.py"


def test_a_single_process_keeps_everything_and_reduces_nothing():
    state = {"sums": torch.ones(3), "count": 4}
    assert world_size() == 1 and is_main_process()
    assert shard([1, 2, 3]) == [1, 2, 3]
    assert all_reduce_state(state) is state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend to run two CPU processes")
def _launch(tmp_path, workload: Path, *args: str) -> list[subprocess.CompletedProcess]:
    """`workload` with `args` as one plain process, then under `accelerate launch` as two (gloo,
    CPU, one thread each: the two share the machine's cores)."""
    # --multi_gpu: accelerate's torchrun launcher, which starts the processes on a machine without
    # GPUs too (with --cpu it would start one); they join over gloo (passes.distributed)
    launch = [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    runs = []
    for prefix, out in (([], "single"), (launch, "launched")):
        (tmp_path / out).mkdir()
        done = subprocess.run([sys.executable, *prefix, str(workload), *args, str(tmp_path / out)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs.append(done)
    return runs


def test_two_processes_heal_to_the_single_process_adapter(tmp_path):
    """Distillation healing on the Trainer under DDP: 2 processes × 2 windows per step give the
    adapter of 1 process × 4 windows, within float tolerance."""
    from safetensors.torch import load_file

    _launch(tmp_path, HERE / "heal_parallel_run.py")
    single, launched = (load_file(tmp_path / d / "adapter.safetensors") for d in ("single", "launched"))
    assert single.keys() == launched.keys() and single
    for key in single:
        torch.testing.assert_close(launched[key], single[key], rtol=1e-4, atol=1e-5)
    losses = [(tmp_path / d / "losses.txt").read_text().split("\n") for d in ("single", "launched")]
    assert losses[0][1] == losses[1][1] == str(4 * 4 * 16), "tokens: steps × global batch × window"
    # each step's loss is the whole batch's, not the main process's share
    assert [float(x) for x in losses[1][0].split()] == pytest.approx([float(x) for x in losses[0][0].split()], rel=1e-4)


def test_two_processes_recover_the_single_process_blocks(tmp_path):
    """Block-local recovery with each process on its share of the windows and the gradients
    averaged trains the weights, and reports the errors, of one process on all of them."""
    from safetensors.torch import load_file

    _launch(tmp_path, HERE / "recovery_parallel_run.py")
    single, launched = (load_file(tmp_path / d / "model.safetensors") for d in ("single", "launched"))
    changed = [k for k in single if not torch.equal(single[k], tiny_model("llama", num_layers=6).state_dict()[k])]
    assert changed and all(".layers.1." in k for k in changed)  # block 1 feeds the gap 2-3
    for key in single:
        torch.testing.assert_close(launched[key], single[key], rtol=1e-4, atol=1e-5)
    records = [json.loads((tmp_path / d / "recovery.json").read_text())["1"] for d in ("single", "launched")]
    for name in ("relative_error_before", "relative_error_after"):
        assert records[1][name] == pytest.approx(records[0][name], rel=1e-4)


def test_two_processes_reach_the_single_process_plan(tmp_path):
    model_dir, text_file = tmp_path / "model", tmp_path / "calib.txt"
    save_tiny_model(model_dir, "llama", num_layers=6)
    text_file.write_text(" ".join(["the module returns a new object for each class and function"] * 100))
    done = _launch(tmp_path, WORKLOAD, str(model_dir), str(text_file))[1]  # the launched run
    single, launched = tmp_path / "single", tmp_path / "launched"

    assert sorted(p.name for p in launched.iterdir()) == ["plans.json", "report.json"]
    assert done.stdout.count("drop 2 blocks:") == 1, "only the main process prints the plan"
    (expected, expected_compensations), (got, got_compensations) = (
        (lambda saved: (saved["plans"], saved["compensations"]))(json.loads((d / "plans.json").read_text()))
        for d in (single, launched))
    for name, transforms in expected_compensations.items():  # the reduced Gram sums (and cosine gradients)
        assert transforms.keys() == got_compensations[name].keys() == {"1", "3"}
        for p, transform in transforms.items():
            tolerance = 1e-4 if name == "cosine" else 1e-9  # Adam's steps see the gradients' rounding
            torch.testing.assert_close(torch.tensor(got_compensations[name][p]), torch.tensor(transform),
                                       rtol=tolerance, atol=tolerance * 1e-3)
    for name, plan in expected.items():
        other = got[name]
        torch.testing.assert_close(torch.tensor(other["cka"]), torch.tensor(plan["cka"]), rtol=1e-9, atol=1e-12)
        scores = [torch.nan if s is None else s for s in plan["scores"]]
        other_scores = [torch.nan if s is None else s for s in other["scores"]]
        torch.testing.assert_close(torch.tensor(other_scores), torch.tensor(scores), rtol=1e-9, atol=0, equal_nan=True)
        assert other["dropped"] == plan["dropped"], name
        assert (other["n_tokens"], other["n_batches"]) == (plan["n_tokens"], plan["n_batches"]) == (96, 3)
    for name in ("sglp-loss", "sglp-loss-all"):
        steps = zip(got[name]["extra"]["loss_check"]["steps"], expected[name]["extra"]["loss_check"]["steps"], strict=True)
        for mine, theirs in steps:
            assert mine["block"] == theirs["block"] and mine["loss"] == pytest.approx(theirs["loss"], rel=1e-12)
    for segment, search in expected["sglp-subset"]["extra"]["subset_search"].items():
        assert got["sglp-subset"]["extra"]["subset_search"][segment]["best_keep"] == search["best_keep"]
        assert got["sglp-subset"]["extra"]["subset_search"][segment]["best_score"] == pytest.approx(search["best_score"], rel=1e-9)
    reports = [json.loads((d / "report.json").read_text()) for d in (single, launched)]
    assert reports[1]["dropped"] == reports[0]["dropped"] and reports[1]["n_batches"] == reports[0]["n_batches"] == 3
    torch.testing.assert_close(torch.tensor(reports[1]["cka"]), torch.tensor(reports[0]["cka"]), rtol=1e-9, atol=1e-12)
