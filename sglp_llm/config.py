"""`SGLPConfig`: every setting of a pruning run, validated, and saved/loaded as YAML or JSON.

Recipes, the CLI and the Python API all build this one object, so a run is reproducible from
the config stored next to the pruned model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_NAME = "sglp_config.json"

METHODS = ("sglp", "block-influence", "angular", "last", "random", "sleb")
SCORING_MODES = ("block", "subset", "loss")
GRADIENT_SCORES = ("taylor", "fisher", "gradnorm")  # sglp_llm.statistics.score
LOSS_BOUNDS = ("stale", "marginal", "local")
LOSS_SCREENS = ("sequences", "taylor")
LOSS_OBJECTIVES = ("nll", "kl")  # sglp_llm.selection.removal
LOSS_TIES = ("none", "block-influence", "run-then-block-influence")  # sglp_llm.selection.loss_check
HIDDEN_STATES = ("auto", "memory", "disk")  # sglp_llm.passes.hidden_states
COMPENSATIONS = ("none", "least_squares", "cosine", "rescale")  # sglp_llm.recovery.compensate
COMPENSATION_FITS = ("original", "pruned")
RECOVERIES = ("none", "blocks")  # sglp_llm.recovery.block_recovery
AUTO_K_RULES = ("reference", "elbow")
# the settings that decide which calibration batches a run uses
CALIBRATION_FIELDS = (
    "dataset", "dataset_config", "dataset_split", "text_column", "seq_len", "n_samples", "batch_size", "seed",
)
ALLOCATIONS = ("auto", "size", "redundancy", "loss")
SEGMENT_FEATURES = ("column_sum", "rows")
CKA_DTYPES = ("float32", "float64")
OFFLOAD_MODES = ("none", "sequential")


class ConfigError(ValueError):
    """A setting is missing, out of range or inconsistent; the message says what to change."""


class SettingsFile:
    """Saving and loading of a settings dataclass (`SGLPConfig`, `heal.HealConfig`) as JSON or
    YAML, so every kind of run is reproducible from the file stored next to its output.

    Subclasses name their file inside a model folder (`FILE_NAME`) and their section of a recipe
    (`SECTION`).
    """

    FILE_NAME: str
    SECTION: str
    # section name -> its settings, for files people read (the rest stay at the top); a file or
    # recipe may give the settings flat or in these sections
    SECTIONS: dict[str, tuple[str, ...]] = {}

    def to_dict(self) -> dict[str, Any]:
        """Every setting under its own name (what reports and plans record)."""
        return dataclasses.asdict(self)

    def to_sections(self) -> dict[str, Any]:
        """The settings with those of each of `SECTIONS` grouped under the section's name."""
        flat = self.to_dict()
        grouped = {k: v for k, v in flat.items() if not any(k in names for names in self.SECTIONS.values())}
        for section, names in self.SECTIONS.items():
            grouped[section] = {name: flat[name] for name in names}
        return grouped

    @classmethod
    def flat_settings(cls, data: dict[str, Any]) -> dict[str, Any]:
        """`data` with the settings of each of `SECTIONS` taken out of their section."""
        flat = {k: v for k, v in data.items() if k not in cls.SECTIONS}
        for section in cls.SECTIONS:
            if section not in data:
                continue
            settings = data[section]
            if not isinstance(settings, dict):
                raise ConfigError(f"Section {section!r} must be a mapping of settings, got {type(settings).__name__}.")
            misplaced = sorted(set(settings) - set(cls.SECTIONS[section]))
            if misplaced:
                raise ConfigError(f"{misplaced} do not belong in section {section!r}, whose settings are "
                                  f"{list(cls.SECTIONS[section])}; give them in their own section or flat.")
            twice = sorted(set(settings) & set(flat))
            if twice:
                raise ConfigError(f"{twice} given both in section {section!r} and outside it: give each once.")
            flat.update(settings)
        return flat

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """From flat settings or settings grouped in `SECTIONS` (or a mix of both)."""
        if not isinstance(data, dict):
            raise ConfigError(f"A config must be a mapping of settings, got {type(data).__name__}.")
        data = cls.flat_settings(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"Unknown setting(s) {unknown}. Valid settings: {sorted(known)}."
            )
        return cls(**data)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = (
            yaml.safe_dump(self.to_sections(), sort_keys=False)
            if path.suffix in (".yaml", ".yml")
            else json.dumps(self.to_sections(), indent=2)
        )
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path):
        """Load from a .json, .yaml or .yml file (a recipe's `SECTION:` section is accepted)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {str(path)!r} does not exist.")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"Could not parse {str(path)!r}: {err}") from err
        if isinstance(data, dict) and cls.SECTION in data:
            data = data[cls.SECTION]
        return cls.from_dict(data or {})

    def save_pretrained(self, directory: str | Path) -> None:
        self.save(Path(directory) / self.FILE_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path):
        return cls.load(Path(directory) / cls.FILE_NAME)


# loss_vocabulary None (`SGLPConfig.resolve_loss_vocabulary`): a head over at least NARROWED_FROM
# tokens scores each position's AUTO_VOCABULARY likeliest (with the batch's next tokens and a
# sample of the rest), a fraction of the head's time (benchmarks/results/cost.md)
AUTO_VOCABULARY = 32
NARROWED_FROM = 16384


@dataclass
class SGLPConfig(SettingsFile):
    """Settings of one SGLP run.

    How many blocks go: exactly one of ``drop`` (a count) or ``ratio`` (a fraction of the blocks,
    rounded to the nearest count).
    """

    FILE_NAME = CONFIG_NAME
    SECTION = "sglp"
    # how much and by which method stay at the top; "research" holds the knobs the benchmarks
    # showed buy nothing on real models (kept for measuring, see benchmarks/results/*.md)
    SECTIONS = {
        "calibration": ("dataset", "dataset_config", "dataset_split", "text_column", "seq_len", "n_samples",
                        "batch_size", "seed"),
        "selection": ("scoring", "gradient_score", "groups", "num_segments", "allocation", "protect_first",
                      "protect_last", "layers_path"),
        "loss_check": ("loss_candidates", "loss_tokens", "loss_positions", "loss_vocabulary", "loss_objective", "loss_beam", "loss_confirm",
                       "loss_ties", "decide_among"),
        "memory": ("offload", "onload_device", "hidden_states", "hidden_states_dir", "cka_max_tokens_per_batch",
                   "gradient_checkpointing", "checkpoint_dir", "checkpoint_every"),
        "recovery": ("compensation", "compensation_ridge", "compensation_aware", "recover", "recover_steps",
                     "recover_learning_rate"),
        "verification": ("verify", "stability_check"),
        "research": ("loss_lazy", "loss_bound", "loss_screen", "loss_screen_samples", "loss_screen_errors", "loss_risk", "loss_tie_errors", "segment_feature",
                     "auto_k", "auto_k_threshold", "max_segments", "min_segment_size", "compensation_fit",
                     "cka_minibatch_tokens", "cka_dtype", "cka_skip_sinks", "max_candidates", "subset_batches",
                     "sleb_batches"),
    }

    # -- how much to prune, and how: SGLP or a peer baseline (see sglp_llm.selection.baselines)
    drop: int | None = None
    ratio: float | None = None
    method: str = "sglp"

    # -- calibration data (see sglp_llm.data)
    # a source, or a list of sources whose windows are mixed in equal shares (sglp_llm.data)
    dataset: str | list[str] | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    text_column: str = "text"
    seq_len: int = 256
    n_samples: int = 32
    batch_size: int = 4
    seed: int = 0

    # -- CKA (see sglp_llm.statistics.cka)
    cka_minibatch_tokens: int = 512
    cka_max_tokens_per_batch: int | None = None
    cka_dtype: str = "float64"
    # leave attention sinks out of the CKA sums: each sequence's first token and massive-activation
    # tokens (norm > 10x the minibatch median at some block output; sglp_llm.statistics.cka)
    cka_skip_sinks: bool = False
    # "sequential": the same statistics with one decoder block on the device at a time, for
    # models larger than its memory (see sglp_llm.passes.sequential)
    offload: str = "none"
    # offload="sequential" only: where each block runs while it is onloaded (e.g. "cuda:0" for a
    # model held in CPU memory); unset: the device of the input embeddings
    onload_device: str | None = None
    # offload="sequential" only: where every block's hidden states wait between the forward, the
    # statistics and the backward: "memory", "disk" (a temporary folder in hidden_states_dir, or
    # the system's, removed at the end) or "auto" (disk when they would take over half the
    # available memory); see sglp_llm.passes.hidden_states
    hidden_states: str = "auto"
    hidden_states_dir: str | None = None

    # -- segmentation (see sglp_llm.selection.segment); used by method="sglp" only. groups: whether the
    # choice keeps to the Fisher groups of CKA-similar blocks (every group keeps a block, drops
    # allocated per group). scoring "block" and "subset" choose within groups by definition;
    # the loss check does not by default: the groups changed none of its choices on either
    # real model (benchmarks/results/ablation.md). None: that rule; true/false: force it
    groups: bool | None = None
    num_segments: int | None = None
    max_segments: int | None = None
    segment_feature: str = "column_sum"
    auto_k_threshold: float = 0.05
    auto_k: str = "elbow"  # "elbow" of the DP loss curve (measured default) or "reference" (the paper's 5 % rule)
    min_segment_size: int = 1
    # drops per segment: in proportion to "size" or "redundancy", or "loss": the loss check
    # (scoring="loss") takes each next block from whichever segment hurts least; every segment
    # keeps at least one block. "auto": "loss" under scoring="loss", else "size"
    allocation: str = "auto"

    # -- selection (see sglp_llm.statistics.score and sglp_llm.selection.select); scoring, max_candidates,
    # subset_batches and the loss_* settings are used by method="sglp" only, protection by every
    # method. gradient_score: the score from one backward that ranks each segment's blocks (see
    # sglp_llm.statistics.score): "taylor" (-dL/dα of a gate on the block: the first-order loss increase
    # when it goes), "fisher" (that gate's per-sequence second moment) or "gradnorm" (the paper's
    # norm of the block's weight gradients). scoring="block": the lowest-scored blocks of each
    # segment go; scoring="loss": removals are chosen one at a time by calibration loss among the
    # loss_candidates lowest-scored blocks of each segment that still has drops to give ("all":
    # every block of the segment, and no backward runs).
    # the paper's score. Without the loss check neither choice is good and the evidence is mixed
    # (benchmarks/results/ablation.md: GradNorm in the groups far better on SmolLM2, the Taylor
    # score far better on Gemma-3-270M); no score predicts a block's removal cost better than
    # the forward-only block influence (benchmarks/results/gate-scores-*.md)
    gradient_score: str = "gradnorm"
    scoring: str = "loss"  # measured default: benchmarks/results/quality.md
    max_candidates: int = 64
    subset_batches: int = 1
    loss_candidates: int | str = "all"
    # the calibration tokens (the first sequences holding at least this many) whose loss the loss
    # check compares, whatever the batch size; 2048 = the measured default of 2 batches of
    # 4 x 256 tokens (benchmarks/results/quality.md)
    loss_tokens: int = 2048
    # the share of each loss window's positions whose next-token loss the head scores (seeded,
    # spread evenly, the same for every candidate): the blocks still run on every position, the
    # head, most of a measurement with a large vocabulary (Gemma-3: 262k), on this share only
    loss_positions: float = 1.0
    # 0: the head scores the whole vocabulary; k > 0: on each loss batch only the tokens among the
    # original network's k likeliest at any position, the batch's next tokens and a sample of the
    # rest standing for all of it (an estimate of the NLL from a few of the head's columns); None:
    # 32 for the NLL on a plain linear head over at least 16384 tokens, else 0 (settled when the
    # model is loaded, `resolve_loss_vocabulary`; the default: 0.3-0.8x the whole head's analysis
    # time, its choices as good held out: benchmarks/results/robustness.md, `default-vocabulary`
    # against `default-logsumexp`, and ablation.md)
    loss_vocabulary: int | None = None
    # what a removal's loss is: "nll", the next-token NLL of the calibration text (SLEB's), or
    # "kl", the KL divergence from the original model's next-token distribution on it
    loss_objective: str = "nll"
    # 1: the greedy loss check; k > 1: a beam of the k best removal sets, the final choice among
    # them made on the next loss_tokens calibration tokens, held back from the search
    loss_beam: int = 1
    # 1: the greedy step takes the search's best candidate; k > 1: its k best are measured on the
    # held-back tokens (as loss_beam's) and the best there goes
    loss_confirm: int = 1
    # how the greedy step decides between candidates whose losses differ by less than the noise
    # of the calibration sample (within one standard error of the best's increase, measured
    # over the loss sequences): "none", the lowest loss goes; "block-influence", the one that
    # changes its input least in the original network goes (ShortGPT's score, from the
    # statistics pass): SGLP's representation view where the loss cannot decide;
    # "run-then-block-influence", the same among the tied blocks that border a removed one, if any
    # (measured default: benchmarks/results/robustness.md, `default` against `default-untied`; block
    # influence alone, `default-ties`, reached for low-influence blocks 25 and 26 on SmolLM2).
    # Only the greedy NLL check (no loss_beam, loss_confirm or KL objective) settles ties
    loss_ties: str = "run-then-block-influence"
    # peers (e.g. block-influence, angular) whose choices compete with SGLP's: the set whose removal
    # leaves the lowest calibration loss on every calibration token after the loss check's wins
    # (benchmarks/results/pool-decision.md; not the default: it spoils two measured cells)
    decide_among: list[str] = field(default_factory=list)
    # re-measure only the most promising candidate's loss at each step (see api._loss_check)
    loss_lazy: bool = True
    # the lazy lower bound: "stale" (the earlier loss), "marginal" (current loss + the earlier
    # increase; assumes a block's damage does not shrink as others go) or "local" (marginal
    # except next to a removal since, where stale; measured default)
    loss_bound: str = "local"
    # rank the first step's candidates on this many calibration sequences; only the promising
    # ones are measured on the loss batches (0: every candidate is; measured default: 1)
    loss_screen_samples: int = 1
    # a screened estimate stands as a candidate's bound only lowered by this many of its expected
    # errors: the spread over the loss sequences of the best fresh candidate's increase, scaled to
    # the screen's share of them (`screen_allowance`). A one-sequence screen's error is a few of
    # the loss check's standard errors, more than the gaps between the best candidates, so at 0
    # the first step can miss its best removal (SmolLM2, calibration seed 2: block 17's screen put
    # it 0.05 nats above block 5, on all loss tokens it is 0.02 below). The default (measured:
    # benchmarks/results/robustness.md, `default` against `default-logsumexp`, 0 here: SmolLM2's
    # worst 1.17 against 1.38 on the same draws); 0: the estimates stand as bounds
    loss_screen_errors: float = 1.0
    # rank a step's measured candidates by their loss plus this many standard errors of their
    # increase (`RemovalLoss.increase_error`) instead of the loss alone: a removal whose damage
    # varies between the calibration sequences is the riskier one on other text. 0: the loss
    # alone. Needs the greedy NLL check with near-ties settled (`settles_ties`)
    loss_risk: float = 0.0
    # how many standard errors of the best candidate's increase a near-tie spans (`loss_ties`):
    # candidates whose loss lies within that of the best's are tied
    loss_tie_errors: float = 1.0
    # what the first step's estimates come from: "sequences" (the loss on loss_screen_samples
    # sequences, above) or "taylor" (the loss plus each block's Taylor gate score, from the
    # statistics pass's backward: no extra forward)
    loss_screen: str = "sequences"
    # method="sleb" only: every candidate is scored on the first sleb_batches calibration batches
    # (unset: all of them, as in the paper); SLEB costs about drop × blocks × sleb_batches forwards
    sleb_batches: int | None = None
    protect_first: int = 1
    protect_last: int = 1

    # -- model structure
    layers_path: str | None = None

    # -- running the statistics pass; none of these change the statistics (see sglp_llm.api).
    # gradient_checkpointing: recompute block activations in the GradNorm backward (less memory,
    # about one more forward). checkpoint_dir: save the pass's sums there every
    # checkpoint_every batches, so a rerun resumes (see sglp_llm.passes.checkpoint)
    gradient_checkpointing: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1

    # -- compensation (see sglp_llm.recovery.compensate): after any selection, fit on the calibration
    # tokens a map T for the block before each removed run and fold it into that block's MLP
    # output projections ("least_squares": d x d, ReplaceMe; "cosine": its cosine-distance
    # variant; "rescale": per channel, also into a post-feedforward norm); compensation_ridge: λ
    # as a fraction of the mean diagonal of MᵀM; compensation_fit: fit every run on the original
    # network, or run by run on the network pruned and compensated so far ("pruned"). Off by
    # default: benchmarks/results/compensation.md
    compensation: str = "none"
    compensation_ridge: float = 0.0
    compensation_fit: str = "original"
    # the loss check (or SLEB) measures every candidate removal with its compensation fitted and
    # applied, instead of the plain removal
    compensation_aware: bool = False

    # -- recovery (see sglp_llm.recovery.block_recovery): after the removal, "blocks" trains each kept
    # block that feeds a gap (all its weights, one block at a time) to give the original's state
    # at the gap's far side from the input the pruned network gives it: recover_steps AdamW
    # steps at recover_learning_rate, each on batch_size new windows of the calibration text
    # (pre-tokenized batches: those, cycled). Off by default: benchmarks/results/recovery.md.
    # The rate: 3e-4 since 2026-12-07 (3e-3 before, which made Gemma-3-270M's held-out perplexity
    # worse than the plain drop; 3e-4 helped in every cell measured on both real models)
    recover: str = "none"
    recover_steps: int = 200
    recover_learning_rate: float = 3e-4

    # -- writing: run the pruned model (and the saved folder, reloaded) against the original with
    # the dropped blocks skipped, and write nothing on a mismatch (see sglp_llm.output.verify)
    verify: bool = True
    # analyse each half of the calibration sequences as well and report how far the two choices
    # agree (sglp_llm.stability): a choice that moves with the sample fits its noise
    stability_check: bool = True

    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """A config from its dict; one saved before `loss_tokens` replaced `loss_batches` (a batch
        count) loads with the tokens those batches held."""
        if isinstance(data, dict) and "loss_batches" in data:
            data = dict(data)
            batches = data.pop("loss_batches")
            rows = data.get("batch_size", cls.batch_size) * data.get("seq_len", cls.seq_len)
            data.setdefault("loss_tokens", batches * rows if isinstance(batches, int) else batches)
        return super().from_dict(data)

    def calibration_key(self) -> tuple:
        """What decides the calibration batches, hashable (a list of sources as a tuple)."""
        return tuple(tuple(v) if isinstance(v, list) else v for v in (getattr(self, n) for n in CALIBRATION_FIELDS))

    # ------------------------------------------------------------------ validation
    @property
    def drop_allocation(self) -> str:
        """The allocation rule in force: "auto" resolved for the scoring mode."""
        if self.allocation != "auto":
            return self.allocation
        return "loss" if self.scoring == "loss" else "size"

    @property
    def uses_groups(self) -> bool:
        """Whether the choice keeps to the Fisher groups (the `groups` setting, resolved)."""
        return self.groups if self.groups is not None else self.scoring != "loss"

    @property
    def settles_ties(self) -> bool:
        """Whether the loss check settles near-ties by `loss_ties`: only the greedy NLL check has the
        per-sequence losses it reads (with the KL objective or a held-back decision it does not apply)."""
        return (self.loss_ties != "none" and self.method == "sglp" and self.scoring == "loss"
                and self.loss_objective == "nll" and self.loss_beam == 1 and self.loss_confirm == 1)

    @property
    def first_step_screen(self) -> str | None:
        """What screens the loss check's first step: "taylor" (the gate's estimates), "sequences"
        (`loss_screen_samples` calibration sequences) or None. A compensated removal
        (`compensation_aware`) has no plain estimate to screen it by."""
        if self.compensation_aware:
            return None
        if self.loss_screen == "taylor":
            return "taylor"
        return "sequences" if self.loss_screen_samples else None

    @property
    def lowers_screened_estimates(self) -> bool:
        """Whether the first step's screened estimates are lowered by `loss_screen_errors` expected
        errors before they stand as bounds: a screen on sequences, for the NLL (whose per-sequence
        losses give the error)."""
        return self.first_step_screen == "sequences" and self.loss_screen_errors > 0 and self.loss_objective == "nll"

    @property
    def needs_backward(self) -> bool:
        """Whether the analysis needs a gradient score (a backward per calibration batch): SGLP
        does, except a loss check that tries every block of a segment."""
        if self.method != "sglp":
            return False
        return self.scoring != "loss" or self.loss_candidates != "all" or self.loss_screen == "taylor"

    @property
    def keeps_original_outputs(self) -> bool:
        """Whether the statistics pass keeps every block's output on the loss check's batches for
        it (sglp_llm.passes.original_outputs): a loss check starts from the original network; a
        compensation-aware one runs whole forwards instead."""
        return self.method == "sglp" and self.scoring == "loss" and not self.compensation_aware

    def validate(self) -> None:
        if (self.drop is None) == (self.ratio is None):
            raise ConfigError(
                "Say how many blocks to remove with exactly one of `drop` (a count, e.g. drop=6) "
                "or `ratio` (a fraction, e.g. ratio=0.2)."
            )
        if self.drop is not None and (not isinstance(self.drop, int) or self.drop < 1):
            raise ConfigError(f"`drop` must be a positive integer, got {self.drop!r}.")
        if self.ratio is not None and not (0.0 < float(self.ratio) < 1.0):
            raise ConfigError(f"`ratio` must be strictly between 0 and 1, got {self.ratio!r}.")
        if self.method not in METHODS:
            raise ConfigError(f"`method` must be one of {METHODS}, got {self.method!r}.")
        if isinstance(self.dataset, (list, tuple)):
            if not self.dataset or not all(isinstance(s, str) and s for s in self.dataset):
                raise ConfigError(f"`dataset` as a list mixes calibration sources: give their names, got {self.dataset!r}.")
            self.dataset = list(self.dataset)
        elif self.dataset is not None and not isinstance(self.dataset, str):
            raise ConfigError(f"`dataset` must be a source name, a list of them or unset, got {self.dataset!r}.")
        for name in (
            "seq_len", "n_samples", "batch_size", "max_candidates", "subset_batches", "loss_tokens", "loss_beam", "loss_confirm",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"`{name}` must be a positive integer, got {value!r}.")
        if not isinstance(self.cka_minibatch_tokens, int) or self.cka_minibatch_tokens < 4:
            raise ConfigError(
                "`cka_minibatch_tokens` must be an integer >= 4 (the unbiased HSIC needs at least "
                f"4 tokens per minibatch), got {self.cka_minibatch_tokens!r}."
            )
        if self.cka_max_tokens_per_batch is not None and self.cka_max_tokens_per_batch < 4:
            raise ConfigError("`cka_max_tokens_per_batch` must be >= 4 or unset.")
        if self.cka_dtype not in CKA_DTYPES:
            raise ConfigError(f"`cka_dtype` must be one of {CKA_DTYPES}, got {self.cka_dtype!r}.")
        if self.offload not in OFFLOAD_MODES:
            raise ConfigError(
                f"`offload` must be one of {OFFLOAD_MODES} (\"sequential\": one decoder block on the "
                f"device at a time, for models larger than its memory), got {self.offload!r}."
            )
        if self.segment_feature not in SEGMENT_FEATURES:
            raise ConfigError(
                f"`segment_feature` must be one of {SEGMENT_FEATURES}, got {self.segment_feature!r}."
            )
        if self.gradient_score not in GRADIENT_SCORES:
            raise ConfigError(
                f"`gradient_score` must be one of {GRADIENT_SCORES}, got {self.gradient_score!r}."
            )
        if self.loss_screen not in LOSS_SCREENS:
            raise ConfigError(f"`loss_screen` must be one of {LOSS_SCREENS}, got {self.loss_screen!r}.")
        if self.loss_screen == "taylor" and self.gradient_score != "taylor":
            raise ConfigError(
                "`loss_screen: taylor` estimates each removal's loss from the Taylor gate score, so it needs "
                f"`gradient_score: taylor` (got {self.gradient_score!r}); or use loss_screen \"sequences\"."
            )
        if self.scoring not in SCORING_MODES:
            raise ConfigError(f"`scoring` must be one of {SCORING_MODES}, got {self.scoring!r}.")
        if self.loss_candidates != "all" and (not isinstance(self.loss_candidates, int) or self.loss_candidates < 1):
            raise ConfigError(
                "`loss_candidates` must be a positive integer (the lowest-scored blocks of a segment "
                f"the loss check tries) or \"all\", got {self.loss_candidates!r}."
            )
        for name in ("num_segments", "max_segments", "sleb_batches"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"`{name}` must be a positive integer or unset, got {value!r}.")
        if self.loss_bound not in LOSS_BOUNDS:
            raise ConfigError(f"`loss_bound` must be one of {LOSS_BOUNDS}, got {self.loss_bound!r}.")
        if self.auto_k not in AUTO_K_RULES:
            raise ConfigError(f"`auto_k` must be one of {AUTO_K_RULES}, got {self.auto_k!r}.")
        if self.compensation not in COMPENSATIONS:
            raise ConfigError(f"`compensation` must be one of {COMPENSATIONS}, got {self.compensation!r}.")
        if not isinstance(self.compensation_ridge, (int, float)) or self.compensation_ridge < 0:
            raise ConfigError(f"`compensation_ridge` must be a non-negative number, got {self.compensation_ridge!r}.")
        if self.compensation_fit not in COMPENSATION_FITS:
            raise ConfigError(f"`compensation_fit` must be one of {COMPENSATION_FITS}, got {self.compensation_fit!r}.")
        if self.compensation != "none" and self.protect_first < 1:
            raise ConfigError("Compensation folds into the block before each removed run, so block 0 must stay: "
                              "set protect_first >= 1 or compensation: none.")
        if self.compensation_aware:
            if self.compensation == "none":
                raise ConfigError("`compensation_aware` measures candidates with their compensation: choose one "
                                  "(compensation: least_squares, cosine or rescale) or drop compensation_aware.")
            if not (self.method == "sleb" or (self.method == "sglp" and self.scoring == "loss")):
                raise ConfigError("`compensation_aware` changes how the loss check and SLEB measure a removal; "
                                  f"method {self.method!r} with scoring {self.scoring!r} measures none. Use the "
                                  "default loss check or method: sleb.")
            if self.offload == "sequential":
                raise ConfigError("`compensation_aware` runs each candidate in the model's own forward, not one "
                                  "block at a time; load the model in memory or drop compensation_aware.")
        if self.recover not in RECOVERIES:
            raise ConfigError(f"`recover` must be one of {RECOVERIES}, got {self.recover!r}.")
        if not isinstance(self.recover_steps, int) or isinstance(self.recover_steps, bool) or self.recover_steps < 1:
            raise ConfigError(f"`recover_steps` must be a positive integer, got {self.recover_steps!r}.")
        if (not isinstance(self.recover_learning_rate, (int, float)) or isinstance(self.recover_learning_rate, bool)
                or self.recover_learning_rate <= 0):
            raise ConfigError("`recover_learning_rate` must be a positive number (in YAML, e.g. 1.0e-4), got "
                              f"{self.recover_learning_rate!r}.")
        if self.recover != "none" and self.compensation != "none":
            raise ConfigError("Recovery trains the block before each removed run, which compensation also changes; "
                              "choose one (recover: none or compensation: none).")
        if self.hidden_states not in HIDDEN_STATES:
            raise ConfigError(f"`hidden_states` must be one of {HIDDEN_STATES}, got {self.hidden_states!r}.")
        if self.hidden_states_dir is not None and not Path(self.hidden_states_dir).expanduser().is_dir():
            raise ConfigError(
                f"`hidden_states_dir` {self.hidden_states_dir!r} is not an existing folder; create it or "
                "leave it unset (the system's temporary folder)."
            )
        if self.onload_device is not None:
            if self.offload != "sequential":
                raise ConfigError(
                    "`onload_device` says where blocks run under `offload: sequential`; set "
                    f"offload to \"sequential\" or leave onload_device unset (got {self.onload_device!r})."
                )
            import torch

            try:
                torch.device(self.onload_device)
            except (RuntimeError, TypeError) as error:
                raise ConfigError(
                    f"`onload_device` must name a torch device such as \"cuda:0\" or \"cpu\", got "
                    f"{self.onload_device!r} ({error})."
                ) from None
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"`allocation` must be one of {ALLOCATIONS}, got {self.allocation!r}.")
        if self.groups is False and self.scoring != "loss":
            raise ConfigError(
                f"`scoring: {self.scoring}` chooses the blocks each Fisher group gives up, so it needs the "
                "groups; drop `groups: false`, or use `scoring: loss`, which can choose over the whole stack."
            )
        if not self.uses_groups:
            given = [f"{name}: {getattr(self, name)!r}" for name in ("num_segments", "max_segments") if getattr(self, name) is not None]
            given += [f"allocation: {self.allocation!r}"] if self.allocation not in ("auto", "loss") else []
            if given:
                raise ConfigError(
                    f"{', '.join(given)} shapes the Fisher groups, which the loss check does not use by default; "
                    "add `groups: true` (--groups) to choose within them, or leave the setting out."
                )
        if self.allocation == "loss" and self.scoring != "loss":
            raise ConfigError(
                '`allocation: loss` lets the calibration-loss check decide how many blocks each '
                f'segment gives up, so it needs `scoring: loss` (got scoring={self.scoring!r}); '
                'or use allocation "size" or "redundancy".'
            )
        if not isinstance(self.min_segment_size, int) or self.min_segment_size < 1:
            raise ConfigError(
                f"`min_segment_size` must be a positive integer, got {self.min_segment_size!r}."
            )
        if not (0.0 <= self.auto_k_threshold < 1.0):
            raise ConfigError("`auto_k_threshold` must be in [0, 1).")
        if self.loss_beam > 1 and (self.method != "sglp" or self.scoring != "loss" or self.uses_groups):
            raise ConfigError(
                f"loss_beam={self.loss_beam} searches removal sets over the whole stack with the loss check: it needs "
                "method sglp, scoring loss and no groups; use loss_beam: 1 for the other choices."
            )
        if not isinstance(self.decide_among, (list, tuple)) or not all(isinstance(m, str) for m in self.decide_among):
            raise ConfigError(f"`decide_among` lists peer methods, e.g. [block-influence, angular]; got {self.decide_among!r}.")
        self.decide_among = list(self.decide_among)
        peers = [m for m in METHODS if m != "sglp"]
        wrong = [m for m in self.decide_among if m not in peers]
        if wrong or len(set(self.decide_among)) < len(self.decide_among):
            raise ConfigError(f"`decide_among` lists each peer once, among {', '.join(peers)}; got {self.decide_among!r}.")
        if self.decide_among and self.method != "sglp":
            raise ConfigError(
                f"decide_among puts peers' choices against SGLP's; with method {self.method!r} there is none: "
                "use method sglp, or leave decide_among empty."
            )
        if self.loss_beam > 1 and self.loss_confirm > 1:
            raise ConfigError("loss_beam and loss_confirm are two ways to decide on held-back tokens: set one of them.")
        if self.loss_vocabulary is not None and (isinstance(self.loss_vocabulary, bool) or not isinstance(self.loss_vocabulary, int)
                                                 or self.loss_vocabulary < 0):
            raise ConfigError(f"`loss_vocabulary` is how many of each position's likeliest tokens the loss check's head "
                              f"scores (0: the whole vocabulary; null: chosen for the model); got {self.loss_vocabulary!r}.")
        if self.loss_vocabulary and self.loss_objective != "nll":
            raise ConfigError("`loss_vocabulary` narrows the NLL's head; the KL objective compares whole distributions. "
                              "Use loss_objective: nll, or set loss_vocabulary to 0 or null.")
        if isinstance(self.loss_positions, bool) or not isinstance(self.loss_positions, (int, float)) or not 0 < self.loss_positions <= 1:
            raise ConfigError(f"`loss_positions` is the share of each window's positions the loss check scores, in (0, 1]; "
                              f"got {self.loss_positions!r}.")
        if self.loss_objective not in LOSS_OBJECTIVES:
            raise ConfigError(f"`loss_objective` must be one of {LOSS_OBJECTIVES}, got {self.loss_objective!r}.")
        if self.loss_ties not in LOSS_TIES:
            raise ConfigError(f"`loss_ties` must be one of {LOSS_TIES}, got {self.loss_ties!r}.")
        for name in ("protect_first", "protect_last", "loss_screen_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"`{name}` must be a non-negative integer, got {value!r}.")
        for name in ("loss_screen_errors", "loss_risk", "loss_tie_errors"):  # counts of standard errors
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"`{name}` must be a non-negative number of standard errors (0: off), got {value!r}.")
        if self.loss_risk and not self.settles_ties:
            raise ConfigError("`loss_risk` ranks the greedy NLL loss check's candidates where it settles near-ties: it needs "
                              "loss_ties other than none, loss_objective nll, and no loss_beam or loss_confirm.")
        for name in ("gradient_checkpointing", "loss_lazy", "verify", "cka_skip_sinks", "stability_check"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"`{name}` must be true or false, got {getattr(self, name)!r}.")
        if self.groups is not None and not isinstance(self.groups, bool):
            raise ConfigError(f"`groups` must be true, false or unset (the scoring's rule), got {self.groups!r}.")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            raise ConfigError(f"`checkpoint_dir` must be a directory path as a string, or unset; got {self.checkpoint_dir!r}.")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise ConfigError(
                f"`checkpoint_every` must be a positive integer (batches between saves), got {self.checkpoint_every!r}."
            )

    def protected_blocks(self, num_blocks: int) -> set[int]:
        """The blocks no method may drop: the first `protect_first` and the last `protect_last`."""
        return set(range(self.protect_first)) | set(range(num_blocks - self.protect_last, num_blocks))

    def resolve_loss_vocabulary(self, head_narrowable: bool, vocab_size: int, objective: str | None = None) -> int:
        """`loss_vocabulary` as set; None, AUTO_VOCABULARY for the NLL (`objective`, else the
        config's) on a head that can be narrowed over at least NARROWED_FROM tokens, where a
        subset is much smaller than the vocabulary; else 0, the whole head."""
        if self.loss_vocabulary is not None:
            return self.loss_vocabulary
        nll = (objective or self.loss_objective) == "nll"
        return AUTO_VOCABULARY if nll and head_narrowable and vocab_size >= NARROWED_FROM else 0

    def resolve_drop(self, num_blocks: int) -> int:
        """The number of blocks to remove from a model with `num_blocks` blocks."""
        n = self.drop if self.drop is not None else int(round(self.ratio * num_blocks))
        removable = num_blocks - self.protect_first - self.protect_last
        if n < 1:
            raise ConfigError(
                f"ratio={self.ratio} of {num_blocks} blocks rounds to 0 blocks; raise the ratio or "
                "give `drop`."
            )
        if n > removable - 1 or n >= num_blocks:
            raise ConfigError(
                f"Cannot drop {n} of {num_blocks} blocks: at most {max(removable - 1, 0)} can go "
                f"(protect_first={self.protect_first}, protect_last={self.protect_last}, and at "
                "least one removable block must stay)."
            )
        return n

    # ------------------------------------------------------------------ (de)serialisation
    def replace(self, **changes: Any) -> "SGLPConfig":
        """A copy with `changes` applied (None values are ignored), validated again."""
        data = self.to_dict()
        data.update({k: v for k, v in changes.items() if v is not None})
        if changes.get("drop") is not None:
            data["ratio"] = None
        elif changes.get("ratio") is not None:
            data["drop"] = None
        return SGLPConfig.from_dict(data)
