"""The fast online stage equals the reference `preprocess.model_inputs` (and scipy's decimate) bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.signal

from hubert_ecg_jax.data.online import decimate, fast_model_inputs
from hubert_ecg_jax.data.preprocess import crop_window, model_inputs, prepare_record
from hubert_ecg_jax.data.readers import read_record


@pytest.mark.parametrize("rows,length", [(1, 30000), (31, 30000), (33, 30000), (5, 28), (3, 12345)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decimate_is_scipy_bit_for_bit(rows, length, dtype):
  x = np.random.default_rng(rows + length).standard_normal((rows, length)).astype(dtype)
  expected = scipy.signal.decimate(x.astype(np.float64), 5, axis=-1).astype(np.float32)
  got = decimate(x)
  assert got.dtype == np.float32 and got.shape == expected.shape
  np.testing.assert_array_equal(got, expected)


def _assert_same_as_reference(windows):
  x, mask = fast_model_inputs(windows)
  expected_x, expected_mask = model_inputs(windows)
  assert x.dtype == np.float32 and mask.dtype == np.int32
  np.testing.assert_array_equal(x, expected_x)
  np.testing.assert_array_equal(mask, expected_mask)


def test_real_records_every_window_offset(sample_data_dir):
  windows = []
  for index, path in enumerate(sorted(sample_data_dir.glob("*.hea"))):
    ecg = read_record(path)
    prepared = prepare_record(ecg.signal, ecg.fs, lead_names=ecg.lead_names)
    windows.append(crop_window(prepared, [0, 1, 1234, prepared.shape[1] - 2500][index % 4]))
  _assert_same_as_reference(np.stack(windows))  # 30 rows: one partial block of 32 lanes


def test_padding_nans_zeros_and_float64():
  rng = np.random.default_rng(0)
  windows = rng.uniform(-1, 1, (40, 12, 2500)).astype(np.float32)
  windows[1, :, 1800:] = 0  # a short record, zero-padded at the end
  windows[2, :, :600] = 0  # leading zeros
  windows[3] = 0  # all zeros: an all-zero attention mask
  windows[4, 5, 100:400] = np.nan  # filled with the window's mean
  windows[5, :, 7] = np.nan
  windows[6, 0, 2499] = 1e-30  # a tiny value still counts as signal
  windows[6, :, :2495] = 0
  _assert_same_as_reference(windows)
  _assert_same_as_reference(windows[:3].astype(np.float64))


def test_bad_windows_are_refused():
  with pytest.raises(ValueError, match=r"expected windows of shape \(batch, 12, 2500\)"):
    fast_model_inputs(np.zeros((2, 12, 2000), np.float32))
  bad = np.zeros((2, 12, 2500), np.float32)
  bad[1, 3, 4] = np.inf
  with pytest.raises(ValueError, match="infinite"):
    fast_model_inputs(bad)
  with pytest.raises(ValueError, match="entirely NaN"):
    fast_model_inputs(np.full((1, 12, 2500), np.nan, np.float32))
  with pytest.raises(ValueError, match=r"samples > 27"):
    decimate(np.zeros((2, 20)))
