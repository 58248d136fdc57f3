"""Records with a subset of the 12 leads: refused by default, zeros on request, and reported."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from hubert_ecg_jax import cli
from hubert_ecg_jax.data.preprocess import (STANDARD_LEADS, missing_standard_leads, preprocess_ecg,
                                            prepare_record, zeroed_leads)
from hubert_ecg_jax.data.readers import read_record
from hubert_ecg_jax.lead_subsets import input_lead_mask, parse_leads

PRESENT = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")  # the limb augmented leads and III absent


@pytest.fixture(scope="module")
def ecg(sample_data_dir):
  return read_record(sorted(sample_data_dir.glob("*.hea"))[0])


def _subset(ecg, leads):
  rows = [list(ecg.lead_names).index(lead) for lead in leads]
  return ecg.signal[rows]


def test_missing_leads_are_refused_by_default(ecg):
  with pytest.raises(ValueError, match=r"missing leads \['III', 'aVR', 'aVL', 'aVF'\].*"
                     "missing_leads='zero'"):
    prepare_record(_subset(ecg, PRESENT), ecg.fs, lead_names=PRESENT)


def test_missing_leads_enter_as_zeros_and_the_others_are_unchanged(ecg):
  full = prepare_record(ecg.signal, ecg.fs, lead_names=ecg.lead_names)
  partial = prepare_record(_subset(ecg, PRESENT), ecg.fs, lead_names=PRESENT, missing_leads="zero")
  absent = [STANDARD_LEADS.index(lead) for lead in ("III", "aVR", "aVL", "aVF")]
  kept = [STANDARD_LEADS.index(lead) for lead in PRESENT]
  np.testing.assert_array_equal(partial[absent], 0.0)
  np.testing.assert_allclose(partial[kept], full[kept], atol=1e-6)  # every step is per lead
  assert missing_standard_leads(PRESENT) == ["III", "aVR", "aVL", "aVF"]
  assert zeroed_leads(partial) == ["III", "aVR", "aVL", "aVF"] and zeroed_leads(full) == []
  x, mask = preprocess_ecg(_subset(ecg, PRESENT), ecg.fs, lead_names=PRESENT, missing_leads="zero")
  assert x.shape == mask.shape == (6000,) and mask.all()


def test_zeros_need_lead_names_to_place_the_rows(ecg):
  with pytest.raises(ValueError, match="missing_leads='zero' needs lead_names"):
    prepare_record(_subset(ecg, PRESENT), ecg.fs, missing_leads="zero")
  with pytest.raises(ValueError, match="missing_leads must be 'refuse' or 'zero'"):
    prepare_record(ecg.signal, ecg.fs, lead_names=ecg.lead_names, missing_leads="drop")


def test_lead_subsets_parse_and_mask_blocks_of_the_input():
  assert parse_leads("v1, ii,I") == ("I", "II", "V1")
  with pytest.raises(ValueError, match="unknown: \\['V7'\\]"):
    parse_leads("I,V7")
  mask = input_lead_mask(["II"])
  assert mask.shape == (6000,) and mask.sum() == 500 and mask[500:1000].all()


def test_preprocess_command_reports_the_zeroed_leads(ecg, tmp_path):
  """A CSV listing one ECG stored as CSV with 8 named lead columns (label column AF)."""
  with (tmp_path / "partial.csv").open("w", newline="") as stream:
    writer = csv.writer(stream)
    writer.writerow(PRESENT)
    writer.writerows(_subset(ecg, PRESENT).T.tolist())
  listing = tmp_path / "listing.csv"
  listing.write_text("filename,age,sex,AF\npartial.csv,50,M,1\n")
  common = ["--fs", "500", "--workers", "1", "--quiet"]
  refused = tmp_path / "records"
  assert cli.main(["preprocess", str(listing), str(refused)] + common) == 0
  manifest = json.loads((refused / "manifest.json").read_text())
  assert manifest["num_records"] == 0 and "missing leads" in manifest["failures"][0]["reason"]
  zero = tmp_path / "records_zero"
  assert cli.main(["preprocess", str(listing), str(zero), "--missing-leads", "zero"] + common) == 0
  manifest = json.loads((zero / "manifest.json").read_text())
  assert manifest["num_records"] == 1
  assert manifest["preprocessing"]["zeroed_leads"] == {"partial": ["III", "aVR", "aVL", "aVF"]}
