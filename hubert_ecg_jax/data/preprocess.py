"""HuBERT-ECG preprocessing, numerically the original's semantics (reference §4).

More in docs/modules.md."""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
import scipy.signal

from hubert_ecg_jax.config import MODEL_INPUT_LENGTH, STANDARD_LEADS

TARGET_FS = 500
MODEL_FS = 100
WINDOW_SAMPLES = 2500  # 5 s at TARGET_FS
DECIMATION_FACTOR = TARGET_FS // MODEL_FS
MIN_FS = 100.0
BANDPASS_HZ = (0.05, 47.0)
MINMAX_EPS = 1e-8

FilterOrder = Literal["resample_first", "filter_first"]
NanPolicy = Literal["refuse", "interpolate"]
MissingLeads = Literal["refuse", "zero"]
CropMode = Literal["first", "random", "tta"]

_CANONICAL_LEAD = {name.upper(): name for name in STANDARD_LEADS}


def canonical_lead_name(name: str) -> str | None:
  """The standard spelling of a lead name ('avr', 'AVR', ' V1 ' -> 'aVR', 'V1'), or None."""
  key = re.sub(r"\s+", "", str(name)).upper()
  return _CANONICAL_LEAD.get(key)


def missing_standard_leads(lead_names: Sequence[str]) -> list[str]:
  """The standard leads that `lead_names` lacks (matched as `reorder_leads` does)."""
  present = {canonical_lead_name(name) for name in lead_names}
  return [lead for lead in STANDARD_LEADS if lead not in present]


def zeroed_leads(prepared: np.ndarray) -> list[str]:
  """Leads of a prepared (12, n) record that are all zeros: the ones entered for missing leads."""
  return [STANDARD_LEADS[i] for i in np.flatnonzero(~np.asarray(prepared).any(axis=1))]


def reorder_leads(signal: np.ndarray, lead_names: Sequence[str],
                  missing_leads: MissingLeads = "refuse") -> np.ndarray:
  """Rows of `signal` (leads, n) reordered to STANDARD_LEADS -> (12, n).

  Names are matched case-insensitively ignoring whitespace; unknown and duplicate leads are refused
  with their names, and so are missing leads unless `missing_leads="zero"` (their rows are zeros).
  """
  if missing_leads not in ("refuse", "zero"):
    raise ValueError(f"missing_leads must be 'refuse' or 'zero', got {missing_leads!r}")
  signal = np.asarray(signal)
  if signal.ndim != 2:
    raise ValueError(f"expected a 2-D signal (leads, samples), got shape {signal.shape}")
  names = [str(name) for name in lead_names]
  if len(names) != signal.shape[0]:
    raise ValueError(
        f"got {len(names)} lead names {names} for a signal with {signal.shape[0]} rows")
  canonical = [canonical_lead_name(name) for name in names]
  unknown = [name for name, lead in zip(names, canonical) if lead is None]
  if unknown:
    raise ValueError(
        f"unknown lead names {unknown}; expected the 12 standard leads {list(STANDARD_LEADS)} "
        "(any case); select those rows before preprocessing")
  duplicates = sorted({lead for lead in canonical if canonical.count(lead) > 1})
  if duplicates:
    raise ValueError(f"duplicate leads {duplicates} in lead names {names}")
  missing = [lead for lead in STANDARD_LEADS if lead not in canonical]
  if missing and missing_leads == "refuse":
    raise ValueError(f"missing leads {missing} in lead names {names}; all 12 standard leads are "
                     "needed, or pass missing_leads='zero' (--missing-leads zero) to enter them as zeros")
  if not missing:
    return signal[[canonical.index(lead) for lead in STANDARD_LEADS]]
  if len(missing) == len(STANDARD_LEADS):
    raise ValueError(f"none of the 12 standard leads is in lead names {names}")
  reordered = np.zeros((len(STANDARD_LEADS), signal.shape[1]), signal.dtype)
  for row, lead in enumerate(STANDARD_LEADS):
    if lead in canonical:
      reordered[row] = signal[canonical.index(lead)]
  return reordered


def bandpass_taps(fs: float) -> np.ndarray:
  """The original's FIR band-pass 0.05-47 Hz: int(0.3*fs) taps bumped to odd, Hamming window."""
  numtaps = int(0.3 * fs)
  if numtaps % 2 == 0:
    numtaps += 1
  return scipy.signal.firwin(numtaps, 2.0 * np.asarray(BANDPASS_HZ) / fs, pass_zero=False)


def _bandpass(signal: np.ndarray, fs: float) -> np.ndarray:
  taps = bandpass_taps(fs)
  padlen = 3 * len(taps)
  if signal.shape[-1] <= padlen:
    raise ValueError(
        f"record too short to filter: {signal.shape[-1]} samples at {fs:g} Hz; the band-pass "
        f"filter ({len(taps)} taps, applied forward and backward) needs more than {padlen}")
  return scipy.signal.filtfilt(taps, [1.0], signal, axis=-1)


def _resample_to_target(signal: np.ndarray, fs: float) -> np.ndarray:
  return scipy.signal.resample(signal, int(signal.shape[-1] * TARGET_FS / fs), axis=-1)


def _interpolate_nans(signal: np.ndarray) -> np.ndarray:
  filled = signal.copy()
  time = np.arange(signal.shape[-1])
  for lead in range(signal.shape[0]):
    bad = np.isnan(signal[lead])
    if bad.any():
      filled[lead, bad] = np.interp(time[bad], time[~bad], signal[lead, ~bad])
  return filled


def _validated_signal(signal: np.ndarray, fs: float, nan_policy: NanPolicy) -> np.ndarray:
  signal = np.asarray(signal)
  if signal.ndim != 2:
    raise ValueError(f"expected a 2-D signal (12 leads, samples), got shape {signal.shape}")
  if signal.shape[0] != len(STANDARD_LEADS):
    raise ValueError(
        f"expected 12 leads (rows) in a (12, samples) signal, got shape {signal.shape}; "
        "pass lead_names to reorder or transpose an (samples, 12) array")
  if not np.issubdtype(signal.dtype, np.number) or np.issubdtype(signal.dtype, np.complexfloating):
    raise ValueError(f"expected a real numeric signal, got dtype {signal.dtype}")
  if not np.isfinite(fs) or fs < MIN_FS:
    raise ValueError(f"sampling rate must be at least {MIN_FS:g} Hz, got {fs}")
  if nan_policy not in ("refuse", "interpolate"):
    raise ValueError(f"nan_policy must be 'refuse' or 'interpolate', got {nan_policy!r}")
  signal = signal.astype(np.float64)
  infinite = np.isinf(signal)
  if infinite.any():
    leads = [STANDARD_LEADS[i] for i in np.flatnonzero(infinite.any(axis=1))]
    raise ValueError(f"expected finite samples, found {int(infinite.sum())} infinite values in leads {leads}")
  nan = np.isnan(signal)
  if nan.any():
    all_nan = [STANDARD_LEADS[i] for i in np.flatnonzero(nan.all(axis=1))]
    if all_nan:
      raise ValueError(f"leads {all_nan} are entirely NaN; a record needs a value in every lead")
    if nan_policy == "refuse":
      leads = [STANDARD_LEADS[i] for i in np.flatnonzero(nan.any(axis=1))]
      raise ValueError(
          f"signal contains {int(nan.sum())} NaN samples in leads {leads}; the offline filter would "
          "spread them over the whole lead: pass nan_policy='interpolate' to fill them linearly")
    signal = _interpolate_nans(signal)
  return signal


def prepare_record(
    signal: np.ndarray,
    fs: float,
    lead_names: Sequence[str] | None = None,
    order: FilterOrder = "resample_first",
    nan_policy: NanPolicy = "refuse",
    missing_leads: MissingLeads = "refuse",
) -> np.ndarray:
  """Offline stage: (leads, n) at `fs` -> float32 (12, int(n*500/fs)) band-passed, resampled, in [-1, 1].

  `lead_names` (one per row) reorders rows to STANDARD_LEADS; without it rows must already be in that
  order. `order`, `nan_policy` and `missing_leads` are described in the module docstring.
  """
  if order not in ("resample_first", "filter_first"):
    raise ValueError(f"order must be 'resample_first' or 'filter_first', got {order!r}")
  fs = float(fs)
  absent: list[str] = []
  if lead_names is not None:
    signal = reorder_leads(signal, lead_names, missing_leads)
    absent = missing_standard_leads(lead_names)
  elif missing_leads == "zero" and np.ndim(signal) == 2 and np.shape(signal)[0] != len(STANDARD_LEADS):
    raise ValueError(f"missing_leads='zero' needs lead_names to tell which of the 12 leads the "
                     f"{np.shape(signal)[0]} rows are")
  signal = _validated_signal(signal, fs, nan_policy)  # (12, n) float64
  if order == "resample_first":
    if int(signal.shape[-1] * TARGET_FS / fs) < 1:
      raise ValueError(f"record of {signal.shape[-1]} samples at {fs:g} Hz is empty at {TARGET_FS} Hz")
    filtered = _bandpass(_resample_to_target(signal, fs), TARGET_FS)
  else:
    filtered = _resample_to_target(_bandpass(signal, fs), fs)
  if (signal == signal[:, :1]).all():
    raise ValueError(
        f"all 12 leads are flat (each one constant over the {signal.shape[-1]} samples): expected "
        "an ECG with a varying signal in at least one lead")
  low = filtered.min(axis=-1, keepdims=True)
  high = filtered.max(axis=-1, keepdims=True)
  scaled = 2.0 * (filtered - low) / (high - low + MINMAX_EPS) - 1.0
  scaled[[STANDARD_LEADS.index(lead) for lead in absent]] = 0.0
  return scaled.astype(np.float32)


def crop_offsets(
    num_samples: int,
    mode: CropMode,
    rng: np.random.Generator | None = None,
    n_crops: int = 1,
) -> np.ndarray:
  """Start offsets (n_crops,) int64 of 5-s windows in a 500-Hz record of `num_samples` samples.

  "first": [0] (n_crops must be 1). "random": n_crops offsets drawn uniformly from every valid offset,
  0..num_samples-2500 inclusive (the original's training crop; its TTA crop excluded the last offset).
  "tta": n_crops evenly spaced offsets from 0 to the last valid one, rounded (deterministic, covering the
  record; use "random" with n_crops > 1 for the original's random TTA crops). Records shorter than a
  window have the single valid offset 0.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be positive, got {num_samples}")
  if n_crops < 1:
    raise ValueError(f"n_crops must be at least 1, got {n_crops}")
  last_offset = max(num_samples - WINDOW_SAMPLES, 0)
  if mode == "first":
    if n_crops != 1:
      raise ValueError(f"mode 'first' gives one crop, got n_crops={n_crops}")
    return np.zeros(1, dtype=np.int64)
  if mode == "random":
    if rng is None:
      raise ValueError("mode 'random' needs rng (a numpy Generator)")
    return rng.integers(0, last_offset + 1, size=n_crops, dtype=np.int64)
  if mode == "tta":
    return np.round(np.linspace(0, last_offset, n_crops)).astype(np.int64)
  raise ValueError(f"mode must be 'first', 'random' or 'tta', got {mode!r}")


def crop_window(record_500hz: np.ndarray, offset: int) -> np.ndarray:
  """The 5-s window (12, 2500) at `offset` of a prepared (12, n) record.

  Records shorter than 2500 samples (offset must be 0) are padded with zeros at the end, which the
  attention mask of `model_input` marks as padding.
  """
  record = np.asarray(record_500hz)
  if record.ndim != 2 or record.shape[0] != len(STANDARD_LEADS):
    raise ValueError(f"expected a prepared record of shape (12, samples), got {record.shape}")
  num_samples = record.shape[1]
  last_offset = max(num_samples - WINDOW_SAMPLES, 0)
  if not 0 <= offset <= last_offset:
    raise ValueError(
        f"crop offset {offset} out of range 0..{last_offset} for a record of {num_samples} samples")
  if num_samples >= WINDOW_SAMPLES:
    return record[:, offset:offset + WINDOW_SAMPLES]
  padded = np.zeros((len(STANDARD_LEADS), WINDOW_SAMPLES), dtype=record.dtype)
  padded[:, :num_samples] = record
  return padded


def check_windows(windows: np.ndarray) -> np.ndarray:
  """Refuses a batch of windows that is not (batch, 12, 2500) or holds infinite values."""
  if windows.ndim != 3 or windows.shape[1:] != (len(STANDARD_LEADS), WINDOW_SAMPLES):
    raise ValueError(
        f"expected windows of shape (batch, 12, {WINDOW_SAMPLES}), got {windows.shape}")
  infinite = np.isinf(windows)
  if infinite.any():
    raise ValueError(f"expected finite window values, found {int(infinite.sum())} infinite values in "
                     f"windows {np.flatnonzero(infinite.any(axis=(1, 2))).tolist()}")
  return windows


def fill_nans(windows: np.ndarray) -> np.ndarray:
  """NaNs of each (12, 2500) window -> the mean of that window's non-NaN values."""
  nan = np.isnan(windows)
  if not nan.any():
    return windows
  valid_count = (~nan).sum(axis=(1, 2), keepdims=True)
  if (valid_count == 0).any():
    raise ValueError("a window is entirely NaN; there is no value to fill it with")
  means = np.where(nan, 0.0, windows).sum(axis=(1, 2), keepdims=True) / valid_count
  return np.where(nan, means, windows)


def attention_masks(nonzero: np.ndarray) -> np.ndarray:
  """bool (batch, 500): any lead non-zero in each 100-Hz column -> int32 (batch, 6000) mask,
  1 between the first and last non-zero column, repeated for the 12 leads (lead-major)."""
  index = np.arange(nonzero.shape[1])
  first = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), nonzero.shape[1])
  last = nonzero.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1)
  column_mask = (index >= first[:, None]) & (index <= last[:, None])  # (batch, 500)
  return np.tile(column_mask, (1, len(STANDARD_LEADS))).astype(np.int32)


def model_inputs(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Online stage on a batch: (batch, 12, 2500) -> x float32 (batch, 6000), mask int32 (batch, 6000)."""
  windows = check_windows(np.asarray(windows, dtype=np.float64))
  filled = fill_nans(windows)
  batch = windows.shape[0]
  flat = filled.reshape(batch, -1)  # (batch, 30000) lead-major
  x = scipy.signal.decimate(flat, DECIMATION_FACTOR, axis=-1)  # (batch, 6000)
  columns = filled.reshape(batch, len(STANDARD_LEADS), -1, DECIMATION_FACTOR)
  return x.astype(np.float32), attention_masks((columns != 0).any(axis=(1, 3)))


def model_input(window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Online stage: (12, 2500) window at 500 Hz -> x float32 (6000,), attention mask int32 (6000,)."""
  window = np.asarray(window)
  if window.shape != (len(STANDARD_LEADS), WINDOW_SAMPLES):
    raise ValueError(f"expected a window of shape (12, {WINDOW_SAMPLES}), got {window.shape}")
  x, mask = model_inputs(window[None])
  return x[0], mask[0]


def preprocess_ecg(
    signal: np.ndarray,
    fs: float,
    lead_names: Sequence[str] | None = None,
    order: FilterOrder = "resample_first",
    nan_policy: NanPolicy = "refuse",
    missing_leads: MissingLeads = "refuse",
) -> tuple[np.ndarray, np.ndarray]:
  """One ECG (leads, n) in mV at `fs` -> model input float32 (6000,) and attention mask int32 (6000,).

  `prepare_record`, then the first 5 s (zero-padded if shorter), then `model_input`. With
  `missing_leads="zero"` and `lead_names` naming fewer than 12 leads, the others are zeros
  (`missing_standard_leads(lead_names)` lists them).
  """
  record = prepare_record(signal, fs, lead_names=lead_names, order=order, nan_policy=nan_policy,
                          missing_leads=missing_leads)
  return model_input(crop_window(record, 0))
