"""Evaluation metrics: multi-label (the field's headline), multi-class and regression.

More in docs/modules.md."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from sklearn import metrics as skm

DEFAULT_THRESHOLD = 0.5


def jsonable(value: Any) -> Any:
  """`value` as plain JSON data: arrays become lists, NaN becomes None, dataclasses dicts."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {field.name: jsonable(getattr(value, field.name)) for field in dataclasses.fields(value)}
  if isinstance(value, dict):
    return {str(key): jsonable(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(item) for item in value]
  if isinstance(value, np.ndarray):
    return jsonable(value.tolist())
  if isinstance(value, np.generic):
    return jsonable(value.item())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def check_multilabel(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray]:
  """Validated copies: `y_true` as int8 0/1 and `y_score` as float64 probabilities, both (N, L)."""
  y_true = np.asarray(y_true)
  y_score = np.asarray(y_score, dtype=np.float64)
  if y_true.ndim != 2 or y_score.ndim != 2:
    raise ValueError(f"expected y_true and y_score of shape (records, labels), found "
                     f"{y_true.shape} and {y_score.shape}")
  if y_true.shape != y_score.shape:
    raise ValueError(f"y_true and y_score must have the same shape, found {y_true.shape} "
                     f"and {y_score.shape}")
  if y_true.shape[0] == 0 or y_true.shape[1] == 0:
    raise ValueError(f"expected at least one record and one label, found shape {y_true.shape}")
  if not np.isin(y_true, (0, 1)).all():
    found = np.unique(y_true[~np.isin(y_true, (0, 1))])[:5]
    raise ValueError(f"y_true must hold only 0 and 1, found values {found.tolist()}")
  if not np.isfinite(y_score).all():
    raise ValueError(f"y_score must be finite, found {int((~np.isfinite(y_score)).sum())} "
                     "NaN or infinite values")
  if y_score.min() < 0.0 or y_score.max() > 1.0:
    raise ValueError(f"y_score must be probabilities in [0, 1] (apply a sigmoid to logits), "
                     f"found range [{y_score.min():.4g}, {y_score.max():.4g}]")
  return y_true.astype(np.int8), y_score


def defined_label_mask(y_true: np.ndarray) -> np.ndarray:
  """(labels,) True where the column of `y_true` (N, L) holds both classes."""
  positives = y_true.sum(axis=0)
  return (positives > 0) & (positives < y_true.shape[0])


def label_names_or_default(label_names: Sequence[str] | None, n_labels: int) -> list[str]:
  """The given names (checked: one per label, unique) or `label_0 ... label_{L-1}`."""
  if label_names is None:
    return [f"label_{index}" for index in range(n_labels)]
  names = [str(name) for name in label_names]
  if len(names) != n_labels:
    raise ValueError(f"expected {n_labels} label names, found {len(names)}")
  if len(set(names)) != len(names):
    raise ValueError(f"label names must be unique, found duplicates in {names}")
  return names


def label_auroc(y_true: Any, y_score: Any) -> np.ndarray:
  """(labels,) AUROC per label from `sklearn.metrics.roc_auc_score`; NaN where undefined."""
  y_true, y_score = check_multilabel(y_true, y_score)
  return _per_defined_label(skm.roc_auc_score, y_true, y_score)


def label_auprc(y_true: Any, y_score: Any) -> np.ndarray:
  """(labels,) average precision per label (`average_precision_score`); NaN where undefined."""
  y_true, y_score = check_multilabel(y_true, y_score)
  return _per_defined_label(skm.average_precision_score, y_true, y_score)


def _per_defined_label(metric, y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
  values = np.full(y_true.shape[1], np.nan)
  for label in np.flatnonzero(defined_label_mask(y_true)):
    values[label] = metric(y_true[:, label], y_score[:, label])
  return values


def threshold_metrics(y_true: np.ndarray, y_score: np.ndarray,
                      thresholds: np.ndarray) -> dict[str, np.ndarray]:
  """Per-label F1, sensitivity and specificity, predicting positive where score >= threshold.

  F1 is `f1_score(average=None)`, sensitivity `recall_score(average=None)` (both with
  zero_division 0), specificity TN / (TN + FP) from `multilabel_confusion_matrix`.
  """
  y_pred = (y_score >= thresholds[None, :]).astype(np.int8)  # (records, labels)
  confusion = skm.multilabel_confusion_matrix(y_true, y_pred)  # (labels, 2, 2): [[tn, fp], [fn, tp]]
  negatives = confusion[:, 0, 0] + confusion[:, 0, 1]
  return {
      "f1": skm.f1_score(y_true, y_pred, average=None, zero_division=0.0),
      "sensitivity": skm.recall_score(y_true, y_pred, average=None, zero_division=0.0),
      "specificity": np.divide(confusion[:, 0, 0], negatives, out=np.zeros(len(negatives)),
                               where=negatives > 0),
  }


@dataclasses.dataclass
class ThresholdTuning:
  """Per-label thresholds that maximise F1 on a validation set.

  label_names: one per label, in column order.
  thresholds: (labels,) predict positive where score >= threshold.
  validation_f1: (labels,) the F1 each threshold reaches on the validation set (NaN for fallbacks).
  fallback_labels: labels with a single class in the validation set; they keep `default`.
  """
  label_names: list[str]
  thresholds: np.ndarray
  validation_f1: np.ndarray
  fallback_labels: list[str]
  default: float = DEFAULT_THRESHOLD

  def to_dict(self) -> dict[str, Any]:
    return jsonable(self)


def tune_thresholds(y_true_val: Any, y_score_val: Any, label_names: Sequence[str] | None = None,
                    default: float = DEFAULT_THRESHOLD) -> ThresholdTuning:
  """Per label, the validation score t maximising the F1 of (score >= t); ties take the lowest t.

  Candidates are the distinct validation scores (`precision_recall_curve`), which covers every
  distinct prediction the label can make. Labels with one class in validation keep `default`.
  """
  y_true, y_score = check_multilabel(y_true_val, y_score_val)
  names = label_names_or_default(label_names, y_true.shape[1])
  thresholds = np.full(y_true.shape[1], float(default))
  best_f1 = np.full(y_true.shape[1], np.nan)
  defined = defined_label_mask(y_true)
  for label in np.flatnonzero(defined):
    precision, recall, candidates = skm.precision_recall_curve(y_true[:, label], y_score[:, label])
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator),
                   where=denominator > 0)
    best = int(np.argmax(f1))  # candidates ascend, so the first maximum is the lowest threshold
    thresholds[label], best_f1[label] = candidates[best], f1[best]
  fallback = [names[label] for label in np.flatnonzero(~defined)]
  return ThresholdTuning(names, thresholds, best_f1, fallback, float(default))


@dataclasses.dataclass
class FmaxResult:
  """Sample-level Fmax and the shared threshold, precision and recall where it is reached."""
  fmax: float
  threshold: float
  precision: float
  recall: float
  n_records_with_labels: int

  def to_dict(self) -> dict[str, Any]:
    return jsonable(self)


def fmax_score(y_true: Any, y_score: Any) -> FmaxResult:
  """Fmax, the sample-centric, threshold-free F of the CAFA protocol used by PTB-XL benchmarks.

  For a shared threshold t, record i predicts P_i(t) = {labels l : score[i, l] >= t} and has
  true set T_i. Then
    precision(t) = mean over records with |P_i(t)| >= 1 of |P_i(t) & T_i| / |P_i(t)|,
    recall(t)    = mean over records with |T_i| >= 1   of |P_i(t) & T_i| / |T_i|,
    Fmax         = max over t of 2 precision(t) recall(t) / (precision(t) + recall(t)),
  with F = 0 where precision + recall = 0. t runs over every distinct score (the values where
  any P_i changes), so the maximum is exact, not taken on a grid. Records without any true label
  count in precision only. NaN (with threshold NaN) if no record has a true label.
  """
  y_true, y_score = check_multilabel(y_true, y_score)
  n_labels = y_true.shape[1]
  true_per_record = y_true.sum(axis=1)  # (records,)
  n_with_labels = int((true_per_record > 0).sum())
  if n_with_labels == 0:
    return FmaxResult(math.nan, math.nan, math.nan, math.nan, 0)
  # Lower the threshold one entry at a time (scores descending) and track each record's
  # predicted count and true positives; precision and recall sums change by that record's delta.
  order = np.argsort(-y_score, axis=None, kind="stable")  # (entries,)
  record = order // n_labels
  truth = y_true.ravel()[order].astype(np.float64)
  scores = y_score.ravel()[order]
  by_record = np.argsort(record, kind="stable")  # groups entries per record, keeping score order
  group_start = np.searchsorted(record[by_record], record[by_record], side="left")
  predicted_after = np.empty(len(order))
  tp_after = np.empty(len(order))
  rank_in_record = np.arange(len(order)) - group_start
  predicted_after[by_record] = rank_in_record + 1
  tp_cumulative = np.cumsum(truth[by_record])
  tp_after[by_record] = tp_cumulative - (tp_cumulative[group_start] - truth[by_record][group_start])
  predicted_before = predicted_after - 1
  tp_before = tp_after - truth
  precision_before = np.divide(tp_before, predicted_before, out=np.zeros(len(order)),
                               where=predicted_before > 0)
  precision_sum = np.cumsum(tp_after / predicted_after - precision_before)
  covered = np.cumsum(predicted_before == 0)
  recall_sum = np.cumsum(truth / np.maximum(true_per_record[record], 1))
  last_of_tie = np.append(scores[1:] != scores[:-1], True)  # threshold = this score
  precision = precision_sum[last_of_tie] / covered[last_of_tie]
  recall = recall_sum[last_of_tie] / n_with_labels
  denominator = precision + recall
  f_score = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator),
                      where=denominator > 0)
  best = int(np.argmax(f_score))
  return FmaxResult(float(f_score[best]), float(scores[last_of_tie][best]), float(precision[best]),
                    float(recall[best]), n_with_labels)


@dataclasses.dataclass
class MultilabelMetrics:
  """Per-label and macro metrics of a multi-label problem.

  per_label: metric name -> (labels,) values, NaN for undefined labels. Names: auroc, auprc,
    f1@0.5, sensitivity@0.5, specificity@0.5, and with tuned thresholds f1@tuned,
    sensitivity@tuned, specificity@tuned.
  macro: metric name -> mean over the `n_defined_labels` defined labels (NaN if none).
  thresholds: (labels,) the tuned thresholds used for the @tuned metrics, or None.
  """
  label_names: list[str]
  n_records: int
  support: np.ndarray  # (labels,) positives in y_true
  per_label: dict[str, np.ndarray]
  macro: dict[str, float]
  n_labels: int
  n_defined_labels: int
  undefined_labels: list[str]
  fmax: FmaxResult
  thresholds: np.ndarray | None = None

  def to_dict(self) -> dict[str, Any]:
    return jsonable(self)


def multilabel_metrics(y_true: Any, y_score: Any, label_names: Sequence[str] | None = None,
                       thresholds: Any = None) -> MultilabelMetrics:
  """All multi-label metrics of probabilities `y_score` (N, L) against 0/1 `y_true` (N, L).

  `thresholds` (L,), e.g. `tune_thresholds(...).thresholds` from the validation set, adds the
  @tuned metrics; threshold metrics otherwise use 0.5, as the original does.
  """
  y_true, y_score = check_multilabel(y_true, y_score)
  n_records, n_labels = y_true.shape
  names = label_names_or_default(label_names, n_labels)
  defined = defined_label_mask(y_true)
  per_label = {"auroc": _per_defined_label(skm.roc_auc_score, y_true, y_score),
               "auprc": _per_defined_label(skm.average_precision_score, y_true, y_score)}
  at_default = threshold_metrics(y_true, y_score, np.full(n_labels, DEFAULT_THRESHOLD))
  per_label.update({f"{name}@0.5": values for name, values in at_default.items()})
  if thresholds is not None:
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (n_labels,):
      raise ValueError(f"expected thresholds of shape ({n_labels},), found {thresholds.shape}")
    at_tuned = threshold_metrics(y_true, y_score, thresholds)
    per_label.update({f"{name}@tuned": values for name, values in at_tuned.items()})
  for values in per_label.values():
    values[~defined] = np.nan
  n_defined = int(defined.sum())
  macro = {name: float(values[defined].mean()) if n_defined else math.nan
           for name, values in per_label.items()}
  return MultilabelMetrics(
      label_names=names, n_records=n_records, support=y_true.sum(axis=0).astype(np.int64),
      per_label=per_label, macro=macro, n_labels=n_labels, n_defined_labels=n_defined,
      undefined_labels=[names[label] for label in np.flatnonzero(~defined)],
      fmax=fmax_score(y_true, y_score), thresholds=thresholds)


@dataclasses.dataclass
class MulticlassMetrics:
  """Accuracy and one-vs-rest macro metrics of a single-label problem over C classes.

  per_class: auroc (one-vs-rest), f1, recall, each (classes,), NaN for undefined classes (a class
  absent from y_true, or the only class present). Macro values average the defined classes.
  """
  class_names: list[str]
  n_records: int
  support: np.ndarray  # (classes,) records of each class
  accuracy: float
  per_class: dict[str, np.ndarray]
  macro: dict[str, float]
  n_defined_classes: int
  undefined_classes: list[str]

  def to_dict(self) -> dict[str, Any]:
    return jsonable(self)


def multiclass_metrics(y_true: Any, y_prob: Any,
                       class_names: Sequence[str] | None = None) -> MulticlassMetrics:
  """Metrics of softmax probabilities `y_prob` (N, C) against class indices `y_true` (N,)."""
  y_true = np.asarray(y_true)
  y_prob = np.asarray(y_prob, dtype=np.float64)
  if y_prob.ndim != 2 or y_true.shape != (y_prob.shape[0],) or len(y_true) == 0:
    raise ValueError(f"expected y_true (records,) and y_prob (records, classes), found "
                     f"{y_true.shape} and {y_prob.shape}")
  n_classes = y_prob.shape[1]
  if n_classes < 2 or not np.isfinite(y_prob).all():
    raise ValueError(f"expected finite probabilities over at least 2 classes, found shape "
                     f"{y_prob.shape} with {int((~np.isfinite(y_prob)).sum())} non-finite values")
  if not np.issubdtype(y_true.dtype, np.integer) or y_true.min() < 0 or y_true.max() >= n_classes:
    raise ValueError(f"y_true must hold class indices in [0, {n_classes}), found dtype "
                     f"{y_true.dtype} and range [{y_true.min()}, {y_true.max()}]")
  names = label_names_or_default(class_names, n_classes)
  one_hot = np.eye(n_classes, dtype=np.int8)[y_true]  # (records, classes)
  defined = defined_label_mask(one_hot)
  y_pred = y_prob.argmax(axis=1)
  classes = np.arange(n_classes)
  per_class = {
      "auroc": _per_defined_label(skm.roc_auc_score, one_hot, y_prob),
      "f1": skm.f1_score(y_true, y_pred, labels=classes, average=None, zero_division=0.0),
      "recall": skm.recall_score(y_true, y_pred, labels=classes, average=None, zero_division=0.0),
  }
  for values in per_class.values():
    values[~defined] = np.nan
  n_defined = int(defined.sum())
  macro = {name: float(values[defined].mean()) if n_defined else math.nan
           for name, values in per_class.items()}
  return MulticlassMetrics(
      class_names=names, n_records=len(y_true), support=one_hot.sum(axis=0).astype(np.int64),
      accuracy=float(skm.accuracy_score(y_true, y_pred)), per_class=per_class, macro=macro,
      n_defined_classes=n_defined, undefined_classes=[names[c] for c in np.flatnonzero(~defined)])


@dataclasses.dataclass
class RegressionMetrics:
  """MSE, MAE and R2, per target and averaged over targets (R2 NaN for a constant target)."""
  target_names: list[str]
  n_records: int
  mse: float
  mae: float
  r2: float
  per_target: dict[str, np.ndarray]
  undefined_targets: list[str]

  def to_dict(self) -> dict[str, Any]:
    return jsonable(self)


def regression_metrics(y_true: Any, y_pred: Any,
                       target_names: Sequence[str] | None = None) -> RegressionMetrics:
  """Regression summary of `y_pred` against `y_true`, both (N,) or (N, targets)."""
  y_true = np.asarray(y_true, dtype=np.float64)
  y_pred = np.asarray(y_pred, dtype=np.float64)
  if y_true.shape != y_pred.shape or y_true.ndim not in (1, 2) or len(y_true) < 2:
    raise ValueError(f"expected y_true and y_pred of the same shape (records,) or (records, "
                     f"targets) with at least 2 records, found {y_true.shape} and {y_pred.shape}")
  if not (np.isfinite(y_true).all() and np.isfinite(y_pred).all()):
    raise ValueError("y_true and y_pred must be finite, found NaN or infinite values")
  y_true, y_pred = y_true.reshape(len(y_true), -1), y_pred.reshape(len(y_pred), -1)
  names = label_names_or_default(target_names, y_true.shape[1])
  constant = np.ptp(y_true, axis=0) == 0  # R2 divides by the target's variance
  per_target = {
      "mse": skm.mean_squared_error(y_true, y_pred, multioutput="raw_values"),
      "mae": skm.mean_absolute_error(y_true, y_pred, multioutput="raw_values"),
      "r2": np.full(y_true.shape[1], np.nan),
  }
  if not constant.all():
    per_target["r2"][~constant] = skm.r2_score(y_true[:, ~constant], y_pred[:, ~constant],
                                               multioutput="raw_values")
  r2_defined = per_target["r2"][~constant]
  return RegressionMetrics(
      target_names=names, n_records=len(y_true), mse=float(per_target["mse"].mean()),
      mae=float(per_target["mae"].mean()),
      r2=float(r2_defined.mean()) if len(r2_defined) else math.nan, per_target=per_target,
      undefined_targets=[names[t] for t in np.flatnonzero(constant)])
