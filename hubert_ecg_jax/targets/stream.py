"""The two offline passes of the k-means targets, streamed over a records directory.

`sample_features` draws a reproducible sample of frame features for the k-means fit;
`write_units` computes the features of every record batch by batch, assigns them to the k-means
centres and writes only the units (`data.units`). Features of the whole dataset are never stored.
More in docs/modules.md.
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from hubert_ecg_jax.config import MODEL_INPUT_LENGTH
from hubert_ecg_jax.data import records as records_lib
from hubert_ecg_jax.data import units as units_lib
from hubert_ecg_jax.data.ingest import file_digest
from hubert_ecg_jax.data.online import fast_model_inputs
from hubert_ecg_jax.data.preprocess import crop_window
from hubert_ecg_jax.files import AnyPath, as_path, output_folder, write_json_atomic
from hubert_ecg_jax.progress import progress_bar
from hubert_ecg_jax.run_lock import hold_directory, holds_directory
from hubert_ecg_jax.targets.features import FEATURE_SETS, frame_features, num_frames
from hubert_ecg_jax.targets.kmeans import KMeansModel

SAMPLE_FILE = "sample.npy"
SAMPLE_MANIFEST = "features.json"
FeatureFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # x, attention_mask -> (b, frames, dim)


def handmade_features(feature_set: str) -> tuple[FeatureFn, dict[str, Any]]:
  """Iteration-1 features: "stats" (16), "mfcc" (39) or "mixed" (29) per frame."""
  if feature_set not in FEATURE_SETS:
    raise ValueError(f"feature set must be one of {FEATURE_SETS}, found {feature_set!r}")
  return (functools.partial(_handmade, feature_set=feature_set),  # picklable: runs in workers
          {"kind": "handmade", "feature_set": feature_set})


def _handmade(x: np.ndarray, mask: np.ndarray, feature_set: str) -> np.ndarray:
  return frame_features(x, feature_set)


def _first_window_batches(shard: AnyPath, batch_size: int,
                          keep: Callable[[int], bool] = lambda position: True
                          ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
  """(ids, x (b, 6000), attention mask (b, 6000)) of the first 5 s of the records of `shard`
  whose position in it `keep` accepts (where the pre-training targets live)."""
  ids: list[str] = []
  windows: list[np.ndarray] = []
  for position, serialized in enumerate(records_lib.iterate_shard(shard)):
    if not keep(position):
      continue
    record = records_lib.decode_example(serialized)
    ids.append(record.record_id)
    windows.append(crop_window(record.signal, 0))
    if len(ids) == batch_size:
      yield ids, *fast_model_inputs(np.stack(windows))  # = model_inputs, bit for bit
      ids, windows = [], []
  if ids:
    yield ids, *fast_model_inputs(np.stack(windows))  # = model_inputs, bit for bit


def _checked(values: np.ndarray, ids: list[str], shard: AnyPath) -> np.ndarray:
  if not np.all(np.isfinite(values)):
    raise ValueError(f"non-finite features for records {ids} of {shard}")
  return values


@holds_directory("out_dir")
def sample_features(records_dir: str | os.PathLike, out_dir: str | os.PathLike, features: FeatureFn,
                    description: dict[str, Any], frames: int = 500_000, seed: int = 0,
                    batch_size: int = 32, overwrite: bool = False, show_progress: bool = True
                    ) -> dict[str, Any]:
  """Writes `frames` frame features drawn with `seed` (whole records drawn without replacement,
  then frames) to OUT/sample.npy (frames, dim) float32, for `cluster`; returns the summary."""
  if frames < 1 or batch_size < 1:
    raise ValueError(f"frames and batch_size must be positive, found {frames} and {batch_size}")
  manifest = records_lib.read_manifest(records_dir)
  paths = records_lib.shard_paths(records_dir, manifest)
  rng = np.random.default_rng(seed)
  per_record = num_frames(MODEL_INPUT_LENGTH)
  drawn = min(manifest.num_records, math.ceil(frames / per_record))
  chosen = np.zeros(manifest.num_records, bool)
  chosen[rng.choice(manifest.num_records, drawn, replace=False)] = True
  parts: list[np.ndarray] = []
  first = 0  # index of the shard's first record in the directory
  with progress_bar(total=drawn, desc="feature sample", unit="ECG", disable=not show_progress) as bar:
    for path, shard in zip(paths, manifest.shards):
      in_shard = chosen[first:first + shard.num_records]
      if in_shard.any():
        for ids, x, mask in _first_window_batches(path, batch_size, in_shard.__getitem__):
          parts.append(_checked(features(x, mask), ids, path).astype(np.float32))
          bar.update(len(ids))
      first += shard.num_records
  rows = np.concatenate(parts).reshape(-1, parts[0].shape[-1])  # (drawn * frames, dim)
  if len(rows) > frames:
    rows = rows[np.sort(rng.choice(len(rows), frames, replace=False))]
  summary = {"records_dir": str(as_path(records_dir).resolve()), "source": description,
             "seed": seed, "records_drawn": drawn, "frames": len(rows), "dim": rows.shape[1]}
  with output_folder(out_dir, overwrite) as staging:
    with (staging / SAMPLE_FILE).open("wb") as file:
      np.save(file, rows)
    write_json_atomic(staging / SAMPLE_MANIFEST, summary)
  return summary


def _units_manifest(records: records_lib.RecordsManifest, records_dir: str | os.PathLike,
                    kmeans_paths: Sequence[str | os.PathLike], models: Sequence[KMeansModel],
                    description: dict[str, Any]) -> units_lib.UnitsManifest:
  for path, model in zip(kmeans_paths, models):
    if model.k > units_lib.MAX_VOCAB:
      raise ValueError(f"k-means model {path} has K = {model.k}; units are stored as int16, so K "
                       f"must be at most {units_lib.MAX_VOCAB}")
  source = {"records_dir": str(as_path(records_dir).resolve()), "features": description,
            "kmeans": [str(p) for p in kmeans_paths],
            "kmeans_sha256": [file_digest(as_path(p)) for p in kmeans_paths]}
  return units_lib.UnitsManifest(records.shards, [m.k for m in models],
                                 num_frames(MODEL_INPUT_LENGTH), source)


def _shard_units(path: AnyPath, features: FeatureFn, models: Sequence[KMeansModel],
                 batch_size: int, done: Callable[[int], Any] = lambda count: None
                 ) -> Iterator[tuple[str, np.ndarray]]:
  """(record id, units (codebooks, frames)) of every record of one records shard, in its order;
  `done` is told each batch's size."""
  for ids, x, mask in _first_window_batches(path, batch_size):
    values = _checked(features(x, mask), ids, path)  # (b, frames, dim)
    for index, model in enumerate(models):
      if values.shape[-1] != model.dim:
        raise ValueError(f"k-means model {index} expects {model.dim}-dim vectors, the features "
                         f"have {values.shape[-1]}: use the features the model was fitted on")
    codes = np.stack([model.predict(values) for model in models], axis=1)  # (b, codebooks, frames)
    yield from zip(ids, codes)
    done(len(ids))


def _use_host_cpu() -> None:
  """Worker processes compute on the host CPU: the accelerators belong to the parent."""
  jax.config.update("jax_platforms", "cpu")


def _write_units_shard(path: AnyPath, target: AnyPath, features: FeatureFn,
                       kmeans_paths: Sequence[str | os.PathLike], batch_size: int) -> int:
  """One units shard, in a worker process."""
  models = [KMeansModel.load(p) for p in kmeans_paths]
  return units_lib.write_units_shard(target, _shard_units(path, features, models, batch_size))


def write_units(records_dir: str | os.PathLike, units_dir: str | os.PathLike, features: FeatureFn,
                description: dict[str, Any], kmeans_paths: Sequence[str | os.PathLike],
                batch_size: int = 32, workers: int = 1, process_index: int = 0,
                process_count: int = 1, show_progress: bool = True) -> units_lib.UnitsManifest:
  """Writes the k-means units of every record of `records_dir` to `units_dir`, one codebook per
  k-means model, each records shard's units in one file (written atomically). Process i of n
  writes shards i, i + n, ...; finished shards are skipped, so a rerun resumes. With `workers` > 1
  shards are written in that many worker processes on the host CPU (`features` must pickle: the
  hand-made ones do; a model's run in this process, on its devices)."""
  if not 0 <= process_index < process_count or batch_size < 1 or workers < 1:
    raise ValueError(f"need 0 <= process_index < process_count, batch_size >= 1 and workers >= 1, "
                     f"found {process_index}, {process_count}, {batch_size}, {workers}")
  with hold_directory(units_dir, take=process_index == 0):  # process 0 holds it for all
    units_dir = as_path(units_dir)
    if not kmeans_paths:
      raise ValueError("at least one k-means model is needed")
    records = records_lib.read_manifest(records_dir)
    paths = records_lib.shard_paths(records_dir, records)
    models = [KMeansModel.load(path) for path in kmeans_paths]
    manifest = _units_manifest(records, records_dir, kmeans_paths, models, description)
    if (units_dir / units_lib.UNITS_MANIFEST).exists():
      previous = units_lib.read_units_manifest(units_dir)
      if previous.to_dict() != manifest.to_dict():
        raise FileExistsError(f"{units_dir} holds units of another job ({previous.source}): "
                              "choose an empty directory")
    else:
      units_lib.write_units_manifest(units_dir, manifest)
    mine = [(path, units_dir / units_lib.units_file_name(shard.file), shard.num_records)
            for path, shard in list(zip(paths, records.shards))[process_index::process_count]]
    with progress_bar(total=sum(count for *_, count in mine), desc="units", unit="ECG",
                      disable=not show_progress) as bar:
      todo = []
      for path, target, count in mine:
        if target.exists():  # finished by an earlier run
          bar.update(count)
        else:
          todo.append((path, target))
      if workers == 1:
        for path, target in todo:
          units_lib.write_units_shard(target, _shard_units(path, features, models, batch_size,
                                                           bar.update))
        return manifest
      context = multiprocessing.get_context("spawn")  # TensorFlow and JAX do not survive a fork
      with concurrent.futures.ProcessPoolExecutor(min(workers, max(len(todo), 1)), context,
                                                  initializer=_use_host_cpu) as pool:
        jobs = [pool.submit(_write_units_shard, path, target, features, kmeans_paths, batch_size)
                for path, target in todo]
        for job in concurrent.futures.as_completed(jobs):
          bar.update(job.result())
  return manifest
