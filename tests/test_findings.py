"""SNOMED CT names of the CinC 2021 tables, merging of equivalent codes, and the challenge score."""
from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest

from hubert_ecg_jax.evaluate import challenge, snomed
from hubert_ecg_jax.evaluate.report import evaluate_multilabel, format_table, write_csv

from conftest import TEST_DATA

# SHA-256 of the challenge's published tables (evaluation-2021, the copies the project was given).
PUBLISHED_SHA256 = {
    "SOURCE.md": "106e4376c0689a2ae13bec9527fc11a90bf83712fb859cbd9f5b546613798700",
    "dx_mapping_scored.csv": "fad13ad9f7ca230e7e6392ac8a264cb7cd157879525129f964c5f708eabb41d0",
    "dx_mapping_unscored.csv": "ce53c9e35406e922f1634a38bb13c31e8cf7603291641a16c201d8e679f4fe94",
    "weights.csv": "668cb04555a97e8977488cb4bb6088d0d2bf9e59557945deedf29d5065c14d2b",
}
AF, NSR, IAVB, STE = "164889003", "426783006", "270492004", "164931005"


def test_names_and_abbreviations_come_from_the_challenge_tables():
  assert snomed.display_name("59118001") == "right bundle branch block (RBBB)"
  assert snomed.display_name(STE) == "st elevation (STE)"  # an unscored code
  assert snomed.describe(NSR).scored and not snomed.describe(STE).scored
  assert snomed.display_name("NORM", {"NORM": "normal ECG"}) == "normal ECG"
  assert snomed.display_name("label_3") == "label_3"
  with snomed.table_path(snomed.SCORED_TABLE).open() as stream:
    scored = {row["SNOMEDCTCode"] for row in csv.DictReader(stream)}
  assert len(scored) == 30 and all(snomed.findings()[code].scored for code in scored)


def test_shipped_tables_are_the_reference_tables():
  for name in ("SOURCE.md", snomed.SCORED_TABLE, snomed.UNSCORED_TABLE, snomed.WEIGHTS_TABLE):
    digest = hashlib.sha256(snomed.table_path(name).read_bytes()).hexdigest()
    assert digest == PUBLISHED_SHA256[name], name


def test_ptbxl_statements_are_named_from_scp_statements(tmp_path):
  # The first lines of PTB-XL 1.0.3's scp_statements.csv (columns cut after diagnostic_class).
  (tmp_path / "ptbxl").mkdir()
  (tmp_path / "ptbxl" / "scp_statements.csv").write_text(
      ",description,diagnostic,form,rhythm,diagnostic_class\n"
      "NDT,non-diagnostic T abnormalities,1.0,1.0,,STTC\n"
      "NST_,non-specific ST changes,1.0,1.0,,STTC\n"
      "IMI,inferior myocardial infarction,1.0,,,MI\n")
  descriptions = snomed.ptbxl_descriptions(tmp_path)  # found one folder down
  assert descriptions["IMI"] == "inferior myocardial infarction"
  assert snomed.display_name("STTC", descriptions) == "ST/T change"
  assert snomed.label_table(["IMI", "X"], descriptions) == [
      {"label": "IMI", "abbreviation": "IMI", "name": "inferior myocardial infarction"},
      {"label": "X", "abbreviation": "", "name": ""}]
  assert snomed.resolve_label("inferior myocardial infarction", ["NDT", "IMI"], descriptions) == 1
  assert snomed.ptbxl_descriptions(tmp_path / "ptbxl" / "missing") == {}


def test_resolve_label_by_code_abbreviation_or_name():
  labels = [NSR, AF, "59118001"]
  assert snomed.resolve_label("AF", labels) == 1
  assert snomed.resolve_label("right bundle branch block", labels) == 2
  assert snomed.resolve_label(NSR, labels) == 0
  with pytest.raises(ValueError, match="no output of the model is 'LBBB'.*atrial fibrillation"):
    snomed.resolve_label("LBBB", labels)


def test_merge_equivalent_takes_the_maximum_of_the_group():
  y_true = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
  y_score = np.array([[0.9, 0.1, 0.2], [0.3, 0.8, 0.4], [0.1, 0.2, 0.7]])
  merged_true, merged_score, names = snomed.merge_equivalent(y_true, y_score,
                                                            ["713427006", AF, "59118001"])
  assert names == ["713427006|59118001", AF]
  np.testing.assert_array_equal(merged_true, [[1, 0], [1, 1], [0, 0]])
  np.testing.assert_allclose(merged_score, [[0.9, 0.1], [0.4, 0.8], [0.7, 0.2]])
  assert snomed.display_name(names[0]) == ("complete right bundle branch block / right bundle "
                                           "branch block (CRBBB|RBBB)")


def test_reward_matrix_is_the_challenge_weights():
  weights = challenge.reward_matrix()
  classes = snomed.scored_classes()
  assert weights.shape == (26, 26) and len(classes) == 26
  np.testing.assert_array_equal(np.diag(weights), 1.0)
  np.testing.assert_array_equal(weights, weights.T)
  af, nsr = classes.index((AF,)), classes.index((NSR,))
  assert weights[af, nsr] == 0.25  # weights.csv row 164889003, column 426783006
  # The same matrix by abbreviation (the other table of the challenge, in tests/data/snomed).
  with (TEST_DATA / "snomed" / "weights_abbreviations.csv").open() as stream:
    rows = list(csv.reader(stream))
  np.testing.assert_array_equal(weights, np.array([[float(v) for v in row[1:]] for row in rows[1:]]))


def test_challenge_score_matches_a_case_computed_by_hand():
  # Columns AF, NSR, IAVB and STE (unscored: left out). Weights from weights.csv:
  #   W[AF,AF] = W[NSR,NSR] = W[IAVB,IAVB] = 1, W[AF,NSR] = 0.25, W[AF,IAVB] = 0.3, W[NSR,IAVB] = 0.45.
  labels = [AF, NSR, IAVB, STE]
  y_true = np.array([[1, 0, 0, 0],   # record 1: AF
                     [0, 1, 0, 1],   # record 2: NSR (and STE, unscored)
                     [1, 0, 1, 0]])  # record 3: AF and IAVB
  y_pred = np.array([[1, 0, 0, 0],   # AF
                     [1, 0, 0, 0],   # AF
                     [1, 0, 0, 1]])  # AF (and STE)
  # Each record spreads 1 / |labels or outputs| over its (label, output) pairs.
  # observed: r1 {AF} -> W[AF,AF] / 1 = 1; r2 {NSR, AF} -> W[NSR,AF] / 2 = 0.125;
  #           r3 {AF, IAVB} -> (W[AF,AF] + W[IAVB,AF]) / 2 = (1 + 0.3) / 2 = 0.65;  total 1.775
  # correct (outputs = labels): r1 1; r2 1; r3 (1 + 0.3 + 0.3 + 1) / 2 = 1.3;          total 3.3
  # inactive (NSR alone): r1 {AF, NSR} -> 0.25 / 2 = 0.125; r2 -> 1;
  #           r3 {AF, IAVB, NSR} -> (0.25 + 0.45) / 3 = 0.7 / 3;                      total 1.125 + 0.7 / 3
  inactive = 1.125 + 0.7 / 3
  expected = (1.775 - inactive) / (3.3 - inactive)  # 0.2146...
  result = challenge.challenge_score(y_true, y_pred, labels)
  assert result.observed == pytest.approx(1.775)
  assert result.correct == pytest.approx(3.3)
  assert result.inactive == pytest.approx(inactive)
  assert result.score == pytest.approx(expected)
  assert result.classes == [AF, IAVB, NSR] and result.ignored_labels == [STE]
  perfect = challenge.challenge_score(y_true, y_true, labels)
  assert perfect.score == pytest.approx(1.0)
  always_normal = challenge.challenge_score(y_true, np.tile([0, 1, 0, 0], (3, 1)), labels)
  assert always_normal.score == pytest.approx(0.0)


def test_challenge_score_counts_equivalent_codes_as_one_class():
  y_true = np.array([[1, 0], [0, 1]])
  # Predicting 59118001 for a record labelled 713427006 (and back) is right: both are RBBB.
  # No sinus-rhythm column, so the inactive classifier outputs nothing and scores 0.
  swapped = challenge.challenge_score(y_true, np.array([[0, 1], [1, 0]]), ["713427006", "59118001"])
  assert swapped.classes == ["713427006|59118001"]
  assert (swapped.observed, swapped.correct, swapped.inactive, swapped.score) == (2.0, 2.0, 0.0, 1.0)
  with pytest.raises(ValueError, match="no label is a scored challenge code"):
    challenge.challenge_score(y_true, y_true, [STE, "NORM"])


def test_report_names_findings_in_the_table_and_csv(tmp_path):
  labels = [AF, NSR]
  rng = np.random.default_rng(0)
  y_true = np.array([[1, 0], [0, 1], [1, 0], [0, 1], [1, 1], [0, 0]])
  evaluation = evaluate_multilabel(y_true, rng.uniform(size=(6, 2)), labels, n_boot=0)
  findings = {row["label"]: (row["abbreviation"], row["name"]) for row in snomed.label_table(labels)}
  table = format_table(evaluation, findings)
  assert "atrial fibrillation (AF)" in table and "sinus rhythm (NSR)" in table
  rows = list(csv.DictReader(write_csv(evaluation, tmp_path / "m.csv", findings).open()))
  assert [(r["label"], r["abbreviation"], r["name"]) for r in rows[:2]] == [
      (AF, "AF", "atrial fibrillation"), (NSR, "NSR", "sinus rhythm")]
  assert rows[2]["label"] == "macro"
