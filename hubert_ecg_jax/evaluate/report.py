"""The evaluation report of a multi-label problem: metrics plus bootstrap intervals, written as
JSON, as CSV (one row per label and a macro row) and as a table for the terminal; and the
test-time-augmentation helper that turns per-crop scores into per-record scores.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from hubert_ecg_jax.evaluate.bootstrap import LabelBootstrap, bootstrap_label_ci
from hubert_ecg_jax.evaluate.metrics import MultilabelMetrics, jsonable, multilabel_metrics
from hubert_ecg_jax.files import AnyPath, UrlPath, as_path

CROP_AGGREGATIONS = ("mean", "max")
# Per-label columns of the CSV and the table, in order; @tuned ones appear with tuned thresholds.
REPORTED_METRICS = ("auroc", "auprc", "f1@0.5", "f1@tuned", "sensitivity@0.5",
                    "specificity@0.5", "sensitivity@tuned", "specificity@tuned")


def aggregate_crops(scores: Any, how: str = "mean") -> np.ndarray:
  """Per-record scores (records, labels) from per-crop scores (records, crops, labels).

  Test-time augmentation: "mean" or "max" over the crops of each record (the original's test.sh
  uses max over sigmoid probabilities).
  """
  scores = np.asarray(scores, dtype=np.float64)
  if scores.ndim != 3 or scores.shape[1] == 0:
    raise ValueError(f"expected scores of shape (records, crops, labels) with at least one crop, "
                     f"found {scores.shape}")
  if how not in CROP_AGGREGATIONS:
    raise ValueError(f"expected how in {CROP_AGGREGATIONS}, found {how!r}")
  return scores.mean(axis=1) if how == "mean" else scores.max(axis=1)


@dataclasses.dataclass
class MultilabelEvaluation:
  """Metrics of a multi-label test set and bootstrap intervals (metric name -> LabelBootstrap)."""
  metrics: MultilabelMetrics
  intervals: dict[str, LabelBootstrap]

  def to_dict(self) -> dict[str, Any]:
    return jsonable(self)


def evaluate_multilabel(y_true: Any, y_score: Any, label_names: Sequence[str] | None = None, *,
                        thresholds: Any = None, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95,
                        ci_metrics: Sequence[str] = ("auroc", "auprc")) -> MultilabelEvaluation:
  """Every multi-label metric of `y_score` (N, L) and, unless n_boot is 0, bootstrap intervals of
  the `ci_metrics` ("auroc", "auprc"), per label and macro."""
  if n_boot < 0:
    raise ValueError(f"expected n_boot >= 0 (0: no intervals), found {n_boot}")
  metrics = multilabel_metrics(y_true, y_score, label_names, thresholds)
  intervals = {metric: bootstrap_label_ci(y_true, y_score, metric, n_boot=n_boot, seed=seed,
                                          level=level)
               for metric in (ci_metrics if n_boot else ())}
  return MultilabelEvaluation(metrics, intervals)


def write_json(result: Any, path: str | pathlib.Path | UrlPath) -> AnyPath:
  """Writes a result (any of this package's dataclasses, or plain data) as JSON; NaN as null."""
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(jsonable(result), indent=2, allow_nan=False) + "\n")
  return path


def _columns(evaluation: MultilabelEvaluation, named: bool = False) -> list[str]:
  """CSV columns: label, (abbreviation, name,) support, each reported metric (with its CI bounds),
  threshold, note."""
  columns = ["label"] + (["abbreviation", "name"] if named else []) + ["support"]
  for metric in REPORTED_METRICS:
    if metric in evaluation.metrics.per_label:
      columns.append(metric)
      if metric in evaluation.intervals:
        columns += [f"{metric}_ci_lower", f"{metric}_ci_upper"]
  if evaluation.metrics.thresholds is not None:
    columns.append("threshold")
  return columns + ["note"]


def csv_rows(evaluation: MultilabelEvaluation,
             findings: Mapping[str, tuple[str, str]] | None = None) -> list[dict[str, Any]]:
  """One row per label, then the macro row (support: all positives); undefined values are NaN.

  `findings` (label -> (abbreviation, name), e.g. from `snomed.label_table`) adds those columns.
  """
  metrics = evaluation.metrics
  undefined = set(metrics.undefined_labels)
  rows = []
  for index, name in enumerate(metrics.label_names):
    row: dict[str, Any] = {"label": name}
    if findings is not None:
      row["abbreviation"], row["name"] = findings.get(name, ("", ""))
    row["support"] = int(metrics.support[index])
    for metric, values in metrics.per_label.items():
      row[metric] = float(values[index])
    for metric, interval in evaluation.intervals.items():
      row[f"{metric}_ci_lower"] = float(interval.per_label.lower[index])
      row[f"{metric}_ci_upper"] = float(interval.per_label.upper[index])
    if metrics.thresholds is not None:
      row["threshold"] = float(metrics.thresholds[index])
    row["note"] = "undefined: one class in y_true" if name in undefined else ""
    rows.append(row)
  macro: dict[str, Any] = {"label": "macro", "support": int(metrics.support.sum())}
  macro.update(metrics.macro)
  for metric, interval in evaluation.intervals.items():
    macro[f"{metric}_ci_lower"] = float(interval.macro.lower)
    macro[f"{metric}_ci_upper"] = float(interval.macro.upper)
  macro["note"] = f"mean over {metrics.n_defined_labels} of {metrics.n_labels} labels"
  rows.append(macro)
  return rows


def write_csv(evaluation: MultilabelEvaluation, path: str | pathlib.Path | UrlPath,
              findings: Mapping[str, tuple[str, str]] | None = None) -> AnyPath:
  """Writes the per-label rows and the macro row as CSV; undefined values are written `nan`."""
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", newline="") as stream:
    writer = csv.DictWriter(stream, fieldnames=_columns(evaluation, findings is not None), restval="")
    writer.writeheader()
    for row in csv_rows(evaluation, findings):
      writer.writerow({key: repr(value) if isinstance(value, float) else value
                       for key, value in row.items()})
  return path


def _cell(value: float, lower: float | None = None, upper: float | None = None) -> str:
  if math.isnan(value):
    return "n/a"
  if lower is None or math.isnan(lower):
    return f"{value:.3f}"
  return f"{value:.3f} [{lower:.3f}-{upper:.3f}]"


def _finding_cell(row: Mapping[str, Any]) -> str:
  """'right bundle branch block (RBBB)' for a named label, '' for the macro row, '-' otherwise."""
  name, abbreviation = row.get("name") or "", row.get("abbreviation") or ""
  if not name:
    return "" if row["label"] == "macro" else "-"
  return name if abbreviation in ("", row["label"]) else f"{name} ({abbreviation})"


def format_table(evaluation: MultilabelEvaluation,
                 findings: Mapping[str, tuple[str, str]] | None = None) -> str:
  """A fixed-width table for the terminal: a row per label, the macro row, Fmax, undefined labels.

  With `findings` (label -> (abbreviation, name)) a `finding` column gives each label's name.
  """
  metrics = evaluation.metrics
  shown = [metric for metric in REPORTED_METRICS if metric in metrics.per_label]
  header = ["label"] + (["finding"] if findings is not None else []) + ["n+"] + shown
  body = []
  for row in csv_rows(evaluation, findings):
    named = [] if findings is None else [_finding_cell(row)]
    cells = [str(row["label"])] + named + [str(row["support"])]
    for metric in shown:
      cells.append(_cell(row[metric], row.get(f"{metric}_ci_lower"), row.get(f"{metric}_ci_upper")))
    body.append(cells)
  widths = [max(len(line[column]) for line in [header] + body) for column in range(len(header))]

  def line(cells: list[str]) -> str:
    return "  ".join(cell.ljust(width) if column < len(header) - len(shown) - 1 else cell.rjust(width)
                     for column, (cell, width) in enumerate(zip(cells, widths)))

  rule = "-" * len(line(header))
  lines = [line(header), rule] + [line(cells) for cells in body[:-1]] + [rule, line(body[-1])]
  fmax = metrics.fmax
  lines.append(f"Fmax {_cell(fmax.fmax)} at threshold {_cell(fmax.threshold)} (precision "
               f"{_cell(fmax.precision)}, recall {_cell(fmax.recall)}) over {metrics.n_records} "
               "records")
  if evaluation.intervals:
    interval = next(iter(evaluation.intervals.values())).macro
    lines.append(f"intervals: {100 * interval.level:g}% bootstrap percentile, {interval.n_boot} "
                 f"resamples, seed {interval.seed}")
  if metrics.undefined_labels:
    lines.append(f"undefined (one class in y_true), left out of macro: "
                 f"{', '.join(metrics.undefined_labels)}")
  return "\n".join(lines)
