"""Synthetic 12-lead ECGs from a cardiac dipole model, with labelled clinical classes.

More in docs/modules.md."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hubert_ecg_jax.data import records as records_lib
from hubert_ecg_jax.data import units as units_lib
from hubert_ecg_jax.data.preprocess import STANDARD_LEADS
from hubert_ecg_jax.files import as_path


@dataclasses.dataclass(frozen=True)
class SyntheticClass:
  """A class the generator can draw: short name, SNOMED CT code (as CinC 2021 uses), description."""
  name: str
  snomed_code: str
  description: str
  heart_rate_bpm: tuple[float, float]  # range the record's mean rate is drawn from


SYNTHETIC_CLASSES: dict[str, SyntheticClass] = {c.name: c for c in (
    SyntheticClass("NSR", "426783006", "normal sinus rhythm", (62.0, 95.0)),
    SyntheticClass("AF", "164889003", "atrial fibrillation", (75.0, 135.0)),
    SyntheticClass("SB", "426177001", "sinus bradycardia", (42.0, 55.0)),
    SyntheticClass("STach", "427084000", "sinus tachycardia", (108.0, 145.0)),
    SyntheticClass("RBBB", "59118001", "right bundle branch block", (62.0, 92.0)),
    SyntheticClass("STE", "164931005", "ST elevation (anterior or inferior injury)", (62.0, 95.0)),
)}


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
  """Artefacts added per electrode (mV). `powerline_hz` None leaves out mains hum."""
  baseline_wander_mv: float = 0.08
  white_noise_mv: float = 0.008
  powerline_hz: float | None = None
  powerline_mv: float = 0.02


def _unit(vector: Sequence[float]) -> np.ndarray:
  vector = np.asarray(vector, dtype=np.float64)
  return vector / np.linalg.norm(vector)


# Electrode directions. Limb electrodes on an equilateral triangle, scaled so lead I = d_x and
# lead II = d . (cos 60, sin 60, 0); chest electrodes in the transverse plane, angles from +x to +z.
_SQRT3 = np.sqrt(3.0)
_LIMB_ELECTRODES = np.array([[-0.5, -0.5 / _SQRT3, 0.0],   # RA
                             [0.5, -0.5 / _SQRT3, 0.0],    # LA
                             [0.0, 1.0 / _SQRT3, 0.0]])    # LL
_CHEST_ANGLES_DEG = np.array([118.0, 96.0, 78.0, 58.0, 32.0, 5.0])  # V1..V6
_CHEST_GAIN = 1.4  # chest electrodes sit closer to the heart than the limbs
_CHEST_ELECTRODES = _CHEST_GAIN * np.stack([
    np.cos(np.radians(_CHEST_ANGLES_DEG)), np.full(6, 0.15), np.sin(np.radians(_CHEST_ANGLES_DEG))], axis=1)
_ELECTRODES = np.concatenate([_LIMB_ELECTRODES, _CHEST_ELECTRODES])  # (9, 3): RA, LA, LL, V1..V6


@dataclasses.dataclass(frozen=True)
class _Wave:
  """One Gaussian pulse per beat: time offset from the R peak (s), widths before/after its peak (s),
  and amplitude x direction (mV)."""
  offset_s: float
  width_before_s: float
  width_after_s: float
  vector: np.ndarray  # (3,)


def _frontal_rotation(angle_deg: float) -> np.ndarray:
  """Rotation about the anterior (z) axis: turns frontal-plane axes clockwise by angle_deg."""
  angle = np.radians(angle_deg)
  return np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1.0]])


def _random_rotation(rng: np.random.Generator, degrees: float) -> np.ndarray:
  """A small random 3-D rotation (patient anatomy), via Rodrigues' formula."""
  axis = _unit(rng.normal(size=3))
  angle = np.radians(rng.normal(0.0, degrees))
  cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _beat_waves(label: str, rng: np.random.Generator, rr_s: float) -> list[_Wave]:
  """The waves of one beat template for a class, drawn once per record (rr_s: mean RR interval)."""
  axis_deg = float(np.clip(rng.normal(50.0, 18.0), -15.0, 95.0))
  orient = _random_rotation(rng, 8.0) @ _frontal_rotation(axis_deg - 50.0)
  qrs_gain = rng.uniform(0.8, 1.25)
  waves = []

  def add(offset, before, after, amplitude, direction):
    waves.append(_Wave(offset, before, after, amplitude * (orient @ _unit(direction))))

  qrs_onset = -0.045
  if label != "AF":
    pr_s = rng.uniform(0.14, 0.18) * (rr_s / 0.8) ** 0.15
    p_peak = qrs_onset - pr_s + 0.05
    p_gain = rng.uniform(0.8, 1.2)
    add(p_peak - 0.012, 0.018, 0.018, 0.10 * p_gain, (0.25, 0.65, 0.4))   # right atrium
    add(p_peak + 0.014, 0.02, 0.02, 0.09 * p_gain, (0.6, 0.45, -0.45))    # left atrium
  add(-0.027, 0.007, 0.007, 0.18 * qrs_gain, (-0.45, 0.15, 0.6))          # septum: q in I, V6; r in V1
  add(-0.009, 0.01, 0.01, 1.2 * qrs_gain, (0.55, 0.65, 0.15))             # apex, anterior-left
  add(0.009, 0.011, 0.011, 1.2 * qrs_gain, (0.75, 0.3, -0.55))            # lateral wall, posterior-left
  terminal = 0.1 if label == "RBBB" else 0.22
  add(0.03, 0.009, 0.009, terminal * qrs_gain, (-0.35, -0.6, -0.3))      # base: terminal S
  qt_s = rng.uniform(0.39, 0.43) * np.sqrt(rr_s)
  t_peak = qt_s + qrs_onset - 0.095
  t_gain = rng.uniform(0.8, 1.2)
  add(t_peak, 0.06 * np.sqrt(rr_s / 0.8), 0.04 * np.sqrt(rr_s / 0.8), 0.33 * t_gain, (0.6, 0.65, 0.15))
  if label == "RBBB":
    # Late right-ventricular activation: wide terminal R' in V1, wide S in I and V6; discordant T in V1-V3.
    add(0.05, 0.02, 0.022, 0.75 * qrs_gain, (-0.55, 0.05, 0.8))
    add(t_peak, 0.06, 0.045, 0.18 * t_gain, (0.35, 0.0, -0.8))
  if label == "STE":
    territory = (0.15, -0.2, 0.95) if rng.random() < 0.5 else (0.05, 0.95, -0.15)  # anterior / inferior
    st_gain = rng.uniform(0.22, 0.4)
    plateau = (t_peak - 0.045) / 2  # from the J point to the T peak
    add(0.045 + plateau, plateau, plateau, st_gain, territory)
    add(t_peak, 0.05, 0.04, 0.6 * st_gain, territory)  # hyperacute T in the same territory
  return waves


def _rr_intervals(label: str, rng: np.random.Generator, mean_rr_s: float, duration_s: float) -> np.ndarray:
  """RR intervals (s) covering the record plus a beat either side."""
  count = int(duration_s / mean_rr_s * 1.6) + 6
  if label == "AF":
    # Irregularly irregular: independent log-normal intervals, coefficient of variation about 0.2-0.3.
    sigma = rng.uniform(0.2, 0.3)
    rr = mean_rr_s * rng.lognormal(-sigma ** 2 / 2, sigma, count)
    return np.maximum(rr, 0.28)
  beat_times = np.arange(count) * mean_rr_s
  respiration_hz, mayer_hz = rng.uniform(0.2, 0.33), rng.uniform(0.08, 0.12)
  rsa = rng.uniform(0.01, 0.04) * min(1.0, 75.0 / (60.0 / mean_rr_s))  # weaker at high rates
  mayer = rng.uniform(0.005, 0.015)
  rr = mean_rr_s * (1 + rsa * np.sin(2 * np.pi * respiration_hz * beat_times + rng.uniform(0, 2 * np.pi))
                    + mayer * np.sin(2 * np.pi * mayer_hz * beat_times + rng.uniform(0, 2 * np.pi))
                    + rng.normal(0, 0.006, count))
  return rr


def _dipole(waves: list[_Wave], r_times: np.ndarray, beat_gains: np.ndarray, time: np.ndarray) -> np.ndarray:
  """Sum of every wave of every beat -> (3, samples)."""
  dipole = np.zeros((3, time.size))
  fs = 1.0 / (time[1] - time[0])
  for r_time, gain in zip(r_times, beat_gains):
    start = max(int(np.floor((r_time - 0.5) * fs)), 0)
    stop = min(int(np.ceil((r_time + 0.75) * fs)), time.size)
    if start >= stop:
      continue
    local = time[start:stop] - r_time
    for wave in waves:
      width = np.where(local < wave.offset_s, wave.width_before_s, wave.width_after_s)
      dipole[:, start:stop] += gain * np.outer(wave.vector, np.exp(-0.5 * ((local - wave.offset_s) / width) ** 2))
  return dipole


def _fibrillatory_waves(rng: np.random.Generator, time: np.ndarray) -> np.ndarray:
  """Atrial fibrillation's f-waves: 4-9 Hz, drifting frequency and amplitude -> (3, samples)."""
  dipole = np.zeros((3, time.size))
  for _ in range(3):
    base_hz = rng.uniform(4.5, 8.5)
    drift = 0.8 * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * time + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(base_hz + drift) * (time[1] - time[0]) + rng.uniform(0, 2 * np.pi)
    envelope = 1 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * time + rng.uniform(0, 2 * np.pi))
    direction = _unit(np.array([-0.2, 0.6, 0.7]) + rng.normal(0, 0.3, 3))
    dipole += rng.uniform(0.03, 0.06) * np.outer(direction, envelope * np.sin(phase))
  return dipole


def _electrode_noise(rng: np.random.Generator, time: np.ndarray, noise: NoiseConfig) -> np.ndarray:
  """Baseline wander (respiration and motion), white noise and optional mains hum -> (9, samples)."""
  num_electrodes = _ELECTRODES.shape[0]
  respiration = np.sin(2 * np.pi * rng.uniform(0.15, 0.35) * time + rng.uniform(0, 2 * np.pi))
  artefacts = np.outer(rng.uniform(0, noise.baseline_wander_mv, num_electrodes), respiration)
  for _ in range(2):
    frequencies = rng.uniform(0.03, 0.6, num_electrodes)[:, None]
    phases = rng.uniform(0, 2 * np.pi, num_electrodes)[:, None]
    artefacts += rng.uniform(0, noise.baseline_wander_mv, num_electrodes)[:, None] * np.sin(
        2 * np.pi * frequencies * time + phases)
  artefacts += rng.normal(0, noise.white_noise_mv, (num_electrodes, time.size))
  if noise.powerline_hz is not None:
    hum = np.sin(2 * np.pi * noise.powerline_hz * time + rng.uniform(0, 2 * np.pi))
    artefacts += np.outer(rng.uniform(0.3, 1.0, num_electrodes) * noise.powerline_mv, hum)
  return artefacts


def leads_from_electrodes(electrodes: np.ndarray) -> np.ndarray:
  """Electrode potentials (9, n) in order RA, LA, LL, V1..V6 -> the 12 standard leads (12, n)."""
  right_arm, left_arm, left_leg = electrodes[0], electrodes[1], electrodes[2]
  wilson = (right_arm + left_arm + left_leg) / 3
  limb = [left_arm - right_arm, left_leg - right_arm, left_leg - left_arm,
          right_arm - (left_arm + left_leg) / 2, left_arm - (right_arm + left_leg) / 2,
          left_leg - (right_arm + left_arm) / 2]
  return np.stack(limb + [chest - wilson for chest in electrodes[3:]])


def generate_ecg(label: str, rng: np.random.Generator, fs: float = 500, duration_s: float = 10.0,
                 noise: NoiseConfig | None = NoiseConfig()) -> np.ndarray:
  """One synthetic ECG of class `label` (a key of SYNTHETIC_CLASSES) -> float32 (12, int(fs*duration_s)) mV."""
  if label not in SYNTHETIC_CLASSES:
    raise ValueError(f"unknown synthetic class {label!r}; expected one of {list(SYNTHETIC_CLASSES)}")
  if fs < 100 or duration_s <= 0:
    raise ValueError(f"need fs >= 100 Hz and a positive duration, got fs={fs}, duration_s={duration_s}")
  num_samples = int(round(fs * duration_s))
  time = np.arange(num_samples) / fs
  low_bpm, high_bpm = SYNTHETIC_CLASSES[label].heart_rate_bpm
  mean_rr_s = 60.0 / rng.uniform(low_bpm, high_bpm)
  waves = _beat_waves(label, rng, mean_rr_s)
  rr = _rr_intervals(label, rng, mean_rr_s, duration_s)
  r_times = np.cumsum(rr) - rng.uniform(0.6, 1.6) * rr[0]
  respiration_hz = rng.uniform(0.2, 0.33)
  beat_gains = (1 + 0.05 * np.sin(2 * np.pi * respiration_hz * r_times) + rng.normal(0, 0.015, r_times.size))
  dipole = _dipole(waves, r_times, beat_gains, time)
  if label == "AF":
    dipole += _fibrillatory_waves(rng, time)
  electrodes = _ELECTRODES @ dipole  # (9, samples)
  if noise is not None:
    electrodes = electrodes + _electrode_noise(rng, time, noise)
  return leads_from_electrodes(electrodes).astype(np.float32)


def generate_dataset(n: int, seed: int, fs: float = 500, duration_s: float = 10.0,
                     classes: Sequence[str] | None = None,
                     noise: NoiseConfig | None = NoiseConfig()) -> tuple[np.ndarray, list[str]]:
  """n ECGs -> (signals float32 (n, 12, samples), labels). Classes take turns (balanced); record i uses
  the generator seeded with (seed, i), so a longer dataset starts with the shorter one."""
  classes = list(SYNTHETIC_CLASSES) if classes is None else list(classes)
  unknown = [name for name in classes if name not in SYNTHETIC_CLASSES]
  if unknown or not classes:
    raise ValueError(f"classes {unknown or classes} unknown; expected names from {list(SYNTHETIC_CLASSES)}")
  if n < 0:
    raise ValueError(f"n must be non-negative, got {n}")
  labels = [classes[i % len(classes)] for i in range(n)]
  signals = [generate_ecg(label, np.random.default_rng([seed, i]), fs, duration_s, noise)
             for i, label in enumerate(labels)]
  shape = (0, len(STANDARD_LEADS), int(round(fs * duration_s)))
  return (np.stack(signals) if signals else np.zeros(shape, np.float32)), labels


def write_wfdb_folder(folder: str | os.PathLike, n: int, seed: int, fs: float = 500, duration_s: float = 10.0,
                      classes: Sequence[str] | None = None,
                      noise: NoiseConfig | None = NoiseConfig()) -> list[Path]:
  """Writes n WFDB records (format 16, 1 uV resolution, `# Age/Sex/Dx` CinC header lines with the
  class's SNOMED code) named SYN00000... into `folder`; returns their `.hea` paths."""
  import wfdb

  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  signals, labels = generate_dataset(n, seed, fs, duration_s, classes, noise)
  demographics = np.random.default_rng([seed, n, 7])
  paths = []
  for index, (signal, label) in enumerate(zip(signals, labels)):
    name = f"SYN{index:05d}"
    comments = [f"Age: {int(demographics.integers(25, 90))}",
                f"Sex: {'Male' if demographics.random() < 0.5 else 'Female'}",
                f"Dx: {SYNTHETIC_CLASSES[label].snomed_code}"]
    wfdb.wrsamp(name, fs=fs, units=["mV"] * 12, sig_name=list(STANDARD_LEADS),
                p_signal=signal.T.astype(np.float64), fmt=["16"] * 12, adc_gain=[1000.0] * 12,
                baseline=[0] * 12, comments=comments, write_dir=str(folder))
    paths.append(folder / f"{name}.hea")
  return paths


def write_units(records_dir: str | os.PathLike, units_dir: str | os.PathLike,
                units_of: Callable[[str], np.ndarray], vocab_sizes: Sequence[int]) -> None:
  """A units directory for `records_dir` in which record `i` has the units `units_of(i)`
  (codebooks, 93): pre-training targets made without features and k-means (tests, benchmarks)."""
  manifest = records_lib.read_manifest(records_dir)
  for path, shard in zip(records_lib.shard_paths(records_dir, manifest), manifest.shards):
    ids = [records_lib.decode_example(s).record_id for s in records_lib.iterate_shard(path)]
    units_lib.write_units_shard(as_path(units_dir) / units_lib.units_file_name(shard.file),
                                ((record_id, units_of(record_id)) for record_id in ids))
  units_lib.write_units_manifest(units_dir, units_lib.UnitsManifest(
      manifest.shards, list(vocab_sizes), 93, {"kind": "synthetic"}))
