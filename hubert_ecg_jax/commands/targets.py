"""`hubert-ecg-jax targets RECORDS UNITS --kmeans MODEL.npz`: the k-means units of every record."""
from __future__ import annotations

import argparse
import os

from hubert_ecg_jax.commands import add_compute_dtype_argument, add_feature_source_arguments


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "targets", help="write the k-means units of every record (the pre-training targets)",
      description="One streaming pass over RECORDS: the features of each record's first 5 s "
      "(the same --feature-set, or --model and --layer, as the sample `cluster` fitted on) are "
      "assigned to the nearest centre of each --kmeans model (one codebook each) and only the "
      "units are written: UNITS/units-*.tfrecord, one small file per records shard (about 200 "
      "bytes per record and codebook), and UNITS/units.json. The records are not copied; "
      "`pretrain` reads them with their units (--config.data.train_units=UNITS). Resumable: "
      "finished shards are skipped. Multi-host: run it on every host with --process-index and "
      "--process-count; each host writes its own shards.")
  p.add_argument("records", help="records directory written by `preprocess`")
  p.add_argument("units", help="output units directory (new, or a stopped run of this command)")
  p.add_argument("--kmeans", nargs="+", required=True, metavar="MODEL.npz",
                 help="k-means model(s) written by `cluster`; several give several codebooks")
  add_feature_source_arguments(p)
  p.add_argument("--batch-size", type=int, default=32, help="records per batch (default 32)")
  p.add_argument("--workers", type=int, default=None,
                 help="--feature-set: worker processes, one shard each at a time (default: all CPU "
                 "cores); --model runs in this process on every local device")
  add_compute_dtype_argument(p)
  p.add_argument("--process-index", type=int, default=0, help="multi-host: this host's index")
  p.add_argument("--process-count", type=int, default=1, help="multi-host: number of hosts")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.commands import feature_source
  from hubert_ecg_jax.targets.stream import write_units

  if args.model and args.workers not in (None, 1):
    raise ValueError("--workers goes with --feature-set: a model's features run in this process, "
                     "on every local device")
  features, description = feature_source(args)
  workers = 1 if args.model else args.workers or os.cpu_count() or 1
  manifest = write_units(args.records, args.units, features, description, args.kmeans,
                         batch_size=args.batch_size, workers=workers,
                         process_index=args.process_index,
                         process_count=args.process_count, show_progress=not args.quiet)
  whose = ("" if args.process_count == 1
           else f" (this host's shards: {args.process_index} of every {args.process_count})")
  print(f"units of {manifest.num_records} records, {manifest.codebooks} codebook(s) x "
        f"{manifest.frames} frames, K = {manifest.vocab_sizes}{whose} -> {args.units}")
  return 0
