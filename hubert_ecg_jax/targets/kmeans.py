"""k-means in JAX for pre-training targets: k-means++ on a sample, mini-batch updates, Lloyd passes.

More in docs/modules.md."""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import pathlib
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hubert_ecg_jax.files import UrlPath, as_path, atomic_path
from hubert_ecg_jax.progress import progress_bar

VectorSource = Callable[[], Iterable[np.ndarray]]
_MODEL_KEYS = ("centers", "normalize", "counts", "inertia", "history", "config_json")


@dataclasses.dataclass(frozen=True)
class KMeansConfig:
  """Settings of one k-means fit (see the module docstring for the algorithm)."""
  k: int = 100
  normalize: bool = True  # L2 row normalisation at fit and at predict
  batch_size: int = 4096  # vectors per mini-batch update
  minibatch_epochs: int = 1  # mini-batch passes over the data before the Lloyd passes
  lloyd_iters: int = 20  # at most this many Lloyd updates
  tol: float = 1e-4  # stop when (previous SSE - SSE) <= tol * SSE
  init_sample: int | None = None  # k-means++ sample size; None: max(3 batch_size, 3 k), at most N
  n_init: int = 1  # k-means++ seedings tried on the sample, lowest potential kept
  block_rows: int = 16384  # vectors per jitted distance block (memory: block_rows x k floats)
  seed: int = 0

  def __post_init__(self) -> None:
    positive = {"k": self.k, "batch_size": self.batch_size, "n_init": self.n_init,
                "block_rows": self.block_rows}
    for name, value in positive.items():
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if self.minibatch_epochs < 0 or self.lloyd_iters < 0 or self.tol < 0:
      raise ValueError(f"minibatch_epochs, lloyd_iters and tol must be >= 0, got "
                       f"{self.minibatch_epochs}, {self.lloyd_iters}, {self.tol}")
    if self.init_sample is not None and self.init_sample < self.k:
      raise ValueError(f"init_sample must be >= k={self.k}, got {self.init_sample}")


def array_source(vectors: np.ndarray, chunk_rows: int = 65536) -> VectorSource:
  """Source over an in-memory `(n, dim)` array, yielded in chunks of `chunk_rows`."""
  vectors = np.asarray(vectors)
  if vectors.ndim != 2:
    raise ValueError(f"expected vectors of shape (n, dim), got shape {vectors.shape}")
  return lambda: (vectors[i:i + chunk_rows] for i in range(0, len(vectors), chunk_rows))


def npy_source(paths: Sequence[str | pathlib.Path], chunk_rows: int = 65536,
               shuffle_seed: int | None = None) -> VectorSource:
  """Source over `.npy` files of shape `(..., dim)` (leading axes are flattened into rows).

  With `shuffle_seed`, file order and the rows inside each file are permuted, the same way on every
  pass; each file is then read whole, otherwise it is memory-mapped and read chunk by chunk.
  """
  paths = [as_path(p) for p in paths]
  if not paths:
    raise ValueError("npy_source needs at least one .npy file, got none")

  def chunks() -> Iterator[np.ndarray]:
    rng = np.random.default_rng(shuffle_seed)
    order = rng.permutation(len(paths)) if shuffle_seed is not None else range(len(paths))
    for index in order:
      array = _load_npy(paths[index], memory_map=shuffle_seed is None)
      if array.ndim < 2:
        raise ValueError(f"{paths[index]}: expected an array of shape (..., dim), got {array.shape}")
      rows = array.reshape(-1, array.shape[-1])
      if shuffle_seed is not None:
        rows = rows[rng.permutation(len(rows))]
      for start in range(0, len(rows), chunk_rows):
        yield np.asarray(rows[start:start + chunk_rows])
  return chunks


def _load_npy(path: pathlib.Path | UrlPath, memory_map: bool) -> np.ndarray:
  """The array of a `.npy` file; memory-mapped if asked and the file is local (a URL is read whole)."""
  if isinstance(path, UrlPath):
    return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
  return np.load(path, mmap_mode="r" if memory_map else None)


def _as_source(data: np.ndarray | VectorSource, chunk_rows: int) -> VectorSource:
  if callable(data):
    return data
  if isinstance(data, Iterator):
    raise ValueError("k-means reads the data several times: pass a callable that returns a fresh "
                     "iterator of chunks (a VectorSource), not a one-shot iterator")
  return array_source(data, chunk_rows)


def _checked_chunks(source: VectorSource, dim: int | None = None) -> Iterator[np.ndarray]:
  for chunk in source():
    chunk = np.asarray(chunk)
    if chunk.ndim != 2 or (dim is not None and chunk.shape[1] != dim):
      expected = f"(rows, {dim})" if dim is not None else "(rows, dim)"
      raise ValueError(f"source yielded a chunk of shape {chunk.shape}, expected {expected}")
    yield chunk


def _blocks(source: VectorSource, rows: int, dim: int) -> Iterator[tuple[np.ndarray, int]]:
  """Re-cut the stream into float32 blocks of exactly `rows` rows (last zero-padded) + valid count."""
  pending: list[np.ndarray] = []
  have = 0
  for chunk in _checked_chunks(source, dim):
    start = 0
    while start < len(chunk):
      take = min(rows - have, len(chunk) - start)
      pending.append(chunk[start:start + take])
      have, start = have + take, start + take
      if have == rows:
        yield np.concatenate(pending).astype(np.float32, copy=False), rows
        pending, have = [], 0
  if have:
    block = np.zeros((rows, dim), np.float32)
    block[:have] = np.concatenate(pending)
    yield block, have


def _scan(source: VectorSource) -> tuple[int, int]:
  """Count the vectors and check them: returns (n, dim)."""
  n, dim = 0, None
  for chunk in _checked_chunks(source):
    dim = chunk.shape[1] if dim is None else dim
    if chunk.shape[1] != dim:
      raise ValueError(f"source chunks have different widths: {dim} and {chunk.shape[1]}")
    if not np.all(np.isfinite(chunk)):
      raise ValueError(f"vectors contain NaN or infinite values (in rows {n}..{n + len(chunk) - 1})")
    n += len(chunk)
  if dim is None or n == 0:
    raise ValueError("the vector source is empty")
  return n, dim


def _gather_rows(source: VectorSource, indices: np.ndarray, dim: int) -> np.ndarray:
  """Rows at sorted global `indices` of the stream, as float32 `(len(indices), dim)`."""
  picked, offset = [], 0
  for chunk in _checked_chunks(source, dim):
    lo, hi = np.searchsorted(indices, [offset, offset + len(chunk)])
    picked.append(chunk[indices[lo:hi] - offset])
    offset += len(chunk)
  return np.concatenate(picked).astype(np.float32)


def _prepare(x: jax.Array, normalize: bool | jax.Array) -> jax.Array:
  """float32 rows, L2-normalised when `normalize` (a traced flag: no recompilation per setting)."""
  x = x.astype(jnp.float32)
  norms = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
  return x / jnp.where(jnp.logical_and(normalize, norms > 0), norms, 1.0)


def _sq_distances(x: jax.Array, centers: jax.Array) -> jax.Array:
  """(rows, dim), (k, dim) -> (rows, k) squared Euclidean distances, clamped at 0."""
  cross = jnp.dot(x, centers.T, precision=jax.lax.Precision.HIGHEST)
  d2 = jnp.sum(x * x, 1)[:, None] - 2.0 * cross + jnp.sum(centers * centers, 1)[None, :]
  return jnp.maximum(d2, 0.0)


def _nearest(x: jax.Array, centers: jax.Array) -> tuple[jax.Array, jax.Array]:
  d2 = _sq_distances(x, centers)
  labels = jnp.argmin(d2, axis=1)
  return labels.astype(jnp.int32), jnp.take_along_axis(d2, labels[:, None], 1)[:, 0]


@jax.jit
def _assign_block(centers: jax.Array, block: jax.Array,
                  normalize: bool) -> tuple[jax.Array, jax.Array]:
  return _nearest(_prepare(block, normalize), centers)


@functools.partial(jax.jit, static_argnames=("k", "trials"))
def _kmeans_plus_plus(key: jax.Array, sample: jax.Array, k: int,
                      trials: int) -> tuple[jax.Array, jax.Array]:
  """Greedy k-means++ on a prepared `(s, dim)` sample -> (k, dim) centres and their potential."""
  key, first_key = jax.random.split(key)
  first = jax.random.randint(first_key, (), 0, sample.shape[0])
  centers = jnp.zeros((k, sample.shape[1]), jnp.float32).at[0].set(sample[first])
  closest = _sq_distances(sample, sample[first][None])[:, 0]  # (s,)

  def add_center(i, state):
    centers, closest, key = state
    key, draw_key = jax.random.split(key)
    cumulative = jnp.cumsum(closest)
    draws = jax.random.uniform(draw_key, (trials,)) * cumulative[-1]
    candidates = jnp.minimum(jnp.searchsorted(cumulative, draws, side="right",
                                              method="compare_all"),
                             sample.shape[0] - 1)  # (trials,)
    updated = jnp.minimum(closest[:, None], _sq_distances(sample, sample[candidates]))
    best = jnp.argmin(jnp.sum(updated, axis=0))
    return centers.at[i].set(sample[candidates[best]]), updated[:, best], key

  centers, closest, _ = jax.lax.fori_loop(1, k, add_center, (centers, closest, key))
  return centers, jnp.sum(closest)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _minibatch_step(centers: jax.Array, counts: jax.Array, batch: jax.Array, valid_rows: jax.Array,
                    normalize: bool) -> tuple[jax.Array, jax.Array]:
  x = _prepare(batch, normalize)
  labels, _ = _nearest(x, centers)
  valid = jnp.arange(x.shape[0]) < valid_rows
  batch_sums = jax.ops.segment_sum(x * valid[:, None], labels, centers.shape[0])  # (k, dim)
  batch_counts = jax.ops.segment_sum(valid.astype(jnp.int32), labels, centers.shape[0])  # (k,)
  new_counts = counts + batch_counts
  step = (batch_sums - batch_counts[:, None] * centers) / jnp.maximum(new_counts, 1)[:, None]
  return centers + step, new_counts


class _PassStats(NamedTuple):
  sums: jax.Array  # (k, dim) sum of the vectors assigned to each centre
  counts: jax.Array  # (k,) int32
  sse: jax.Array  # ()
  far_d2: jax.Array  # (k,) largest distances to the nearest centre seen so far
  far_vectors: jax.Array  # (k, dim) the vectors at those distances


def _empty_stats(k: int, dim: int) -> _PassStats:
  return _PassStats(jnp.zeros((k, dim)), jnp.zeros((k,), jnp.int32), jnp.zeros(()),
                    jnp.full((k,), -jnp.inf), jnp.zeros((k, dim)))


@functools.partial(jax.jit, donate_argnums=(0,))
def _lloyd_accumulate(stats: _PassStats, centers: jax.Array, block: jax.Array,
                      valid_rows: jax.Array, normalize: bool) -> _PassStats:
  x = _prepare(block, normalize)
  labels, d2 = _nearest(x, centers)
  valid = jnp.arange(x.shape[0]) < valid_rows
  k = centers.shape[0]
  top_d2, top_rows = jax.lax.top_k(jnp.where(valid, d2, -jnp.inf), min(k, x.shape[0]))
  far_d2, far_index = jax.lax.top_k(jnp.concatenate([stats.far_d2, top_d2]), k)
  far_vectors = jnp.concatenate([stats.far_vectors, x[top_rows]])[far_index]
  return _PassStats(stats.sums + jax.ops.segment_sum(x * valid[:, None], labels, k),
                    stats.counts + jax.ops.segment_sum(valid.astype(jnp.int32), labels, k),
                    stats.sse + jnp.sum(jnp.where(valid, d2, 0.0)), far_d2, far_vectors)


@jax.jit
def _lloyd_update(stats: _PassStats) -> jax.Array:
  """Means of the assigned vectors; empty centres take the farthest vectors, in order."""
  empty = stats.counts == 0
  means = stats.sums / jnp.maximum(stats.counts, 1)[:, None]
  rank = jnp.maximum(jnp.cumsum(empty) - 1, 0)
  return jnp.where(empty[:, None], stats.far_vectors[rank], means)


@dataclasses.dataclass(frozen=True, eq=False)
class KMeansModel:
  """Fitted centres plus the normalisation they were fitted with (applied again at predict)."""
  centers: np.ndarray  # (k, dim) float32, in the normalised space when `normalize`
  normalize: bool
  counts: np.ndarray  # (k,) vectors assigned to each centre in the last measured pass
  inertia: float  # SSE of the fitting data against `centers`
  history: tuple[float, ...]  # SSE measured at each Lloyd pass
  config: KMeansConfig

  @property
  def k(self) -> int:
    return self.centers.shape[0]

  @property
  def dim(self) -> int:
    return self.centers.shape[1]

  def _block_results(self, data: np.ndarray | VectorSource,
                     block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(labels, squared distances) per block; block i is read back while block i + 1 computes."""
    centers = jnp.asarray(self.centers)
    in_flight: list[tuple[tuple[jax.Array, jax.Array], int]] = []

    def read_back() -> tuple[np.ndarray, np.ndarray]:
      (labels, d2), rows = in_flight.pop(0)
      return np.asarray(labels)[:rows], np.asarray(d2)[:rows]

    for block, valid in _blocks(_as_source(data, block_rows), block_rows, self.dim):
      in_flight.append((_assign_block(centers, block, self.normalize), valid))
      if len(in_flight) == 2:
        yield read_back()
    while in_flight:
      yield read_back()

  def predict(self, vectors: np.ndarray, block_rows: int | None = None) -> np.ndarray:
    """(..., dim) vectors -> (...) int32 index of the nearest centre."""
    vectors = np.asarray(vectors)
    if vectors.ndim < 1 or vectors.shape[-1] != self.dim:
      raise ValueError(f"expected vectors of shape (..., {self.dim}), got shape {vectors.shape}")
    if not np.all(np.isfinite(vectors)):
      raise ValueError("vectors contain NaN or infinite values")
    flat = vectors.reshape(-1, self.dim)
    if len(flat) == 0:
      return np.zeros(vectors.shape[:-1], np.int32)
    rows = min(block_rows or self.config.block_rows, 1 << (len(flat) - 1).bit_length())
    labels = np.concatenate([labels for labels, _ in self._block_results(flat, rows)])
    return labels.reshape(vectors.shape[:-1])

  def inertia_of(self, data: np.ndarray | VectorSource) -> float:
    """SSE of `(n, dim)` vectors (or a source) against the centres, after the model's normalisation."""
    return float(sum(np.sum(d2, dtype=np.float64)
                     for _, d2 in self._block_results(data, self.config.block_rows)))

  def save(self, path: str | pathlib.Path) -> None:
    """Write the model to an `.npz` file (centres, normalisation, counts, SSE, history, settings)."""
    buffer = io.BytesIO()  # zip archives seek back while writing: built in memory, then written once
    np.savez(buffer, centers=self.centers, normalize=np.bool_(self.normalize), counts=self.counts,
             inertia=np.float64(self.inertia), history=np.asarray(self.history, np.float64),
             config_json=np.str_(json.dumps(dataclasses.asdict(self.config))))
    with atomic_path(path) as staging:
      staging.write_bytes(buffer.getvalue())

  @classmethod
  def load(cls, path: str | pathlib.Path) -> KMeansModel:
    """Read a model written by `save`."""
    path = as_path(path)
    if not path.is_file():
      raise FileNotFoundError(f"k-means model {path} not found")
    expected = "expected an .npz archive written by KMeansModel.save"
    try:
      saved = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    except ValueError:  # numpy's guess for content that is neither .npy nor .npz: pickled data
      raise ValueError(f"{path}: not a k-means model file: {expected}, found neither an .npz "
                       "archive nor a .npy array") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
      raise ValueError(f"{path}: not a k-means model file: {expected}, found a damaged archive "
                       f"({error})") from None
    if not isinstance(saved, np.lib.npyio.NpzFile):
      raise ValueError(f"{path}: not a k-means model file: {expected}, found a single array of "
                       f"shape {saved.shape}")
    with saved:
      missing = [key for key in _MODEL_KEYS if key not in saved.files]
      if missing:
        raise ValueError(f"{path}: not a k-means model file: {expected}, missing {missing}")
      return cls(np.asarray(saved["centers"], np.float32), bool(saved["normalize"]),
                 np.asarray(saved["counts"]), float(saved["inertia"]),
                 tuple(float(v) for v in saved["history"]),
                 KMeansConfig(**json.loads(str(saved["config_json"]))))


def fit_kmeans(data: np.ndarray | VectorSource, config: KMeansConfig,
               progress: bool = False) -> KMeansModel:
  """Fit k-means on `(n, dim)` vectors or a `VectorSource` (module docstring: the algorithm)."""
  source = _as_source(data, config.block_rows)
  n, dim = _scan(source)
  if n < config.k:
    raise ValueError(f"k-means with k={config.k} needs at least {config.k} vectors, got {n}")
  rng = np.random.default_rng(config.seed)
  sample_size = min(n, config.init_sample or max(3 * config.batch_size, 3 * config.k))
  sample_rows = np.sort(rng.choice(n, sample_size, replace=False))
  sample = _prepare(jnp.asarray(_gather_rows(source, sample_rows, dim)), config.normalize)
  trials = 2 + int(math.log(config.k))
  seedings = [_kmeans_plus_plus(key, sample, config.k, trials)
              for key in jax.random.split(jax.random.key(config.seed), config.n_init)]
  centers = min(seedings, key=lambda seeding: float(seeding[1]))[0]

  # One bar over every pass (mini-batch epochs, then at most lloyd_iters + 1 Lloyd passes); it
  # stops short of its total when Lloyd converges early.
  minibatch_blocks, lloyd_blocks = -(-n // config.batch_size), -(-n // config.block_rows)
  total = config.minibatch_epochs * minibatch_blocks + (config.lloyd_iters + 1) * lloyd_blocks
  bar = progress_bar(total=total, desc=f"k-means k={config.k}", unit="block", disable=not progress)

  def blocks(rows: int, phase: str) -> Iterator[tuple[np.ndarray, int]]:
    bar.set_postfix_str(phase, refresh=False)
    for block in _blocks(source, rows, dim):
      yield block
      bar.update()

  counts = jnp.zeros((config.k,), jnp.int32)
  for epoch in range(config.minibatch_epochs):
    for batch, valid in blocks(config.batch_size, f"mini-batch epoch {epoch + 1}"):
      centers, counts = _minibatch_step(centers, counts, batch, valid, config.normalize)
  history: list[float] = []
  for iteration in range(config.lloyd_iters + 1):
    stats = _empty_stats(config.k, dim)
    for block, valid in blocks(config.block_rows, f"Lloyd pass {iteration + 1}"):
      stats = _lloyd_accumulate(stats, centers, block, valid, config.normalize)
    history.append(float(stats.sse))
    converged = iteration > 0 and history[-2] - history[-1] <= config.tol * history[-1]
    if converged or iteration == config.lloyd_iters:
      break
    centers = _lloyd_update(stats)
  bar.close()
  return KMeansModel(np.asarray(centers, np.float32), config.normalize,
                     np.asarray(stats.counts).astype(np.int64), history[-1], tuple(history), config)


def sweep_k(data: np.ndarray | VectorSource, ks: Iterable[int], config: KMeansConfig,
            save_dir: str | pathlib.Path | None = None, progress: bool = False) -> dict[int, float]:
  """Fit one model per K (other settings from `config`) -> {K: SSE}; models saved as kmeans_k{K}.npz."""
  sse = {}
  for k in progress_bar(sorted(set(ks)), desc="K sweep", disable=not progress):
    model = fit_kmeans(data, dataclasses.replace(config, k=k), progress=progress)
    if save_dir is not None:
      model.save(as_path(save_dir) / f"kmeans_k{k}.npz")
    sse[k] = model.inertia
  return sse


def format_sweep_table(sse: dict[int, float]) -> str:
  """A text table of K, SSE and the relative SSE drop from the previous K."""
  lines = [f"{'K':>6}  {'SSE':>14}  {'drop vs previous K':>18}"]
  previous = None
  for k in sorted(sse):
    drop = "" if previous is None else f"{100 * (previous - sse[k]) / previous:17.2f}%"
    lines.append(f"{k:>6}  {sse[k]:>14.6g}  {drop:>18}")
    previous = sse[k]
  return "\n".join(lines)


def plot_elbow(sse: dict[int, float], path: str | pathlib.Path | UrlPath, title: str = "k-means elbow") -> None:
  """Save the SSE-against-K figure (the paper's Supplementary Figure 1) as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  ks = sorted(sse)
  figure, axes = plt.subplots(figsize=(5, 3.5))
  axes.plot(ks, [sse[k] for k in ks], marker="o")
  axes.set_xlabel("K (clusters)")
  axes.set_ylabel("SSE (inertia)")
  axes.set_title(title)
  axes.grid(alpha=0.3)
  figure.tight_layout()
  with atomic_path(path) as staging, staging.open("wb") as file:
    figure.savefig(file, format="png", dpi=120)
  plt.close(figure)
