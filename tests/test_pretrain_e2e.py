"""Pre-training end to end, as a user runs it: real and synthetic records -> iteration-1 feature
sample -> k-means -> units -> pretrain -> iteration-2 units from the model's hidden states -> pretrain
again."""
from __future__ import annotations

import re
import shutil

import jax
import numpy as np

from hubert_ecg_jax.cli import main
from hubert_ecg_jax.pretrained import load_pretrained
from hubert_ecg_jax.data.synthetic import write_wfdb_folder

K = 16


def _metric(output: str, prefix: str, name: str) -> float:
  values = re.findall(rf"\[{prefix}\] step \d+:.*?\b{name} ([0-9.]+)", output)
  assert values, f"no {prefix} {name} in the output"
  return float(values[-1])


def _pretrain(workdir, records, units, extra, capsys) -> str:
  capsys.readouterr()
  assert main(["pretrain", "demo_pretrain", str(workdir), f"--config.data.train_dir={records}",
               f"--config.data.train_units={units}", f"--config.data.val_dir={records}",
               f"--config.data.val_units={units}", f"--config.model.vocab_sizes={K}",
               "--config.data.batch_size=16", "--config.train.total_steps=120",
               "--config.train.log_every=40", "--config.train.val_every=120",
               "--config.train.progress=false", *extra]) == 0
  return capsys.readouterr().out


def test_two_iterations_of_pretraining(tmp_path, sample_data_dir, capsys):
  raw = tmp_path / "raw"
  write_wfdb_folder(raw, 34, seed=1)
  for header in sorted(sample_data_dir.glob("*.hea"))[:14]:  # real CinC records beside them
    for part in sample_data_dir.glob(header.stem + ".*"):
      shutil.copy(part, raw / part.name)
  records = tmp_path / "records"
  assert main(["preprocess", str(raw), str(records), "--shards", "2", "--workers", "1", "--quiet"]) == 0

  # Iteration 1: hand-made features, k-means, units, pre-training.
  assert main(["features", str(records), str(tmp_path / "f1"), "--feature-set", "mixed"]) == 0
  assert main(["cluster", "--features", str(tmp_path / "f1"), "--k", str(K), "--out",
               str(tmp_path / "km1")]) == 0
  assert main(["targets", str(records), str(tmp_path / "u1"), "--kmeans",
               str(tmp_path / "km1" / f"kmeans_k{K}.npz"), "--feature-set", "mixed"]) == 0
  out = _pretrain(tmp_path / "it1", records, tmp_path / "u1", [], capsys)
  # Chance is 1/K = 0.0625: the model has learnt to predict masked units from their context.
  assert _metric(out, "train", "masked_accuracy") > 3 / K
  assert _metric(out, "val", "accuracy") > 1.5 / K  # every frame, unmasked, of the same records

  # Iteration 2: hidden states of layer 1 of the iteration-1 model, new units, new label embedding.
  assert main(["features", str(records), str(tmp_path / "f2"), "--model", str(tmp_path / "it1" / "model"),
               "--layer", "1"]) == 0
  assert main(["cluster", "--features", str(tmp_path / "f2"), "--k", str(K), "--out",
               str(tmp_path / "km2")]) == 0
  assert main(["targets", str(records), str(tmp_path / "u2"), "--kmeans",
               str(tmp_path / "km2" / f"kmeans_k{K}.npz"), "--model", str(tmp_path / "it1" / "model"),
               "--layer", "1"]) == 0
  init_from = f"--config.model.init_from={tmp_path / 'it1' / 'model'}"
  out = _pretrain(tmp_path / "it2", records, tmp_path / "u2", [init_from], capsys)
  assert _metric(out, "train", "masked_accuracy") > 3 / K
  # init_from is honoured: one step at the warm-up's learning rate of 0 exports the start, which is
  # the iteration-1 model but for new label embeddings.
  _pretrain(tmp_path / "it2_start", records, tmp_path / "u2",
            [init_from, "--config.train.total_steps=1"], capsys)
  _, previous = load_pretrained(tmp_path / "it1" / "model")
  _, start = load_pretrained(tmp_path / "it2_start" / "model")
  kept = [name for name in previous if not name.startswith("label_embedding")]
  assert "encoder" in kept and "final_proj_0" in kept
  for ours, theirs in zip(jax.tree.leaves({n: start[n] for n in kept}),
                          jax.tree.leaves({n: previous[n] for n in kept})):
    np.testing.assert_array_equal(ours, theirs)
  assert not np.allclose(start["label_embedding_0"]["embedding"],
                         previous["label_embedding_0"]["embedding"])
