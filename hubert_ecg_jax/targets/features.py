"""Iteration-1 frame features, aligned exactly with the encoder frames of the model input.

More in docs/modules.md."""
from __future__ import annotations

import dataclasses

import numpy as np

from hubert_ecg_jax.config import HubertECGConfig

_RELEASED = HubertECGConfig.preset("small")  # the released conv feature encoder ("x5")
FRAME_HOP = _RELEASED.frame_hop  # total stride of the conv feature encoder: 64
FRAME_WIDTH = _RELEASED.receptive_field  # input samples one encoder frame sees: 82
FLAT_STD = 1e-8  # windows with std <= this have skewness and kurtosis 0
STAT_NAMES: tuple[str, ...] = (
    "min", "max", "mean", "rms", "var", "std", "power", "peak", "peak_to_peak", "crest_factor",
    "skewness", "kurtosis", "fft_power_max", "fft_power_sum", "fft_power_mean", "fft_power_var")
FEATURE_SETS: tuple[str, ...] = ("stats", "mfcc", "mixed")


@dataclasses.dataclass(frozen=True)
class MfccConfig:
  """MFCC of one 82-sample window at the model's 100 Hz rate.

  Steps: subtract the window mean (`remove_dc`); pre-emphasis `y_j = x_j - a x_{j-1}` with
  `x_{-1} = x_0` (`a = pre_emphasis`, 0 disables it); symmetric Hamming window
  `0.54 - 0.46 cos(2 pi j / (n - 1))`; zero-pad to `n_fft` and take the power spectrum `|rfft|^2`
  (bins `k sample_rate / n_fft`); `n_mels` triangular filters with unit peak whose corners are
  `n_mels + 2` points evenly spaced on the HTK mel scale `2595 log10(1 + f / 700)` between `fmin_hz`
  and `fmax_hz`, each triangle linear in Hz (librosa `htk=True, norm=None`); natural log of the
  energies clamped at `log_floor`; orthonormal DCT-II over the filters, keeping the first `n_mfcc`
  coefficients (c0 included, no liftering). Between 0 and 50 Hz the mel scale is nearly linear, so
  the filters are nearly evenly spaced (about 2.1 Hz apart with the defaults).
  """
  sample_rate: float = 100.0
  n_fft: int = 128
  n_mels: int = 23
  n_mfcc: int = 13
  fmin_hz: float = 0.0
  fmax_hz: float = 50.0
  pre_emphasis: float = 0.97
  remove_dc: bool = True
  log_floor: float = 1e-10
  delta_width: int = 2

  def __post_init__(self) -> None:
    if self.n_fft < FRAME_WIDTH:
      raise ValueError(f"n_fft must be >= the window of {FRAME_WIDTH} samples, got {self.n_fft}")
    if not 0 < self.n_mfcc <= self.n_mels:
      raise ValueError(f"n_mfcc must be in [1, n_mels={self.n_mels}], got {self.n_mfcc}")
    if not 0 <= self.fmin_hz < self.fmax_hz <= self.sample_rate / 2:
      raise ValueError(f"need 0 <= fmin_hz < fmax_hz <= {self.sample_rate / 2} Hz (Nyquist), "
                       f"got fmin_hz={self.fmin_hz}, fmax_hz={self.fmax_hz}")
    if not 0 <= self.pre_emphasis < 1:
      raise ValueError(f"pre_emphasis must be in [0, 1), got {self.pre_emphasis}")
    if self.log_floor <= 0 or self.delta_width < 1:
      raise ValueError(f"need log_floor > 0 and delta_width >= 1, got {self.log_floor}, "
                       f"{self.delta_width}")


def num_frames(input_length: int) -> int:
  """Encoder frames for an input of `input_length` samples (93 for 6000)."""
  if input_length < FRAME_WIDTH:
    raise ValueError(f"input needs at least {FRAME_WIDTH} samples for one frame, got {input_length}")
  return (input_length - FRAME_WIDTH) // FRAME_HOP + 1


def feature_dim(feature_set: str, mfcc_config: MfccConfig = MfccConfig()) -> int:
  """Values per frame of a feature set: 16 (stats), 39 (mfcc), 29 (mixed) with the defaults."""
  if feature_set == "stats":
    return len(STAT_NAMES)
  if feature_set == "mfcc":
    return 3 * mfcc_config.n_mfcc
  if feature_set == "mixed":
    return len(STAT_NAMES) + mfcc_config.n_mfcc
  raise ValueError(f"feature_set must be one of {FEATURE_SETS}, got {feature_set!r}")


def frame_windows(x: np.ndarray) -> np.ndarray:
  """(batch, L) model input -> (batch, frames, 82) float64 windows `x[:, 64 t : 64 t + 82]`."""
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"expected model input of shape (batch, samples), got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("model input contains NaN or infinite values; fill them before features")
  starts = FRAME_HOP * np.arange(num_frames(x.shape[1]))
  index = starts[:, None] + np.arange(FRAME_WIDTH)[None, :]  # (frames, 82)
  return x.astype(np.float64)[:, index]


def _window_statistics(w: np.ndarray) -> np.ndarray:
  """(..., n) windows -> (..., 16) statistics in `STAT_NAMES` order (float64)."""
  n = w.shape[-1]
  mean = w.mean(-1)
  centred = w - mean[..., None]
  var = np.mean(centred**2, -1)
  std = np.sqrt(var)
  power = np.mean(w**2, -1)
  rms = np.sqrt(power)
  lo, hi = w.min(-1), w.max(-1)
  peak = np.abs(w).max(-1)
  crest = np.where(rms > 0, peak / np.where(rms > 0, rms, 1.0), 1.0)
  flat = std <= FLAT_STD
  safe_var = np.where(flat, 1.0, var)
  skewness = np.where(flat, 0.0, np.mean(centred**3, -1) / safe_var**1.5)
  kurtosis = np.where(flat, 0.0, np.mean(centred**4, -1) / safe_var**2 - 3.0)
  periodogram = np.abs(np.fft.fft(w, axis=-1))**2 / n  # (..., n)
  return np.stack([
      lo, hi, mean, rms, var, std, power, peak, hi - lo, crest, skewness, kurtosis,
      periodogram.max(-1), periodogram.sum(-1), periodogram.mean(-1), periodogram.var(-1)], -1)


def frame_statistics(x: np.ndarray) -> np.ndarray:
  """(batch, L) model input -> (batch, frames, 16) float32 statistics (`STAT_NAMES`)."""
  return _window_statistics(frame_windows(x)).astype(np.float32)


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
  return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
  return 700.0 * (10.0**(mel / 2595.0) - 1.0)


def mel_filterbank(config: MfccConfig = MfccConfig()) -> np.ndarray:
  """(n_fft // 2 + 1, n_mels) triangular filters, unit peak, linear in Hz between mel-spaced corners."""
  corners = _mel_to_hz(np.linspace(_hz_to_mel(config.fmin_hz), _hz_to_mel(config.fmax_hz),
                                   config.n_mels + 2))  # (n_mels + 2,)
  bins = np.arange(config.n_fft // 2 + 1) * config.sample_rate / config.n_fft  # (bins,)
  lower, centre, upper = corners[:-2], corners[1:-1], corners[2:]  # (n_mels,) each
  rising = (bins[:, None] - lower) / (centre - lower)
  falling = (upper - bins[:, None]) / (upper - centre)
  return np.maximum(0.0, np.minimum(rising, falling))


def _dct_ii_orthonormal(size: int, keep: int) -> np.ndarray:
  """(size, keep) matrix `M` with `v @ M` = the first `keep` orthonormal DCT-II coefficients of `v`."""
  j = np.arange(size)[:, None]
  k = np.arange(keep)[None, :]
  basis = np.cos(np.pi * k * (2 * j + 1) / (2 * size)) * np.sqrt(2.0 / size)
  basis[:, 0] = np.sqrt(1.0 / size)
  return basis


def _window_mfcc(w: np.ndarray, config: MfccConfig) -> np.ndarray:
  """(..., n) windows -> (..., n_mfcc) MFCCs (float64)."""
  if config.remove_dc:
    w = w - w.mean(-1, keepdims=True)
  if config.pre_emphasis:
    previous = np.concatenate([w[..., :1], w[..., :-1]], -1)
    w = w - config.pre_emphasis * previous
  n = w.shape[-1]
  hamming = 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(n) / (n - 1))
  power = np.abs(np.fft.rfft(w * hamming, n=config.n_fft, axis=-1))**2  # (..., n_fft // 2 + 1)
  energies = power @ mel_filterbank(config)  # (..., n_mels)
  log_energies = np.log(np.maximum(energies, config.log_floor))
  return log_energies @ _dct_ii_orthonormal(config.n_mels, config.n_mfcc)


def frame_deltas(coefficients: np.ndarray, width: int = 2) -> np.ndarray:
  """(batch, frames, d) -> (batch, frames, d) regression deltas across frames, edges repeated."""
  if coefficients.ndim != 3:
    raise ValueError(f"expected (batch, frames, dim) coefficients, got shape {coefficients.shape}")
  frames = coefficients.shape[1]
  padded = np.pad(coefficients, ((0, 0), (width, width), (0, 0)), mode="edge")
  delta = np.zeros_like(coefficients, dtype=np.float64)
  for j in range(1, width + 1):
    ahead = padded[:, width + j:width + j + frames]
    behind = padded[:, width - j:width - j + frames]
    delta += j * (ahead - behind)
  return delta / (2 * sum(j * j for j in range(1, width + 1)))


def frame_mfcc(x: np.ndarray, config: MfccConfig = MfccConfig(), deltas: bool = True) -> np.ndarray:
  """(batch, L) model input -> (batch, frames, 3 n_mfcc) MFCC + delta + delta-delta (float32).

  With `deltas=False` only the `n_mfcc` coefficients are returned.
  """
  mfcc = _window_mfcc(frame_windows(x), config)  # (batch, frames, n_mfcc)
  if not deltas:
    return mfcc.astype(np.float32)
  delta = frame_deltas(mfcc, config.delta_width)
  delta2 = frame_deltas(delta, config.delta_width)
  return np.concatenate([mfcc, delta, delta2], -1).astype(np.float32)


def frame_features(x: np.ndarray, feature_set: str,
                   mfcc_config: MfccConfig = MfccConfig()) -> np.ndarray:
  """(batch, L) model input -> (batch, frames, feature_dim(feature_set)) float32 features."""
  if feature_set == "stats":
    return frame_statistics(x)
  if feature_set == "mfcc":
    return frame_mfcc(x, mfcc_config)
  if feature_set == "mixed":
    windows = frame_windows(x)
    stats = _window_statistics(windows)
    mfcc = _window_mfcc(windows, mfcc_config)
    return np.concatenate([stats, mfcc], -1).astype(np.float32)
  raise ValueError(f"feature_set must be one of {FEATURE_SETS}, got {feature_set!r}")
