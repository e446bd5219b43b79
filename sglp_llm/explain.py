"""What ran and what chose each block, in words: the one source for the CLI help and summary, the
model card and the report, so that no output names a stage that did not run.
"""

from __future__ import annotations

from typing import Any

from .config import AUTO_VOCABULARY, NARROWED_FROM, SGLPConfig

GRADIENT_SCORE_TEXT = {
    "taylor": "the Taylor gate score −dL/dα (the first-order rise of the calibration loss when the block goes)",
    "fisher": "the gate's second moment E[(dL/dα)²] (GradNorm on a gate scaling the block's update)",
    "gradnorm": "the paper's GradNorm (the norm of the block's weight gradients)",
}
PEER_TEXT = {
    "block-influence": "ShortGPT's block influence (1 − cos(input, output)): the lowest-scored blocks of the whole stack",
    "angular": "Gromov et al.'s angular distance: the contiguous run whose input and output are closest in angle",
    "last": "the deepest unprotected blocks",
    "random": "seeded random blocks",
    "sleb": "SLEB: one removal at a time, each time the block whose removal leaves the lowest calibration loss",
}


COMPENSATION_TEXT = {
    "least_squares": "compensation: a d x d map T for each removed run (ReplaceMe), least squares on the "
                     "calibration tokens, folded into the MLP output projections of the block before the run",
    "cosine": "compensation: a d x d map T for each removed run (ReplaceMe's cosine variant), minimising the "
              "cosine distance on the calibration tokens with a least-squares scale, folded into the MLP output "
              "projections of the block before the run",
    "rescale": "compensation: a per-channel scale of the MLP branch's output for each removed run, least squares "
               "on the calibration tokens, folded into the output projections (or post-feedforward norm) of the "
               "block before the run",
}
COMPENSATION_FIT_TEXT = {
    "original": "each fitted on the original network",
    "pruned": "fitted run by run on the network pruned and compensated so far",
}


def stages(config: dict[str, Any], calibration_tokens: int | None = None) -> list[str]:
    """The stages a run with these settings (SGLPConfig.to_dict()) performs, in order; with
    `calibration_tokens` (what the run had), token counts are what the loss check could read."""
    compensation = config.get("compensation", "none")
    choice = _choice_stages(config, calibration_tokens)
    if config.get("decide_among"):
        peers = "; ".join(f"{m} ({PEER_TEXT[m]})" for m in config["decide_among"])
        choice.append(
            f"decision: the choice above against the peers' ({peers}), each on the same calibration; the set "
            f"whose removal leaves the lowest calibration loss on every calibration token after the first "
            f"{config.get('loss_tokens')} (which the loss check did not read) goes"
        )
    if config.get("recover", "none") == "blocks":
        choice.append(
            "recovery: each kept block that feeds a removed run trained (all its weights, "
            f"{config.get('recover_steps')} AdamW steps at lr {config.get('recover_learning_rate')}) to give the "
            "original's state after the run from the input the pruned network gives it, on new windows of the "
            "calibration text each step"
        )
    if compensation == "none":
        return choice
    fit = COMPENSATION_FIT_TEXT[config.get("compensation_fit", "original")]
    if config.get("compensation_aware"):
        choice[-1] += f"; each candidate removal measured with its {compensation} compensation fitted and applied"
    return choice + [f"{COMPENSATION_TEXT[compensation]}, {fit}"]


def _choice_stages(config: dict[str, Any], calibration_tokens: int | None) -> list[str]:
    method = config.get("method", "sglp")
    if method != "sglp":
        return [f"choice: {PEER_TEXT[method]}; no CKA groups, no gradient score"]
    sinks = ", attention-sink tokens left out" if config.get("cka_skip_sinks") else ""
    settings = SGLPConfig.from_dict(config)
    if not settings.uses_groups:
        return [
            f"similarity: linear CKA between every pair of block outputs on the calibration tokens{sinks}, "
            "for the report and heatmap only: the choice does not use it",
            "groups: none (`groups: true` keeps the choice to the Fisher groups; they changed no choice of the "
            "loss check on either benchmarked model)",
            *_score_and_choice(config, settings, calibration_tokens),
        ]
    lines = [f"similarity: linear CKA between every pair of block outputs on the calibration tokens{sinks}"]
    if config.get("num_segments") == 1:
        lines.append("groups: none (one group holds every block)")
    else:
        feature = "column sums" if config.get("segment_feature", "column_sum") == "column_sum" else "rows"
        k = (f"k = {config['num_segments']}" if config.get("num_segments")
             else f"k chosen by the {'elbow' if config.get('auto_k') == 'elbow' else '5 %'} rule")
        lines.append(f"groups: Fisher optimal segmentation of the CKA {feature} into contiguous groups ({k})")
    return lines + _score_and_choice(config, settings, calibration_tokens)


def _score_and_choice(config: dict[str, Any], settings: SGLPConfig, calibration_tokens: int | None) -> list[str]:
    lines = []
    score = config.get("gradient_score", "taylor")
    if settings.needs_backward:
        lines.append(f"gradient score, from one backward: {GRADIENT_SCORE_TEXT[score]}")
    else:
        lines.append("gradient score: none (no backward runs)")
    scoring = config.get("scoring")
    if scoring == "loss":
        size = config.get("loss_candidates")
        if not settings.uses_groups:
            pool = "every unprotected block" if size == "all" else f"the {size} lowest-scored unprotected blocks"
            share = ""
        else:
            pool = "every block of its group" if size == "all" else f"the {size} lowest-scored blocks of each group"
            share = ("; each group giving as many as the loss decides, keeping at least one"
                     if config.get("allocation") in ("auto", "loss") else f"; drops per group by {config.get('allocation')}")
        samples = config.get("loss_screen_samples")
        errors = config.get("loss_screen_errors", 0)  # a plan older than the allowance took the estimates as they were
        screen = {
            "taylor": "; the first step measures only the candidates the Taylor estimates make promising",
            "sequences": f"; the first step measures only the candidates that a screen on {samples} calibration "
                         f"sequence{'s' if samples != 1 else ''} makes promising"
                         + (f" (its estimates lowered by {errors:g} expected error{'s' if errors != 1 else ''})" if errors else ""),
            None: "",
        }[settings.first_step_screen]
        tokens = config.get("loss_tokens")
        # a calibration shorter than loss_tokens (+ as many held back) is read whole: say what was read
        held_back_tokens = tokens
        if calibration_tokens is not None:
            tokens, held_back_tokens = min(tokens, calibration_tokens), min(tokens, max(calibration_tokens - tokens, 0))
        positions = config.get("loss_positions", 1.0)
        measured_on = f"{tokens} tokens" + (f", the head scoring {positions:.0%} of each window's positions" if positions < 1 else "")
        vocabulary = config.get("loss_vocabulary", 0)  # a plan older than the option scored the whole vocabulary
        if vocabulary is None:  # not settled yet (a plan before the model): `SGLPConfig.resolve_loss_vocabulary`
            measured_on += (f", the NLL estimated from each sequence's {AUTO_VOCABULARY} likeliest tokens per position "
                            "under the original model, its next tokens and a weighted sample of the rest when the "
                            f"model's head is a linear layer over {NARROWED_FROM} tokens or more, else from the whole vocabulary")
        elif vocabulary:
            measured_on += (f", the NLL estimated from each sequence's {vocabulary} likeliest tokens per position under the "
                            "original model, its next tokens and a weighted sample of the rest")
        if config.get("loss_beam", 1) > 1:
            lines.append(
                f"choice: a beam of the {config['loss_beam']} removal sets with the lowest {loss_name(config)} "
                f"({measured_on}), among {pool}; the final choice among them by the same loss on the next "
                f"{held_back_tokens} calibration tokens, held back from the search"
            )
        else:
            confirm = config.get("loss_confirm", 1)
            held = (f"; at each step the {confirm} best are measured on the next {held_back_tokens} calibration tokens, "
                    "held back from the search, and the best there goes") if confirm > 1 else ""
            rule = config.get("loss_ties", "none")
            ties = (f"; candidates whose loss is within {_tie_span(config)} (over the loss sequences) of the lowest "
                    "one's increase are a tie, and of those the block with the lowest block influence on the original "
                    "network goes" + (", among those that border a removed block when any does"
                                      if rule == "run-then-block-influence" else "")) if settings.settles_ties else ""
            risk = config.get("loss_risk", 0)  # a plan older than the option compared the losses alone
            if risk and settings.settles_ties:
                ties += (f"; each candidate's loss counted with {risk:g} standard error{'s' if risk != 1 else ''} of its "
                         "increase added (a removal whose damage varies between sequences is riskier on other text)")
            lines.append(
                f"choice: one removal at a time, the candidate whose removal leaves the lowest {loss_name(config)} "
                f"({measured_on}), among {pool}{share}{screen}{held}{ties}"
            )
    elif scoring == "block":
        lines.append("choice: the lowest-scored blocks of each group by the gradient score alone, drops per group "
                     f"by {'size' if config.get('allocation') == 'auto' else config.get('allocation')}; no loss check")
    else:
        lines.append("choice: the paper's subset search, keeping in each group the subset whose network has the "
                     "highest GradNorm")
    return lines


def _tie_span(config: dict[str, Any]) -> str:
    """How far a near-tie spans, in words (a plan older than `loss_tie_errors`: one standard error)."""
    errors = config.get("loss_tie_errors", 1.0)
    return "one standard error" if errors == 1 else f"{errors:g} standard errors"


def loss_name(config: dict[str, Any]) -> str:
    """What the loss check's loss is, for people."""
    if config.get("loss_objective", "nll") == "kl":
        return "KL divergence to the original model's next-token distribution on the calibration tokens"
    return "calibration loss"


def chosen_by(plan: Any) -> dict[int, str]:
    """For each dropped block of `plan` (a PruningPlan), what chose it."""
    decision = plan.extra.get("decision")
    if not decision:
        return _chosen_by(plan)
    losses = {name: c["held_back_loss"] for name, c in decision["candidates"].items()}
    chosen = decision["chosen"]
    others = ", ".join(f"{name}'s {decision['candidates'][name]['dropped']} {loss:.4f}"
                       for name, loss in losses.items() if name != chosen)
    why = (f"held-back calibration loss {losses[chosen]:.4f} on {decision['held_back_tokens']} tokens, "
           f"against {others}")
    if chosen == plan.config.get("method", "sglp"):
        return {block: f"{reason}; kept over the peers by the {why}" for block, reason in _chosen_by(plan).items()}
    return {block: f"{chosen}'s choice ({PEER_TEXT[chosen]}), taken over SGLP's by the {why}" for block in plan.dropped}


def kept_for_attention(plan: Any) -> str | None:
    """The block no method could drop as the hybrid stack's last full-attention block
    (`model.blocks.last_full_attention`), in words; None when there is none."""
    block = plan.extra.get("kept_as_last_full_attention")
    if block is None:
        return None
    return (f"block {block} kept: the drop could remove every full-attention block of this hybrid stack, "
            "and it keeps one (without any it would not run or would see no further than its window)")


def _chosen_by(plan: Any) -> dict[int, str]:
    config, dropped = plan.config, plan.dropped
    method = config.get("method", "sglp")
    if method == "sleb":
        steps = plan.extra.get("sleb_steps", [])
        return {s["block"]: f"SLEB removal {n + 1}, calibration loss {s['loss']:.4f}" for n, s in enumerate(steps)}
    if method != "sglp":
        return {b: f"{plan.score_kind} {plan.score_text(b)}" for b in dropped}
    reasons = {}
    settings = SGLPConfig.from_dict(config)
    ranked = settings.needs_backward
    steps = {s["block"]: (n + 1, s) for n, s in enumerate(plan.extra.get("loss_check", {}).get("steps", []))}
    protected = set(plan.extra.get("protected", []))
    for segment in plan.segments:
        # ranked among the blocks of the group that may go, lowest score first
        free = [b for b in segment if b not in protected]
        order = sorted(free, key=lambda b: (plan.scores[b] if plan.scores[b] is not None else float("inf"), b))
        for block in segment:
            if block not in dropped:
                continue
            parts = [f"group {segment[0]}-{segment[-1]}"] if settings.uses_groups else []
            if ranked:
                parts.append(
                    f"rank {order.index(block) + 1} of {len(free)} by {plan.score_kind} ({plan.score_text(block)})"
                )
            if block in steps:
                step, record = steps[block]
                parts.append(f"loss check removal {step}, {loss_name(config)} {record['loss']:.4f}")
                if "tied" in record:
                    others = [b for b in record["tied"] if b != block]
                    parts.append(f"tied with {others} (within {record['tie_margin']:.4f}, {_tie_span(config)}, of block "
                                 f"{record['lowest_loss']}'s loss), settled by block influence "
                                 f"({record['block_influence'][str(block)]:.4f}"
                                 f"{', bordering a removed block' if record.get('borders_removed') else ''})")
                if "held_back" in record:
                    parts.append(f"on the held-back tokens {record['held_back'][str(block)]:.4f}, "
                                 f"the best of the search's {len(record['held_back'])} best")
            elif config.get("scoring") == "subset":
                parts.append("outside the group's best keep-set by network GradNorm")
            reasons[block] = "; ".join(parts)
    return reasons
