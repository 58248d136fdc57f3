"""Benchmark: input-pipeline throughput in ECG/s per CPU core (target >= 1500, DESIGN.md).

Writes `--records` synthetic 10-s records (the package's dipole-model generator, prepared offline as
`preprocess` does, replicated from `--unique` distinct ECGs) with pre-training targets as TFRecord
shards in a temporary folder, then measures, for each core count in `--cores`, in a fresh process
pinned to that many cores (tf.data threads = cores):

- "pretrain": the full training pipeline: read, parse, first 5 s, shuffle, batch, targets, online stage
  (NaN fill, flatten, decimate, attention mask) and span masks, run inside tf.data;
- "finetune": the same with a random aligned 5-s crop and no targets or masks;
- "windows only": read, parse, crop, shuffle, batch, without the online stage;
- "online stage on host": the windows pipeline, then the online stage (with masks) in the consuming
  thread (the alternative to running it inside tf.data);
- "online stage alone": `online.fast_model_inputs` and the scipy reference `preprocess.model_inputs`
  on one batch, one thread.

ECG/s per core is ECGs per CPU-second of the measuring process (all its threads): it does not depend on
what else runs on the machine, unlike the wall-clock ECG/s, which is also shown.

  python tools/bench_pipeline.py                       # 1 core and all cores
  python tools/bench_pipeline.py --cores 1 --json
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np


def write_synthetic_records(directory: str, records: int, unique: int, shards: int, seed: int) -> None:
  from hubert_ecg_jax.data import records as records_lib
  from hubert_ecg_jax.data.preprocess import prepare_record
  from hubert_ecg_jax.data.synthetic import generate_dataset, write_units

  signals, labels = generate_dataset(unique, seed)
  classes = sorted(set(labels))
  prepared = [prepare_record(signal, 500) for signal in signals]
  rng = np.random.default_rng(seed)
  stored = [records_lib.StoredRecord(
      record_id=f"SYN{i:06d}", source="synthetic", signal=prepared[i % unique],
      labels=np.eye(len(classes), dtype=np.float32)[classes.index(labels[i % unique])],
      source_fs=500.0) for i in range(records)]
  records_lib.write_records(directory, stored, classes, num_shards=shards)
  write_units(directory, units_directory(directory),
              lambda record_id: rng.integers(0, 500, (1, 93)).astype(np.int32), [500])


def units_directory(records_dir: str) -> str:
  return records_dir.rstrip("/") + ".units"


class _Clock:
  """Wall time and this process's CPU time (all threads) over a block of work."""

  def __enter__(self) -> _Clock:
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc) -> None:
    self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _timed(iterator, batches: int, warmup: int, consume=lambda batch: batch) -> _Clock:
  for _ in range(warmup):
    consume(next(iterator))
  with _Clock() as clock:
    for _ in range(batches):
      consume(next(iterator))
  return clock


def measure(directory: str, cores: int, batch_size: int, batches: int, warmup: int) -> list[dict]:
  """Runs in a process pinned to `cores` cores (set before TensorFlow starts its thread pools)."""
  from hubert_ecg_jax.data import pipeline as P
  from hubert_ecg_jax.data.online import fast_model_inputs
  from hubert_ecg_jax.data.preprocess import model_inputs

  base = dict(batch_size=batch_size, seed=0, threads=cores, parallel_batches=cores,
              process_index=0, process_count=1)
  pretrain = P.PipelineConfig(**base, train_crop="first")
  units = units_directory(directory)
  finetune = P.PipelineConfig(**base)
  rows = []

  def row(path: str, clock: _Clock, ecgs: int, used_cores: int) -> None:
    rows.append({"path": path, "cores": used_cores, "ecg_per_s": ecgs / clock.wall,
                 "ecg_per_cpu_s": ecgs / clock.cpu, "cpu_utilisation": clock.cpu / clock.wall})
    print(f"  {path:30s} {used_cores} core(s): {ecgs / clock.wall:8.0f} ECG/s, "
          f"{ecgs / clock.cpu:8.0f} ECG per CPU-second", file=sys.stderr, flush=True)

  ecgs = batches * batch_size
  row("pretrain (full pipeline)",
      _timed(P.make_train_iterator(directory, pretrain, units), batches, warmup), ecgs, cores)
  row("finetune (full pipeline)",
      _timed(P.make_train_iterator(directory, finetune), batches, warmup), ecgs, cores)
  windows = iter(P.train_windows_dataset(directory, pretrain, units).prefetch(2).as_numpy_iterator())
  row("windows only (no online)", _timed(windows, batches, warmup), ecgs, cores)
  step = iter(range(1 << 62))
  row("online stage on host", _timed(windows, batches, warmup,
                                     lambda b: P.online_stage(b["windows"], next(step), pretrain, True)),
      ecgs, cores)
  batch = next(windows)["windows"]
  repeats = max(batches // 4, 3)
  for name, function in (("online stage alone (fast)", fast_model_inputs),
                         ("online stage alone (scipy)", model_inputs)):
    function(batch)
    wall, cpu = time.perf_counter(), time.thread_time()  # this thread only: tf.data may still run
    for _ in range(repeats):
      function(batch)
    clock = _Clock()
    clock.wall, clock.cpu = time.perf_counter() - wall, time.thread_time() - cpu
    row(name, clock, repeats * batch_size, 1)
  return rows


def _processor_name() -> str:
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  if cpuinfo.is_file():
    for line in cpuinfo.read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform.processor() or platform.machine()


def _child_command(args: argparse.Namespace, directory: str, cores: int) -> list[str]:
  return [sys.executable, os.path.abspath(__file__), "--data", directory, "--child-cores", str(cores),
          "--batch-size", str(args.batch_size), "--batches", str(args.batches),
          "--warmup", str(args.warmup)]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--records", type=int, default=1024, help="records written (default 1024)")
  parser.add_argument("--unique", type=int, default=64, help="distinct synthetic ECGs among them")
  parser.add_argument("--shards", type=int, default=8, help="shard files")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--batches", type=int, default=40, help="batches timed per row")
  parser.add_argument("--warmup", type=int, default=5, help="batches before timing")
  parser.add_argument("--cores", default=None,
                      help="comma-separated core counts (default: 1 and all cores available)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
  parser.add_argument("--data", help=argparse.SUPPRESS)
  parser.add_argument("--child-cores", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  available = sorted(os.sched_getaffinity(0))
  if args.child_cores:
    os.sched_setaffinity(0, available[:args.child_cores])
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    print(json.dumps(measure(args.data, args.child_cores, args.batch_size, args.batches, args.warmup)))
    return 0
  core_counts = ([int(c) for c in args.cores.split(",")] if args.cores
                 else sorted({1, len(available)}))
  if max(core_counts) > len(available) or min(core_counts) < 1:
    parser.error(f"--cores must be between 1 and {len(available)}, found {core_counts}")
  rows = []
  with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as temporary:
    directory = os.path.join(temporary, "records")
    print(f"writing {args.records} synthetic records ...", file=sys.stderr, flush=True)
    write_synthetic_records(directory, args.records, args.unique, args.shards, args.seed)
    for cores in core_counts:
      print(f"measuring on {cores} core(s) ...", file=sys.stderr, flush=True)
      env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
      result = subprocess.run(_child_command(args, directory, cores), env=env, check=True,
                              stdout=subprocess.PIPE, text=True)
      rows += json.loads(result.stdout.strip().splitlines()[-1])
  machine = {"processor": _processor_name(), "cores_available": len(available),
             "batch_size": args.batch_size, "records": args.records, "target_per_core": 1500}
  if args.json:
    print(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0
  print(f"input pipeline throughput, batch {args.batch_size}, {machine['processor']}, "
        f"{len(available)} cores available; ECG/s per core = ECGs / CPU-seconds of the process "
        "(target >= 1500)")
  print(f"| {'path':30s} | cores | {'ECG/s':>8s} | {'ECG/s per core':>14s} | CPU busy |")
  print(f"|{'-' * 32}|-------|{'-' * 10}|{'-' * 16}|----------|")
  for r in rows:
    print(f"| {r['path']:30s} | {r['cores']:5d} | {r['ecg_per_s']:8.0f} | {r['ecg_per_cpu_s']:14.0f} "
          f"| {r['cpu_utilisation']:8.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
