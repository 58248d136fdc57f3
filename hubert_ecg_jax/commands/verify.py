"""`hubert-ecg-jax verify DIR`: read every shard and record of a records or units directory."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "verify", help="check a records (or units) directory: every shard read, every record decoded",
      description="Reads every shard of DIR (a `preprocess` or `targets` output), checking each "
      "record's checksums, decodes every record against the schema, and checks counts, record "
      "ids, label counts and the units' shape and range against the manifest, on all cores. "
      "Prints a table of the bad shards and exits 1 if there is any. Run it before a long job.")
  p.add_argument("directory", metavar="DIR",
                 help="records directory (manifest.json) or units directory (units.json)")
  p.add_argument("--workers", type=int, default=None,
                 help="processes reading shards (default: one per CPU core)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.data.verify import format_report, verify_records

  if args.workers is not None and args.workers < 1:
    raise ValueError(f"--workers must be >= 1, found {args.workers}")
  checks, problems = verify_records(args.directory, args.workers, progress=not args.quiet)
  print(format_report(args.directory, checks, problems))
  return 1 if problems or any(check.problem for check in checks) else 0
