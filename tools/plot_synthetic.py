"""Plots synthetic ECGs of every class as 12-lead sheets (PNG), to look at them before trusting them.

Usage: python tools/plot_synthetic.py --out /tmp/synthetic --seed 0 [--clean] [--seconds 10] [--classes AF,RBBB]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from hubert_ecg_jax.data.preprocess import STANDARD_LEADS
from hubert_ecg_jax.data.synthetic import SYNTHETIC_CLASSES, NoiseConfig, generate_ecg


def plot_sheet(signal: np.ndarray, fs: float, title: str, path: Path) -> None:
  """A (12, n) mV signal as 12 stacked strips on ECG paper (1 mV = 10 mm, 25 mm/s look)."""
  time = np.arange(signal.shape[1]) / fs
  figure, axes = plt.subplots(12, 1, figsize=(16, 26), sharex=True)
  for lead, axis in enumerate(axes):
    axis.plot(time, signal[lead], color="black", linewidth=0.8)
    axis.set_ylim(-1.5, 2.0)
    axis.set_yticks(np.arange(-1.5, 2.01, 0.5))
    axis.set_xticks(np.arange(0, time[-1] + 1e-9, 0.2))
    axis.grid(True, color="#f4a6a6", linewidth=0.5)
    axis.tick_params(labelleft=False, labelbottom=lead == 11)
    axis.set_ylabel(STANDARD_LEADS[lead], rotation=0, labelpad=18)
  axes[0].set_title(title)
  figure.tight_layout()
  figure.savefig(path, dpi=60)
  plt.close(figure)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", type=Path, default=Path("/tmp/synthetic"), help="folder for the PNG files")
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  parser.add_argument("--seconds", type=float, default=10.0, help="duration of each ECG")
  parser.add_argument("--clean", action="store_true", help="no noise or baseline wander")
  parser.add_argument("--powerline-hz", type=float, default=None, help="add mains hum at this frequency")
  parser.add_argument("--classes", default=",".join(SYNTHETIC_CLASSES),
                      help="comma-separated classes to plot (default: all)")
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  noise = None if args.clean else NoiseConfig(powerline_hz=args.powerline_hz)
  names = [name.strip() for name in args.classes.split(",") if name.strip()]
  for name in names:
    if name not in SYNTHETIC_CLASSES:
      parser.error(f"unknown class {name!r}; expected some of {list(SYNTHETIC_CLASSES)}")
  for index, name in enumerate(SYNTHETIC_CLASSES):
    if name not in names:
      continue
    signal = generate_ecg(name, np.random.default_rng([args.seed, index]), 500, args.seconds, noise)
    path = args.out / f"{name}.png"
    plot_sheet(signal, 500, f"{name}: {SYNTHETIC_CLASSES[name].description}", path)
    print(path)


if __name__ == "__main__":
  main()
