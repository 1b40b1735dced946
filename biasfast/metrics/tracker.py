"""`BiasTracker`: the bias measures across training checkpoints, and the biased-generalization window.

The paper's reading (official code, `cos_dis_aggregate.py`): the pair distance reaches its minimum (τ_bias)
before the test loss does (τ_test); between the two the model still improves on test data while drifting
towards its own training samples. Stopping at the test-loss minimum therefore lands inside the bias.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from biasfast._core.io import write_atomically
from biasfast.metrics.bias import BiasReport

_FIELDS = ("step", "pair_distance", "pair_distance_sem", "score", "score_ci", "p_value", "memorized_fraction",
           "proximity_gap", "nn_divergence", "test_loss")


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _argmin_step(steps: list[int], values: list[float | None]) -> int | None:
    """Step of the smallest finite value (the earliest on ties); None when there is none."""
    best = None
    for step, value in zip(steps, values):
        if value is not None and math.isfinite(value) and (best is None or value < best[1]):
            best = (step, value)
    return None if best is None else best[0]


class BiasTracker:
    """Collects one `BiasReport` and one test loss per checkpoint; finds τ_bias, τ_test and the biased window."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def update(self, step: int, report: BiasReport, test_loss: float) -> None:
        """Record checkpoint `step` (any order; each step once)."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step: expected an int, got {type(step).__name__}")
        if not isinstance(report, BiasReport):
            raise TypeError(f"report: expected a BiasReport (from biasfast.bias_score), got {type(report).__name__}")
        loss = float(test_loss)
        if not math.isfinite(loss):
            raise ValueError(f"test_loss: expected a finite number, got {loss}")
        if any(record["step"] == step for record in self.records):
            raise ValueError(f"step: checkpoint {step} was already recorded")
        self.records.append({
            "step": step,
            "pair_distance": _finite_or_none(report.pair_distance.mean),
            "pair_distance_sem": _finite_or_none(report.pair_distance.sem),
            "score": _finite_or_none(report.score),
            "score_ci": [_finite_or_none(v) for v in report.score_ci],
            "p_value": _finite_or_none(report.p_value),
            "memorized_fraction": _finite_or_none(report.memorized_fraction),
            "proximity_gap": _finite_or_none(report.proximity_gap),
            "nn_divergence": None if report.nn_divergence is None else _finite_or_none(report.nn_divergence),
            "test_loss": loss,
        })
        self.records.sort(key=lambda record: record["step"])

    def column(self, field: str) -> list[Any]:
        """One field over the checkpoints, in step order."""
        if field not in _FIELDS:
            raise ValueError(f"field: unknown field {field!r}; expected one of {_FIELDS}")
        return [record[field] for record in self.records]

    @property
    def tau_bias(self) -> int | None:
        """Step of the pair-distance minimum (the paper's τ_cos), searched after the initial rise.

        Models that start from shared weights produce identical samples at first, so their pair distance starts
        near 0 and rises before the generalization dip the paper measures; the search therefore starts at the
        first checkpoint whose pair distance exceeds the next one's by more than their combined standard errors.
        Independently initialised models fall from the first checkpoint on, and this is the plain argmin. None
        when the curve has not yet fallen significantly (no minimum after the rise), or before any update."""
        pairs, sems = self.column("pair_distance"), self.column("pair_distance_sem")
        for i in range(len(pairs) - 1):
            if pairs[i] is None or pairs[i + 1] is None:
                continue
            if pairs[i] - pairs[i + 1] > (sems[i] or 0.0) + (sems[i + 1] or 0.0):
                return _argmin_step(self.column("step")[i:], pairs[i:])
        return None

    @property
    def tau_test(self) -> int | None:
        """Step with the smallest test loss."""
        return _argmin_step(self.column("step"), self.column("test_loss"))

    @property
    def biased_window(self) -> tuple[int, int] | None:
        """(τ_bias, τ_test) when τ_bias < τ_test: checkpoints in between generalize better yet favour their
        own training data. None when there is no such window (yet)."""
        bias, test = self.tau_bias, self.tau_test
        return (bias, test) if bias is not None and test is not None and bias < test else None

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the records and the derived steps as JSON, atomically (temporary file + os.replace)."""
        payload = {"records": self.records, "tau_bias": self.tau_bias, "tau_test": self.tau_test,
                   "biased_window": self.biased_window}
        write_atomically(path, lambda stream: json.dump(payload, stream, indent=1, allow_nan=False))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "BiasTracker":
        """A tracker with the records written by `to_json`."""
        with open(path) as stream:
            payload = json.load(stream)
        tracker = cls()
        for record in payload["records"]:
            missing = set(_FIELDS) - set(record)
            if missing:
                raise ValueError(f"path: record of step {record.get('step')} lacks {sorted(missing)}")
            tracker.records.append({field: record[field] for field in _FIELDS})
        tracker.records.sort(key=lambda record: record["step"])
        return tracker

    def plot(self, path: str | os.PathLike) -> None:
        """PNG: pair distance (± sem) and score against step, test loss on a twin axis, dotted lines at
        τ_bias and τ_test. Uses matplotlib's Agg canvas directly (no pyplot state, no display needed)."""
        if not self.records:
            raise ValueError("BiasTracker.plot: no checkpoints recorded yet; call update() first")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        nan = float("nan")
        steps = self.column("step")
        pair = [nan if v is None else v for v in self.column("pair_distance")]
        sem = [0.0 if v is None else v for v in self.column("pair_distance_sem")]
        score = [nan if v is None else v for v in self.column("score")]
        figure = Figure(figsize=(8, 4.8), constrained_layout=True)
        FigureCanvasAgg(figure)
        axis = figure.add_subplot()
        axis.plot(steps, pair, "o-", color="tab:blue", label="pair distance (mean)")
        axis.fill_between(steps, [p - s for p, s in zip(pair, sem)], [p + s for p, s in zip(pair, sem)],
                          color="tab:blue", alpha=0.2)
        axis.plot(steps, score, "s-", color="tab:red", label="bias score")
        axis.set_xlabel("training step")
        axis.set_ylabel("pair distance / bias score")
        loss_axis = axis.twinx()
        loss_axis.plot(steps, self.column("test_loss"), "x--", color="tab:green", label="test loss")
        loss_axis.set_ylabel("test loss")
        for step, name, colour in ((self.tau_bias, "τ_bias", "tab:blue"), (self.tau_test, "τ_test", "tab:green")):
            if step is not None:
                axis.axvline(step, linestyle=":", color=colour, label=f"{name} = {step}")
        handles, labels = axis.get_legend_handles_labels()
        more_handles, more_labels = loss_axis.get_legend_handles_labels()
        axis.legend(handles + more_handles, labels + more_labels, loc="best", fontsize="small")
        write_atomically(path, lambda stream: figure.savefig(stream, format="png", dpi=120), "wb")
