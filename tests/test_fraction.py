"""Label-efficiency runs: the stratified training fraction against scikit-learn, and a linear probe
on a fraction through the console command."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from sklearn.model_selection import StratifiedShuffleSplit

from hubert_ecg_jax import cli
from hubert_ecg_jax.finetune.data import read_labels
from hubert_ecg_jax.finetune.fraction import stratified_fraction
from hubert_ecg_jax.plots import plot_label_efficiency
from test_finetune import write_synthetic_split

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_single_label_fraction_matches_scikit_learns_stratified_split(fraction):
  classes = np.repeat([0, 1, 2, 3], [120, 50, 24, 6])  # (200,) imbalanced
  one_hot = np.eye(4)[classes]
  ours = np.bincount(classes[stratified_fraction(one_hot, fraction, seed=3)], minlength=4)
  split = StratifiedShuffleSplit(n_splits=1, train_size=fraction, random_state=3)
  train, _ = next(split.split(np.zeros(len(classes)), classes))
  reference = np.bincount(classes[train], minlength=4)
  # scikit-learn gives each class its share rounded so that the total is exact; ours rounds per class.
  assert np.abs(ours - reference).max() <= 1
  assert abs(ours.sum() - reference.sum()) <= 2
  np.testing.assert_allclose(ours, fraction * np.bincount(classes), atol=1)


def test_multi_label_fraction_keeps_each_labels_share():
  rng = np.random.default_rng(0)
  labels = rng.uniform(size=(1000, 6)) < np.array([0.4, 0.2, 0.1, 0.05, 0.02, 0.01])
  labels[:, 1] |= labels[:, 0] & (rng.uniform(size=1000) < 0.3)  # correlated labels
  chosen = stratified_fraction(labels, 0.1, seed=0)
  expected = 0.1 * labels.sum(axis=0)
  stratified_error = np.abs(labels[chosen].sum(axis=0) - expected)
  assert stratified_error.max() <= 1.5 and abs(len(chosen) - 100) <= 3
  # A plain random draw of the same size misses the shares by more.
  random_errors = [np.abs(labels[rng.choice(1000, len(chosen), replace=False)].sum(axis=0)
                          - expected).mean() for _ in range(50)]
  assert stratified_error.mean() < np.mean(random_errors) / 2


def test_fraction_is_seeded_and_handles_unlabelled_records():
  strata = np.zeros((50, 0))  # regression: no strata
  first = stratified_fraction(strata, 0.2, seed=1)
  assert len(first) == 10 and np.array_equal(first, stratified_fraction(strata, 0.2, seed=1))
  assert not np.array_equal(first, stratified_fraction(strata, 0.2, seed=2))
  assert len(stratified_fraction(np.eye(5), 0.01, seed=0)) == 1  # never empty
  with pytest.raises(ValueError, match="train_fraction must lie in"):
    stratified_fraction(np.eye(5), 0.0, seed=0)


def test_linear_probe_on_a_fraction_and_the_curve(tmp_path):
  """The README recipe on synthetic records: probes on 25% and 100% of the labels, then the plot."""
  train = write_synthetic_split(tmp_path / "train", 48, 11)
  val = write_synthetic_split(tmp_path / "val", 16, 12)
  test = write_synthetic_split(tmp_path / "test", 16, 13)
  for fraction in (0.25, 1.0):
    workdir = tmp_path / f"probe_{fraction:g}"
    assert cli.main(["finetune", "configs/finetune_demo.py", str(workdir),
                     "--config.mode=linear_probe", "--config.task.kind=multi_class",
                     f"--config.data.train={train}", f"--config.data.val={val}",
                     f"--config.data.test={test}", "--config.eval.n_boot=0",
                     f"--config.data.train_fraction={fraction}", "--config.data.fraction_seed=5",
                     "--config.probe.c_values=(1.0,)", "--config.train.progress=false"]) == 0
    metadata = json.loads((workdir / "best_model" / "metadata.json").read_text())
    assert metadata["training_config"]["data"]["train_fraction"] == fraction
  subset = tmp_path / "probe_0.25" / "data" / "train_fraction-0.25-seed5"
  _, labels, _ = read_labels(subset)
  np.testing.assert_array_equal(labels.sum(axis=0), [3, 3, 3, 3])  # 12 of 48, 3 per class
  assert any("training on 12 of 48 records" in note for note in json.loads(
      (tmp_path / "probe_0.25" / "best_model" / "metadata.json").read_text())["notes"])
  curve = tmp_path / "curve.png"
  done = subprocess.run([sys.executable, str(REPO / "tools" / "plot_label_efficiency.py"),
                         str(tmp_path / "probe_0.25"), str(tmp_path / "probe_1"), "--out", str(curve)],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  header, row = done.stdout.splitlines()[:2]
  assert header.split()[1:] == ["25%", "100%"] and row.split()[0] == "linear_probe"
  assert all(0.0 <= float(value) <= 1.0 for value in row.split()[1:])
  assert curve.stat().st_size > 10_000
  with pytest.raises(ValueError, match="expected fractions"):
    plot_label_efficiency([0.25, 1.0], [[0.5]], tmp_path / "bad.png")
