"""A clustering run: k-means on feature files, optionally over several K, with its summary and plots.

What `hubert-ecg-jax cluster` does; the algorithm is in `kmeans.py`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

from hubert_ecg_jax.files import AnyPath, UrlPath, as_path, write_json_atomic, write_text_atomic
from hubert_ecg_jax.targets.kmeans import (KMeansConfig, KMeansModel, format_sweep_table,
                                           npy_source, plot_elbow, sweep_k)


def feature_files(paths: Sequence[str | os.PathLike | UrlPath]) -> list[AnyPath]:
  """The .npy files named, directories searched recursively; refuses a name that holds none."""
  found: list[AnyPath] = []
  for name in paths:
    path = as_path(name)
    if path.is_dir():
      below = sorted(path.rglob("*.npy"))
      if not below:
        raise FileNotFoundError(f"no .npy files under {path}")
      found.extend(below)
    elif path.is_file() and path.suffix == ".npy":
      found.append(path)
    else:
      raise FileNotFoundError(f"{path} is neither a directory nor a .npy file")
  return found


def cluster_features(files: Sequence[AnyPath], out: str | os.PathLike | UrlPath,
                     config: KMeansConfig, sweep: Sequence[int] = (), shuffle: bool = True,
                     overwrite: bool = False) -> dict[str, Any]:
  """Fits k-means with `config.k` (and each K of `sweep`) on the rows of `files`; writes
  OUT/kmeans_k{K}.npz per K, OUT/summary.json and, with a sweep, OUT/sweep.txt and OUT/elbow.png.
  Returns the summary. Refuses an OUT holding an earlier run unless `overwrite`."""
  out = as_path(out)
  if (out / "summary.json").exists() and not overwrite:
    raise FileExistsError(f"{out} already holds a clustering run; pass --overwrite to replace it")
  out.mkdir(parents=True, exist_ok=True)
  # Mini-batch updates need shuffled rows when a file's rows are ordered (frames of one record).
  source = npy_source(files, chunk_rows=config.block_rows,
                      shuffle_seed=config.seed if shuffle else None)
  started = time.perf_counter()
  sse = sweep_k(source, [config.k, *sweep], config, save_dir=out, progress=True)
  seconds = time.perf_counter() - started
  model = KMeansModel.load(out / f"kmeans_k{config.k}.npz")
  summary = {
      "features": [str(f) for f in files], "vectors": int(model.counts.sum()), "dim": model.dim,
      "k": model.k, "model": f"kmeans_k{config.k}.npz", "inertia": model.inertia,
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
  return summary
