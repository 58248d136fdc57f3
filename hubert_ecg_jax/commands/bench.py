"""`hubert-ecg-jax bench {forward,train}`: speed against the PyTorch original, measured in one run."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "bench", help="benchmark the forward pass or the train step against PyTorch",
      description="Times our JAX model (float32, and bf16 compute with float32 accumulation) and "
      "transformers' PyTorch HubertModel with the same weights, interleaved in one run (warm-up "
      "excluded, median of --repeats runs). Prints a table, or JSON with --json.")
  p.add_argument("what", choices=("forward", "train"), help="what to time")
  p.add_argument("--size", default="base", choices=("tiny", "small", "base", "large"))
  p.add_argument("--batch", type=int, default=8, help="ECGs per batch (default 8)")
  p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (default 5)")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side (e.g. on a GPU host "
                 "without torch)")
  p.add_argument("--json", action="store_true", help="print the result as JSON")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.devtools.bench_forward import format_table, run_forward_benchmark

  if args.batch < 1 or args.repeats < 1:
    raise ValueError(f"--batch and --repeats must be positive, found {args.batch} and {args.repeats}")
  if args.what == "forward":
    result = run_forward_benchmark(args.size, args.batch, args.repeats, with_torch=not args.no_torch)
  else:
    from hubert_ecg_jax.devtools.bench_train import run_train_benchmark
    result = run_train_benchmark(args.size, args.batch, repeats=args.repeats,
                                 with_torch=not args.no_torch)
  print(json.dumps(result, indent=2) if args.json else format_table(result, f"bench {args.what}"))
  return 0
