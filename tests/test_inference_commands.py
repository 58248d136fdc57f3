"""finetune -> evaluate -> predict -> embed through the console command on the real CinC 2021 records
(labels from their `# Dx:` SNOMED codes), with a tiny model; outputs checked for completeness."""
from __future__ import annotations

import csv
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib import image as mpimg

from hubert_ecg_jax import cli
from hubert_ecg_jax.classifier import masked_mean
from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.data.preprocess import prepare_record, crop_window, model_input
from hubert_ecg_jax.data.readers import read_record
from hubert_ecg_jax.inference import embedding_fn, load_backbone, load_classifier
from hubert_ecg_jax.model import HubertECG
from hubert_ecg_jax.model_dir import load_model, save_model
from hubert_ecg_jax.parallel import BatchRunner

SPLITS = {0: "val", 1: "test"}  # record index % 5 -> split; the rest train


@pytest.fixture(scope="module")
def run(sample_data_dir, tmp_path_factory) -> dict[str, pathlib.Path]:
  """Splits the 30 records (symbolic links), preprocesses each split, fine-tunes a tiny model from
  a saved model directory with the CNN frozen."""
  root = tmp_path_factory.mktemp("cinc")
  headers = sorted(sample_data_dir.glob("*.hea"))
  paths = {}
  for index, header in enumerate(headers):
    split = SPLITS.get(index % 5, "train")
    folder = root / "links" / split
    folder.mkdir(parents=True, exist_ok=True)
    for part in sample_data_dir.glob(f"{header.stem}.*"):
      (folder / part.name).symlink_to(part)
  for split in ("train", "val", "test"):
    paths[split] = root / "records" / split
    assert cli.main(["preprocess", str(root / "links" / split), str(paths[split]), "--workers", "1",
                     "--quiet"]) == 0
  # "Pretrained" weights: a random tiny HuBERT-ECG with its pretraining heads, as `convert` writes.
  config = HubertECGConfig.preset("tiny")
  weights = jax.jit(lambda key: HubertECG(config).init({"params": key}, jnp.zeros((1, 400))))(
      jax.random.key(7))["params"]
  paths["pretrained"] = save_model(root / "pretrained", config, weights)
  paths["workdir"] = root / "run"
  code = cli.main(["finetune", "configs/finetune_demo.py", str(paths["workdir"]),
                   "--config.model.init=pretrained", f"--config.model.pretrained={paths['pretrained']}",
                   "--config.train.freeze_feature_encoder=true",
                   f"--config.data.train={paths['train']}", f"--config.data.val={paths['val']}",
                   f"--config.data.test={paths['test']}", "--config.train.steps=6",
                   "--config.train.batch_size=8", "--config.train.eval_every=3",
                   "--config.train.log_every=3", "--config.train.devices=1",
                   "--config.eval.n_boot=50", "--config.train.progress=false"])
  assert code == 0
  paths["model"] = paths["workdir"] / "best_model"
  paths["root"] = root
  return paths


def _train_codes(sample_data_dir: pathlib.Path) -> set[str]:
  headers = sorted(sample_data_dir.glob("*.hea"))
  codes = set()
  for index, header in enumerate(headers):
    if index % 5 not in SPLITS:
      codes |= set(read_record(header).labels)
  return codes


def _check_png(path: pathlib.Path, min_pixels: int = 200_000) -> None:
  pixels = mpimg.imread(path)
  assert pixels.shape[0] * pixels.shape[1] >= min_pixels
  assert pixels[..., :3].std() > 0.05  # not a blank image


def test_finetune_writes_a_classifier_with_metadata_and_a_test_report(run, sample_data_dir, capsys):
  classifier = load_classifier(run["model"])
  metadata = classifier.metadata
  assert classifier.task.kind == "multi_label"
  assert set(classifier.task.output_names) == _train_codes(sample_data_dir)
  assert len(classifier.thresholds) == classifier.task.num_outputs
  assert metadata["validation"]["step"] in (3, 6) and len(metadata["loss_weights"]) == classifier.task.num_outputs
  assert metadata["training_config"]["train"]["steps"] == 6
  # Loaded from the model directory (pretraining heads left out); the frozen CNN is bit for bit the same.
  _, pretrained, _ = load_model(run["pretrained"])
  assert set(classifier.params["hubert_ecg"]) == set(pretrained) - {"final_proj_0", "label_embedding_0"}
  jax.tree.map(np.testing.assert_array_equal, classifier.params["hubert_ecg"]["feature_extractor"],
               pretrained["feature_extractor"])
  moved = classifier.params["hubert_ecg"]["encoder"]["layers_1"]["feed_forward"]["output_dense"]["kernel"]
  assert np.abs(moved - pretrained["encoder"]["layers_1"]["feed_forward"]["output_dense"]["kernel"]).max() > 0
  report = run["workdir"] / "test_evaluation"
  assert {p.name for p in report.iterdir()} >= {"metrics.json", "metrics.csv", "predictions.csv",
                                                "roc.png", "auroc.png"}
  assert (run["workdir"] / "checkpoints").is_dir() and any((run["workdir"] / "tensorboard").iterdir())
  # Rerunning the finished job resumes from its checkpoint and does not train again: the same
  # checkpoints, the best model untouched.
  written = {path: path.stat().st_mtime_ns for folder in ("checkpoints", "best_model")
             for path in (run["workdir"] / folder).rglob("*") if path.is_file()}
  capsys.readouterr()
  assert cli.main(["finetune", "configs/finetune_demo.py", str(run["workdir"]), "--no-test",
                   f"--config.data.train={run['train']}", f"--config.data.val={run['val']}",
                   "--config.train.steps=6", "--config.train.batch_size=8",
                   "--config.train.eval_every=3", "--config.train.devices=1",
                   "--config.train.progress=false"]) == 0
  assert "resumed from step 6 in " in capsys.readouterr().out
  assert {path: path.stat().st_mtime_ns for path in written} == written
  assert {path for folder in ("checkpoints", "best_model")
          for path in (run["workdir"] / folder).rglob("*") if path.is_file()} == set(written)


def test_evaluate_writes_complete_json_csv_and_plots(run, capsys):
  out = run["root"] / "evaluation"
  assert cli.main(["evaluate", str(run["model"]), str(run["test"]), "--out", str(out), "--crop", "tta",
                   "--crops", "2", "--aggregation", "mean", "--n-boot", "50", "--quiet"]) == 0
  table = capsys.readouterr().out
  assert "macro" in table and "Fmax" in table
  summary = json.loads((out / "metrics.json").read_text())
  metrics = summary["evaluation"]["metrics"]
  names = load_classifier(run["model"]).task.output_names
  assert summary["n_records"] == 6 and summary["crops"] == 2 and metrics["label_names"] == list(names)
  assert set(metrics["per_label"]) == {"auroc", "auprc", "f1@0.5", "sensitivity@0.5", "specificity@0.5",
                                       "f1@tuned", "sensitivity@tuned", "specificity@tuned"}
  assert metrics["n_defined_labels"] >= 2 and metrics["macro"]["auroc"] is not None
  assert set(summary["evaluation"]["intervals"]) == {"auroc", "auprc"}
  rows = list(csv.DictReader((out / "metrics.csv").open()))
  assert [row["label"] for row in rows] == list(names) + ["macro"]
  undefined = [row for row in rows if row["note"].startswith("undefined")]
  assert all(row["auroc"] == "nan" for row in undefined)
  predictions = list(csv.DictReader((out / "predictions.csv").open()))
  assert len(predictions) == 6 and all(0 <= float(row[names[0]]) <= 1 for row in predictions)
  _check_png(out / "roc.png")
  _check_png(out / "auroc.png", 50_000)
  # The output is never silently replaced.
  assert cli.main(["evaluate", str(run["model"]), str(run["test"]), "--out", str(out), "--quiet"]) == 1
  assert "already exists" in capsys.readouterr().err


def test_predict_a_folder_and_a_file_with_plot(run, sample_data_dir):
  out = run["root"] / "predictions"
  assert cli.main(["predict", str(run["model"]), str(sample_data_dir), "--out", str(out), "--quiet"]) == 0
  document = json.loads((out / "predictions.json").read_text())
  names = list(load_classifier(run["model"]).task.output_names)
  assert len(document["records"]) == 30 and document["failures"] == []
  assert set(document["thresholds"]) == set(names)
  first = document["records"][0]
  assert first["windows"] == 2 and first["window_offsets_500hz"] == [0, 2500]  # 10 s -> two halves
  assert set(first["probabilities"]) == set(names) and first["duration_s"] == 10.0
  assert all(document["thresholds"][n] <= first["probabilities"][n] for n in first["findings"])
  rows = list(csv.DictReader((out / "predictions.csv").open()))
  assert len(rows) == 30 and list(rows[0])[:4] == ["record_id", "source", "duration_s", "windows"]
  single = run["root"] / "single"
  record = sorted(sample_data_dir.glob("*.hea"))[3]
  assert cli.main(["predict", str(run["model"]), str(record), "--out", str(single), "--plot",
                   "--top", "3", "--quiet"]) == 0
  entry = json.loads((single / "predictions.json").read_text())["records"][0]
  assert entry["record_id"] == record.stem and len(entry["top"]) == 3
  _check_png(single / entry["plot"], 1_000_000)
  # The same ECG as a .npy array (rate given on the command line) gives the same probabilities.
  ecg = read_record(record)
  array = run["root"] / "npy" / f"{record.stem}.npy"
  array.parent.mkdir()
  np.save(array, ecg.signal)
  as_npy = run["root"] / "from_npy"
  assert cli.main(["predict", str(run["model"]), str(array), "--out", str(as_npy), "--fs", "500", "--quiet"]) == 0
  npy_entry = json.loads((as_npy / "predictions.json").read_text())["records"][0]
  hea_entry = next(r for r in document["records"] if r["record_id"] == record.stem)
  for name in names:
    assert npy_entry["probabilities"][name] == pytest.approx(hea_entry["probabilities"][name], abs=1e-6)
  as_bf16 = run["root"] / "bf16"
  assert cli.main(["predict", str(run["model"]), str(array), "--out", str(as_bf16), "--fs", "500",
                   "--compute-dtype", "bfloat16", "--quiet"]) == 0
  bf16_entry = json.loads((as_bf16 / "predictions.json").read_text())["records"][0]
  for name in names:
    assert bf16_entry["probabilities"][name] == pytest.approx(hea_entry["probabilities"][name],
                                                              abs=1e-2)


def test_predict_reads_code15_hdf5_and_refuses_bad_files(run, sample_data_dir, tmp_path, capsys):
  import h5py

  tracings = np.stack([read_record(h).signal[:, :4096].T for h in sorted(sample_data_dir.glob("*.hea"))[:2]])
  with h5py.File(tmp_path / "exams_part0.hdf5", "w") as handle:
    handle["tracings"] = tracings  # (2, 4096, 12) at 400 Hz
    handle["exam_id"] = np.array([101, 202])
  out = tmp_path / "code15"
  assert cli.main(["predict", str(run["model"]), str(tmp_path / "exams_part0.hdf5"), "--out", str(out),
                   "--quiet"]) == 0
  records = json.loads((out / "predictions.json").read_text())["records"]
  assert [r["record_id"] for r in records] == ["101", "202"]
  assert records[0]["duration_s"] == pytest.approx(10.24) and records[0]["windows"] == 3  # 5120 at 500 Hz
  bad = tmp_path / "bad.npy"
  np.save(bad, np.zeros((3, 100), np.float32))
  assert cli.main(["predict", str(run["model"]), str(bad), "--out", str(tmp_path / "o"), "--fs", "500",
                   "--quiet"]) == 1
  assert "bad.npy" in capsys.readouterr().err and not (tmp_path / "o").exists()
  assert cli.main(["evaluate", str(run["train"]), str(run["test"]), "--quiet"]) == 1
  assert "is not a fine-tuned model" in capsys.readouterr().err


def test_embed_records_files_and_layers(run, sample_data_dir):
  out = run["root"] / "emb" / "test.npy"
  assert cli.main(["embed", str(run["model"]), str(run["test"]), "--out", str(out), "--quiet"]) == 0
  embeddings = np.load(out)
  index = list(csv.DictReader(out.with_suffix(".index.csv").open()))
  assert embeddings.shape == (6, 32) and len(index) == 6 and index[0]["row"] == "0"
  # Deterministic: the classifier's own pooled features of the same input (no dropout, no masking).
  classifier = load_classifier(run["model"])
  record = read_record(sorted(sample_data_dir.glob("*.hea"))[3])
  x, mask = model_input(crop_window(prepare_record(record.signal, record.fs, record.lead_names), 0))
  model = HubertECG(classifier.config, pretraining_heads=False)

  def pooled(p, x, m):
    out = model.apply({"params": p}, x, m, deterministic=True)
    return masked_mean(out.last_hidden_state, out.frame_mask)

  expected = jax.jit(pooled)(classifier.params["hubert_ecg"], jnp.asarray(x[None]), jnp.asarray(mask[None]))
  single = run["root"] / "emb" / "one.npy"
  assert cli.main(["embed", str(run["model"]), str(sample_data_dir / f"{record.record_id}.hea"),
                   "--out", str(single), "--quiet"]) == 0
  np.testing.assert_allclose(np.load(single), np.asarray(expected), atol=1e-5)
  single_bf16 = run["root"] / "emb" / "one_bf16.npy"
  assert cli.main(["embed", str(run["model"]), str(sample_data_dir / f"{record.record_id}.hea"),
                   "--out", str(single_bf16), "--compute-dtype", "bfloat16", "--quiet"]) == 0
  relative = np.linalg.norm(np.load(single_bf16) - expected) / np.linalg.norm(expected)
  assert 0 < relative < 2e-2, relative  # bf16 products: close, not identical
  frames = run["root"] / "emb" / "frames.npy"
  assert cli.main(["embed", str(run["model"]), str(sample_data_dir), "--out", str(frames), "--layer", "0",
                   "--pool", "none", "--quiet"]) == 0
  assert np.load(frames).shape == (30, 93, 32)
  assert cli.main(["embed", str(run["model"]), str(sample_data_dir), "--out", str(frames), "--quiet"]) == 1
  assert cli.main(["embed", str(run["model"]), str(sample_data_dir), "--out", str(run["root"] / "x.npy"),
                   "--pool", "none", "--crop", "tta", "--quiet"]) == 1
  assert jax.devices()  # the 8 host devices of conftest ran all of the above


def test_evaluate_reads_the_original_split_csv(run, sample_data_dir):
  """A split CSV (filename, age, sex, label columns) over the records folder gives the same metrics
  as the preprocessed directory for the labels it has; the model's other labels are reported missing."""
  names = list(load_classifier(run["model"]).task.output_names)
  headers = sorted(sample_data_dir.glob("*.hea"))
  test_headers = [h for i, h in enumerate(headers) if SPLITS.get(i % 5) == "test"]
  kept = names[:4]
  lines = [",".join(["filename", "age", "sex"] + kept)]
  for header in test_headers:
    codes = set(read_record(header).labels)
    lines.append(",".join([header.name, "60", "Male"] + ["1" if c in codes else "0" for c in kept]))
  split_csv = run["root"] / "test_split.csv"
  split_csv.write_text("\n".join(lines) + "\n")
  out = run["root"] / "csv_evaluation"
  assert cli.main(["evaluate", str(run["model"]), str(split_csv), "--records-dir", str(sample_data_dir),
                   "--out", str(out), "--n-boot", "0", "--workers", "1", "--quiet"]) == 0
  from_csv = json.loads((out / "metrics.json").read_text())
  assert from_csv["labels_missing_from_data"] == names[4:] and from_csv["n_records"] == 6
  direct = run["root"] / "direct_evaluation"
  assert cli.main(["evaluate", str(run["model"]), str(run["test"]), "--out", str(direct), "--n-boot", "0",
                   "--quiet"]) == 0
  by_dir = json.loads((direct / "metrics.json").read_text())["evaluation"]["metrics"]["per_label"]["auroc"]
  by_csv = from_csv["evaluation"]["metrics"]["per_label"]["auroc"]
  assert by_csv[:4] == by_dir[:4]


def test_bf16_inference_places_the_kernels_cast_at_load(tmp_path):
  """`--compute-dtype bfloat16`: the loaded backbone's kernels are bf16 when the runner places them
  (norms, biases and the weight norm stay float32); embeddings equal the per-call-cast path's."""
  config = HubertECGConfig.preset("tiny", conv_dim=(64,) * 5)
  x = np.random.default_rng(0).uniform(-1, 1, (4, 6000)).astype(np.float32)
  params = HubertECG(config, pretraining_heads=False).init({"params": jax.random.key(0)}, x[:1])["params"]
  save_model(tmp_path / "model", config, params)
  bf16_config, cast = load_backbone(tmp_path / "model", "bfloat16")
  runner = BatchRunner(embedding_fn(bf16_config), batch_size=4, devices=jax.devices()[:1])
  placed = runner.place_params(cast)
  for path, leaf in jax.tree_util.tree_leaves_with_path(placed):
    kernel = jax.tree_util.keystr(path).endswith("['kernel']")
    assert leaf.dtype == (jnp.bfloat16 if kernel else jnp.float32), jax.tree_util.keystr(path)
  mask = np.ones_like(x, np.int32)
  np.testing.assert_array_equal(runner(cast, x, mask), runner(params, x, mask))  # float32 params
