"""The time plan (`sglp-llm analyze --plan-time`) against measured analyses of the real models, at
about 10 % and 30 % of their blocks, with the tool's defaults (32 windows of 256 docstring tokens,
the stability check on, the loss check's head narrowed to 32 likeliest tokens, as the default
narrows it on both models) or, with `--loss-vocabulary 0`, the whole head. In one process: the throughput is measured on a one-block copy with
random weights, then each analysis runs, and three figures are compared:

- predicted: the plan as a user sees it before the run (assumed removal order and lazy
  measurements per step);
- counted: the same count given the run's actual order and measurements per step (what is left
  is the throughput's error);
- measured: the analysis' wall time less what the plan leaves out (the preflight check and
  reading the calibration text).

The lazy search's measurements per step (after the first) are recorded: they set
`sglp_llm.time_plan.MEASURED_PER_STEP`.

    python benchmarks/time_plan.py --threads 1 [--loss-vocabulary 0]

Results: benchmarks/results/time-plan-<model>.json (time-plan-wholehead-<model>.json with the whole
head, the default until 2026-12-07's evening; time-plan-bounds-<model>.json: the narrowed head with the
first step's screened estimates as bounds, as before that evening; time-plan-contended-<model>.json: the
default measured beside other runs, kept to show what contention does to the prediction) and time-plan.md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quality import MODELS, RATIOS, RESULTS, gather_results
from sglp_llm.api import analyze
from sglp_llm.config import SGLPConfig
from sglp_llm.data import STDLIB_DOCS, prepare_calibration
from sglp_llm.model.blocks import find_decoder_blocks
from sglp_llm.model.loading import load_model
from sglp_llm.time_plan import ModelShape, Throughput, count_analysis, measure_throughput, plan_time


def measure(name: str, vocabulary: int = 32) -> dict:
    loaded = load_model(name, dtype="float32")
    model = loaded.model
    num_blocks = len(find_decoder_blocks(model).layers)
    # the head narrowed to `vocabulary` likeliest tokens (time-plan-<model>.json) or whole (0,
    # time-plan-wholehead-<model>.json)
    base = SGLPConfig(drop=1, dataset=STDLIB_DOCS, loss_vocabulary=vocabulary)
    calibration = prepare_calibration(None, loaded.tokenizer, base)
    started = time.perf_counter()
    throughput = measure_throughput(model.config, dtype=torch.float32, device="cpu", seq_len=base.seq_len)
    result = {"model": loaded.name, "num_blocks": num_blocks, "threads": torch.get_num_threads(),
              "loss_screen_errors": base.loss_screen_errors,
              "throughput": vars(throughput) | {"seconds": time.perf_counter() - started}, "runs": []}
    for ratio in (RATIOS[0], RATIOS[-1]):
        config = base.replace(drop=None, ratio=ratio)
        predicted = plan_time(ModelShape.of(model.config), config, throughput)
        started = time.perf_counter()
        plan = analyze(model, calibration, config, progress=False)
        wall = time.perf_counter() - started
        steps = plan.extra["loss_check"]["steps"]
        per_step = [step["measured"] for step in steps[1:]]
        counted = _counted(num_blocks, config, throughput, steps, predicted.narrowed_share)
        measured = wall - plan.timings.get("preflight_s", 0.0) - plan.timings.get("calibration_data_s", 0.0)
        run = {"drop": len(plan.dropped), "dropped": plan.dropped, "order": [s["block"] for s in steps],
               "predicted_s": predicted.total_s(), "predicted_phases_s": predicted.seconds(), "counted_s": counted,
               "measured_s": measured, "timings": plan.timings, "measured_per_step": per_step,
               "first_step_measured": steps[0]["measured"], "loss_vocabulary": plan.config["loss_vocabulary"],
               "narrowed_share": predicted.narrowed_share}
        result["runs"].append(run)
        print(name, {k: v for k, v in run.items() if k not in ("timings", "predicted_phases_s")}, flush=True)
    (RESULTS / f"time-plan-{'' if vocabulary else 'wholehead-'}{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _counted(num_blocks: int, config: SGLPConfig, throughput: Throughput, steps: list[dict], narrowed_share: float) -> float:
    """The plan's seconds given the run's removal order and measurements per step (which blocks
    it measured is still assumed: the removed one's nearest neighbours; the stability check's
    halves are assumed to take the same steps), a narrowed head position at `narrowed_share`."""
    phases, _ = count_analysis(num_blocks, config, order=[s["block"] for s in steps], measured_per_step=[s["measured"] for s in steps])
    return sum(throughput.seconds(w, narrowed_share) for w in phases.values())


def markdown(result: dict) -> str:
    rate = result["throughput"]
    vocabulary = result["runs"][0].get("loss_vocabulary", 0)
    head = (f"the loss check's head narrowed to each sequence's {vocabulary} likeliest tokens" if vocabulary
            else "the loss check's head over the whole vocabulary")
    # runs before 2026-12-07's evening took the first step's screened estimates as bounds
    errors = result.get("loss_screen_errors", 0)
    head += (f", the screened estimates lowered by {errors:g} expected error (the default)" if errors
             else ", the screened estimates as bounds (the default until 2026-12-07's evening)")
    lines = [f"## {result['model']}: {head}", "",
             f"- {head}; the stability check's halves assumed to read back the choice's first step and measure the "
             "rest on their own",
             *([f"- conditions: {result['conditions']}"] if result.get("conditions") else []),
             f"- {result['num_blocks']} blocks; {result['threads']} torch thread(s); throughput {rate['source']}, measured in "
             f"{rate['seconds']:.1f} s: {rate['block_token_s'] * 1e6:.2f} µs per block-token, {rate['head_token_s'] * 1e6:.2f} µs "
             "per head position" + (f", {rate['likeliest_token_s'] * 1e6:.2f} µs per position picking the likeliest tokens"
                                    if rate.get("likeliest_token_s") else ""), "",
             "| drop | measured (s) | predicted (s) | predicted / measured | counted with the run's order and measurements per step (s) | "
             "measurements per lazy step (mean) | blocks |", "|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        per_step = run["measured_per_step"]
        mean = sum(per_step) / len(per_step) if per_step else float("nan")
        lines.append(f"| {run['drop']} | {run['measured_s']:.0f} | {run['predicted_s']:.0f} | "
                     f"{run['predicted_s'] / run['measured_s']:.2f} | {run['counted_s']:.0f} | {mean:.1f} | {run['dropped']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loss-vocabulary", type=int, default=32, help="0: the whole head")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        measure(name, args.loss_vocabulary)
    gather_results("time-plan", "The time plan against measured analyses (benchmarks/time_plan.py, issue 26)", markdown,
                   variants=("", "contended-", "bounds-", "wholehead-"))


if __name__ == "__main__":
    main()
