"""`hubert-ecg-jax cluster`: fit k-means pre-training targets on feature arrays, optionally sweeping K."""
from __future__ import annotations

import argparse
import dataclasses
import time

from hubert_ecg_jax.files import AnyPath, as_path, write_json_atomic, write_text_atomic


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "cluster", help="fit k-means pre-training targets on feature arrays (.npy), with a K sweep",
      description="Fits k-means in JAX (k-means++, mini-batch passes, Lloyd passes; streamed, so the "
      "features need not fit in memory) on frame features: the sample `features` writes "
      "(OUT/sample.npy), or any .npy arrays of shape (..., dim) (leading axes are flattened). Writes OUT/kmeans_k{K}.npz (centres + "
      "normalisation + settings, loaded by KMeansModel.load), OUT/summary.json and, with --sweep, "
      "one model per K, OUT/sweep.txt (SSE table) and OUT/elbow.png.")
  p.add_argument("--features", nargs="+", required=True, metavar="PATH",
                 help=".npy files and/or directories searched recursively for *.npy")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--k", type=int, default=100, help="clusters of the model to keep (default 100)")
  p.add_argument("--sweep", default="", metavar="K1,K2,...",
                 help="also fit these K and report SSE against K (e.g. 100,200,300)")
  p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                 help="L2-normalise every vector, at fit and at predict alike (default on, as the "
                 "original's fit)")
  p.add_argument("--batch-size", type=int, default=4096, help="vectors per mini-batch update")
  p.add_argument("--minibatch-epochs", type=int, default=1,
                 help="mini-batch passes over the data before the Lloyd passes (default 1)")
  p.add_argument("--iters", type=int, default=20, help="at most this many Lloyd passes (default 20)")
  p.add_argument("--tol", type=float, default=1e-4,
                 help="stop when the relative SSE improvement of a Lloyd pass is at most this")
  p.add_argument("--init-sample", type=int, default=None,
                 help="vectors drawn for k-means++ (default max(3 batch size, 3 K))")
  p.add_argument("--n-init", type=int, default=1,
                 help="k-means++ seedings tried on the sample, the lowest potential kept")
  p.add_argument("--block-rows", type=int, default=16384,
                 help="vectors per distance block on the device (memory: block rows x K floats)")
  p.add_argument("--seed", type=int, default=0, help="random seed (sampling, seeding, shuffling)")
  p.add_argument("--no-shuffle", action="store_true",
                 help="stream files and rows in order, memory-mapped (default: shuffle file order "
                 "and the rows of each file, which mini-batch updates need when rows are ordered)")
  p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run")
  p.set_defaults(func=run)


def _feature_files(paths: list[str]) -> list[AnyPath]:
  files: list[AnyPath] = []
  for name in paths:
    path = as_path(name)
    if path.is_dir():
      found = sorted(path.rglob("*.npy"))
      if not found:
        raise FileNotFoundError(f"no .npy files under {path}")
      files.extend(found)
    elif path.is_file() and path.suffix == ".npy":
      files.append(path)
    else:
      raise FileNotFoundError(f"{path} is neither a directory nor a .npy file")
  return files


def _parse_sweep(text: str) -> list[int]:
  try:
    return [int(k) for k in text.split(",") if k.strip()]
  except ValueError:
    raise ValueError(f"--sweep expects comma-separated integers such as 100,200,300, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.targets.kmeans import (KMeansConfig, KMeansModel, format_sweep_table,
                                             npy_source, plot_elbow, sweep_k)

  files = _feature_files(args.features)
  sweep = _parse_sweep(args.sweep)
  out = as_path(args.out)
  if (out / "summary.json").exists() and not args.overwrite:
    raise FileExistsError(f"{out} already holds a clustering run; pass --overwrite to replace it")
  out.mkdir(parents=True, exist_ok=True)
  config = KMeansConfig(k=args.k, normalize=args.normalize, batch_size=args.batch_size,
                        minibatch_epochs=args.minibatch_epochs, lloyd_iters=args.iters, tol=args.tol,
                        init_sample=args.init_sample, n_init=args.n_init,
                        block_rows=args.block_rows, seed=args.seed)
  source = npy_source(files, chunk_rows=args.block_rows,
                      shuffle_seed=None if args.no_shuffle else args.seed)
  started = time.perf_counter()
  sse = sweep_k(source, [args.k, *sweep], config, save_dir=out, progress=True)
  seconds = time.perf_counter() - started
  model = KMeansModel.load(out / f"kmeans_k{args.k}.npz")
  summary = {
      "features": [str(f) for f in files], "vectors": int(model.counts.sum()), "dim": model.dim,
      "k": model.k, "model": f"kmeans_k{args.k}.npz", "inertia": model.inertia,
      "empty_clusters": int((model.counts == 0).sum()), "lloyd_sse_history": list(model.history),
      "config": dataclasses.asdict(config), "sweep_sse": {str(k): v for k, v in sse.items()},
      "seconds": round(seconds, 3)}
  if len(sse) > 1:
    table = format_sweep_table(sse)
    write_text_atomic(out / "sweep.txt", table + "\n")
    plot_elbow(sse, out / "elbow.png", title=f"k-means SSE against K ({model.dim}-dim features)")
    print(table)
  write_json_atomic(out / "summary.json", summary)
  print(f"k-means K={model.k} on {summary['vectors']} vectors of dim {model.dim}: SSE "
        f"{model.inertia:.6g}, {summary['empty_clusters']} empty clusters, {seconds:.1f} s -> "
        f"{out / summary['model']}")
  return 0
