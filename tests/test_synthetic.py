"""The synthetic ECG generator: determinism, physical lead identities, and class features measured on
the signal with a simple R-peak detector (heart rate, RR irregularity, QRS width)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.signal

from hubert_ecg_jax.data.labels import snomed_codes_from_header
from hubert_ecg_jax.data.preprocess import preprocess_ecg
from hubert_ecg_jax.data.readers import find_records, read_record
from hubert_ecg_jax.data.synthetic import (
    SYNTHETIC_CLASSES, NoiseConfig, generate_dataset, generate_ecg, write_wfdb_folder)

FS = 500
RECORDS_PER_CLASS = 6


def r_peaks(signal: np.ndarray, fs: float = FS) -> np.ndarray:
  """R-peak sample indices: 8-25 Hz band energy summed over leads, smoothed over 60 ms, local maxima."""
  sos = scipy.signal.butter(3, [8, 25], "bandpass", fs=fs, output="sos")
  energy = (scipy.signal.sosfiltfilt(sos, signal, axis=1) ** 2).sum(axis=0)
  smooth = int(0.06 * fs)
  energy = np.convolve(energy, np.ones(smooth) / smooth, "same")
  peaks, _ = scipy.signal.find_peaks(energy, height=0.3 * np.percentile(energy, 99), distance=int(0.25 * fs))
  return peaks


def qrs_width_s(clean_signal: np.ndarray, fs: float = FS) -> float:
  """Median over beats of the span where the spatial speed exceeds 10% of that beat's maximum."""
  speed = np.sqrt((np.gradient(clean_signal, axis=1) ** 2).sum(axis=0)) * fs  # mV/s
  widths = []
  for peak in r_peaks(clean_signal, fs):
    if int(0.15 * fs) <= peak <= clean_signal.shape[1] - int(0.2 * fs):
      segment = speed[peak - int(0.15 * fs):peak + int(0.2 * fs)]
      above = np.flatnonzero(segment > 0.1 * segment.max())
      widths.append((above[-1] - above[0]) / fs)
  return float(np.median(widths))


@pytest.fixture(scope="module")
def dataset():
  signals, labels = generate_dataset(RECORDS_PER_CLASS * len(SYNTHETIC_CLASSES), seed=11)
  return signals, labels


def _of_class(dataset, name):
  signals, labels = dataset
  return [signal for signal, label in zip(signals, labels) if label == name]


def test_classes_and_codes():
  assert list(SYNTHETIC_CLASSES) == ["NSR", "AF", "SB", "STach", "RBBB", "STE"]
  assert {c.snomed_code for c in SYNTHETIC_CLASSES.values()} == {
      "426783006", "164889003", "426177001", "427084000", "59118001", "164931005"}


def test_deterministic_and_prefix_stable():
  first = generate_ecg("AF", np.random.default_rng(5))
  np.testing.assert_array_equal(first, generate_ecg("AF", np.random.default_rng(5)))
  assert not np.array_equal(first, generate_ecg("AF", np.random.default_rng(6)))
  long_signals, long_labels = generate_dataset(8, seed=3, duration_s=2.0)
  short_signals, short_labels = generate_dataset(3, seed=3, duration_s=2.0)
  np.testing.assert_array_equal(long_signals[:3], short_signals)
  assert long_labels[:3] == short_labels == ["NSR", "AF", "SB"]
  assert long_signals.shape == (8, 12, 1000) and long_signals.dtype == np.float32


def test_lead_identities_hold_with_noise(dataset):
  signals = dataset[0].astype(np.float64)
  lead_i, lead_ii, lead_iii, avr, avl, avf = (signals[:, k] for k in range(6))
  tolerance = 1e-5  # float32 rounding of mV values
  np.testing.assert_allclose(lead_iii, lead_ii - lead_i, atol=tolerance)
  np.testing.assert_allclose(avr, -(lead_i + lead_ii) / 2, atol=tolerance)
  np.testing.assert_allclose(avl, lead_i - lead_ii / 2, atol=tolerance)
  np.testing.assert_allclose(avf, lead_ii - lead_i / 2, atol=tolerance)
  np.testing.assert_allclose(avr + avl + avf, 0.0, atol=tolerance)


def test_amplitudes_are_physiological(dataset):
  for signal in dataset[0]:
    peak_to_peak = np.ptp(signal, axis=1)
    assert peak_to_peak.max() < 6.0 and np.median(peak_to_peak) > 0.5


@pytest.mark.parametrize("name,low,high", [("NSR", 60, 100), ("SB", 35, 60), ("STach", 100, 160),
                                           ("RBBB", 60, 100), ("STE", 60, 100)])
def test_heart_rate_in_class_range(dataset, name, low, high):
  for signal in _of_class(dataset, name):
    rate = 60.0 / np.mean(np.diff(r_peaks(signal)) / FS)
    assert low <= rate <= high, (name, rate)


def test_af_rr_irregularity_exceeds_sinus(dataset):
  def irregularity(signal):
    rr = np.diff(r_peaks(signal)) / FS
    return np.sqrt(np.mean(np.diff(rr) ** 2)) / rr.mean()  # RMSSD relative to the mean RR
  af = [irregularity(s) for s in _of_class(dataset, "AF")]
  sinus = [irregularity(s) for s in _of_class(dataset, "NSR")]
  assert min(af) > 0.15 and max(sinus) < 0.08 and min(af) > 2 * max(sinus)


def test_qrs_wider_in_bundle_branch_block():
  nsr = [qrs_width_s(generate_ecg("NSR", np.random.default_rng([2, i]), noise=None)) for i in range(4)]
  rbbb = [qrs_width_s(generate_ecg("RBBB", np.random.default_rng([2, i]), noise=None)) for i in range(4)]
  assert max(nsr) < 0.11 and min(rbbb) >= 0.12, (nsr, rbbb)


def test_rbbb_has_terminal_r_prime_in_v1():
  signal = generate_ecg("RBBB", np.random.default_rng(4), noise=None)
  peak = r_peaks(signal)[2]
  v1 = signal[6, peak - 40:peak + 60]  # -80 ms .. +120 ms
  late, early = v1[45:], v1[:45]
  assert late.max() > 0.3 and early.min() < -0.3 and np.argmax(late) > 0


def test_st_elevation_raises_the_st_segment():
  def st_level(signal):
    peaks = r_peaks(signal)[1:-1]
    return np.max([np.mean(signal[:, p + 40:p + 50], axis=1) - np.mean(signal[:, p - 60:p - 50], axis=1)
                   for p in peaks], axis=0).max()  # mV, J+80 ms against PR segment, most elevated lead
  ste = [st_level(generate_ecg("STE", np.random.default_rng([8, i]), noise=None)) for i in range(4)]
  nsr = [st_level(generate_ecg("NSR", np.random.default_rng([8, i]), noise=None)) for i in range(4)]
  assert min(ste) > 0.15 > max(nsr) - 0.05, (ste, nsr)


def test_af_has_no_p_waves_and_powerline_is_optional():
  clean_af = generate_ecg("AF", np.random.default_rng(1), noise=None)
  hum = generate_ecg("NSR", np.random.default_rng(1), noise=NoiseConfig(powerline_hz=50.0))
  quiet = generate_ecg("NSR", np.random.default_rng(1), noise=NoiseConfig())
  spectrum = lambda s: np.abs(np.fft.rfft(s[0]))[500]  # 50 Hz bin of a 10-s record
  assert spectrum(hum) > 20 * spectrum(quiet)
  assert clean_af.shape == (12, 5000)


def test_refusals():
  with pytest.raises(ValueError, match=r"unknown synthetic class 'VT'; expected one of \['NSR'"):
    generate_ecg("VT", np.random.default_rng(0))
  with pytest.raises(ValueError, match=r"need fs >= 100 Hz"):
    generate_ecg("NSR", np.random.default_rng(0), fs=50)
  with pytest.raises(ValueError, match=r"classes \['LBBB'\] unknown"):
    generate_dataset(2, 0, classes=["NSR", "LBBB"])


def test_wfdb_folder_reads_like_cinc(tmp_path):
  paths = write_wfdb_folder(tmp_path, 4, seed=2, duration_s=6.0)
  assert find_records(tmp_path) == paths
  signals, labels = generate_dataset(4, seed=2, duration_s=6.0)
  for path, signal, label in zip(paths, signals, labels):
    record = read_record(path)
    assert record.fs == 500.0 and record.signal.shape == (12, 3000)
    np.testing.assert_allclose(record.signal, signal, atol=6e-4)  # 1 uV storage resolution
    assert record.labels == (SYNTHETIC_CLASSES[label].snomed_code,)
    assert snomed_codes_from_header(path) == record.labels
    assert set(record.metadata) == {"age", "sex"}
    x, mask = preprocess_ecg(record.signal, record.fs, record.lead_names)
    assert x.shape == (6000,) and mask.all()


def test_plot_tool_writes_the_chosen_sheets(tmp_path, monkeypatch):
  import runpy
  import sys
  from pathlib import Path

  tool = Path(__file__).resolve().parents[1] / "tools" / "plot_synthetic.py"
  monkeypatch.setattr(sys, "argv", [str(tool), "--out", str(tmp_path), "--seconds", "1", "--classes", "AF,RBBB"])
  runpy.run_path(str(tool), run_name="__main__")
  assert sorted(path.name for path in tmp_path.glob("*.png")) == ["AF.png", "RBBB.png"]
