"""Iteration-1 frame features against scipy/numpy computed window by window."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import scipy.signal
import scipy.stats
import wfdb

from hubert_ecg_jax.targets import features

RNG = np.random.default_rng(0)


def _conv_encoder_frames(length: int) -> int:
  """Output length of the VALID conv stack (kernels 10,3,3,2,2; strides 4,2,2,2,2)."""
  for kernel, stride in zip((10, 3, 3, 2, 2), (4, 2, 2, 2, 2)):
    length = (length - kernel) // stride + 1
  return length


def _real_model_inputs(sample_data_dir, count: int = 3) -> np.ndarray:
  """(count, 6000): first 5 s of real records, min-max scaled per lead, flattened, decimated by 5."""
  rows = []
  for header in sorted(sample_data_dir.glob("*.hea"))[:count]:
    signal, fields = wfdb.rdsamp(str(header.with_suffix("")))
    assert fields["fs"] == 500
    leads = signal[:2500].T  # (12, 2500)
    lo, hi = leads.min(1, keepdims=True), leads.max(1, keepdims=True)
    scaled = 2 * (leads - lo) / (hi - lo + 1e-8) - 1
    rows.append(scipy.signal.decimate(scaled.reshape(-1), 5))
  return np.stack(rows).astype(np.float32)


def test_frame_count_matches_conv_encoder_for_every_length():
  for length in range(82, 13000):
    assert features.num_frames(length) == _conv_encoder_frames(length), length
  assert features.num_frames(6000) == 93
  with pytest.raises(ValueError, match="at least 82"):
    features.num_frames(81)


def test_windows_are_the_receptive_fields():
  x = np.arange(2 * 6000, dtype=np.float32).reshape(2, 6000)
  windows = features.frame_windows(x)
  assert windows.shape == (2, 93, 82)
  for t in (0, 7, 50, 92):
    np.testing.assert_array_equal(windows[1, t], x[1, 64 * t:64 * t + 82])


def _reference_statistics(w: np.ndarray) -> list[float]:
  """The 16 statistics of one window, written out with numpy/scipy."""
  periodogram = np.abs(scipy.fft.fft(w))**2 / len(w)
  rms = np.sqrt(np.mean(w**2))
  return [
      np.min(w), np.max(w), np.mean(w), rms, np.var(w), np.std(w), np.mean(w**2), np.max(np.abs(w)),
      np.ptp(w), np.max(np.abs(w)) / rms, scipy.stats.skew(w), scipy.stats.kurtosis(w),
      periodogram.max(), periodogram.sum(), periodogram.mean(), np.var(periodogram)]


@pytest.mark.parametrize("source", ["random", "real"])
def test_statistics_match_scipy_per_window(source, sample_data_dir):
  if source == "random":
    x = RNG.standard_normal((2, 6000)).astype(np.float32) * 0.3 + 0.1
  else:
    x = _real_model_inputs(sample_data_dir, 2)
  stats = features.frame_statistics(x)
  assert stats.shape == (x.shape[0], 93, 16) and stats.dtype == np.float32
  for b in range(x.shape[0]):
    for t in range(93):
      expected = _reference_statistics(x[b, 64 * t:64 * t + 82].astype(np.float64))
      np.testing.assert_allclose(stats[b, t], expected, rtol=2e-6, atol=1e-6, err_msg=f"frame {t}")


def _reference_mfcc(w: np.ndarray, config: features.MfccConfig) -> np.ndarray:
  """One window's MFCCs from outside implementations: transformers' spectrogram (DC removal,
  pre-emphasis, symmetric Hamming window, power spectrum, HTK mel filters, floored natural log)
  and scipy's orthonormal DCT-II."""
  from transformers import audio_utils

  mel_filters = audio_utils.mel_filter_bank(
      num_frequency_bins=config.n_fft // 2 + 1, num_mel_filters=config.n_mels,
      min_frequency=config.fmin_hz, max_frequency=config.fmax_hz,
      sampling_rate=int(config.sample_rate), norm=None, mel_scale="htk")
  log_mel = audio_utils.spectrogram(
      w, audio_utils.window_function(len(w), "hamming", periodic=False), frame_length=len(w),
      hop_length=len(w), fft_length=config.n_fft, power=2.0, center=False,
      preemphasis=config.pre_emphasis, mel_filters=mel_filters, mel_floor=config.log_floor,
      log_mel="log", remove_dc_offset=config.remove_dc, dtype=np.float64)  # (n_mels, 1)
  return scipy.fft.dct(log_mel[:, 0], type=2, norm="ortho")[:config.n_mfcc]


def test_mel_filterbank_matches_transformers():
  from transformers import audio_utils
  config = features.MfccConfig()
  reference = audio_utils.mel_filter_bank(
      num_frequency_bins=config.n_fft // 2 + 1, num_mel_filters=config.n_mels,
      min_frequency=config.fmin_hz, max_frequency=config.fmax_hz,
      sampling_rate=int(config.sample_rate), norm=None, mel_scale="htk")
  np.testing.assert_allclose(features.mel_filterbank(config), reference, atol=1e-12)


def test_mfcc_matches_independent_implementation(sample_data_dir):
  config = features.MfccConfig()
  x = _real_model_inputs(sample_data_dir, 2)
  mfcc = features.frame_mfcc(x, config, deltas=False)
  assert mfcc.shape == (2, 93, 13)
  for b in range(2):
    for t in range(0, 93, 4):
      expected = _reference_mfcc(x[b, 64 * t:64 * t + 82].astype(np.float64), config)
      np.testing.assert_allclose(mfcc[b, t], expected, rtol=1e-5, atol=1e-4, err_msg=f"frame {t}")


def test_deltas_follow_the_regression_formula_and_are_not_zero(sample_data_dir):
  x = _real_model_inputs(sample_data_dir, 1)
  full = features.frame_mfcc(x)
  assert full.shape == (1, 93, 39)
  c, delta, delta2 = full[0, :, :13], full[0, :, 13:26], full[0, :, 26:]

  def reference_delta(values):
    # The regression deltas over +-2 frames with edge frames repeated are scipy's Savitzky-Golay
    # first derivative (window 5, order 1, mode "nearest").
    return scipy.signal.savgol_filter(values, 5, polyorder=1, deriv=1, axis=0, mode="nearest")

  np.testing.assert_allclose(delta, reference_delta(c.astype(np.float64)), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(delta2, reference_delta(reference_delta(c.astype(np.float64))),
                             rtol=1e-5, atol=1e-4)
  assert np.abs(delta).mean() > 0.1 and np.abs(delta2).mean() > 0.05


def test_feature_sets_shapes_and_mixed_layout(sample_data_dir):
  x = _real_model_inputs(sample_data_dir, 2)
  for name, dim in (("stats", 16), ("mfcc", 39), ("mixed", 29)):
    out = features.frame_features(x, name)
    assert out.shape == (2, 93, dim) == (2, 93, features.feature_dim(name))
    assert np.all(np.isfinite(out))
  mixed = features.frame_features(x, "mixed")
  np.testing.assert_array_equal(mixed[..., :16], features.frame_statistics(x))
  np.testing.assert_array_equal(mixed[..., 16:], features.frame_mfcc(x, deltas=False))
  assert features.frame_features(np.zeros((1, 12000), np.float32), "stats").shape == (1, 187, 16)


def test_flat_signals_give_finite_documented_values():
  x = np.zeros((3, 6000), np.float32)
  x[1] = 0.5
  x[2, :3000] = -0.25  # flat windows, a step at a lead junction, then zeros
  for name in features.FEATURE_SETS:
    assert np.all(np.isfinite(features.frame_features(x, name))), name
  stats = features.frame_statistics(x)
  names = features.STAT_NAMES
  assert np.all(stats[:, :, names.index("skewness")][:2] == 0)
  assert np.all(stats[:, :, names.index("kurtosis")][:2] == 0)
  assert np.all(stats[:, :, names.index("crest_factor")][:2] == 1)
  np.testing.assert_allclose(stats[1, :, names.index("rms")], 0.5)


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match=r"\(batch, samples\)"):
    features.frame_features(np.zeros(6000), "stats")
  with pytest.raises(ValueError, match="NaN"):
    features.frame_features(np.full((1, 6000), np.nan), "stats")
  with pytest.raises(ValueError, match="feature_set"):
    features.frame_features(np.zeros((1, 6000)), "wavelets")
  with pytest.raises(ValueError, match="n_mfcc"):
    features.MfccConfig(n_mfcc=30)
