"""`hubert-ecg-jax bench {forward,train,device,offline}`: speed against the PyTorch original, in one
run, or of the offline data stages.

`bench device` is the accelerator check (`hubert_ecg_jax/device_check.py`): parity, throughput
sweeps with MFU, the PyTorch peer, a pre-training run with a checkpoint round trip, k-means.
`bench offline` times the offline data stages on synthetic records (`devtools/bench_offline.py`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import tempfile

DEFAULT_REPEATS = 5  # forward and train; offline runs once unless asked


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "bench", help="benchmark the forward pass or the train step against PyTorch, check an "
      "accelerator, or time the offline data stages",
      description="Times our JAX model (float32, and bf16 compute with float32 accumulation) and "
      "transformers' PyTorch HubertModel with the same weights, interleaved in one run (warm-up "
      "excluded, median of --repeats runs), or the offline data stages on synthetic records. "
      "Prints a table, or JSON with --json.")
  p.add_argument("what", choices=("forward", "train", "device", "offline"),
                 help="what to time: forward, train, device (the whole accelerator check: "
                 "parity, batch sweeps with MFU, the PyTorch peer, a short pre-training run with a "
                 "checkpoint round trip, k-means; --size and --batch do not apply), or offline "
                 "(the offline data stages on synthetic records, against reading and preparing "
                 "them alone)")
  p.add_argument("--size", default="base", choices=("tiny", "small", "base", "large"))
  p.add_argument("--batch", type=int, default=8, help="ECGs per batch (default 8)")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed runs per implementation (default 5; offline: 1, the best run is kept)")
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
  p.add_argument("--records", type=int, default=2000,
                 help="offline: synthetic 10-s 500 Hz WFDB records to process (default 2000)")
  p.add_argument("--workers", type=int, default=None,
                 help="offline: worker processes (default: all CPU cores)")
  p.add_argument("--model-records", type=int, default=64,
                 help="offline: records of the units pass over a model layer (model: --size, "
                 "randomly initialised; default 64)")
  p.add_argument("--work-dir", help="offline: folder for the records and outputs, kept (default: a "
                 "temporary folder, removed after); its synthetic records are reused by a rerun")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  if args.what == "offline":
    return _run_offline(args)
  from hubert_ecg_jax.devtools.bench_forward import format_table, run_forward_benchmark

  if args.what == "device":
    import dataclasses

    from hubert_ecg_jax.devtools import device_check

    settings = device_check.CheckSettings.quick() if args.quick else device_check.CheckSettings()
    settings = dataclasses.replace(settings, with_torch=not args.no_torch,
                                   time_limit_s=args.time_limit,
                                   sweep=tuple(args.sweep) if args.sweep else settings.sweep)
    return device_check.main(settings, args.out)
  repeats = DEFAULT_REPEATS if args.repeats is None else args.repeats
  if args.batch < 1 or repeats < 1:
    raise ValueError(f"--batch and --repeats must be positive, found {args.batch} and {repeats}")
  if args.what == "forward":
    result = run_forward_benchmark(args.size, args.batch, repeats, with_torch=not args.no_torch)
  else:
    from hubert_ecg_jax.devtools.bench_train import run_train_benchmark
    result = run_train_benchmark(args.size, args.batch, repeats=repeats,
                                 with_torch=not args.no_torch)
  print(json.dumps(result, indent=2) if args.json else format_table(result, f"bench {args.what}"))
  return 0


def _run_offline(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.devtools import bench_offline

  repeats = 1 if args.repeats is None else args.repeats
  if args.workers is not None and args.workers < 1:
    raise ValueError(f"--workers must be positive, found {args.workers}")
  folder = (contextlib.nullcontext(args.work_dir) if args.work_dir
            else tempfile.TemporaryDirectory(prefix="bench-offline-"))
  with folder as work_dir:
    results, machine = bench_offline.run_offline_benchmark(
        pathlib.Path(work_dir), args.records, args.workers, repeats, args.size, args.model_records)
  if args.json:
    print(json.dumps({**machine, "stages": [result.to_dict() for result in results]}, indent=2))
  else:
    print(bench_offline.format_stage_table(results, bench_offline.offline_title(machine)))
  return 0
