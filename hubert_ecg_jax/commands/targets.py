"""`hubert-ecg-jax targets RECORDS FEATURES OUT --kmeans MODEL.npz`: units into the records."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "targets", help="write k-means units into the records as pre-training targets",
      description="Assigns each frame of each record to its nearest k-means centre (the same "
      "normalisation as at fit) and copies RECORDS to OUT with those units as the records' "
      "targets, one codebook per --kmeans model. OUT is what `pretrain` reads.")
  p.add_argument("records", help="records directory written by `preprocess`")
  p.add_argument("features", help="features directory written by `features` for those records")
  p.add_argument("out", help="output records directory (must be empty)")
  p.add_argument("--kmeans", nargs="+", required=True, metavar="MODEL.npz",
                 help="k-means model(s) written by `cluster`; several give several codebooks")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.targets.dump import write_targets

  manifest = write_targets(args.records, args.features, args.kmeans, args.out)
  print(f"{manifest.num_records} records with targets {manifest.target_codebooks} x "
        f"{manifest.target_frames} (vocab sizes {manifest.targets_info['vocab_sizes']}) -> {args.out}")
  return 0
