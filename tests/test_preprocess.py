"""preprocess_ecg against an independent scipy rendering of the original's semantics, on real ECGs."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.signal

from hubert_ecg_jax.data import preprocess
from hubert_ecg_jax.data.preprocess import (
    STANDARD_LEADS, bandpass_taps, crop_offsets, crop_window, model_input, model_inputs, prepare_record,
    preprocess_ecg, reorder_leads)
from hubert_ecg_jax.data.readers import find_records, read_record

TOLERANCE = 1e-6


def reference_preprocess(signal: np.ndarray, fs: float, order: str) -> tuple[np.ndarray, np.ndarray]:
  """The original's steps written out directly with scipy (reference §4.1-4.2)."""
  signal = np.asarray(signal, dtype=np.float64)

  def band_pass(x, rate):
    numtaps = int(0.3 * rate)
    if numtaps % 2 == 0:
      numtaps += 1
    taps = scipy.signal.firwin(numtaps, [2 * 0.05 / rate, 2 * 47 / rate], pass_zero=False, window="hamming")
    return scipy.signal.filtfilt(taps, [1.0], x, axis=1)

  def resample(x):
    return scipy.signal.resample(x, int(signal.shape[1] * 500 / fs), axis=1)

  x = band_pass(resample(signal), 500) if order == "resample_first" else resample(band_pass(signal, fs))
  low, high = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
  x = 2 * (x - low) / (high - low + 1e-8) - 1
  window = x[:, :2500].copy()
  window[np.isnan(window)] = np.nanmean(window)
  decimated = scipy.signal.decimate(window.reshape(-1), 5)
  return decimated, np.ones(6000, dtype=np.int32)


@pytest.fixture(scope="module")
def real_records(sample_data_dir):
  records = [read_record(path) for path in find_records(sample_data_dir)]
  assert len(records) == 30
  return records


def test_filter_taps_follow_the_original_rule():
  assert [len(bandpass_taps(fs)) for fs in (500, 250, 360, 1000, 257, 400)] == [151, 75, 109, 301, 77, 121]


@pytest.mark.parametrize("order", ["resample_first", "filter_first"])
def test_matches_reference_on_every_real_record(real_records, order):
  for record in real_records:
    x, mask = preprocess_ecg(record.signal, record.fs, record.lead_names, order=order)
    expected_x, expected_mask = reference_preprocess(record.signal, record.fs, order)
    assert x.shape == (6000,) and x.dtype == np.float32 and mask.dtype == np.int32
    assert np.max(np.abs(x - expected_x)) <= TOLERANCE, record.record_id
    np.testing.assert_array_equal(mask, expected_mask)


@pytest.mark.parametrize("order", ["resample_first", "filter_first"])
@pytest.mark.parametrize("fs", [250, 360, 1000])
def test_matches_reference_on_resampled_copies(real_records, fs, order):
  for record in real_records:
    copy = scipy.signal.resample(record.signal.astype(np.float64), int(record.signal.shape[1] * fs / 500), axis=1)
    x, mask = preprocess_ecg(copy, fs, order=order)
    expected_x, expected_mask = reference_preprocess(copy, fs, order)
    assert np.max(np.abs(x - expected_x)) <= TOLERANCE, (record.record_id, fs)
    np.testing.assert_array_equal(mask, expected_mask)


def test_orders_agree_at_500_hz_and_differ_elsewhere(real_records):
  signal = real_records[0].signal
  np.testing.assert_allclose(prepare_record(signal, 500, order="resample_first"),
                             prepare_record(signal, 500, order="filter_first"), atol=1e-6)
  copy = scipy.signal.resample(signal, 2500, axis=1)
  difference = np.abs(prepare_record(copy, 250, order="resample_first") - prepare_record(copy, 250, order="filter_first"))
  assert difference.max() > 1e-3


def test_prepared_record_is_scaled_per_lead(real_records):
  prepared = prepare_record(real_records[3].signal, 500)
  assert prepared.shape == (12, 5000) and prepared.dtype == np.float32
  np.testing.assert_allclose(prepared.min(axis=1), -1.0, atol=1e-6)
  np.testing.assert_allclose(prepared.max(axis=1), 1.0, atol=1e-6)


def test_batched_equals_per_record(real_records):
  rng = np.random.default_rng(0)
  windows = []
  for record in real_records[:8]:
    prepared = prepare_record(record.signal, record.fs)
    windows.append(crop_window(prepared, int(crop_offsets(prepared.shape[1], "random", rng)[0])))
  windows = np.stack(windows)
  windows[2, 4, 100:200] = np.nan
  windows[5, :, 2000:] = 0.0
  batch_x, batch_mask = model_inputs(windows)
  for i, window in enumerate(windows):
    x, mask = model_input(window)
    np.testing.assert_array_equal(batch_x[i], x)
    np.testing.assert_array_equal(batch_mask[i], mask)


def test_online_nan_fill_uses_the_window_mean(real_records):
  window = crop_window(prepare_record(real_records[1].signal, 500), 0).astype(np.float64)
  window[[0, 7], 300:420] = np.nan
  filled = np.where(np.isnan(window), np.nanmean(window), window)
  x, _ = model_input(window)
  assert np.max(np.abs(x - scipy.signal.decimate(filled.reshape(-1), 5))) <= TOLERANCE


@pytest.mark.parametrize("num_samples,valid_columns", [(1500, 300), (1503, 301), (2499, 500)])
def test_short_record_padding_mask(real_records, num_samples, valid_columns):
  prepared = prepare_record(real_records[2].signal[:, :num_samples], 500)
  window = crop_window(prepared, 0)
  assert window.shape == (12, 2500)
  np.testing.assert_array_equal(window[:, num_samples:], 0.0)
  x, mask = model_input(window)
  expected = np.zeros((12, 500), np.int32)
  expected[:, :valid_columns] = 1
  np.testing.assert_array_equal(mask.reshape(12, 500), expected)
  if valid_columns < 500:
    # Why the mask is taken before decimation: the IIR filter leaks non-zeros into the padding.
    assert (x.reshape(12, 500) != 0).any(axis=0).all()


def test_zero_window_has_an_empty_mask():
  _, mask = model_input(np.zeros((12, 2500)))
  assert mask.sum() == 0


def test_reorder_leads_accepts_shuffled_spellings(real_records):
  signal = real_records[0].signal
  spellings = ["i", "II", " iii", "AVR", "avl", "aVF", "v1", "V2", "V3 ", "v4", "V5", "v6"]
  permutation = np.random.default_rng(3).permutation(12)
  shuffled = signal[permutation]
  names = [spellings[i] for i in permutation]
  np.testing.assert_array_equal(reorder_leads(shuffled, names), signal)
  x_shuffled, _ = preprocess_ecg(shuffled, 500, lead_names=names)
  x, _ = preprocess_ecg(signal, 500)
  np.testing.assert_array_equal(x_shuffled, x)


@pytest.mark.parametrize("names,message", [
    (list(STANDARD_LEADS[:11]) + ["V7"], r"unknown lead names \['V7'\]"),
    (list(STANDARD_LEADS[:11]) + ["v5"], r"duplicate leads \['V5'\]"),
    (list(STANDARD_LEADS[:11]), r"got 11 lead names"),
])
def test_reorder_leads_refusals(names, message):
  with pytest.raises(ValueError, match=message):
    reorder_leads(np.zeros((12, 10)), names)


def test_reorder_leads_names_missing_leads():
  with pytest.raises(ValueError, match=r"missing leads \['aVL'\]"):
    reorder_leads(np.zeros((11, 10)), [name for name in STANDARD_LEADS if name != "aVL"])


def test_nan_policy(real_records):
  signal = real_records[4].signal.astype(np.float64)
  with_nans = signal.copy()
  with_nans[3, 1000:1050] = np.nan
  with_nans[9, :20] = np.nan
  with pytest.raises(ValueError, match=r"70 NaN samples in leads \['aVR', 'V4'\].*nan_policy='interpolate'"):
    prepare_record(with_nans, 500)
  filled = with_nans.copy()
  time = np.arange(signal.shape[1])
  for lead in (3, 9):
    bad = np.isnan(filled[lead])
    filled[lead, bad] = np.interp(time[bad], time[~bad], filled[lead, ~bad])
  assert filled[9, 0] == filled[9, 20]
  np.testing.assert_array_equal(prepare_record(with_nans, 500, nan_policy="interpolate"), prepare_record(filled, 500))


@pytest.mark.parametrize("signal,fs,kwargs,error,message", [
    (np.zeros(5000), 500, {}, ValueError, r"expected a 2-D signal \(12 leads, samples\), got shape \(5000,\)"),
    (np.zeros((11, 5000)), 500, {}, ValueError, r"expected 12 leads .* got shape \(11, 5000\)"),
    (np.zeros((5000, 12)), 500, {}, ValueError, r"expected 12 leads .* got shape \(5000, 12\)"),
    (np.zeros((12, 5000)), 50, {}, ValueError, r"at least 100 Hz, got 50"),
    (np.zeros((12, 400)), 500, {}, ValueError, r"too short to filter: 400 samples at 500 Hz.*more than 453"),
    (np.zeros((12, 5000)), 500, {"order": "sideways"}, ValueError, r"order must be 'resample_first' or 'filter_first', got 'sideways'"),
    (np.zeros((12, 5000)), 500, {"nan_policy": "zero"}, ValueError, r"nan_policy must be 'refuse' or 'interpolate', got 'zero'"),
    (np.full((12, 5000), "a"), 500, {}, ValueError, r"real numeric signal, got dtype <U1"),
])
def test_prepare_record_refusals(signal, fs, kwargs, error, message):
  with pytest.raises(error, match=message):
    prepare_record(signal, fs, **kwargs)


def test_prepare_record_refuses_all_nan_and_inf():
  signal = np.ones((12, 5000))
  signal[5] = np.nan
  with pytest.raises(ValueError, match=r"leads \['aVF'\] are entirely NaN"):
    prepare_record(signal, 500, nan_policy="interpolate")
  signal = np.ones((12, 5000))
  signal[6, 7] = np.inf
  with pytest.raises(ValueError, match=r"infinite values in leads \['V1'\]"):
    prepare_record(signal, 500)


def test_crop_offsets():
  np.testing.assert_array_equal(crop_offsets(5000, "first"), [0])
  np.testing.assert_array_equal(crop_offsets(5000, "tta", n_crops=3), [0, 1250, 2500])
  np.testing.assert_array_equal(crop_offsets(1200, "tta", n_crops=2), [0, 0])
  offsets = crop_offsets(2600, "random", np.random.default_rng(0), n_crops=5000)
  assert offsets.min() == 0 and offsets.max() == 100
  np.testing.assert_array_equal(crop_offsets(2600, "random", np.random.default_rng(7), n_crops=4),
                                crop_offsets(2600, "random", np.random.default_rng(7), n_crops=4))


@pytest.mark.parametrize("args,kwargs,message", [
    ((5000, "first"), {"n_crops": 2}, r"mode 'first' gives one crop, got n_crops=2"),
    ((5000, "random"), {}, r"mode 'random' needs rng"),
    ((5000, "middle"), {}, r"mode must be 'first', 'random' or 'tta', got 'middle'"),
    ((0, "first"), {}, r"num_samples must be positive, got 0"),
    ((5000, "tta"), {"n_crops": 0}, r"n_crops must be at least 1, got 0"),
])
def test_crop_offsets_refusals(args, kwargs, message):
  with pytest.raises(ValueError, match=message):
    crop_offsets(*args, **kwargs)


def test_crop_window_and_model_input_refusals():
  with pytest.raises(ValueError, match=r"crop offset 2501 out of range 0..2500 for a record of 5000 samples"):
    crop_window(np.zeros((12, 5000)), 2501)
  with pytest.raises(ValueError, match=r"crop offset 1 out of range 0..0 for a record of 1000 samples"):
    crop_window(np.zeros((12, 1000)), 1)
  with pytest.raises(ValueError, match=r"expected a prepared record of shape \(12, samples\), got \(5000, 12\)"):
    crop_window(np.zeros((5000, 12)), 0)
  with pytest.raises(ValueError, match=r"expected a window of shape \(12, 2500\), got \(12, 5000\)"):
    model_input(np.zeros((12, 5000)))
  with pytest.raises(ValueError, match=r"expected windows of shape \(batch, 12, 2500\), got \(12, 2500\)"):
    model_inputs(np.zeros((12, 2500)))
  with pytest.raises(ValueError, match=r"a window is entirely NaN"):
    model_inputs(np.full((2, 12, 2500), np.nan))


def test_module_constants():
  assert preprocess.TARGET_FS == 500 and preprocess.MODEL_FS == 100
  assert preprocess.WINDOW_SAMPLES == 2500 and preprocess.MODEL_INPUT_LENGTH == 6000
  assert STANDARD_LEADS == ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
