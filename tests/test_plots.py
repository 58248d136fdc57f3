"""The PNG figures: valid files of the expected size with real content, and input checks."""
from __future__ import annotations

import pathlib

import matplotlib.image
import numpy as np
import pytest
import wfdb

from hubert_ecg_jax.evaluate import bootstrap_label_ci, label_auroc
from hubert_ecg_jax.plots import STANDARD_LEADS, plot_ecg, plot_label_auroc, plot_roc_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_png(path: pathlib.Path) -> np.ndarray:
  """(height, width, channels) pixels in [0, 1] after checking the file is a PNG."""
  assert path.read_bytes()[:8] == PNG_SIGNATURE
  assert path.stat().st_size > 10_000
  return matplotlib.image.imread(path)


def _problem(labels: int = 5):
  rng = np.random.default_rng(0)
  y_true = (rng.random((150, labels)) < 0.3).astype(np.int64)
  y_score = np.clip(0.35 * y_true + 0.65 * rng.random((150, labels)), 0, 1)
  return y_true, y_score


@pytest.mark.parametrize("labels", [5, 30])
def test_roc_curves_png(tmp_path, labels):
  y_true, y_score = _problem(labels)
  y_true[:, -1] = 0  # an undefined label is left out, not a crash
  pixels = _read_png(plot_roc_curves(y_true, y_score, tmp_path / f"roc{labels}.png"))
  assert pixels.shape[0] > 500 and pixels.shape[1] > 500
  assert pixels[..., :3].std() > 0.05  # curves, axes and legend, not a blank canvas
  colored = np.ptp(pixels[..., :3], axis=-1) > 0.3  # curve colours, not greys
  assert colored.mean() > 0.002


def test_label_auroc_chart_png(tmp_path):
  y_true, y_score = _problem(12)
  y_true[:, 3] = 0
  interval = bootstrap_label_ci(y_true, y_score, n_boot=30).per_label
  path = plot_label_auroc(label_auroc(y_true, y_score), tmp_path / "bars.png",
                          [f"label {index}" for index in range(12)], interval.lower, interval.upper)
  pixels = _read_png(path)
  assert pixels.shape[0] > 300 and pixels[..., :3].std() > 0.05
  with pytest.raises(ValueError, match="both ci_lower and ci_upper"):
    plot_label_auroc(label_auroc(y_true, y_score), tmp_path / "x.png", ci_lower=interval.lower)


def test_ecg_of_a_real_record_on_ecg_paper(tmp_path, sample_data_dir):
  signal, fields = wfdb.rdsamp(str(sample_data_dir / "E07500"))  # (samples, 12) in mV, 10 s
  dpi = 100
  path = plot_ecg(signal.T, fields["fs"], tmp_path / "ecg.png", lead_names=fields["sig_name"],
                  title="E07500", findings=[("sinus bradycardia", 0.91), ("AF", 0.02)], dpi=dpi)
  pixels = _read_png(path)[..., :3]
  # Drawn to scale: 250 mm of paper for 10 s at 25 mm/s, plus 10 mm calibration and 2 x 6 mm sides.
  assert abs(pixels.shape[1] - (250 + 10 + 12) / 25.4 * dpi) <= 1
  trace = pixels.max(axis=-1) < 0.25  # black ink
  paper = (pixels[..., 0] > 0.85) & (pixels[..., 1] < 0.8)  # the red-pink grid
  assert 0.01 < trace.mean() < 0.2 and paper.mean() > 0.05
  # Ink in every quarter of the width: all four columns of leads were drawn.
  assert all(column.mean() > 0.005 for column in np.array_split(trace, 4, axis=1))


def test_ecg_window_is_capped_at_ten_seconds(tmp_path):
  t = np.arange(15 * 250) / 250  # 15 s at 250 Hz
  signal = np.sin(2 * np.pi * 1.2 * t)[None, :] * np.linspace(0.5, 1.5, 12)[:, None]
  long = _read_png(plot_ecg(signal, 250, tmp_path / "long.png", dpi=80))
  short = _read_png(plot_ecg(signal[:, :1250], 250, tmp_path / "short.png", dpi=80))
  assert abs(long.shape[1] - (250 + 22) / 25.4 * 80) <= 1  # first 10 s only
  assert abs(short.shape[1] - (125 + 22) / 25.4 * 80) <= 1  # 5 s record, 125 mm of paper


def test_ecg_input_checks(tmp_path):
  signal = np.zeros((12, 5000))
  with pytest.raises(ValueError, match=r"shape \(12, samples\)"):
    plot_ecg(signal[:8], 500, tmp_path / "x.png")
  with pytest.raises(ValueError, match=r"missing \['V6'\]"):
    plot_ecg(signal, 500, tmp_path / "x.png", lead_names=STANDARD_LEADS[:11] + ("V7",))
  with pytest.raises(ValueError, match="probabilities in"):
    plot_ecg(signal, 500, tmp_path / "x.png", findings=[("AF", 3.0)])
  with pytest.raises(ValueError, match="sampling rate"):
    plot_ecg(signal, 0, tmp_path / "x.png")
