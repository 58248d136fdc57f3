"""`hubert-ecg-jax features RECORDS OUT`: a reproducible sample of frame features, for `cluster`."""
from __future__ import annotations

import argparse

from hubert_ecg_jax.commands import add_compute_dtype_argument, add_feature_source_arguments


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "features", help="sample per-frame features of the records for the k-means fit (iteration 1: "
      "hand-made; iteration n: a model's hidden states)",
      description="Draws whole records at random (--seed) from a records directory written by "
      "`preprocess`, computes the features of the 93 frames of their first 5 s (where pre-training "
      "targets live) and keeps --frames of those frames: OUT/sample.npy (frames, dim) float32 and "
      "OUT/features.json. Only the drawn records are read past their shard's index. Iteration 1: "
      "--feature-set stats|mfcc|mixed (frames aligned with the encoder's receptive fields). "
      "Iteration 2 and later: --model DIR --layer K, the hidden states of layer K of the previous "
      "iteration's model, on every local device. Then `cluster --features OUT`, and `targets` with "
      "the same feature options for the units of every record.")
  p.add_argument("records", help="records directory (manifest.json + shards)")
  p.add_argument("out", help="output folder (must be empty or absent; see --overwrite)")
  add_feature_source_arguments(p)
  p.add_argument("--frames", type=int, default=500_000,
                 help="frames in the sample (default 500000, about 5400 records; all the records' "
                 "frames when they are fewer)")
  p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
  p.add_argument("--batch-size", type=int, default=32, help="records per batch (default 32)")
  add_compute_dtype_argument(p)
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.commands import feature_source
  from hubert_ecg_jax.targets.stream import sample_features

  features, description = feature_source(args)
  summary = sample_features(args.records, args.out, features, description, frames=args.frames,
                            seed=args.seed, batch_size=args.batch_size, overwrite=args.overwrite,
                            show_progress=not args.quiet)
  print(f"{summary['frames']} frames of {summary['records_drawn']} records ({summary['dim']} values "
        f"per frame, {description}) -> {args.out}/sample.npy")
  return 0
