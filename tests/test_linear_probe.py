"""Linear probe: the folded scikit-learn head reproduces scikit-learn's predictions, and a probe on a
frozen (random-init) encoder runs through `finetune --config.mode=linear_probe` and `evaluate`."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from hubert_ecg_jax import cli
from hubert_ecg_jax.finetune.linear_probe import fit_head, fold_standardisation
from hubert_ecg_jax.tasks import Task
from test_finetune import write_synthetic_split


def _features(seed: int = 0, n: int = 80, hidden: int = 6):
  rng = np.random.default_rng(seed)
  x = rng.normal(3.0, 2.0, (n, hidden))
  mean, std = x.mean(axis=0), x.std(axis=0)
  return x, (x - mean) / std, mean, std


@pytest.mark.parametrize("num_classes", [2, 3])
def test_multiclass_head_reproduces_sklearn_probabilities(num_classes):
  x, z, mean, std = _features()
  y = (z[:, 0] + 0.5 * z[:, 1] > 0).astype(int) + (num_classes == 3) * (z[:, 2] > 1)
  kernel, bias = fold_standardisation(*fit_head("multi_class", z, y, 0.5, False, 500, num_classes), mean, std)
  task = Task("multi_class", tuple(f"c{k}" for k in range(num_classes)), ("class",))
  expected = LogisticRegression(C=0.5, max_iter=500).fit(z, y).predict_proba(z)
  np.testing.assert_allclose(task.probabilities(x @ kernel + bias), expected, atol=1e-4)


def test_multilabel_head_reproduces_sklearn_and_handles_constant_labels():
  x, z, mean, std = _features(1)
  y = np.stack([z[:, 0] > 0, z[:, 1] > 0.5, np.ones(len(z), bool)], axis=1).astype(np.float32)
  kernel, bias = fold_standardisation(*fit_head("multi_label", z, y, 2.0, True, 500, 3), mean, std)
  probabilities = Task("multi_label", ("a", "b", "c"), ("a", "b", "c")).probabilities(x @ kernel + bias)
  for label in (0, 1):
    model = LogisticRegression(C=2.0, max_iter=500, class_weight="balanced").fit(z, y[:, label])
    np.testing.assert_allclose(probabilities[:, label], model.predict_proba(z)[:, 1], atol=1e-4)
  np.testing.assert_allclose(probabilities[:, 2], 1 - 1e-4, rtol=1e-6)  # all positive: a constant


def test_regression_head_is_ridge():
  x, z, mean, std = _features(2)
  y = np.stack([z @ np.arange(6.0), z[:, 0]], axis=1)
  kernel, bias = fold_standardisation(*fit_head("regression", z, y, 4.0, False, 500, 2), mean, std)
  np.testing.assert_allclose(x @ kernel + bias, Ridge(alpha=0.25).fit(z, y).predict(z), atol=1e-4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  from hubert_ecg_jax.data.synthetic import write_wfdb_folder

  root = tmp_path_factory.mktemp("probe")
  splits = {split: write_synthetic_split(root / split, n, seed)
            for split, n, seed in (("train", 48, 11), ("val", 24, 12), ("test", 24, 13))}
  write_wfdb_folder(root / "wfdb", 3, seed=14, duration_s=7.5, classes=["SB", "RBBB"])
  return dict(splits, wfdb=root / "wfdb", root=root)


def _probe(data, kind: str) -> pathlib.Path:
  workdir = data["root"] / f"probe_{kind}"
  assert cli.main(["finetune", "configs/finetune_demo.py", str(workdir), "--no-test",
                   "--config.mode=linear_probe", f"--config.task.kind={kind}",
                   f"--config.data.train={data['train']}", f"--config.data.val={data['val']}",
                   "--config.probe.c_values=(0.1,1.0)", "--config.train.progress=false"]) == 0
  return workdir / "best_model"


def test_multiclass_probe_on_a_frozen_random_encoder(data):
  """One-hot columns as classes, end to end: saved as an ordinary classifier, evaluated, predicted."""
  model = _probe(data, "multi_class")
  metadata = json.loads((model / "metadata.json").read_text())
  assert metadata["mode"] == "linear_probe" and metadata["task"]["kind"] == "multi_class"
  assert metadata["thresholds"] is None and "C=" in metadata["notes"][-1]
  assert metadata["loss_weights"] == pytest.approx([1 / 3] * 4)  # C / n_c with 12 records per class
  out = data["root"] / "report_multi_class"
  assert cli.main(["evaluate", str(model), str(data["test"]), "--out", str(out), "--n-boot", "20",
                   "--quiet"]) == 0
  summary = json.loads((out / "metrics.json").read_text())
  assert summary["multiclass"]["n_records"] == 24 and summary["multiclass"]["accuracy"] > 0.6
  assert summary["evaluation"]["metrics"]["label_names"] == ["SB", "STach", "RBBB", "STE"]
  assert (out / "roc.png").is_file() and (out / "auroc.png").is_file()
  predictions = data["root"] / "predict_multi_class"
  assert cli.main(["predict", str(model), str(data["wfdb"]), "--out", str(predictions), "--quiet"]) == 0
  records = json.loads((predictions / "predictions.json").read_text())["records"]
  assert len(records) == 3 and all(len(r["findings"]) == 1 for r in records)
  assert all(r["windows"] == 2 and r["window_offsets_500hz"] == [0, 1250] for r in records)  # 7.5 s
  assert all(sum(r["probabilities"].values()) == pytest.approx(1.0) for r in records)


def test_regression_probe_reports_mse_mae_r2(data):
  model = _probe(data, "regression")
  out = data["root"] / "report_regression"
  assert cli.main(["evaluate", str(model), str(data["test"]), "--out", str(out), "--quiet"]) == 0
  summary = json.loads((out / "metrics.json").read_text())
  assert summary["regression"]["target_names"] == ["SB", "STach", "RBBB", "STE"]
  assert 0 < summary["regression"]["mse"] < 0.25  # better than predicting the mean (variance 0.1875)
  rows = (out / "metrics.csv").read_text().splitlines()
  assert rows[0] == "target,mse,mae,r2" and len(rows) == 5
