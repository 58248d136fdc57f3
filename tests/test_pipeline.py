"""Streaming pipeline: determinism, exact resume, host split, aligned crops, units and masks."""
from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from hubert_ecg_jax.data import pipeline as P
from hubert_ecg_jax.data import records as R
from hubert_ecg_jax.data import units as U
from hubert_ecg_jax.data.preprocess import crop_offsets, crop_window, model_inputs
from hubert_ecg_jax.data.synthetic import write_units

NUM_RECORDS = 23
LENGTHS = [2500, 5000, 1800, 7321, 4999, 2501, 12000]  # includes one shorter than a window


def _records() -> list[R.StoredRecord]:
  rng = np.random.default_rng(0)
  out = []
  for i in range(NUM_RECORDS):
    n = LENGTHS[i % len(LENGTHS)]
    t = np.arange(n) / 500.0
    signal = (np.sin(2 * np.pi * (1 + i % 5) * t)[None, :] * rng.uniform(0.2, 1, (12, 1))
              + 0.05 * rng.standard_normal((12, n))).astype(np.float32)
    out.append(R.StoredRecord(
        record_id=f"r{i:02d}", source=f"r{i:02d}.hea", signal=signal,
        labels=np.eye(4, dtype=np.float32)[i % 4], source_fs=500.0))
  return out


def _units(record_id: str) -> np.ndarray:
  """(2, 93) units of a record, different for every record."""
  return np.random.default_rng(int(record_id[1:])).integers(0, 100, (2, 93)).astype(np.int32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  R.write_records(root / "five", _records(), list("abcd"), num_shards=5)
  R.write_records(root / "one", _records(), list("abcd"), num_shards=1)
  write_units(root / "five", root / "five_units", _units, [100, 100])
  return root, {r.record_id: r for r in _records()}


def _config(**changes) -> P.PipelineConfig:
  values = dict(batch_size=4, seed=7, shuffle_buffer=8, process_index=0, process_count=1)
  values.update(changes)
  return P.PipelineConfig(**values)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_same_seed_same_batches_other_seed_other_batches(data):
  root, _ = data
  first = _take(P.make_train_iterator(root / "five", _config()), 8)
  again = _take(P.make_train_iterator(root / "five", _config()), 8)
  _assert_batches_equal(first, again)
  other = _take(P.make_train_iterator(root / "five", _config(seed=8)), 8)
  assert any((a["record_id"] != b["record_id"]).any() or (a["crop_offset"] != b["crop_offset"]).any()
             for a, b in zip(first, other))


@pytest.mark.parametrize("with_units", [False, True])
def test_restore_mid_epoch_continues_exactly(data, tmp_path, with_units):
  root, _ = data
  config = _config(train_crop="first" if with_units else "random")
  units = root / "five_units" if with_units else None
  uninterrupted = P.make_train_iterator(root / "five", config, units)
  _take(uninterrupted, 3)  # 12 of 23 windows: mid-epoch, with a partly full shuffle buffer
  prefix = uninterrupted.save(tmp_path / "state")
  expected = _take(uninterrupted, 6)  # crosses into the next epoch
  resumed = P.make_train_iterator(root / "five", config, units)
  resumed.restore(prefix)
  _assert_batches_equal(_take(resumed, 6), expected)
  with pytest.raises(FileNotFoundError, match="no iterator state"):
    resumed.restore(tmp_path / "absent")
  import tensorflow as tf
  other = iter(tf.data.Dataset.range(10).batch(2))  # the state of another dataset graph
  other_prefix = tf.train.Checkpoint(iterator=other).write(str(tmp_path / "other"))
  with pytest.raises(P.DataPositionMismatch, match="saved by another input pipeline"):
    resumed.restore(other_prefix)


def _host_epoch(directory, host, hosts, num_records):
  """Record ids of the first training epoch of one host (batch size 1: nothing dropped)."""
  iterator = P.make_train_iterator(directory, _config(batch_size=1, process_index=host,
                                                      process_count=hosts))
  return [str(next(iterator)["record_id"][0]) for _ in range(num_records)]


@pytest.mark.parametrize("shards", ["five", "one"])  # file split, and record split (fewer files)
def test_two_hosts_see_every_record_once_per_epoch(data, shards):
  root, records = data
  manifest = R.read_manifest(root / shards)
  counts = [s.num_records for s in manifest.shards]
  per_host = [sum(counts[0::2]), sum(counts[1::2])] if shards == "five" else [12, 11]
  seen = []
  for host in (0, 1):
    epoch = _host_epoch(root / shards, host, 2, per_host[host])
    assert len(set(epoch)) == len(epoch)  # no repeats within a host's epoch
    seen += epoch
  assert collections.Counter(seen) == collections.Counter(list(records))
  evaluated = []
  for host in (0, 1):
    iterator = P.make_eval_iterator(root / shards, _config(process_index=host, process_count=2))
    evaluated += [str(i) for batch in iterator for i in batch["record_id"]]
  assert collections.Counter(evaluated) == collections.Counter(list(records))


def _expected_inputs(records, batch):
  windows = np.stack([crop_window(records[i].signal, int(o))
                      for i, o in zip(batch["record_id"], batch["crop_offset"])])
  return model_inputs(windows)


def test_training_crops_are_aligned_random_windows(data):
  root, records = data
  iterator = P.make_train_iterator(root / "five", _config())
  offsets = collections.defaultdict(set)
  for batch in _take(iterator, 12):
    assert batch["x"].shape == (4, 6000) and batch["x"].dtype == np.float32
    assert batch["attention_mask"].shape == (4, 6000) and batch["attention_mask"].dtype == np.int32
    assert batch["labels"].shape == (4, 4) and "mask_time_indices" not in batch
    x, mask = _expected_inputs(records, batch)
    np.testing.assert_array_equal(batch["x"], x)  # bit for bit the reference online stage
    np.testing.assert_array_equal(batch["attention_mask"], mask)
    for record_id, offset, labels in zip(batch["record_id"], batch["crop_offset"], batch["labels"]):
      n = records[record_id].signal.shape[1]
      assert 0 <= offset <= max(n - 2500, 0)
      np.testing.assert_array_equal(labels, records[record_id].labels)
      offsets[n].add(int(offset))
  assert offsets[1800] == {0} and len(offsets[12000]) > 1  # short records: offset 0, padded
  short = [b for b in _take(iterator, 12) if "r02" in b["record_id"]][0]
  row = list(short["record_id"]).index("r02")
  assert short["attention_mask"][row].reshape(12, 500)[:, 360:].sum() == 0


@pytest.mark.parametrize("mode", ["first", "tta", "random"])
def test_eval_crops_are_time_aligned(data, mode):
  root, records = data
  crops = 1 if mode == "first" else 3
  config = _config(batch_size=5, eval_crop=mode, eval_crops=crops)
  batches = list(P.make_eval_iterator(root / "five", config))
  assert [len(b["record_id"]) for b in batches] == [5] * 13 + [4] if crops == 3 else [5] * 4 + [3]
  seen = collections.defaultdict(list)
  for batch in batches:
    x, mask = _expected_inputs(records, batch)  # one offset for all 12 leads of a window
    np.testing.assert_array_equal(batch["x"], x)  # bit for bit the reference online stage
    np.testing.assert_array_equal(batch["attention_mask"], mask)
    for record_id, index, offset in zip(batch["record_id"], batch["crop_index"], batch["crop_offset"]):
      seen[record_id].append((int(index), int(offset)))
  assert sorted(seen) == sorted(records)
  for record_id, pairs in seen.items():
    n = records[record_id].signal.shape[1]
    assert [i for i, _ in pairs] == list(range(crops))
    offsets = [o for _, o in pairs]
    if mode == "random":
      assert all(0 <= o <= max(n - 2500, 0) for o in offsets)
    else:
      np.testing.assert_array_equal(offsets, crop_offsets(n, mode, n_crops=crops))
  again = list(P.make_eval_iterator(root / "five", config))
  _assert_batches_equal(batches, again)


def test_pretraining_batches_carry_units_and_masks(data):
  root, records = data
  config = _config(batch_size=6, train_crop="first")
  batch = next(P.make_train_iterator(root / "five", config, root / "five_units"))
  assert batch["targets"].shape == (6, 2, 93) and batch["targets"].dtype == np.int32
  assert batch["mask_time_indices"].shape == (6, 93) and batch["mask_time_indices"].dtype == np.bool_
  assert (batch["crop_offset"] == 0).all()
  for record_id, targets, masks, attention in zip(batch["record_id"], batch["targets"],
                                                  batch["mask_time_indices"], batch["attention_mask"]):
    np.testing.assert_array_equal(targets, _units(record_id))
    if attention.all():
      assert masks.sum() in (30, 31)
    else:  # a padded record: no masks on padding frames
      valid = config.model_config.num_frames(int(attention.sum()))
      assert not masks[valid:].any()
  evaluation = next(P.make_eval_iterator(root / "five", dataclasses.replace(config, batch_size=3),
                                         root / "five_units"))
  assert evaluation["targets"].shape == (3, 2, 93) and "mask_time_indices" not in evaluation
  for record_id, targets in zip(evaluation["record_id"], evaluation["targets"]):
    np.testing.assert_array_equal(targets, _units(record_id))


def test_units_of_other_records_are_refused(data, tmp_path):
  root, _ = data
  config = _config(train_crop="first")
  with pytest.raises(ValueError, match="were made for other records"):
    P.make_train_iterator(root / "one", config, root / "five_units")
  with pytest.raises(ValueError, match="units belong to the first 5 s"):
    P.make_train_iterator(root / "five", _config(), root / "five_units")
  with pytest.raises(FileNotFoundError, match="expected a units directory"):
    P.make_train_iterator(root / "five", config, root / "five")
  # Same shard names and counts, other records: refused at the first element, not trained on.
  other = [dataclasses.replace(r, record_id=r.record_id + "x") for r in _records()]
  R.write_records(tmp_path / "other", other, list("abcd"), num_shards=5)
  write_units(tmp_path / "other", tmp_path / "other_units", lambda i: _units(i[:-1]), [100, 100])
  with pytest.raises(Exception, match="out of step with its records shard"):
    next(P.make_train_iterator(root / "five", config, tmp_path / "other_units"))
  # A units shard missing (an unfinished `targets`): refused with what to do.
  (tmp_path / "partial").mkdir()
  for path in (root / "five_units").iterdir():
    if path.name != U.units_file_name("records-00002-of-00005.tfrecord"):
      (tmp_path / "partial" / path.name).write_bytes(path.read_bytes())
  with pytest.raises(FileNotFoundError, match="unfinished: 1 of 5 units shards missing"):
    P.make_train_iterator(root / "five", config, tmp_path / "partial")


def test_bad_configurations_are_refused(data):
  root, _ = data
  with pytest.raises(ValueError, match="eval_crops must be 1 for 'first'"):
    _config(eval_crops=2)
  with pytest.raises(ValueError, match="process_index must be in 0..1"):
    P.make_eval_iterator(root / "one", _config(process_index=2, process_count=2))
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    P.make_eval_iterator(root, _config())
  R.write_records(root / "single", _records()[:1], list("abcd"))
  with pytest.raises(ValueError, match="host 1 of 2 gets no records"):
    P.make_train_iterator(root / "single", _config(process_index=1, process_count=2))
  with pytest.raises(ValueError, match="seed must be non-negative"):
    _config(seed=-1)


def test_benchmark_program_runs(capsys):
  import importlib.util
  import json
  import pathlib

  path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_pipeline.py"
  spec = importlib.util.spec_from_file_location("bench_pipeline", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  assert bench.main(["--records", "24", "--unique", "3", "--shards", "2", "--batch-size", "8",
                     "--batches", "2", "--warmup", "1", "--cores", "1", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert [row["path"] for row in report["rows"]][:3] == [
      "pretrain (full pipeline)", "finetune (full pipeline)", "windows only (no online)"]
  assert all(row["ecg_per_cpu_s"] > 0 for row in report["rows"])


# The batches of the reading before damaged shards were detected (commit ad3f04e), with cycle_length
# 2 so that shard files end and others open mid-stream: detecting damage must not change them.
_BEFORE_TRAIN_IDS = [
    "r03 r00 r02 r18", "r19 r04 r06 r11", "r07 r05 r21 r22", "r20 r10 r09 r17", "r14 r12 r13 r16",
    "r15 r01 r08 r13", "r16 r11 r15 r09", "r17 r18 r06 r10", "r05 r07 r21 r20", "r14 r19 r12 r02",
    "r22 r00 r08 r03", "r04 r01 r04 r00"]
_BEFORE_TRAIN_OFFSETS = [
    [4632, 0, 0, 1074], [0, 107, 9270, 917], [0, 0, 0, 1971], [2446, 4355, 0, 2998], [0, 0, 1569, 0],
    [2181, 1596, 1072, 3525], [0, 48, 2118, 0], [566, 1908, 547, 2324], [1, 0, 0, 3258],
    [0, 1, 1, 0], [1, 0, 1350, 337], [711, 1328, 569, 0]]
_BEFORE_MASKS_SHA256 = "47811eedb91850ad"  # of the packed span masks of the 12 pre-training batches
_BEFORE_EVAL_IDS = ["r00 r04 r01 r05 r02", "r06 r03 r07 r08 r09", "r10 r13 r11 r14 r12",
                    "r15 r16 r18 r17 r19", "r20 r21 r22"]


@pytest.mark.parametrize("skip", [False, True])
def test_sound_shards_give_the_batches_of_the_reading_before_damage_detection(data, skip):
  import hashlib

  root, _ = data
  config = _config(cycle_length=2, skip_corrupted=skip)
  batches = _take(P.make_train_iterator(root / "five", config), 12)
  assert [" ".join(b["record_id"]) for b in batches] == _BEFORE_TRAIN_IDS
  assert [b["crop_offset"].tolist() for b in batches] == _BEFORE_TRAIN_OFFSETS
  assert all(b.get(P.SKIPPED, 0) == 0 and (P.SKIPPED in b) == skip for b in batches)
  units = P.make_train_iterator(root / "five", dataclasses.replace(config, train_crop="first"),
                                root / "five_units")
  masks = hashlib.sha256()
  for expected in _BEFORE_TRAIN_IDS:
    batch = next(units)
    assert " ".join(batch["record_id"]) == expected
    masks.update(np.packbits(batch["mask_time_indices"]).tobytes())
  assert masks.hexdigest()[:16] == _BEFORE_MASKS_SHA256
  evaluation = P.make_eval_iterator(root / "five", _config(cycle_length=2, batch_size=5))
  assert [" ".join(b["record_id"]) for b in evaluation] == _BEFORE_EVAL_IDS
