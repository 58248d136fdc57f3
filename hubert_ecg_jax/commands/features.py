"""`hubert-ecg-jax features RECORDS OUT`: frame features of every record, for k-means targets."""
from __future__ import annotations

import argparse

from hubert_ecg_jax.commands import add_compute_dtype_argument


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "features", help="dump per-frame features of every record (iteration 1: hand-made; "
      "iteration n: a model's hidden states)",
      description="Reads a records directory written by `preprocess` and writes, for each shard, "
      "OUT/<shard>.npy (records, 93, dim) float32 and OUT/<shard>.ids.json, computed on the first "
      "5 s of each record (where pre-training targets live). Iteration 1: --feature-set "
      "stats|mfcc|mixed (frames aligned with the encoder's receptive fields). Iteration 2 and "
      "later: --model DIR --layer K, the hidden states of layer K of the previous iteration's "
      "model. Resumable: finished shards are skipped. Then run `cluster --features OUT`.")
  p.add_argument("records", help="records directory (manifest.json + shards)")
  p.add_argument("out", help="output features directory")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--feature-set", choices=("stats", "mfcc", "mixed"),
                      help="iteration-1 hand-made features")
  source.add_argument("--model", help="model (our model dir, HF dir or .pt) whose hidden states "
                      "are the features (iteration 2+)")
  p.add_argument("--layer", type=int, default=None,
                 help="with --model: hidden-state index, 0 = encoder input .. L = last layer "
                 "(default: the middle layer)")
  p.add_argument("--batch-size", type=int, default=32, help="records per batch (default 32)")
  add_compute_dtype_argument(p)
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.targets import dump

  if args.batch_size < 1:
    raise ValueError(f"--batch-size must be positive, found {args.batch_size}")
  if args.feature_set:
    if args.layer is not None or args.compute_dtype is not None:
      raise ValueError("--layer and --compute-dtype go with --model, not with --feature-set")
    features, description = dump.handmade_features(args.feature_set)
  else:
    layer = args.layer
    if layer is None:
      from hubert_ecg_jax.pretrained import load_pretrained
      layer = load_pretrained(args.model)[0].num_hidden_layers // 2
    features, description = dump.hidden_state_features(args.model, layer, args.compute_dtype)
  summary = dump.dump_features(args.records, args.out, features, description, args.batch_size)
  print(f"features of {summary['num_records']} records ({summary['dim']} per frame, "
        f"{description}) -> {args.out}")
  return 0
