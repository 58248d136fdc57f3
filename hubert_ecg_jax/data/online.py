"""Fast online stage for the input pipeline: `model_inputs` at several times the speed of scipy.

More in docs/modules.md."""
from __future__ import annotations

import numba
import numpy as np
import scipy.signal

from hubert_ecg_jax.data.preprocess import (DECIMATION_FACTOR, attention_masks, check_windows,
                                            fill_nans)

_LANES = 32  # rows filtered together: enough independent chains to hide the multiply-add latency
_SOS = scipy.signal.cheby1(8, 0.05, 0.8 / DECIMATION_FACTOR, output="sos")  # decimate's IIR filter
_ZI = scipy.signal.sosfilt_zi(_SOS)  # (sections, 2): steady state for a unit step, as sosfiltfilt
# sosfiltfilt's default padding length for this filter (odd extension at both ends).
_PADLEN = 3 * (2 * len(_SOS) + 1 - min(int((_SOS[:, 2] == 0).sum()), int((_SOS[:, 5] == 0).sum())))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _filter_step(sos: np.ndarray, z0: np.ndarray, z1: np.ndarray, lanes: np.ndarray) -> None:
  """One sample through every second-order section (transposed direct form II, as scipy's sosfilt)."""
  for s in range(sos.shape[0]):
    b0, b1, b2, a1, a2 = sos[s, 0], sos[s, 1], sos[s, 2], sos[s, 4], sos[s, 5]
    for k in range(_LANES):
      x = lanes[k]
      y = b0 * x + z0[s, k]
      z0[s, k] = b1 * x - a1 * y + z1[s, k]
      z1[s, k] = b2 * x - a2 * y
      lanes[k] = y


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _decimate_rows(x: np.ndarray, sos: np.ndarray, zi: np.ndarray, padlen: int, q: int,
                   out: np.ndarray) -> None:
  """out[b] = decimate(x[b], q) for rows of x (B, N); zero-phase IIR with odd padding."""
  rows, n = x.shape
  sections = sos.shape[0]
  length = n + 2 * padlen
  buffer = np.zeros((length, _LANES))  # (padded time, lanes): forward-filtered block of rows
  z0 = np.empty((sections, _LANES))
  z1 = np.empty((sections, _LANES))
  lanes = np.zeros(_LANES)
  for start in range(0, rows, _LANES):
    width = min(_LANES, rows - start)
    for j in range(length):  # odd extension: 2*x[0] - x[padlen-j] before, 2*x[-1] - x[...] after
      for k in range(width):
        if j < padlen:
          buffer[j, k] = 2.0 * x[start + k, 0] - x[start + k, padlen - j]
        elif j < padlen + n:
          buffer[j, k] = x[start + k, j - padlen]
        else:
          buffer[j, k] = 2.0 * x[start + k, n - 1] - x[start + k, 2 * n + padlen - 2 - j]
    for s in range(sections):  # forward pass from the steady state of the first sample
      for k in range(_LANES):
        z0[s, k] = zi[s, 0] * buffer[0, k]
        z1[s, k] = zi[s, 1] * buffer[0, k]
    for j in range(length):
      for k in range(_LANES):
        lanes[k] = buffer[j, k]
      _filter_step(sos, z0, z1, lanes)
      for k in range(_LANES):
        buffer[j, k] = lanes[k]
    for s in range(sections):  # backward pass from the steady state of the last output
      for k in range(_LANES):
        z0[s, k] = zi[s, 0] * buffer[length - 1, k]
        z1[s, k] = zi[s, 1] * buffer[length - 1, k]
    for j in range(length - 1, -1, -1):
      for k in range(_LANES):
        lanes[k] = buffer[j, k]
      _filter_step(sos, z0, z1, lanes)
      i = j - padlen
      if 0 <= i < n and i % q == 0:
        for k in range(width):
          out[start + k, i // q] = lanes[k]


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _nonzero_columns(windows: np.ndarray, q: int) -> np.ndarray:
  """(B, leads, T) -> bool (B, T // q): whether any lead is non-zero in each group of q samples."""
  batch, leads, samples = windows.shape
  out = np.zeros((batch, samples // q), dtype=np.bool_)
  for b in range(batch):
    for column in range(samples // q):
      for lead in range(leads):
        for t in range(column * q, column * q + q):
          if windows[b, lead, t] != 0:
            out[b, column] = True
            break
        if out[b, column]:
          break
  return out


def decimate(flat: np.ndarray) -> np.ndarray:
  """`scipy.signal.decimate(flat, 5, axis=-1)` of (B, N) float32/float64 rows -> float32 (B, ceil(N/5))."""
  flat = np.ascontiguousarray(flat)
  if flat.ndim != 2 or flat.shape[1] <= _PADLEN or flat.dtype not in (np.float32, np.float64):
    raise ValueError(f"expected float32/float64 rows (batch, samples > {_PADLEN}), found "
                     f"{flat.dtype} {flat.shape}")
  out = np.empty((flat.shape[0], -(-flat.shape[1] // DECIMATION_FACTOR)), np.float32)
  _decimate_rows(flat, _SOS, _ZI, _PADLEN, DECIMATION_FACTOR, out)
  return out


def fast_model_inputs(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`preprocess.model_inputs`, fast: (B, 12, 2500) -> x float32 (B, 6000), mask int32 (B, 6000)."""
  windows = np.asarray(windows)
  if windows.dtype not in (np.float32, np.float64):
    windows = windows.astype(np.float64)
  windows = check_windows(windows)
  if np.isnan(windows).any():
    windows = fill_nans(windows.astype(np.float64))  # in float64, as the reference
  x = decimate(windows.reshape(windows.shape[0], -1))  # lead-major flatten: (B, 30000) -> (B, 6000)
  nonzero = _nonzero_columns(np.ascontiguousarray(windows), DECIMATION_FACTOR)  # (B, 500)
  return x, attention_masks(nonzero)
