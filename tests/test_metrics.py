"""Metrics against scikit-learn and brute-force numpy references; the report's outputs."""
from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from hubert_ecg_jax.evaluate import (aggregate_crops, evaluate_multilabel, fmax_score, format_table,
                                     multiclass_metrics, multilabel_metrics, regression_metrics,
                                     tune_thresholds, write_csv, write_json)

TOLERANCE = 1e-12  # same sklearn call, or the same sums in another order


def _problem(seed: int, records: int = 200, labels: int = 6, decimals: int | None = None):
  """Multi-label truth and informative probabilities; `decimals` rounds scores to create ties."""
  rng = np.random.default_rng(seed)
  y_true = (rng.random((records, labels)) < rng.uniform(0.1, 0.5, labels)).astype(np.int64)
  y_score = np.clip(0.35 * y_true + 0.65 * rng.random((records, labels)), 0.0, 1.0)
  if decimals is not None:
    y_score = np.round(y_score, decimals)
  return y_true, y_score


def _brute_force_fmax(y_true: np.ndarray, y_score: np.ndarray) -> float:
  """Fmax by its definition, one threshold at a time over every distinct score."""
  best = 0.0
  true_count = y_true.sum(axis=1)
  for threshold in np.unique(y_score):
    predicted = y_score >= threshold
    hits = (predicted & (y_true == 1)).sum(axis=1)
    predicted_count = predicted.sum(axis=1)
    covered = predicted_count > 0
    precision = np.mean(hits[covered] / predicted_count[covered])
    recall = np.mean(hits[true_count > 0] / true_count[true_count > 0])
    if precision + recall > 0:
      best = max(best, 2 * precision * recall / (precision + recall))
  return best


def test_ranking_metrics_match_sklearn_per_label_and_macro():
  y_true, y_score = _problem(0, decimals=2)
  result = multilabel_metrics(y_true, y_score)
  for label in range(y_true.shape[1]):
    assert result.per_label["auroc"][label] == skm.roc_auc_score(y_true[:, label], y_score[:, label])
    assert result.per_label["auprc"][label] == skm.average_precision_score(y_true[:, label],
                                                                           y_score[:, label])
  assert abs(result.macro["auroc"] - skm.roc_auc_score(y_true, y_score, average="macro")) < TOLERANCE
  assert abs(result.macro["auprc"]
             - skm.average_precision_score(y_true, y_score, average="macro")) < TOLERANCE
  assert result.n_defined_labels == result.n_labels == 6 and result.undefined_labels == []
  np.testing.assert_array_equal(result.support, y_true.sum(axis=0))


def test_threshold_metrics_match_sklearn_at_half_and_at_given_thresholds():
  y_true, y_score = _problem(1)
  thresholds = np.linspace(0.3, 0.7, y_true.shape[1])
  result = multilabel_metrics(y_true, y_score, thresholds=thresholds)
  for suffix, cut in (("0.5", np.full(y_true.shape[1], 0.5)), ("tuned", thresholds)):
    y_pred = (y_score >= cut).astype(np.int64)
    np.testing.assert_array_equal(result.per_label[f"f1@{suffix}"],
                                  skm.f1_score(y_true, y_pred, average=None))
    np.testing.assert_array_equal(result.per_label[f"sensitivity@{suffix}"],
                                  skm.recall_score(y_true, y_pred, average=None))
    # Specificity is the recall of the negative class: an independent sklearn route.
    np.testing.assert_allclose(result.per_label[f"specificity@{suffix}"],
                               skm.recall_score(1 - y_true, 1 - y_pred, average=None), atol=TOLERANCE)
    assert abs(result.macro[f"f1@{suffix}"]
               - skm.f1_score(y_true, y_pred, average="macro")) < TOLERANCE
  np.testing.assert_array_equal(result.thresholds, thresholds)


def test_single_class_label_is_undefined_and_left_out_of_macro():
  y_true, y_score = _problem(2)
  y_true[:, 1] = 0  # no positive
  y_true[:, 4] = 1  # no negative
  names = ["AF", "rare", "RBBB", "LBBB", "always", "NSR"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no sklearn warning either: undefined labels are not computed
    result = multilabel_metrics(y_true, y_score, names, thresholds=np.full(6, 0.4))
  assert result.undefined_labels == ["rare", "always"]
  assert result.n_defined_labels == 4 and result.n_labels == 6
  for values in result.per_label.values():
    assert np.isnan(values[[1, 4]]).all() and not np.isnan(values[[0, 2, 3, 5]]).any()
  defined = [0, 2, 3, 5]
  assert abs(result.macro["auroc"] - skm.roc_auc_score(y_true[:, defined], y_score[:, defined],
                                                       average="macro")) < TOLERANCE
  assert result.support[1] == 0 and result.support[4] == len(y_true)
  assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["per_label"]["auroc"][1] is None


def test_tuned_thresholds_reach_the_best_f1_of_a_brute_force_search():
  y_true, y_score = _problem(3, records=150, decimals=2)
  y_true[:, 5] = 0
  tuning = tune_thresholds(y_true, y_score, label_names=list("abcdef"))
  for label in range(5):
    candidates = np.unique(y_score[:, label])
    predicted = y_score[:, label][None, :] >= candidates[:, None]  # (candidates, records)
    hits = (predicted & (y_true[:, label] == 1)).sum(axis=1)
    f1 = 2 * hits / (predicted.sum(axis=1) + y_true[:, label].sum())
    assert abs(tuning.validation_f1[label] - f1.max()) < TOLERANCE
    assert tuning.thresholds[label] == candidates[np.flatnonzero(f1 >= f1.max() - TOLERANCE)[0]]
  assert tuning.fallback_labels == ["f"] and tuning.thresholds[5] == 0.5
  assert np.isnan(tuning.validation_f1[5])


@pytest.mark.parametrize("seed", range(4))
def test_fmax_matches_brute_force_definition(seed):
  y_true, y_score = _problem(seed, records=80, labels=7, decimals=2 if seed % 2 else None)
  y_true[:5] = 0  # records without any true label count in precision only
  result = fmax_score(y_true, y_score)
  assert abs(result.fmax - _brute_force_fmax(y_true, y_score)) < 1e-9
  f_at_best = 2 * result.precision * result.recall / (result.precision + result.recall)
  assert abs(f_at_best - result.fmax) < 1e-9 and result.threshold in y_score
  assert result.n_records_with_labels == int((y_true.sum(axis=1) > 0).sum())


def test_fmax_worked_example():
  # t = 0.8: record 0 predicts {0} (hit). precision 1, recall (1/2 + 0) / 2 = 1/4, F = 0.4.
  # t = 0.6: record 0 {0, 1} (2 hits), record 1 {1} (miss): precision (1 + 0) / 2, recall 1/2,
  # F = 0.5. t = 0.3: every label: precision (2/3 + 1/3) / 2, recall (1 + 1) / 2, F = 2/3.
  y_true = np.array([[1, 1, 0], [1, 0, 0]])
  y_score = np.array([[0.9, 0.6, 0.3], [0.3, 0.7, 0.3]])
  result = fmax_score(y_true, y_score)
  assert abs(result.fmax - 2 / 3) < TOLERANCE and result.threshold == 0.3
  assert math.isnan(fmax_score(np.zeros((2, 3)), y_score).fmax)


def test_multiclass_summary_matches_sklearn():
  rng = np.random.default_rng(5)
  y_true = rng.integers(0, 4, 300)
  logits = rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[y_true]
  y_prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  result = multiclass_metrics(y_true, y_prob, ["a", "b", "c", "d"])
  y_pred = y_prob.argmax(axis=1)
  assert result.accuracy == skm.accuracy_score(y_true, y_pred)
  assert abs(result.macro["auroc"]
             - skm.roc_auc_score(y_true, y_prob, multi_class="ovr", average="macro")) < TOLERANCE
  assert abs(result.macro["f1"] - skm.f1_score(y_true, y_pred, average="macro")) < TOLERANCE
  np.testing.assert_array_equal(result.per_class["recall"],
                                skm.recall_score(y_true, y_pred, average=None))
  absent = multiclass_metrics(np.where(y_true == 2, 0, y_true), y_prob)
  assert absent.undefined_classes == ["label_2"] and absent.n_defined_classes == 3
  assert np.isnan(absent.per_class["auroc"][2]) and not np.isnan(absent.macro["auroc"])


def test_regression_summary_matches_sklearn():
  rng = np.random.default_rng(6)
  y_true = rng.normal(size=(100, 2))
  y_pred = y_true + rng.normal(scale=0.5, size=(100, 2))
  result = regression_metrics(y_true, y_pred, ["age", "qt"])
  assert abs(result.mse - skm.mean_squared_error(y_true, y_pred)) < TOLERANCE
  assert abs(result.mae - skm.mean_absolute_error(y_true, y_pred)) < TOLERANCE
  assert abs(result.r2 - skm.r2_score(y_true, y_pred)) < TOLERANCE
  single = regression_metrics(y_true[:, 0], y_pred[:, 0])
  assert single.r2 == skm.r2_score(y_true[:, 0], y_pred[:, 0])
  constant = regression_metrics(np.c_[y_true[:, 0], np.ones(100)], y_pred)
  assert constant.undefined_targets == ["label_1"] and np.isnan(constant.per_target["r2"][1])
  assert abs(constant.r2 - single.r2) < TOLERANCE


@pytest.mark.parametrize("y_true, y_score, message", [
    (np.zeros((4, 3)), np.zeros((4, 2)), "same shape"),
    (np.full((4, 3), 2), np.zeros((4, 3)), "only 0 and 1"),
    (np.zeros((4, 3)), np.full((4, 3), 3.0), r"probabilities in \[0, 1\]"),
    (np.zeros((4, 3)), np.full((4, 3), np.nan), "finite"),
    (np.zeros(4), np.zeros(4), "records, labels"),
])
def test_bad_multilabel_input_is_rejected(y_true, y_score, message):
  with pytest.raises(ValueError, match=message):
    multilabel_metrics(y_true, y_score)


def test_bad_names_thresholds_and_classes_are_rejected():
  y_true, y_score = _problem(7, records=20, labels=3)
  with pytest.raises(ValueError, match="expected 3 label names, found 2"):
    multilabel_metrics(y_true, y_score, ["a", "b"])
  with pytest.raises(ValueError, match="thresholds of shape"):
    multilabel_metrics(y_true, y_score, thresholds=[0.5])
  with pytest.raises(ValueError, match="class indices"):
    multiclass_metrics(np.array([0, 3]), np.full((2, 3), 1 / 3))


def test_aggregate_crops_mean_and_max():
  scores = np.random.default_rng(8).random((5, 3, 4))  # (records, crops, labels)
  np.testing.assert_array_equal(aggregate_crops(scores, "max"), scores.max(axis=1))
  np.testing.assert_allclose(aggregate_crops(scores), scores.mean(axis=1))
  with pytest.raises(ValueError, match="mean"):
    aggregate_crops(scores, "median")
  with pytest.raises(ValueError, match="records, crops, labels"):
    aggregate_crops(scores[0])


def test_report_json_csv_and_table(tmp_path):
  y_true, y_score = _problem(9, records=120, labels=4)
  y_true[:, 3] = 0
  names = ["AF", "RBBB", "LBBB", "rare"]
  tuning = tune_thresholds(y_true[:60], y_score[:60], names)
  evaluation = evaluate_multilabel(y_true[60:], y_score[60:], names, thresholds=tuning.thresholds,
                                   n_boot=50, seed=1)
  data = json.loads(write_json(evaluation, tmp_path / "out" / "metrics.json").read_text())
  assert data["metrics"]["undefined_labels"] == ["rare"]
  assert data["intervals"]["auroc"]["per_label"]["lower"][3] is None
  assert data["metrics"]["fmax"]["fmax"] == evaluation.metrics.fmax.fmax
  with write_csv(evaluation, tmp_path / "metrics.csv").open() as stream:
    rows = list(csv.DictReader(stream))
  assert [row["label"] for row in rows] == names + ["macro"]
  assert {"auroc_ci_lower", "auroc_ci_upper", "auprc_ci_upper", "f1@tuned", "specificity@0.5",
          "threshold", "support"} <= set(rows[0])
  assert float(rows[0]["auroc"]) == evaluation.metrics.per_label["auroc"][0]
  assert float(rows[-1]["auroc"]) == evaluation.metrics.macro["auroc"]
  assert rows[3]["auroc"] == "nan" and rows[3]["note"].startswith("undefined")
  assert rows[-1]["note"] == "mean over 3 of 4 labels"
  interval = evaluation.intervals["auroc"]
  assert float(rows[-1]["auroc_ci_lower"]) == float(interval.macro.lower) <= interval.macro.estimate
  table = format_table(evaluation)
  assert "macro" in table and "Fmax" in table and "rare" in table.splitlines()[-1]
  assert f"{evaluation.metrics.macro['auroc']:.3f}" in table
  assert evaluate_multilabel(y_true, y_score, n_boot=0).intervals == {}
