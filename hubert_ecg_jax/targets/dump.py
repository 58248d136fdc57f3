"""Frame features of every record, dumped per shard; k-means units written back into the records.

More in docs/modules.md."""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hubert_ecg_jax.data import records as records_lib
from hubert_ecg_jax.data.preprocess import crop_window, model_inputs
from hubert_ecg_jax.files import atomic_path, write_json_atomic
from hubert_ecg_jax.layers import cast_kernels
from hubert_ecg_jax.model import HubertECG
from hubert_ecg_jax.pretrained import load_pretrained
from hubert_ecg_jax.progress import progress_bar
from hubert_ecg_jax.run_lock import holds_directory
from hubert_ecg_jax.targets.features import FEATURE_SETS, frame_features
from hubert_ecg_jax.targets.kmeans import KMeansModel

FEATURES_MANIFEST = "features.json"
FrameFeatureFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # x, attention_mask -> (b, frames, d)


def handmade_features(feature_set: str) -> tuple[FrameFeatureFn, dict[str, Any]]:
  """Iteration-1 features: "stats" (16), "mfcc" (39) or "mixed" (29) per frame."""
  if feature_set not in FEATURE_SETS:
    raise ValueError(f"feature set must be one of {FEATURE_SETS}, found {feature_set!r}")
  return (lambda x, mask: frame_features(x, feature_set)), {"kind": "handmade",
                                                            "feature_set": feature_set}


def hidden_state_features(model_path: str | os.PathLike, layer: int,
                          compute_dtype: str | None = None
                          ) -> tuple[FrameFeatureFn, dict[str, Any]]:
  """Iteration-n features: `hidden_states[layer]` of a model (0 = encoder input, L = last layer),
  computed in `compute_dtype` (None: the model config's)."""
  config, params = load_pretrained(model_path, compute_dtype)
  if compute_dtype is not None:
    params = cast_kernels(params, compute_dtype)  # once, not on every call
  if not 0 <= layer <= config.num_hidden_layers:
    raise ValueError(f"layer must be in 0..{config.num_hidden_layers} for this "
                     f"{config.num_hidden_layers}-layer model, found {layer}")
  model = HubertECG(config)

  @jax.jit
  def forward(x, mask):
    out = model.apply({"params": params}, x, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[layer]

  def features(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(forward(jnp.asarray(x), jnp.asarray(mask)), np.float32)

  return features, {"kind": "hidden_states", "model": str(model_path), "layer": layer,
                    "hidden_size": config.hidden_size, "compute_dtype": config.compute_dtype}


def _first_window_batches(shard: pathlib.Path, batch_size: int
                          ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
  ids: list[str] = []
  windows: list[np.ndarray] = []
  for serialized in records_lib.iterate_shard(shard):
    record = records_lib.decode_example(serialized)
    ids.append(record.record_id)
    windows.append(crop_window(record.signal, 0))
    if len(ids) == batch_size:
      yield ids, *model_inputs(np.stack(windows))
      ids, windows = [], []
  if ids:
    yield ids, *model_inputs(np.stack(windows))


def _pad_batch(array: np.ndarray, size: int) -> np.ndarray:
  """Pads the batch axis to `size` by repeating the last row, so a jitted model compiles once."""
  if len(array) == size:
    return array
  return np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)])


@holds_directory("out_dir")
def dump_features(records_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  features: FrameFeatureFn, description: dict[str, Any], batch_size: int = 32,
                  show_progress: bool = True) -> dict[str, Any]:
  """Writes the features of every record, shard by shard (resumable). Returns the manifest."""
  records_dir, out_dir = pathlib.Path(records_dir), pathlib.Path(out_dir)
  manifest = records_lib.read_manifest(records_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  manifest_path = out_dir / FEATURES_MANIFEST
  summary = {"records_dir": str(records_dir.resolve()), "source": description,
             "num_records": manifest.num_records}
  if manifest_path.exists():
    previous = json.loads(manifest_path.read_text())
    if previous.get("source") != description or previous.get("records_dir") != summary["records_dir"]:
      raise FileExistsError(f"{out_dir} holds features of another job ({previous.get('source')} of "
                            f"{previous.get('records_dir')}): choose an empty directory")
  write_json_atomic(manifest_path, summary)
  progress = progress_bar(total=manifest.num_records, desc="features", unit="ECG", disable=not show_progress)
  for shard in records_lib.shard_paths(records_dir, manifest):
    array_path, ids_path = out_dir / f"{shard.stem}.npy", out_dir / f"{shard.stem}.ids.json"
    if array_path.exists() and ids_path.exists():  # finished by an earlier run
      progress.update(len(json.loads(ids_path.read_text())))
      continue
    shard_ids: list[str] = []
    parts: list[np.ndarray] = []
    for ids, x, mask in _first_window_batches(shard, batch_size):
      values = features(_pad_batch(x, batch_size), _pad_batch(mask, batch_size))[:len(ids)]
      if not np.all(np.isfinite(values)):
        raise ValueError(f"non-finite features for records {ids} of {shard}")
      parts.append(values.astype(np.float32))
      shard_ids.extend(ids)
      progress.update(len(ids))
    with atomic_path(array_path) as staging:
      np.save(staging, np.concatenate(parts) if parts else np.zeros((0, 0, 0), np.float32))
    write_json_atomic(ids_path, shard_ids)
  progress.close()
  dims = {np.load(p, mmap_mode="r").shape[-1] for p in out_dir.glob("*.npy")}
  summary["dim"] = int(dims.pop()) if len(dims) == 1 else None
  write_json_atomic(manifest_path, summary)
  return summary


def feature_files(features_dir: str | os.PathLike) -> list[pathlib.Path]:
  features_dir = pathlib.Path(features_dir)
  if not (features_dir / FEATURES_MANIFEST).is_file():
    raise FileNotFoundError(f"{features_dir} is not a features directory (no {FEATURES_MANIFEST}); "
                            "write one with `hubert-ecg-jax features`")
  return sorted(p for p in features_dir.glob("*.npy") if not p.name.startswith("."))  # no staging


def assign_units(features_dir: str | os.PathLike, models: Sequence[Any]) -> dict[str, np.ndarray]:
  """record_id -> int32 (codebooks, frames): each k-means model's nearest centre per frame."""
  if not models:
    raise ValueError("at least one k-means model is needed")
  units: dict[str, np.ndarray] = {}
  for array_path in feature_files(features_dir):
    ids = json.loads(array_path.with_name(array_path.stem + ".ids.json").read_text())
    features = np.load(array_path)  # (records, frames, dim)
    for index, model in enumerate(models):
      if features.shape[-1] != model.dim:
        raise ValueError(f"k-means model {index} expects {model.dim}-dim vectors, the features in "
                         f"{array_path} have {features.shape[-1]}")
    codes = np.stack([model.predict(features) for model in models], axis=1)  # (records, C, frames)
    units.update(zip(ids, codes.astype(np.int32)))
  return units


@holds_directory("out_dir")
def write_targets(records_dir: str | os.PathLike, features_dir: str | os.PathLike,
                  kmeans_paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  show_progress: bool = True) -> records_lib.RecordsManifest:
  """Copies `records_dir` to `out_dir` with each record's k-means units as its pretraining targets.

  One codebook per k-means model; the manifest's `targets_info["vocab_sizes"]` gives their K.
  """

  models = [KMeansModel.load(path) for path in kmeans_paths]
  units = assign_units(features_dir, models)
  source = json.loads((pathlib.Path(features_dir) / FEATURES_MANIFEST).read_text())
  info = {"features": source["source"], "kmeans": [str(p) for p in kmeans_paths],
          "vocab_sizes": [model.k for model in models]}
  return records_lib.rewrite_with_targets(records_dir, out_dir, units, targets_info=info,
                                          show_progress=show_progress)
