"""benchmarks/gpu_check.py's CPU part as a smoke test: on a machine without CUDA it runs the CPU
reference, says it skips every CUDA check, and fails (exit 1) when a check fails."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tiny_models import save_tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(folder, "llama", num_layers=6)
    text = folder / "text.txt"
    text.write_text(" ".join(["the module returns a new object for each class and function"] * 100))
    return folder, text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA checks would run: this is the CPU smoke test")
def test_without_cuda_the_cpu_reference_runs_and_every_cuda_check_says_it_is_skipped(gpu_check, tiny, capsys):
    folder, text = tiny
    status = gpu_check.main(["--model", str(folder), "--dataset", str(text), "--n-samples", "4", "--seq-len", "16",
                             "--ratio", "0.34"])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0 and lines[0].startswith("device: no CUDA device")
    assert lines[1].startswith("PASS cpu reference (float32)") and "drops [" in lines[1]
    cuda_checks = [name for name, (needs_cuda, _) in gpu_check.CHECKS.items() if needs_cuda]
    assert lines[2:] == [f"SKIP {name}: no CUDA device" for name in cuda_checks] and len(cuda_checks) == 8


def test_a_failing_check_prints_why_and_exits_1(gpu_check, monkeypatch, capsys):
    def fails(*args):
        raise gpu_check.CheckFailed("exit 2: sglp-llm: error: no such model")

    monkeypatch.setattr(gpu_check, "_cli", fails)
    status = gpu_check.main(["--model", "missing", "--n-samples", "4", "--seq-len", "16"])
    printed = capsys.readouterr().out
    assert status == 1 and "FAIL cpu reference (float32)" in printed and "exit 2: sglp-llm: error: no such model" in printed


def test_the_sampling_check_runs_its_commands_where_it_is_run(gpu_check, tiny, tmp_path):
    """Its command lines and report reading, on the CPU here: a seeded sampling gives one choice twice."""
    import argparse

    folder, _ = tiny
    args = argparse.Namespace(model=str(folder), dataset=None, ratio=0.34, n_samples=4, seq_len=16, heal_steps=1)
    assert gpu_check.Checks(args, tmp_path).self_generated().endswith("both times")
