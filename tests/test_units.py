"""The k-means targets' offline passes: a reproducible feature sample, and units streamed from the
records equal, bit for bit, features of all records assigned at once."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hubert_ecg_jax import HubertECG, HubertECGConfig
from hubert_ecg_jax.cli import main as cli_main
from hubert_ecg_jax.data import records as records_lib
from hubert_ecg_jax.data import units as units_lib
from hubert_ecg_jax.data.preprocess import crop_window, model_inputs
from hubert_ecg_jax.model_dir import save_model
from hubert_ecg_jax.targets.features import frame_features
from hubert_ecg_jax.targets.kmeans import KMeansModel
from hubert_ecg_jax.targets.stream import handmade_features, write_units


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory, sample_data_dir):
  out = tmp_path_factory.mktemp("records")
  assert cli_main(["preprocess", str(sample_data_dir), str(out / "rec"), "--shards", "3",
                   "--workers", "1", "--quiet"]) == 0
  return out / "rec"


@pytest.fixture(scope="module")
def kmeans(records_dir, tmp_path_factory):
  """Two k-means models fitted on a sample of "stats" features (two codebooks)."""
  out = tmp_path_factory.mktemp("kmeans")
  assert cli_main(["features", str(records_dir), str(out / "sample"), "--feature-set", "stats",
                   "--quiet"]) == 0
  for k, seed in ((8, 0), (5, 1)):
    assert cli_main(["cluster", "--features", str(out / "sample"), "--k", str(k), "--seed", str(seed),
                     "--out", str(out / f"k{k}")]) == 0
  return [out / "k8" / "kmeans_k8.npz", out / "k5" / "kmeans_k5.npz"]


def _first_windows(records_dir):
  """Record ids, x and attention mask of every record's first 5 s, in directory order."""
  stored = list(records_lib.iterate_records(records_dir))
  x, mask = model_inputs(np.stack([crop_window(r.signal, 0) for r in stored]))
  return [r.record_id for r in stored], x, mask


def _read_units(units_dir, shape):
  """record id -> units, from every units shard."""
  units = {}
  for path in sorted(units_dir.glob("units-*.tfrecord")):
    for serialized in records_lib.iterate_shard(path):
      record_id, values = units_lib.decode_units(serialized, shape)
      units[record_id] = values
  return units


def test_streamed_units_equal_all_features_assigned_at_once(records_dir, kmeans, tmp_path):
  units_dir = tmp_path / "units"
  assert cli_main(["targets", str(records_dir), str(units_dir), "--kmeans", *map(str, kmeans),
                   "--feature-set", "stats", "--batch-size", "7", "--quiet"]) == 0
  ids, x, _ = _first_windows(records_dir)
  features = frame_features(x, "stats")  # (30, 93, 16): the whole directory at once
  models = [KMeansModel.load(path) for path in kmeans]
  expected = np.stack([model.predict(features) for model in models], axis=1)  # (30, 2, 93)
  units = _read_units(units_dir, (2, 93))
  assert list(units) == ids  # every record, in the records' order
  np.testing.assert_array_equal(np.stack([units[i] for i in ids]), expected)
  manifest = units_lib.read_units_manifest(units_dir)
  assert manifest.vocab_sizes == [8, 5] and manifest.frames == 93 and manifest.num_records == 30
  assert manifest.source["features"] == {"kind": "handmade", "feature_set": "stats"}
  # Disk: the units only, a few hundred bytes per ECG (the records are not copied).
  written = sum(p.stat().st_size for p in units_dir.iterdir())
  assert written / 30 < 1024, written
  assert cli_main(["verify", str(units_dir), "--quiet"]) == 0

  # A rerun finds every shard finished and rewrites nothing; another job is refused.
  mtimes = {p.name: p.stat().st_mtime_ns for p in units_dir.iterdir()}
  assert cli_main(["targets", str(records_dir), str(units_dir), "--kmeans", *map(str, kmeans),
                   "--feature-set", "stats", "--quiet"]) == 0
  assert {p.name: p.stat().st_mtime_ns for p in units_dir.iterdir()} == mtimes
  assert cli_main(["targets", str(records_dir), str(units_dir), "--kmeans", str(kmeans[0]),
                   "--feature-set", "stats", "--quiet"]) == 1


def test_hosts_write_their_own_shards_and_a_stopped_pass_resumes(records_dir, kmeans, tmp_path):
  features, description = handmade_features("stats")
  write_units(records_dir, tmp_path / "one", features, description, kmeans[:1], show_progress=False)
  single = {p.name: p.read_bytes() for p in (tmp_path / "one").glob("units-*")}
  assert len(single) == 3
  # Two hosts: shards 0 and 2 for host 0, shard 1 for host 1; together the same bytes.
  write_units(records_dir, tmp_path / "two", features, description, kmeans[:1], process_index=1,
              process_count=2, show_progress=False)
  assert [p.name for p in (tmp_path / "two").glob("units-*")] == ["units-00001-of-00003.tfrecord"]
  write_units(records_dir, tmp_path / "two", features, description, kmeans[:1], process_index=0,
              process_count=2, show_progress=False)
  assert {p.name: p.read_bytes() for p in (tmp_path / "two").glob("units-*")} == single

  # A pass stopped in its second shard: the first stays, the second leaves nothing; a rerun
  # writes the rest and the result is the same bytes.
  calls = []

  def stopping(x, mask):
    calls.append(len(x))
    if len(calls) == 3:
      raise KeyboardInterrupt
    return features(x, mask)

  with pytest.raises(KeyboardInterrupt):
    write_units(records_dir, tmp_path / "stopped", stopping, description, kmeans[:1], batch_size=5,
                show_progress=False)
  assert [p.name for p in (tmp_path / "stopped").glob("*units-*")] == ["units-00000-of-00003.tfrecord"]
  write_units(records_dir, tmp_path / "stopped", features, description, kmeans[:1],
              show_progress=False)
  assert {p.name: p.read_bytes() for p in (tmp_path / "stopped").glob("units-*")} == single


def test_feature_sample_is_reproducible_and_drawn_from_the_records(records_dir, tmp_path):
  argv = ["features", str(records_dir), "", "--feature-set", "mixed", "--frames", "500", "--quiet"]
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    argv[2] = str(tmp_path / name)
    assert cli_main(argv + ["--seed", str(seed)]) == 0
  sample = np.load(tmp_path / "a" / "sample.npy")
  assert sample.shape == (500, 29) and sample.dtype == np.float32
  np.testing.assert_array_equal(np.load(tmp_path / "b" / "sample.npy"), sample)
  assert not np.array_equal(np.load(tmp_path / "c" / "sample.npy"), sample)
  summary = json.loads((tmp_path / "a" / "features.json").read_text())
  assert summary["records_drawn"] == 6 and summary["frames"] == 500  # ceil(500 / 93) records
  _, x, _ = _first_windows(records_dir)
  every_frame = frame_features(x, "mixed").reshape(-1, 29)
  rows = {row.tobytes() for row in every_frame}
  assert all(row.tobytes() in rows for row in sample)  # rows of real records' frames
  assert cli_main(argv[:3] + ["--feature-set", "mixed", "--quiet"]) == 1  # OUT exists: refused
  assert cli_main(argv[:3] + ["--feature-set", "mixed", "--quiet", "--overwrite"]) == 0
  assert np.load(tmp_path / "c" / "sample.npy").shape == (30 * 93, 29)  # all frames: fewer than asked


def test_hidden_state_features_and_units_from_a_model(records_dir, tmp_path):
  config = HubertECGConfig.preset("tiny")
  model = HubertECG(config)
  params = model.init({"params": jax.random.key(3)}, jnp.zeros((1, 6000)))["params"]
  save_model(tmp_path / "model", config, params)
  assert cli_main(["features", str(records_dir), str(tmp_path / "hidden"), "--model",
                   str(tmp_path / "model"), "--layer", "1", "--frames", "10000", "--quiet"]) == 0
  _, x, mask = _first_windows(records_dir)
  expected = model.apply({"params": params}, jnp.asarray(x), attention_mask=jnp.asarray(mask),
                         output_hidden_states=True).hidden_states[1]  # (30, 93, 32)
  sample = np.load(tmp_path / "hidden" / "sample.npy")  # every frame (10000 > 30 x 93), in order
  np.testing.assert_allclose(sample, np.asarray(expected).reshape(-1, 32), atol=1e-5)
  assert cli_main(["cluster", "--features", str(tmp_path / "hidden"), "--k", "6", "--out",
                   str(tmp_path / "km")]) == 0
  assert cli_main(["targets", str(records_dir), str(tmp_path / "units"), "--kmeans",
                   str(tmp_path / "km" / "kmeans_k6.npz"), "--model", str(tmp_path / "model"),
                   "--layer", "1", "--quiet"]) == 0
  units = _read_units(tmp_path / "units", (1, 93))
  assert len(units) == 30 and all(0 <= u.min() and u.max() < 6 for u in units.values())
  assert cli_main(["features", str(records_dir), str(tmp_path / "bad"), "--model",
                   str(tmp_path / "model"), "--layer", "9"]) == 1
  # bf16 products: close to float32.
  assert cli_main(["features", str(records_dir), str(tmp_path / "bf16"), "--model",
                   str(tmp_path / "model"), "--layer", "1", "--frames", "10000",
                   "--compute-dtype", "bfloat16", "--quiet"]) == 0
  bf16 = np.load(tmp_path / "bf16" / "sample.npy")
  relative = np.linalg.norm(bf16 - sample) / np.linalg.norm(sample)  # the same draw of rows
  assert 0 < relative < 1e-2, relative
  assert cli_main(["features", str(records_dir), str(tmp_path / "mixed"), "--feature-set", "mixed",
                   "--compute-dtype", "bfloat16"]) == 1
