"""Label-efficiency curve from fine-tuning / linear-probe runs on fractions of the training labels.

  python tools/plot_label_efficiency.py runs/ptbxl_super_* --out label_efficiency.png

Each RUN is a `finetune` workdir: its fraction and mode come from best_model/metadata.json
(training_config.data.train_fraction, mode), its score from test_evaluation/metrics.json (macro
AUROC by default, `--metric auprc` or `--metric challenge` for the CinC 2021 score). One line per
mode; runs of the same mode and fraction (other fraction seeds) are averaged. The table of points
is printed.
"""
from __future__ import annotations

import argparse
import json
import pathlib
from collections import defaultdict

import numpy as np

from hubert_ecg_jax.plots import plot_label_efficiency

METRICS = ("auroc", "auprc", "challenge")


def run_point(workdir: pathlib.Path, metric: str) -> tuple[str, float, float]:
  """(mode, train fraction, test score) of one run."""
  metadata = json.loads((workdir / "best_model" / "metadata.json").read_text())
  summary = json.loads((workdir / "test_evaluation" / "metrics.json").read_text())
  if metric == "challenge":
    if "challenge" not in summary:
      raise ValueError(f"{workdir}: no challenge score (its labels are not CinC 2021 codes)")
    score = summary["challenge"]["score"]
  else:
    score = summary["evaluation"]["metrics"]["macro"][metric]
  fraction = metadata["training_config"]["data"].get("train_fraction", 1.0)
  return metadata["mode"], float(fraction), float("nan") if score is None else float(score)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs", nargs="+", type=pathlib.Path, help="finetune workdirs")
  parser.add_argument("--metric", choices=METRICS, default="auroc", help="test score (default auroc)")
  parser.add_argument("--out", default="label_efficiency.png", help="PNG to write")
  args = parser.parse_args()
  scores: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
  for workdir in args.runs:
    mode, fraction, score = run_point(workdir, args.metric)
    scores[mode][fraction].append(score)
  fractions = sorted({fraction for by_fraction in scores.values() for fraction in by_fraction})
  modes = sorted(scores)
  table = np.array([[np.mean(scores[mode][f]) if scores[mode][f] else np.nan for f in fractions]
                    for mode in modes])  # (modes, fractions)
  label = {"auroc": "macro AUROC", "auprc": "macro AUPRC", "challenge": "CinC 2021 challenge score"}
  plot_label_efficiency(fractions, table, args.out, modes, metric=label[args.metric])
  print("mode          " + "  ".join(f"{100 * f:>7g}%" for f in fractions))
  for mode, row in zip(modes, table):
    print(f"{mode:<13} " + "  ".join(f"{value:>8.3f}" for value in row))
  print(f"-> {args.out}")


if __name__ == "__main__":
  main()
