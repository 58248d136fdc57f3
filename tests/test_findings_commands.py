"""predict and evaluate with readable findings, attributions, missing leads, lead subsets and the
challenge score, through the console command on the real CinC 2021 records (SNOMED CT labels)."""
from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib import image as mpimg

from hubert_ecg_jax import cli
from hubert_ecg_jax.classifier import HubertECGForClassification
from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.data.preprocess import STANDARD_LEADS
from hubert_ecg_jax.data.readers import read_record
from hubert_ecg_jax.evaluate import snomed
from hubert_ecg_jax.tasks import Task
from hubert_ecg_jax.inference import classifier_metadata, load_classifier
from hubert_ecg_jax.model_dir import save_model
from test_inference_commands import run  # noqa: F401  (the fine-tuned tiny model, a fixture)

PRESENT = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")


def test_predict_names_findings_and_explains_one(run, sample_data_dir, tmp_path, capsys):  # noqa: F811
  names = list(load_classifier(run["model"]).task.output_names)
  explained = next(name for name in names if snomed.describe(name) is not None)
  abbreviation = snomed.describe(explained).abbreviation
  record = sorted(sample_data_dir.glob("*.hea"))[3]
  out = tmp_path / "explained"
  assert cli.main(["predict", str(run["model"]), str(record), "--out", str(out), "--plot",
                   "--explain", abbreviation, "--explain-steps", "8", "--quiet"]) == 0
  document = json.loads((out / "predictions.json").read_text())
  assert [row["label"] for row in document["labels"]] == names
  assert document["model_source"] == {"path": str(run["model"])}
  entry = document["records"][0]
  assert entry["finding_names"] == [snomed.display_name(name) for name in entry["findings"]]
  assert entry["missing_leads"] == []
  explanation = entry["explanation"]
  assert explanation["finding"] == explained and explanation["method"] == "integrated_gradients"
  assert (explanation["steps"], explanation["baseline"]) == (8, "zeros")
  assert sum(explanation["lead_shares"].values()) == pytest.approx(1.0, abs=1e-3)
  values = np.load(out / explanation["attributions"])
  assert values.shape == (2, 12, 500) and np.abs(values).sum() > 0  # 10 s: two windows
  assert mpimg.imread(out / entry["plot"]).shape[0] > 500
  rows = list(csv.DictReader((out / "predictions.csv").open()))
  assert rows[0]["finding_names"] == ";".join(entry["finding_names"])
  printed = capsys.readouterr().out
  assert all(name in printed for name in entry["finding_names"])
  assert cli.main(["predict", str(run["model"]), str(record), "--out", str(tmp_path / "bad"),
                   "--explain", "XYZ", "--quiet"]) == 1
  assert "no output of the model is 'XYZ'" in capsys.readouterr().err


def test_predict_takes_records_with_missing_leads_when_asked(run, sample_data_dir, tmp_path, capsys):  # noqa: F811
  ecg = read_record(sorted(sample_data_dir.glob("*.hea"))[0])
  rows = [list(ecg.lead_names).index(lead) for lead in PRESENT]
  partial = tmp_path / "partial.csv"
  with partial.open("w", newline="") as stream:
    writer = csv.writer(stream)
    writer.writerow(("time_s",) + PRESENT)
    writer.writerows(np.column_stack([np.arange(ecg.signal.shape[1]) / ecg.fs, ecg.signal[rows].T]))
  assert cli.main(["predict", str(run["model"]), str(partial), "--out", str(tmp_path / "refused"),
                   "--quiet"]) == 1
  assert "missing leads ['III', 'aVR', 'aVL', 'aVF']" in capsys.readouterr().err
  out = tmp_path / "zeros"
  assert cli.main(["predict", str(run["model"]), str(partial), "--out", str(out), "--plot",
                   "--missing-leads", "zero", "--quiet"]) == 0
  entry = json.loads((out / "predictions.json").read_text())["records"][0]
  assert entry["missing_leads"] == ["III", "aVR", "aVL", "aVF"]
  assert next(csv.DictReader((out / "predictions.csv").open()))["missing_leads"] == "III;aVR;aVL;aVF"
  assert "leads III, aVR, aVL, aVF missing" in capsys.readouterr().out
  embeddings = tmp_path / "emb.npy"
  assert cli.main(["embed", str(run["model"]), str(partial), "--out", str(embeddings),
                   "--missing-leads", "zero", "--quiet"]) == 0
  index = next(csv.DictReader(embeddings.with_suffix(".index.csv").open()))
  assert index["missing_leads"] == "III;aVR;aVL;aVF" and np.load(embeddings).shape == (1, 32)


def test_evaluate_names_findings_scores_the_challenge_and_takes_lead_subsets(run, tmp_path, capsys):  # noqa: F811
  names = list(load_classifier(run["model"]).task.output_names)
  full = tmp_path / "full"
  assert cli.main(["evaluate", str(run["model"]), str(run["test"]), "--out", str(full),
                   "--n-boot", "0", "--quiet"]) == 0
  table = capsys.readouterr().out
  assert "sinus tachycardia (STach)" in table and "CinC 2021 challenge score" in table
  summary = json.loads((full / "metrics.json").read_text())
  assert summary["labels"] == snomed.label_table(names)
  challenge = summary["challenge"]
  assert challenge["thresholds"] == "tuned" and "426783006" in challenge["classes"]
  assert challenge["score"] is not None and challenge["correct"] > challenge["inactive"]
  rows = list(csv.DictReader((full / "metrics.csv").open()))
  assert list(rows[0])[:4] == ["label", "abbreviation", "name", "support"]
  assert {row["label"]: row["name"] for row in rows}["427084000"] == "sinus tachycardia"
  assert summary["leads"] == list(STANDARD_LEADS) and summary["zeroed_leads"] == []
  two = tmp_path / "two_leads"
  assert cli.main(["evaluate", str(run["model"]), str(run["test"]), "--out", str(two),
                   "--n-boot", "0", "--leads", "II,I", "--merge-equivalent", "--quiet"]) == 0
  assert "leads: I, II only" in capsys.readouterr().out
  subset = json.loads((two / "metrics.json").read_text())
  assert subset["leads"] == ["I", "II"] and len(subset["zeroed_leads"]) == 10
  assert "merged_equivalent_codes" in subset
  full_scores = np.array([[float(v) for v in list(row.values())[1:]]
                          for row in csv.DictReader((full / "predictions.csv").open())])
  two_scores = np.array([[float(v) for v in list(row.values())[1:]]
                         for row in csv.DictReader((two / "predictions.csv").open())])
  assert not np.allclose(full_scores, two_scores)  # the zeroed leads change what the model sees


def test_predict_merges_the_codes_scored_as_one(sample_data_dir, tmp_path):
  labels = ("713427006", "426783006", "59118001")  # complete RBBB, sinus rhythm, RBBB
  config = HubertECGConfig.preset("tiny")
  params = HubertECGForClassification(config, len(labels)).init(
      {"params": jax.random.key(0)}, jnp.zeros((1, 6000)))["params"]
  save_model(tmp_path / "classifier", config, params, metadata=classifier_metadata(
      Task("multi_label", labels, labels), None, 0.1, thresholds=[0.0, 1.0, 1.0]))
  record = sorted(sample_data_dir.glob("*.hea"))[0]
  outputs = {}
  for merge in (False, True):
    out = tmp_path / f"merged_{merge}"
    assert cli.main(["predict", str(tmp_path / "classifier"), str(record), "--out", str(out), "--quiet"]
                    + ["--merge-equivalent"] * merge) == 0
    outputs[merge] = json.loads((out / "predictions.json").read_text())
  separate, merged = (outputs[m]["records"][0] for m in (False, True))
  assert [row["label"] for row in outputs[True]["labels"]] == ["713427006|59118001", "426783006"]
  assert merged["probabilities"]["713427006|59118001"] == max(
      separate["probabilities"]["713427006"], separate["probabilities"]["59118001"])
  # 713427006 reaches its threshold 0 (59118001 and sinus rhythm never reach 1): RBBB is found.
  assert separate["findings"] == ["713427006"] and merged["findings"] == ["713427006|59118001"]
  assert merged["finding_names"] == ["complete right bundle branch block / right bundle branch "
                                     "block (CRBBB|RBBB)"]
