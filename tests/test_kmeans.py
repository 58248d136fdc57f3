"""k-means in JAX against scikit-learn's KMeans and numpy references."""
from __future__ import annotations

import argparse
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from hubert_ecg_jax.targets import kmeans
from hubert_ecg_jax.targets.kmeans import KMeansConfig, KMeansModel, fit_kmeans

CONFIG = KMeansConfig(k=20, batch_size=1024, block_rows=4096, seed=0)


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
  vectors, _ = make_blobs(20000, 32, centers=20, random_state=0)
  return vectors.astype(np.float32)


@pytest.fixture(scope="module")
def overlapping() -> np.ndarray:
  """20k x 32 draws from 60 overlapping anisotropic Gaussians: many local optima for K = 20."""
  rng = np.random.default_rng(1)
  means = rng.normal(size=(60, 32)) * 2
  scales = rng.uniform(0.3, 1.5, 32)
  return (means[rng.integers(0, 60, 20000)] + rng.normal(size=(20000, 32)) * scales).astype(np.float32)


def _l2_normalised(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_distances(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
  """(n, k) squared distances in float64, written out directly."""
  x64, c64 = x.astype(np.float64), centers.astype(np.float64)
  return ((x64[:, None, :] - c64[None, :, :])**2).sum(-1)


@pytest.mark.parametrize("data_name", ["blobs", "overlapping"])
@pytest.mark.parametrize("normalize", [False, True])
def test_inertia_within_one_percent_of_sklearn_and_assignments_exact(data_name, normalize, request):
  x = request.getfixturevalue(data_name)
  clustered = _l2_normalised(x) if normalize else x
  n_init = 5  # best of 5 k-means++ runs on both sides
  reference = KMeans(n_clusters=20, n_init=n_init, random_state=0).fit(clustered)
  models = [fit_kmeans(x, dataclasses.replace(CONFIG, normalize=normalize, seed=seed))
            for seed in range(n_init)]
  model = min(models, key=lambda m: m.inertia)
  assert model.inertia <= 1.01 * reference.inertia_, (model.inertia, reference.inertia_)

  distances = _reference_distances(clustered, model.centers)
  np.testing.assert_array_equal(model.predict(x), distances.argmin(1))
  np.testing.assert_allclose(model.inertia, distances.min(1).sum(), rtol=1e-5)
  np.testing.assert_allclose(model.inertia_of(x), model.inertia, rtol=1e-5)
  np.testing.assert_array_equal(model.counts, np.bincount(distances.argmin(1), minlength=20))


def test_normalisation_is_applied_at_predict_as_at_fit(overlapping):
  model = fit_kmeans(overlapping, CONFIG)
  assert model.normalize
  assert np.all(np.linalg.norm(model.centers, axis=1) <= 1 + 1e-6)  # means of unit vectors
  scales = np.random.default_rng(2).uniform(0.1, 10.0, (len(overlapping), 1)).astype(np.float32)
  labels = model.predict(overlapping)
  np.testing.assert_array_equal(model.predict(overlapping * scales), labels)
  reference = _reference_distances(_l2_normalised(overlapping), model.centers).argmin(1)
  np.testing.assert_array_equal(labels, reference)
  batched = model.predict(overlapping[:186].reshape(2, 93, 32))  # (batch, frames, dim) features
  np.testing.assert_array_equal(batched.reshape(-1), labels[:186])


def test_chunked_iterator_fit_equals_in_memory_fit(overlapping):
  sizes = [777, 1, 3000, 4096, 12, 5000]

  def irregular_chunks():
    start = 0
    for size in sizes * 10:
      if start >= len(overlapping):
        return
      yield overlapping[start:start + size]
      start += size

  config = dataclasses.replace(CONFIG, minibatch_epochs=2, lloyd_iters=5)
  in_memory = fit_kmeans(overlapping, config)
  streamed = fit_kmeans(irregular_chunks, config)
  np.testing.assert_array_equal(streamed.centers, in_memory.centers)
  assert streamed.history == in_memory.history and len(in_memory.history) >= 2


def test_npy_source_reads_shards_and_shuffles_deterministically(tmp_path, overlapping):
  shards = [overlapping[:930].reshape(10, 93, 32), overlapping[930:5000], overlapping[5000:]]
  paths = []
  for i, shard in enumerate(shards):
    paths.append(tmp_path / f"shard{i}.npy")
    np.save(paths[-1], shard)
  plain = np.concatenate(list(kmeans.npy_source(paths, chunk_rows=1000)()))
  np.testing.assert_array_equal(plain, overlapping)
  shuffled = kmeans.npy_source(paths, chunk_rows=1000, shuffle_seed=3)
  first, second = np.concatenate(list(shuffled())), np.concatenate(list(shuffled()))
  np.testing.assert_array_equal(first, second)
  assert not np.array_equal(first, overlapping)
  np.testing.assert_array_equal(np.sort(first, axis=0), np.sort(overlapping, axis=0))
  from_files = fit_kmeans(kmeans.npy_source(paths, chunk_rows=1000), CONFIG)
  np.testing.assert_array_equal(from_files.centers, fit_kmeans(overlapping, CONFIG).centers)


def test_minibatch_step_is_sculley_running_mean():
  rng = np.random.default_rng(4)
  centers = rng.normal(size=(20, 32)).astype(np.float32)
  counts = rng.integers(0, 5, 20).astype(np.int32)
  batch = rng.normal(size=(1024, 32)).astype(np.float32)
  valid = 1000
  labels = _reference_distances(batch[:valid], centers).argmin(1)
  expected_centers, expected_counts = centers.astype(np.float64), counts.astype(np.float64)
  for c in range(20):
    members = batch[:valid][labels == c]
    if len(members):
      total = expected_counts[c] + len(members)
      expected_centers[c] = (expected_counts[c] * centers[c] + members.sum(0)) / total
      expected_counts[c] = total
  new_centers, new_counts = kmeans._minibatch_step(jnp.asarray(centers), jnp.asarray(counts),
                                                   batch, valid, False)
  np.testing.assert_allclose(new_centers, expected_centers, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(new_counts, expected_counts)


def test_empty_clusters_are_reseeded_with_the_farthest_vectors():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(500, 8)).astype(np.float32)
  centers = np.concatenate([x[:3], np.full((2, 8), 100.0, np.float32)])  # last two get nothing
  stats = kmeans._empty_stats(5, 8)
  for block, valid in kmeans._blocks(kmeans.array_source(x, 64), 128, 8):
    stats = kmeans._lloyd_accumulate(stats, jnp.asarray(centers), block, valid, False)
  updated = np.asarray(kmeans._lloyd_update(stats))
  distances = _reference_distances(x, centers)
  labels, nearest = distances.argmin(1), distances.min(1)
  farthest = np.argsort(-nearest)[:2]
  np.testing.assert_array_equal(updated[3:], x[farthest])
  for c in range(3):
    np.testing.assert_allclose(updated[c], x[labels == c].mean(0), rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(tmp_path, blobs):
  model = fit_kmeans(blobs, dataclasses.replace(CONFIG, normalize=False))
  path = tmp_path / "kmeans.npz"
  model.save(path)
  loaded = KMeansModel.load(path)
  np.testing.assert_array_equal(loaded.centers, model.centers)
  np.testing.assert_array_equal(loaded.counts, model.counts)
  assert (loaded.normalize, loaded.inertia, loaded.history, loaded.config) == (
      model.normalize, model.inertia, model.history, model.config)
  np.testing.assert_array_equal(loaded.predict(blobs), model.predict(blobs))
  np.savez(tmp_path / "other.npz", centers=model.centers)
  with pytest.raises(ValueError, match="missing"):
    KMeansModel.load(tmp_path / "other.npz")


def test_sweep_table_and_elbow_plot(tmp_path, blobs):
  sse = kmeans.sweep_k(blobs[:5000], [20, 10], CONFIG, save_dir=tmp_path)
  assert list(sse) == [10, 20] and sse[10] > sse[20]
  assert KMeansModel.load(tmp_path / "kmeans_k10.npz").inertia == sse[10]
  table = kmeans.format_sweep_table(sse)
  assert table.splitlines()[0].split()[:2] == ["K", "SSE"] and len(table.splitlines()) == 3
  kmeans.plot_elbow(sse, tmp_path / "elbow.png")
  assert (tmp_path / "elbow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_rejected(blobs):
  with pytest.raises(ValueError, match="at least 20 vectors"):
    fit_kmeans(blobs[:10], CONFIG)
  with_nan = blobs[:100].copy()
  with_nan[50, 3] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    fit_kmeans(with_nan, dataclasses.replace(CONFIG, k=5))
  with pytest.raises(ValueError, match="fresh iterator"):
    fit_kmeans(iter([blobs]), CONFIG)
  with pytest.raises(ValueError, match="k must be >= 1"):
    KMeansConfig(k=0)
  model = KMeansModel(blobs[:5], True, np.ones(5, np.int64), 1.0, (1.0,), dataclasses.replace(CONFIG, k=5))
  with pytest.raises(ValueError, match=r"\(\.\.\., 32\)"):
    model.predict(np.zeros((4, 31), np.float32))


def test_cluster_command_writes_models_sweep_and_summary(tmp_path, blobs, capsys):
  from hubert_ecg_jax import cli
  from hubert_ecg_jax.commands import cluster

  assert ("cluster", "cluster") in [entry[:2] for entry in cli.COMMANDS]
  features = tmp_path / "features"
  (features / "part").mkdir(parents=True)
  np.save(features / "a.npy", blobs[:2000])
  np.save(features / "part" / "b.npy", blobs[2000:4790].reshape(30, 93, 32))  # per-record frames
  parser = argparse.ArgumentParser()
  cluster.register(parser.add_subparsers())
  out = tmp_path / "out"
  argv = ["cluster", "--features", str(features), "--out", str(out), "--k", "20", "--sweep", "10,20",
          "--batch-size", "1024", "--block-rows", "4096", "--seed", "1"]
  args = parser.parse_args(argv)
  assert args.func(args) == 0
  assert "drop vs previous K" in capsys.readouterr().out
  summary = json.loads((out / "summary.json").read_text())
  assert (summary["vectors"], summary["dim"], summary["k"]) == (4790, 32, 20)
  assert summary["config"]["normalize"] is True and set(summary["sweep_sse"]) == {"10", "20"}
  model = KMeansModel.load(out / summary["model"])
  assert model.inertia == summary["sweep_sse"]["20"] == summary["inertia"]
  assert model.predict(blobs[:4790]).shape == (4790,)
  assert (out / "elbow.png").exists() and (out / "kmeans_k10.npz").exists()
  assert len((out / "sweep.txt").read_text().splitlines()) == 3
  with pytest.raises(FileExistsError, match="--overwrite"):
    args.func(parser.parse_args(argv))
  (tmp_path / "empty").mkdir()
  for path, message in ((tmp_path / "empty", "no .npy"), (tmp_path / "missing", "neither")):
    with pytest.raises(FileNotFoundError, match=message):
      args.func(parser.parse_args(["cluster", "--features", str(path), "--out", str(tmp_path / "o")]))
