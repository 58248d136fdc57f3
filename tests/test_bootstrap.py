"""Bootstrap intervals against a plain-loop numpy/scikit-learn reference with the same seed."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from hubert_ecg_jax.evaluate import (bootstrap_ci, bootstrap_indices, bootstrap_label_ci,
                                     fmax_score, label_auprc, label_auroc)
from hubert_ecg_jax.evaluate.bootstrap import weighted_label_metric

SKLEARN = {"auroc": skm.roc_auc_score, "auprc": skm.average_precision_score}
TOLERANCE = 1e-12


def _problem(seed: int = 0, records: int = 90):
  """Four labels with tied scores; label 3 has 2 positives, so many resamples have none."""
  rng = np.random.default_rng(seed)
  y_true = (rng.random((records, 4)) < [0.3, 0.5, 0.2, 0.0]).astype(np.int64)
  y_true[[4, records // 2], 3] = 1
  y_score = np.round(np.clip(0.3 * y_true + 0.7 * rng.random((records, 4)), 0, 1), 1)
  return y_true, y_score


def _reference(y_true, y_score, metric: str, n_boot: int, seed: int, level: float = 0.95):
  """Plain loop: resample records, sklearn per label where both classes exist, then percentiles."""
  n_records, n_labels = y_true.shape
  indices = np.random.default_rng(seed).integers(0, n_records, size=(n_boot, n_records))
  per_label = [[] for _ in range(n_labels)]
  macro = []
  for resample in indices:
    values = []
    for label in range(n_labels):
      truth = y_true[resample, label]
      if 0 < truth.sum() < len(truth):
        per_label[label].append(SKLEARN[metric](truth, y_score[resample, label]))
        values.append(per_label[label][-1])
    macro.append(np.mean(values))
  quantiles = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
  bounds = np.array([np.percentile(values, quantiles) for values in per_label])  # (labels, 2)
  skipped = np.array([n_boot - len(values) for values in per_label])
  return bounds, skipped, np.percentile(macro, quantiles)


@pytest.mark.parametrize("metric", ["auroc", "auprc"])
def test_vectorised_label_intervals_match_plain_loop(metric):
  y_true, y_score = _problem()
  result = bootstrap_label_ci(y_true, y_score, metric, n_boot=100, seed=7)
  bounds, skipped, macro_bounds = _reference(y_true, y_score, metric, 100, 7)
  np.testing.assert_allclose(result.per_label.lower, bounds[:, 0], rtol=0, atol=TOLERANCE)
  np.testing.assert_allclose(result.per_label.upper, bounds[:, 1], rtol=0, atol=TOLERANCE)
  np.testing.assert_array_equal(result.per_label.n_skipped, skipped)
  assert skipped[3] > 0 and skipped[:3].sum() == 0  # the rare label is skipped and counted
  np.testing.assert_array_equal(result.per_label.n_valid + result.per_label.n_skipped, 100)
  np.testing.assert_allclose([result.macro.lower, result.macro.upper], macro_bounds, atol=TOLERANCE)
  estimates = [SKLEARN[metric](y_true[:, label], y_score[:, label]) for label in range(4)]
  np.testing.assert_allclose(result.per_label.estimate, estimates, rtol=0, atol=TOLERANCE)
  assert abs(result.macro.estimate - np.mean(estimates)) < TOLERANCE


@pytest.mark.parametrize("metric, metric_fn", [("auroc", label_auroc), ("auprc", label_auprc)])
def test_generic_bootstrap_matches_plain_loop(metric, metric_fn):
  y_true, y_score = _problem(1, records=60)
  result = bootstrap_ci(metric_fn, y_true, y_score, n_boot=40, seed=3, level=0.9)
  bounds, skipped, _ = _reference(y_true, y_score, metric, 40, 3, level=0.9)
  np.testing.assert_allclose(np.c_[result.lower, result.upper], bounds, rtol=0, atol=TOLERANCE)
  np.testing.assert_array_equal(result.n_skipped, skipped)
  assert result.level == 0.9 and result.n_boot == 40 and result.seed == 3


def test_generic_bootstrap_of_a_scalar_metric():
  y_true, y_score = _problem(2, records=50)
  result = bootstrap_ci(lambda t, s: fmax_score(t, s).fmax, y_true, y_score, n_boot=60, seed=4)
  indices = np.random.default_rng(4).integers(0, 50, size=(60, 50))
  values = [fmax_score(y_true[rows], y_score[rows]).fmax for rows in indices]
  assert result.estimate.shape == () and result.estimate == fmax_score(y_true, y_score).fmax
  np.testing.assert_allclose([result.lower, result.upper], np.percentile(values, [2.5, 97.5]),
                             atol=TOLERANCE)
  assert int(result.n_skipped) == 0


def test_weighted_metrics_equal_sklearn_on_repeated_records():
  y_true, y_score = _problem(3, records=70)
  counts = np.random.default_rng(5).integers(0, 4, size=(3, 70))  # (weightings, records)
  for metric, sklearn_metric in SKLEARN.items():
    values = weighted_label_metric(y_true, y_score, counts, metric)
    for row, weights in enumerate(counts):
      for label in range(3):
        repeated = np.repeat(np.arange(70), weights)
        expected = sklearn_metric(y_true[repeated, label], y_score[repeated, label])
        assert abs(values[row, label] - expected) < TOLERANCE
        weighted = sklearn_metric(y_true[:, label], y_score[:, label], sample_weight=weights)
        assert abs(values[row, label] - weighted) < TOLERANCE


def test_seed_and_level_behave():
  y_true, y_score = _problem(4)
  first = bootstrap_label_ci(y_true, y_score, n_boot=200, seed=11)
  again = bootstrap_label_ci(y_true, y_score, n_boot=200, seed=11)
  other = bootstrap_label_ci(y_true, y_score, n_boot=200, seed=12)
  narrower = bootstrap_label_ci(y_true, y_score, n_boot=200, seed=11, level=0.5)
  np.testing.assert_array_equal(first.per_label.lower, again.per_label.lower)
  assert not np.array_equal(first.per_label.lower, other.per_label.lower)
  assert (narrower.per_label.upper - narrower.per_label.lower
          <= first.per_label.upper - first.per_label.lower).all()
  np.testing.assert_array_equal(bootstrap_indices(90, 200, 11),
                                np.random.default_rng(11).integers(0, 90, size=(200, 90)))


def test_label_undefined_on_all_records_has_no_interval():
  y_true, y_score = _problem(5, records=40)
  y_true[:, 2] = 0
  result = bootstrap_label_ci(y_true, y_score, "auroc", n_boot=20)
  assert np.isnan([result.per_label.estimate[2], result.per_label.lower[2]]).all()
  assert result.per_label.n_skipped[2] == 20


def test_bad_arguments_are_rejected():
  y_true, y_score = _problem(6, records=30)
  with pytest.raises(ValueError, match="confidence level"):
    bootstrap_label_ci(y_true, y_score, n_boot=10, level=95)
  with pytest.raises(ValueError, match="n_boot >= 1"):
    bootstrap_label_ci(y_true, y_score, n_boot=0)
  with pytest.raises(ValueError, match="'auroc', 'auprc'"):
    bootstrap_label_ci(y_true, y_score, "f1", n_boot=10)
  with pytest.raises(ValueError, match="same number of records"):
    bootstrap_ci(label_auroc, y_true, y_score[:-1], n_boot=10)
