"""Bootstrap confidence intervals (percentile method) over records (more: docs/modules.md)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from hubert_ecg_jax.evaluate.metrics import check_multilabel, jsonable

METRICS_WITH_FAST_BOOTSTRAP = ("auroc", "auprc")
_CHUNK_ELEMENTS = 4_000_000  # resamples x records handled at once, bounds memory (~32 MB each)


@dataclasses.dataclass
class ConfidenceInterval:
  """A bootstrap percentile interval, elementwise over the metric's outputs.

  estimate, lower, upper: the metric on all records and the interval bounds; shape () for a
  scalar metric, (k,) for a vector one (e.g. per label). NaN where no resample was defined.
  n_valid, n_skipped: how many resamples were used / skipped (metric undefined) per element.
  """
  estimate: np.ndarray
  lower: np.ndarray
  upper: np.ndarray
  n_valid: np.ndarray
  n_skipped: np.ndarray
  n_boot: int
  level: float
  seed: int

  def to_dict(self) -> dict[str, Any]:
    return jsonable(self)


@dataclasses.dataclass
class LabelBootstrap:
  """Intervals of a per-label metric and of its macro mean (over the labels defined per resample)."""
  metric: str
  per_label: ConfidenceInterval
  macro: ConfidenceInterval

  def to_dict(self) -> dict[str, Any]:
    return jsonable(self)


def bootstrap_indices(n_records: int, n_boot: int, seed: int) -> np.ndarray:
  """(n_boot, n_records) record indices, drawn with replacement; row b is resample b."""
  if n_records < 1 or n_boot < 1:
    raise ValueError(f"expected n_records >= 1 and n_boot >= 1, found {n_records} and {n_boot}")
  return np.random.default_rng(seed).integers(0, n_records, size=(n_boot, n_records))


def percentile_interval(values: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
  """Percentile bounds over axis 0 of `values` (resamples, k), ignoring NaN per column."""
  if not 0.0 < level < 1.0:
    raise ValueError(f"expected a confidence level in (0, 1), found {level}")
  quantiles = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
  lower = np.full(values.shape[1], np.nan)
  upper = np.full(values.shape[1], np.nan)
  for column in range(values.shape[1]):
    valid = values[:, column][~np.isnan(values[:, column])]
    if len(valid):
      lower[column], upper[column] = np.percentile(valid, quantiles)
  return lower, upper


def _interval(estimate: Any, values: np.ndarray, n_boot: int, level: float,
              seed: int) -> ConfidenceInterval:
  """ConfidenceInterval from the full-data estimate and (n_boot, k) resampled values."""
  estimate = np.asarray(estimate, dtype=np.float64)
  lower, upper = percentile_interval(values, level)
  n_valid = (~np.isnan(values)).sum(axis=0)
  shape = estimate.shape
  return ConfidenceInterval(
      estimate=estimate, lower=lower.reshape(shape), upper=upper.reshape(shape),
      n_valid=n_valid.reshape(shape), n_skipped=(n_boot - n_valid).reshape(shape),
      n_boot=n_boot, level=level, seed=seed)


def bootstrap_ci(metric_fn: Callable[[np.ndarray, np.ndarray], Any], y_true: Any, y_score: Any,
                 *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> ConfidenceInterval:
  """Interval of `metric_fn(y_true[idx], y_score[idx])` over bootstrap resamples of records.

  `metric_fn` returns a float or a 1-D array and must return NaN (not raise) where it is
  undefined, as `label_auroc` and `label_auprc` in `metrics` do.
  """
  y_true, y_score = np.asarray(y_true), np.asarray(y_score)
  if len(y_true) != len(y_score):
    raise ValueError(f"y_true and y_score must have the same number of records, found "
                     f"{len(y_true)} and {len(y_score)}")
  estimate = np.asarray(metric_fn(y_true, y_score), dtype=np.float64)
  if estimate.ndim > 1:
    raise ValueError(f"metric_fn must return a float or a 1-D array, found shape {estimate.shape}")
  indices = bootstrap_indices(len(y_true), n_boot, seed)
  values = np.empty((n_boot, estimate.size))  # (resamples, outputs)
  for b, resample in enumerate(indices):
    values[b] = np.asarray(metric_fn(y_true[resample], y_score[resample]), dtype=np.float64).ravel()
  return _interval(estimate, values, n_boot, level, seed)


def weighted_label_metric(y_true: np.ndarray, y_score: np.ndarray, counts: np.ndarray,
                          metric: str) -> np.ndarray:
  """(weightings, labels) AUROC or average precision with records weighted by `counts` (B, N).

  With integer counts this equals scikit-learn's `roc_auc_score` / `average_precision_score` on
  the records repeated that many times. With w the weights, P and N the weighted positive and
  negative totals, and for a positive p: N_>(p), N_=(p) the negative weight scoring above / equal
  to it, P_>=(p) and N_>=(p) the positive and negative weight scoring at least as high:
    AUROC = sum over positives p of w_p (N - N_>(p) - N_=(p) / 2) / (P N),
    AP    = sum over positives p of w_p / P * P_>=(p) / (P_>=(p) + N_>=(p)),
  the Mann-Whitney form of the trapezoidal ROC area and the step-wise precision-recall area.
  NaN where a weighting leaves one class absent.
  """
  if metric not in METRICS_WITH_FAST_BOOTSTRAP:
    raise ValueError(f"expected metric in {METRICS_WITH_FAST_BOOTSTRAP}, found {metric!r}")
  # Records along axis 0 (records, B): gathers of records and cumulative sums over them then
  # run over contiguous rows, several times faster than over columns.
  counts_by_record = np.ascontiguousarray(np.asarray(counts, dtype=np.float64).T)
  n_labels = y_true.shape[1]
  result = np.empty((n_labels, counts_by_record.shape[1]))  # (labels, weightings)
  for label in range(n_labels):
    is_positive = y_true[:, label].astype(bool)
    pos_scores, neg_scores = y_score[is_positive, label], y_score[~is_positive, label]
    pos_order, neg_order = np.argsort(pos_scores), np.argsort(neg_scores)  # ascending
    pos_ascending, neg_ascending = pos_scores[pos_order], neg_scores[neg_order]
    # Cumulative weights from the highest score down, with a leading zero row: row k holds the
    # weight of the k highest-scoring records of that class.
    pos_weights = counts_by_record[np.flatnonzero(is_positive)[pos_order[::-1]]]  # (positives, B)
    neg_cumulative = _cumulative_with_zero(
        counts_by_record[np.flatnonzero(~is_positive)[neg_order[::-1]]])  # (negatives + 1, B)
    neg_at_least = len(neg_scores) - np.searchsorted(neg_ascending, pos_ascending[::-1], "left")
    pos_total = pos_weights.sum(axis=0)
    neg_total = neg_cumulative[-1]
    defined = (pos_total > 0) & (neg_total > 0)
    if metric == "auroc":
      neg_above = len(neg_scores) - np.searchsorted(neg_ascending, pos_ascending[::-1], "right")
      neg_tied = neg_cumulative[neg_at_least] - neg_cumulative[neg_above]
      credit = neg_total[None, :] - neg_cumulative[neg_above] - 0.5 * neg_tied
      numerator = (pos_weights * credit).sum(axis=0)
      denominator = pos_total * neg_total
    else:
      pos_at_least = len(pos_scores) - np.searchsorted(pos_ascending, pos_ascending[::-1], "left")
      true_pos = _cumulative_with_zero(pos_weights)[pos_at_least]
      predicted = true_pos + neg_cumulative[neg_at_least]
      precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
      numerator = (pos_weights * precision).sum(axis=0)
      denominator = pos_total
    result[label] = np.where(defined, numerator / np.where(defined, denominator, 1.0), np.nan)
  return result.T


def _cumulative_with_zero(weights: np.ndarray) -> np.ndarray:
  """(k + 1, B) cumulative sums along axis 0 of `weights` (k, B), starting with a zero row."""
  cumulative = np.zeros((weights.shape[0] + 1, weights.shape[1]))
  np.cumsum(weights, axis=0, out=cumulative[1:])
  return cumulative


def bootstrap_label_ci(y_true: Any, y_score: Any, metric: str = "auroc", *, n_boot: int = 1000,
                       seed: int = 0, level: float = 0.95) -> LabelBootstrap:
  """Per-label and macro intervals of AUROC or AUPRC ("auroc" | "auprc"), vectorised.

  The same resamples as `bootstrap_ci` with the same seed. A resample's macro value is the mean
  over the labels defined in it; labels undefined on all records have NaN estimates.
  """
  y_true, y_score = check_multilabel(y_true, y_score)
  n_records = y_true.shape[0]
  indices = bootstrap_indices(n_records, n_boot, seed)
  estimate = weighted_label_metric(y_true, y_score, np.ones((1, n_records)), metric)[0]
  values = np.empty((n_boot, y_true.shape[1]))  # (resamples, labels)
  chunk = max(1, _CHUNK_ELEMENTS // n_records)
  for start in range(0, n_boot, chunk):
    rows = indices[start:start + chunk]
    offsets = np.arange(len(rows))[:, None] * n_records
    counts = np.bincount((rows + offsets).ravel(), minlength=len(rows) * n_records)
    values[start:start + len(rows)] = weighted_label_metric(
        y_true, y_score, counts.reshape(len(rows), n_records), metric)
  return LabelBootstrap(
      metric=metric,
      per_label=_interval(estimate, values, n_boot, level, seed),
      macro=_interval(_nanmean_rows(estimate[None, :])[0], _nanmean_rows(values)[:, None],
                      n_boot, level, seed))


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
  """(rows,) mean of each row over its non-NaN entries; NaN for a row with none."""
  valid = ~np.isnan(values)
  n_valid = valid.sum(axis=1)
  totals = np.where(valid, values, 0.0).sum(axis=1)
  return np.divide(totals, n_valid, out=np.full(len(values), np.nan), where=n_valid > 0)
