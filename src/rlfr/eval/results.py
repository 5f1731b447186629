"""The result files of ``rlfr eval``, ``rlfr compare`` and ``rlfr inspect`` as typed records.

Each record's ``to_dict()`` is its JSON file, key for key and in the order the commands have always written
them, so a file written before these types existed reads back unchanged: ``from_dict(d).to_dict() == d``.
``from_dict`` refuses a missing or unknown key, naming the file. An optional field (``None``) is left out of
the file, as the commands left the key out. The tables inside that other functions produce stay in the
layout their producer documents (``rlfr.stats.compare_arms``, ``rlfr.stats.token_reward_stats``, per-step
curves of ``metrics.jsonl``).

- ``EvaluateResult`` / ``DatasetResult``: ``rlfr eval``'s ``results.json``, one entry per dataset.
- ``CompareResult``: ``rlfr compare``'s ``results.json``; ``RunResult``: a run's ``compare_result.json``;
  ``ModelEval``: a model's ``eval_<set>.json``.
- ``FlowTokenStats`` / ``InspectResult``: ``rlfr inspect``'s ``stats.json`` (the statistics, then the inputs).
- ``SelectResult``: ``rlfr select``'s ``results.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from rlfr.errors import RlfrError


def _from_dict(cls, d: Any, source: str, optional: tuple[str, ...] = ()) -> dict:
    """The constructor arguments of ``cls`` in ``d``; an error naming ``source`` for a missing or unknown key."""
    if not isinstance(d, dict):
        raise RlfrError(f"{source}: expected a JSON object ({cls.__name__}), got {type(d).__name__}")
    names = [f.name for f in fields(cls)]
    missing = [k for k in names if k not in d and k not in optional]
    unknown = [k for k in d if k not in names]
    if missing or unknown:
        raise RlfrError(
            f"{source} is not a {cls.__name__} file: missing keys {missing}, unknown keys {unknown} "
            f"(expected {names})"
        )
    return {k: d[k] for k in names if k in d}


def _to_dict(record, optional: tuple[str, ...] = ()) -> dict:
    """Fields in declaration order (the file's key order), leaving out the optional ones that are None."""
    out = {f.name: getattr(record, f.name) for f in fields(record)}
    return {k: v for k, v in out.items() if not (k in optional and v is None)}


# ------------------------------------------------------------------------------------------- rlfr eval
@dataclass(frozen=True, kw_only=True)
class DatasetResult:
    """One dataset of ``rlfr eval``: greedy runs have ``pass_at_1`` (file key ``pass@1``), sampled runs the mean
    accuracy of their ``samples`` samples (``avg@<samples>``) and pass@k by k (``pass@k``: {"1": .., "2": ..})."""

    data: str
    n: int
    samples: int
    mean_response_tokens: float
    seconds: float
    samples_file: str
    pass_at_1: float | None = None
    avg: float | None = None
    pass_at_k: dict[str, float] | None = None

    def to_dict(self) -> dict:
        out = _to_dict(self, ("pass_at_1", "avg", "pass_at_k"))
        renamed = {"pass_at_1": "pass@1", "avg": f"avg@{self.samples}", "pass_at_k": "pass@k"}
        return {renamed.get(k, k): v for k, v in out.items()}

    @classmethod
    def from_dict(cls, d: dict, source: str = "a dataset entry") -> DatasetResult:
        avg_key = f"avg@{d.get('samples')}" if isinstance(d, dict) else ""
        renamed = {"pass@1": "pass_at_1", avg_key: "avg", "pass@k": "pass_at_k"}
        d = {renamed.get(k, k): v for k, v in d.items()} if isinstance(d, dict) else d
        return cls(**_from_dict(cls, d, source, ("pass_at_1", "avg", "pass_at_k")))


@dataclass(frozen=True, kw_only=True)
class EvaluateResult:
    """``rlfr eval``'s ``results.json``: the settings, then ``datasets`` (slug -> ``DatasetResult``)."""

    model: str
    backend: str
    template: str
    greedy: bool
    samples: int
    temperature: float | None  # None: greedy
    top_p: float
    max_new_tokens: int
    seed: int
    datasets: dict[str, DatasetResult]
    rlfr_version: str | None = (
        None  # the rlfr that wrote the file (None: a version before 0.2.0 recorded none)
    )

    def to_dict(self) -> dict:
        out = _to_dict(self, ("rlfr_version",))
        return out | {"datasets": {k: v.to_dict() for k, v in self.datasets.items()}}

    @classmethod
    def from_dict(cls, d: dict, source: str = "results.json") -> EvaluateResult:
        kw = _from_dict(cls, d, source, ("rlfr_version",))
        datasets = {
            k: DatasetResult.from_dict(v, f"{source}, dataset {k!r}") for k, v in kw["datasets"].items()
        }
        return cls(**kw | {"datasets": datasets})


# ---------------------------------------------------------------------------------------- rlfr compare
@dataclass(frozen=True, kw_only=True)
class ModelEval:
    """A model's evaluation on one eval set (``eval_<set>.json``), reused while ``config`` (the evaluation's
    key: model, problems, template, generation limit, samples, seed, model settings) is unchanged."""

    config: dict
    greedy: list[int]  # per problem: 1 if the greedy answer is correct
    seconds: float | None = None  # every attempt's time (None: written by a version that did not time it)
    sampled: list[int] | None = None  # per problem: how many of config["samples"] samples are correct

    def to_dict(self) -> dict:
        return _to_dict(self, ("seconds", "sampled"))

    @classmethod
    def from_dict(cls, d: dict, source: str = "an evaluation file") -> ModelEval:
        return cls(**_from_dict(cls, d, source, ("seconds", "sampled")))


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """One RL run of a study (``compare_result.json``), reused while ``config`` (its ``TrainConfig``) is
    unchanged: its final model and its per-step training curves (key -> one value or None per step)."""

    config: dict
    model_dir: str
    curves: dict[str, list[float | None]]
    seconds: float

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "a run result") -> RunResult:
        return cls(**_from_dict(cls, d, source))


@dataclass(frozen=True, kw_only=True)
class CompareResult:
    """``rlfr compare``'s ``results.json``. ``methods``: per method, the first eval set's greedy accuracy per
    seed, its mean and std, and the reward curve; ``arms``: per arm (base, methods, ablations) its settings,
    curves, training time and, per eval set, accuracies per seed; ``paired``: per eval set, ``"a - b"`` ->
    ``rlfr.stats.compare_arms``. Results of versions before eval sets and ablations have only ``methods``
    (``eval_sets``, ``arms`` and ``paired`` are None)."""

    command: str
    start: str
    flow: str | None
    seeds: list[int]
    budget: dict[str, Any]
    eval_sets: dict[str, dict] | None = None  # slug -> {"data": name, "n": problems}
    methods: dict[str, dict]
    arms: dict[str, dict] | None = None
    paired: dict[str, dict] | None = None

    def to_dict(self) -> dict:
        return _to_dict(self, ("eval_sets", "arms", "paired"))

    @classmethod
    def from_dict(cls, d: dict, source: str = "results.json") -> CompareResult:
        return cls(**_from_dict(cls, d, source, ("eval_sets", "arms", "paired")))


# ---------------------------------------------------------------------------------------- rlfr inspect
AUROC_NOTE = "P(mean deviation of a correct rollout < that of a wrong one); null = one class only"


_SEPARATION = ("auroc_within", "logp_auroc", "logp_auroc_within", "length_corr", "repeatability")


@dataclass(frozen=True, kw_only=True)
class FlowTokenStats:
    """What ``rlfr inspect`` measured over its rollouts: accuracy, the scored tokens, the AUROC of the sequence
    flow score for correct vs wrong pooled over rollouts (None: one class only), ``rlfr.stats.token_reward_stats``,
    and (files of earlier versions lack them) the AUROC within problems (``rlfr.group_stats.GroupMean.to_dict``), the
    same two for the mean token log-prob, the correlation with response length ({"pooled": r, "within":
    GroupMean}) and the repeatability across noise draws ({"draws": D, "by_draws":
    ``rlfr.group_stats.draw_repeatability``})."""

    rollouts: int
    accuracy: float
    scored_tokens: int
    auroc: float | None
    auroc_note: str = AUROC_NOTE
    tokens: dict[str, Any]
    auroc_within: dict | None = None
    logp_auroc: float | None = None
    logp_auroc_within: dict | None = None
    length_corr: dict | None = None
    repeatability: dict | None = None

    def to_dict(self) -> dict:
        return _to_dict(self, _SEPARATION)


@dataclass(frozen=True, kw_only=True)
class InspectResult:
    """``rlfr inspect``'s ``stats.json``: the statistics (``FlowTokenStats``, first in the file), then what was
    inspected and how (policy and flow paths, the flow's latents, the shaping settings, the reward shown, ...)."""

    stats: FlowTokenStats
    policy: str
    flow: str
    latents: dict[str, Any]
    shaping: dict[str, Any]
    reward: str
    template: str
    data: str
    n_prompts: int
    num_generations: int
    temperature: float

    def to_dict(self) -> dict:
        return self.stats.to_dict() | {k: v for k, v in _to_dict(self).items() if k != "stats"}

    @classmethod
    def from_dict(cls, d: dict, source: str = "stats.json") -> InspectResult:
        if not isinstance(d, dict):
            raise RlfrError(f"{source}: expected a JSON object (InspectResult), got {type(d).__name__}")
        names = {f.name for f in fields(FlowTokenStats)}
        stats = FlowTokenStats(
            **_from_dict(FlowTokenStats, {k: v for k, v in d.items() if k in names}, source, _SEPARATION)
        )
        return cls(
            stats=stats, **_from_dict(cls, {k: v for k, v in d.items() if k not in names}, source, ("stats",))
        )


# ----------------------------------------------------------------------------------------- rlfr select
@dataclass(frozen=True, kw_only=True)
class SelectResult:
    """``rlfr select``'s ``results.json``: the settings (``config``: ``SelectConfig`` as a dict) and the inputs,
    then per split (``dev``, ``test``; ``test`` only without a development split) the accuracy of every rule
    at each N (``accuracy``: split -> rule -> str(N) -> accuracy) and pass@N (``pass_at``: split -> str(N));
    ``paired``: on the test split at N = n, each rule minus majority voting and minus best-of-N by log-prob
    ("rule - majority": ``rlfr.stats.PairedDiff`` as {diff, lo, hi, n}); ``primary``: the pre-registered
    comparison (the flow-including rule with the best dev accuracy at N = n, and it against majority voting and
    against best-of-N by log-prob on test; None without a development split); ``separation``: how well each score
    separates correct from wrong samples over all problems (pooled AUROC, and within problems as
    ``rlfr.group_stats.GroupMean``), and the flow score's correlation with response length; ``seconds``: time spent
    generating and scoring."""

    config: dict[str, Any]
    policy: str
    flow: str
    n: int
    ns: list[int]
    problems: dict[str, int]
    rules: list[str]
    flow_rules: list[str]
    accuracy: dict[str, dict[str, dict[str, float]]]
    pass_at: dict[str, dict[str, float]]
    paired: dict[str, dict[str, Any]]
    primary: dict[str, Any] | None = None
    separation: dict[str, Any]
    seconds: dict[str, float]

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "results.json") -> SelectResult:
        return cls(**_from_dict(cls, d, source, ("primary",)))
