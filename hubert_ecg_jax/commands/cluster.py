"""`hubert-ecg-jax cluster`: fit k-means pre-training targets on feature arrays, optionally sweeping K."""
from __future__ import annotations

import argparse


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


def _parse_sweep(text: str) -> list[int]:
  try:
    return [int(k) for k in text.split(",") if k.strip()]
  except ValueError:
    raise ValueError(f"--sweep expects comma-separated integers such as 100,200,300, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
  from hubert_ecg_jax.targets.cluster import cluster_features, feature_files
  from hubert_ecg_jax.targets.kmeans import KMeansConfig

  config = KMeansConfig(k=args.k, normalize=args.normalize, batch_size=args.batch_size,
                        minibatch_epochs=args.minibatch_epochs, lloyd_iters=args.iters, tol=args.tol,
                        init_sample=args.init_sample, n_init=args.n_init,
                        block_rows=args.block_rows, seed=args.seed)
  cluster_features(feature_files(args.features), args.out, config, _parse_sweep(args.sweep),
                   shuffle=not args.no_shuffle, overwrite=args.overwrite)
  return 0
