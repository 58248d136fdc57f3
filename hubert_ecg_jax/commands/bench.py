"""`hubert-ecg-jax bench {forward,train,device}`: speed against the PyTorch original, in one run.

`bench device` is the accelerator check (`hubert_ecg_jax/device_check.py`): parity, throughput
sweeps with MFU, the PyTorch peer, a pre-training run with a checkpoint round trip, k-means.
"""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "bench", help="benchmark the forward pass or the train step against PyTorch, or check an accelerator",
      description="Times our JAX model (float32, and bf16 compute with float32 accumulation) and "
      "transformers' PyTorch HubertModel with the same weights, interleaved in one run (warm-up "
      "excluded, median of --repeats runs). Prints a table, or JSON with --json.")
  p.add_argument("what", choices=("forward", "train", "device"),
                 help="what to time: forward, train, or device (the whole accelerator check: "
                 "parity, batch sweeps with MFU, the PyTorch peer, a short pre-training run with a "
                 "checkpoint round trip, k-means; --size and --batch do not apply)")
  p.add_argument("--size", default="base", choices=("tiny", "small", "base", "large"))
  p.add_argument("--batch", type=int, default=8, help="ECGs per batch (default 8)")
  p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (default 5)")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side (e.g. on a GPU host "
                 "without torch)")
  p.add_argument("--json", action="store_true", help="print the result as JSON")
  p.add_argument("--quick", action="store_true", help="device: tiny sizes, for a CPU (a minute or two)")
  p.add_argument("--sweep", action="append", metavar="'SIZE DTYPE MODE BATCHES'",
                 help="device: a sweep line such as 'base bf16 train 64,128,256' (repeatable; "
                 "replaces the default sweep)")
  p.add_argument("--time-limit", type=float, default=420.0,
                 help="device: seconds after which the remaining sweep lines are skipped (default 420)")
  p.add_argument("--out", default="device_check.json", help="device: where to write the JSON record")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.devtools.bench_forward import format_table, run_forward_benchmark

  if args.what == "device":
    import dataclasses

    from hubert_ecg_jax.devtools import device_check

    settings = device_check.CheckSettings.quick() if args.quick else device_check.CheckSettings()
    settings = dataclasses.replace(settings, with_torch=not args.no_torch,
                                   time_limit_s=args.time_limit,
                                   sweep=tuple(args.sweep) if args.sweep else settings.sweep)
    return device_check.main(settings, args.out)
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
