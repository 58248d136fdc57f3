"""Feature dumping (hand-made and hidden states) and k-means units written into the records."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hubert_ecg_jax import HubertECG, HubertECGConfig
from hubert_ecg_jax.cli import main as cli_main
from hubert_ecg_jax.data import records as records_lib
from hubert_ecg_jax.data.preprocess import crop_window, model_inputs
from hubert_ecg_jax.model_dir import save_model
from hubert_ecg_jax.targets.features import frame_features
from hubert_ecg_jax.targets.kmeans import KMeansModel


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory, sample_data_dir):
  out = tmp_path_factory.mktemp("records")
  assert cli_main(["preprocess", str(sample_data_dir), str(out / "rec"), "--shards", "2",
                   "--workers", "1"]) == 0
  return out / "rec"


def _first_windows(records_dir):
  stored = list(records_lib.iterate_records(records_dir))
  x, mask = model_inputs(np.stack([crop_window(r.signal, 0) for r in stored]))
  return [r.record_id for r in stored], x, mask


def test_handmade_features_resume_and_targets(records_dir, tmp_path):
  feats = tmp_path / "feats"
  assert cli_main(["features", str(records_dir), str(feats), "--feature-set", "stats",
                   "--batch-size", "7"]) == 0
  arrays = sorted(feats.glob("*.npy"))
  assert len(arrays) == 2
  ids, x, _ = _first_windows(records_dir)
  dumped_ids = sum((json.loads(p.with_name(p.stem + ".ids.json").read_text()) for p in arrays), [])
  dumped = np.concatenate([np.load(p) for p in arrays])
  order = [dumped_ids.index(i) for i in ids]
  np.testing.assert_allclose(dumped[order], frame_features(x, "stats"), rtol=1e-6, atol=1e-6)
  # A rerun finds every shard finished and rewrites nothing.
  mtimes = [p.stat().st_mtime_ns for p in arrays]
  assert cli_main(["features", str(records_dir), str(feats), "--feature-set", "stats"]) == 0
  assert [p.stat().st_mtime_ns for p in arrays] == mtimes
  # Another job into the same folder is refused.
  assert cli_main(["features", str(records_dir), str(feats), "--feature-set", "mfcc"]) == 1

  assert cli_main(["cluster", "--features", str(feats), "--k", "8", "--out", str(tmp_path / "km")]) == 0
  kmeans_path = tmp_path / "km" / "kmeans_k8.npz"
  assert cli_main(["targets", str(records_dir), str(feats), str(tmp_path / "with_targets"),
                   "--kmeans", str(kmeans_path), str(kmeans_path)]) == 0
  model = KMeansModel.load(kmeans_path)
  expected = dict(zip(dumped_ids, model.predict(dumped)))
  stored = list(records_lib.iterate_records(tmp_path / "with_targets"))
  assert len(stored) == len(ids)
  for record in stored:
    assert record.targets.shape == (2, 93)
    np.testing.assert_array_equal(record.targets[0], expected[record.record_id])
  manifest = records_lib.read_manifest(tmp_path / "with_targets")
  assert manifest.targets_info["vocab_sizes"] == [8, 8]


def test_hidden_state_features_equal_the_model(records_dir, tmp_path):
  config = HubertECGConfig.preset("tiny")
  model = HubertECG(config)
  params = model.init({"params": jax.random.key(3)}, jnp.zeros((1, 6000)))["params"]
  save_model(tmp_path / "model", config, params)
  feats = tmp_path / "hidden"
  assert cli_main(["features", str(records_dir), str(feats), "--model", str(tmp_path / "model"),
                   "--layer", "1", "--batch-size", "8"]) == 0
  ids, x, mask = _first_windows(records_dir)
  expected = model.apply({"params": params}, jnp.asarray(x), attention_mask=jnp.asarray(mask),
                         output_hidden_states=True).hidden_states[1]
  dumped_ids, dumped = [], []
  for path in sorted(feats.glob("*.npy")):
    dumped_ids += json.loads(path.with_name(path.stem + ".ids.json").read_text())
    dumped.append(np.load(path))
  dumped = np.concatenate(dumped)[[dumped_ids.index(i) for i in ids]]
  np.testing.assert_allclose(dumped, np.asarray(expected), atol=1e-5)
  assert cli_main(["features", str(records_dir), str(tmp_path / "bad"), "--model",
                   str(tmp_path / "model"), "--layer", "9"]) == 1
  # bf16 products: close to float32, and the same OUT refuses to resume with another dtype.
  bf16 = tmp_path / "hidden_bf16"
  assert cli_main(["features", str(records_dir), str(bf16), "--model", str(tmp_path / "model"),
                   "--layer", "1", "--compute-dtype", "bfloat16"]) == 0
  dumped_bf16 = np.concatenate([np.load(path) for path in sorted(bf16.glob("*.npy"))])
  dumped_f32 = np.concatenate([np.load(path) for path in sorted(feats.glob("*.npy"))])
  relative = np.linalg.norm(dumped_bf16 - dumped_f32) / np.linalg.norm(dumped_f32)
  assert 0 < relative < 2e-2, relative
  assert cli_main(["features", str(records_dir), str(bf16), "--model", str(tmp_path / "model"),
                   "--layer", "1"]) == 1
  assert cli_main(["features", str(records_dir), str(tmp_path / "mixed"), "--feature-set", "mixed",
                   "--compute-dtype", "bfloat16"]) == 1
