"""Benchmark: our JAX k-means against scikit-learn's MiniBatchKMeans on the same vectors.

Prints a table (or `--json`) of wall-clock fit time and final SSE, both SSEs measured by the same
code on the same vectors. The vectors are a synthetic mixture (`--n` x `--dim`, default 200k x 768,
the hidden size of HuBERT-ECG base) drawn around `--components` random means, standing in for
dumped hidden states. JAX times exclude compilation (a throwaway fit runs first; its time
is printed too). Rows:
- "jax mini-batch": k-means++ + one mini-batch epoch (`--lloyd-iters 0`), about sklearn's work;
- "jax mini-batch + Lloyd": the same then up to `--lloyd-iters` Lloyd passes (the package default);
- "sklearn MiniBatchKMeans": `MiniBatchKMeans(k, batch_size, n_init=1)`, its default early stop.

  python tools/bench_kmeans.py                 # 200k x 768, K 500
  python tools/bench_kmeans.py --n 1000000     # the issue's 1M x 768 case (about 3 GB of vectors)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import numpy as np


def synthetic_vectors(n: int, dim: int, components: int, seed: int) -> np.ndarray:
  """(n, dim) float32: random means (unit scale) plus isotropic noise of scale 0.5."""
  rng = np.random.default_rng(seed)
  means = rng.standard_normal((components, dim), dtype=np.float32)
  vectors = np.empty((n, dim), np.float32)
  for start in range(0, n, 65536):
    rows = min(65536, n - start)
    noise = rng.standard_normal((rows, dim), dtype=np.float32)
    vectors[start:start + rows] = means[rng.integers(0, components, rows)] + 0.5 * noise
  return vectors


def machine_name() -> str:
  """CPU model (from /proc/cpuinfo where there is one) and CPU count."""
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
  except (OSError, StopIteration):
    model = platform.processor() or platform.machine()
  return f"{model}, {os.cpu_count()} CPUs"


def run_benchmark(args: argparse.Namespace) -> dict:
  import jax
  from sklearn.cluster import MiniBatchKMeans

  from hubert_ecg_jax.targets.kmeans import KMeansConfig, KMeansModel, fit_kmeans

  vectors = synthetic_vectors(args.n, args.dim, args.components, args.seed)
  config = KMeansConfig(k=args.k, normalize=False, batch_size=args.batch_size,
                        lloyd_iters=args.lloyd_iters, block_rows=args.block_rows, seed=args.seed)
  rows = []

  def measure(name: str, fit) -> KMeansModel:
    print(f"fitting {name} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    model, passes = fit()
    seconds = time.perf_counter() - started
    rows.append({"method": name, "seconds": seconds, "sse": model.inertia_of(vectors),
                 "passes": passes})
    return model

  def jax_fit(lloyd_iters: int):
    model = fit_kmeans(vectors, dataclasses.replace(config, lloyd_iters=lloyd_iters))
    return model, config.minibatch_epochs + len(model.history)

  print("compiling (a throwaway JAX fit with one Lloyd pass) ...", file=sys.stderr, flush=True)
  started = time.perf_counter()
  fit_kmeans(vectors, dataclasses.replace(config, lloyd_iters=1))
  warmup_seconds = time.perf_counter() - started
  measure("jax mini-batch", lambda: jax_fit(0))
  measure("jax mini-batch + Lloyd", lambda: jax_fit(args.lloyd_iters))

  def sklearn_fit():
    fitted = MiniBatchKMeans(n_clusters=args.k, batch_size=args.batch_size, n_init=1,
                             random_state=args.seed).fit(vectors)
    model = KMeansModel(fitted.cluster_centers_.astype(np.float32), False,
                        np.bincount(fitted.labels_, minlength=args.k), float(fitted.inertia_), (),
                        config)
    return model, round(fitted.n_steps_ * args.batch_size / args.n, 2) + 1  # + the final labels

  MiniBatchKMeans(n_clusters=8, batch_size=256, n_init=1).fit(vectors[:2048])  # warm-up
  measure("sklearn MiniBatchKMeans", sklearn_fit)
  best = min(row["sse"] for row in rows)
  for row in rows:
    row["sse_vs_best"] = row["sse"] / best
  sklearn_seconds = rows[-1]["seconds"]
  for row in rows:
    row["speedup_vs_sklearn"] = sklearn_seconds / row["seconds"]
  return {
      "vectors": args.n, "dim": args.dim, "k": args.k, "batch_size": args.batch_size,
      "machine": machine_name(),
      "jax_device": str(jax.devices()[0].device_kind), "jax_warmup_seconds": warmup_seconds,
      "rows": rows}


def format_table(result: dict) -> str:
  lines = [f"k-means fit: {result['vectors']} x {result['dim']} vectors, K {result['k']}, batch "
           f"{result['batch_size']}; {result['machine']}; JAX on {result['jax_device']}",
           f"{'method':<26} {'fit s':>8} {'speed vs sklearn':>17} {'distance passes':>16} "
           f"{'SSE':>14} {'SSE / best':>11}"]
  for row in result["rows"]:
    lines.append(f"{row['method']:<26} {row['seconds']:>8.1f} {row['speedup_vs_sklearn']:>16.2f}x "
                 f"{row['passes']:>16} {row['sse']:>14.6g} {row['sse_vs_best']:>11.4f}")
  lines.append(f"JAX times exclude compilation: the first fit (compile + 3 passes) took "
               f"{result['jax_warmup_seconds']:.1f} s.")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--n", type=int, default=200_000, help="vectors (default 200000)")
  parser.add_argument("--dim", type=int, default=768, help="vector width (default 768)")
  parser.add_argument("--k", type=int, default=500, help="clusters (default 500)")
  parser.add_argument("--components", type=int, default=2000,
                      help="mixture components of the synthetic vectors (default 2000)")
  parser.add_argument("--batch-size", type=int, default=4096, help="mini-batch size, both sides")
  parser.add_argument("--lloyd-iters", type=int, default=20, help="Lloyd passes at most (default 20)")
  parser.add_argument("--block-rows", type=int, default=16384, help="JAX distance block rows")
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
  args = parser.parse_args(argv)
  result = run_benchmark(args)
  print(json.dumps(result, indent=2) if args.json else format_table(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
