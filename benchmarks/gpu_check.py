"""The CUDA paths in one short run (issue 26): what the CPU test suite can only check as decisions.

Each check runs the installed `sglp-llm` command line and prints one line: PASS, FAIL (with the
reason) or SKIP (no CUDA device here). The exit status is 1 when any check failed.

- cpu reference: `analyze` on the CPU in float32, the choice the CUDA runs are compared with;
- the README's first command (`prune --ratio 0.2`) on CUDA in float32 (its choice must equal the
  CPU's) and in bfloat16 and float16 (verification at half-precision tolerances; the choice is
  reported beside the CPU's);
- `analyze --device-map auto`;
- sequential onloading to cuda:0 with the blocks read from disk (a safetensors folder);
- a short `heal` of the bfloat16 model;
- `analyze --dataset builtin:self-generated` twice on CUDA: the sampling seeded there (same choice);
- `analyze --plan-time` on CUDA in bfloat16: the throughput it measures (the figure the 8B and
  70B predictions in docs/large-models.md assume) and the predicted time beside the bfloat16
  prune's.

    python benchmarks/gpu_check.py                   # the packaged SmolLM2-135M, under 8 minutes on one GPU
    python benchmarks/gpu_check.py --model DIR --dataset FILE --n-samples 8 --seq-len 32   # any model

Results: print them, and copy the lines into benchmarks/results/gpu.md with the device's name.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch


class CheckFailed(Exception):
    """A check's reason for failing, in one line."""


def _cli(*args: str) -> str:
    """Run `sglp-llm ARGS`; its output, or CheckFailed with the end of its error output."""
    done = subprocess.run([sys.executable, "-m", "sglp_llm.cli", *args, "--no-progress"], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["(no output)"]
        raise CheckFailed(f"exit {done.returncode}: {tail[0]}")
    return done.stdout


def _dropped(report: Path) -> list[int]:
    return json.loads(report.read_text())["dropped"]


class Checks:
    """The checks of one run, sharing the model, the calibration settings and a work folder."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.work = work
        self.sample = ["--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)]
        self.model = ["--model", args.model] if args.model else []
        self.common = [*self.model, *self.sample, *(["--dataset", args.dataset] if args.dataset else [])]
        self.ratio = str(args.ratio)
        self.heal_steps = str(args.heal_steps)
        self.cpu_choice: list[int] | None = None

    def cpu_reference(self) -> str:
        report = self.work / "cpu.json"
        _cli("analyze", *self.common, "--ratio", self.ratio, "--device-map", "cpu", "--dtype", "float32", "--report", str(report))
        self.cpu_choice = _dropped(report)
        return f"drops {self.cpu_choice}"

    def _prune_on_cuda(self, dtype: str, must_match: bool) -> str:
        out = self.work / f"pruned-{dtype}"
        printed = _cli("prune", *self.common, "--ratio", self.ratio, "--dtype", dtype, "--output", str(out))
        if "written to" not in printed:
            raise CheckFailed("prune did not say where it wrote the model")
        report = json.loads((out / "sglp_report.json").read_text())
        if not any(device.startswith("cuda") for device in report.get("extra", {}).get("devices", ["cuda?"])):
            raise CheckFailed(f"the analysis ran on {report['extra'].get('devices')}, not on CUDA")
        choice = report["dropped"]
        if must_match and self.cpu_choice is not None and choice != self.cpu_choice:
            raise CheckFailed(f"drops {choice} on CUDA, {self.cpu_choice} on the CPU")
        return f"drops {choice} (CPU: {self.cpu_choice}); verified and written"

    def readme_float32(self) -> str:
        return self._prune_on_cuda("float32", must_match=True)

    def readme_bfloat16(self) -> str:
        return self._prune_on_cuda("bfloat16", must_match=False)

    def readme_float16(self) -> str:
        return self._prune_on_cuda("float16", must_match=False)

    def device_map_auto(self) -> str:
        report = self.work / "auto.json"
        _cli("analyze", *self.common, "--ratio", self.ratio, "--dtype", "bfloat16", "--device-map", "auto", "--report", str(report))
        return f"drops {_dropped(report)}"

    def _pruned(self, dtype: str) -> Path:
        """The folder an earlier check pruned in `dtype`, which a later check starts from."""
        folder = self.work / f"pruned-{dtype}"
        if not folder.is_dir():
            raise CheckFailed(f"needs the {dtype} prune's folder (its check failed)")
        return folder

    def sequential_from_disk(self) -> str:
        report = self.work / "disk.json"
        _cli("analyze", "--model", str(self._pruned("float32")), "--drop", "1", *self.sample, "--offload", "sequential",
             "--blocks-on-disk", "--onload-device", "cuda:0", "--report", str(report))
        return f"drops {_dropped(report)} of the pruned model, one block on cuda:0 at a time"

    def short_heal(self) -> str:
        out = self.work / "healed"
        _cli("heal", str(self._pruned("bfloat16")), "--steps", self.heal_steps, "--merge", "--output", str(out))
        healing = json.loads((out / "heal_report.json").read_text())
        return f"{self.heal_steps} steps, loss {healing['loss']['first']:.3f} -> {healing['loss']['last']:.3f}"


    def self_generated(self) -> str:
        """The model's own text sampled on CUDA (its generator forked and seeded there): the same
        windows, so the same choice, twice."""
        choices = []
        for run in range(2):
            report = self.work / f"self-generated-{run}.json"
            _cli("analyze", *self.model, *self.sample, "--dataset", "builtin:self-generated",
                 "--ratio", self.ratio, "--dtype", "bfloat16", "--report", str(report))
            plan = json.loads(report.read_text())
            if "the model's own samples" not in (plan.get("calibration_source") or ""):
                raise CheckFailed(f"calibrated on {plan.get('calibration_source')!r}, not the model's own samples")
            choices.append(plan["dropped"])
        if choices[0] != choices[1]:
            raise CheckFailed(f"drops {choices[0]}, then {choices[1]}: the sampling is not seeded on CUDA")
        return f"drops {choices[0]} both times"

    def time_plan(self) -> str:
        report = self.work / "time-plan.json"
        _cli("analyze", *self.common, "--ratio", self.ratio, "--dtype", "bfloat16", "--plan-time", "--report", str(report))
        plan = json.loads(report.read_text())
        rate = plan["throughput"]
        return (f"{rate['source']}: {rate['block_token_s'] * 1e9:.1f} ns per block-token, {rate['head_token_s'] * 1e9:.1f} ns "
                f"per head position; predicted {plan['total_s']:.0f} s of compute (the bfloat16 prune above: see its time)")


# name -> (needs CUDA, the check)
CHECKS: dict[str, tuple[bool, Callable[[Checks], str]]] = {
    "cpu reference (float32)": (False, Checks.cpu_reference),
    "README command on cuda, float32": (True, Checks.readme_float32),
    "README command on cuda, bfloat16": (True, Checks.readme_bfloat16),
    "README command on cuda, float16": (True, Checks.readme_float16),
    "--device-map auto": (True, Checks.device_map_auto),
    "sequential onloading to cuda:0 from disk": (True, Checks.sequential_from_disk),
    "short heal on cuda": (True, Checks.short_heal),
    "the model's own text sampled on cuda": (True, Checks.self_generated),
    "time plan on cuda, bfloat16": (True, Checks.time_plan),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="default: the packaged SmolLM2-135M")
    parser.add_argument("--dataset", help="calibration text (default: the built-in one)")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heal-steps", type=int, default=20)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'no CUDA device: the CUDA checks are skipped'}", flush=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="sglp-gpu-check-") as tmp:
        checks = Checks(args, Path(tmp))
        for name, (needs_cuda, check) in CHECKS.items():
            if needs_cuda and not cuda:
                print(f"SKIP {name}: no CUDA device", flush=True)
                continue
            started = time.perf_counter()
            try:
                detail = check(checks)
            except CheckFailed as reason:
                failed += 1
                print(f"FAIL {name} ({time.perf_counter() - started:.0f} s): {reason}", flush=True)
            else:
                print(f"PASS {name} ({time.perf_counter() - started:.0f} s): {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
