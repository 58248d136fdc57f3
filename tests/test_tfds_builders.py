"""TFDS builders on small trees: a fake PTB-XL written with wfdb.wrsamp from the real CinC records
(read from the manual dir and downloaded from a local archive), and the generic folder builder."""
from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
import wfdb

from hubert_ecg_jax.data.preprocess import STANDARD_LEADS, prepare_record
from hubert_ecg_jax.data.readers import find_records, read_record
from hubert_ecg_jax.data.tfds_ptbxl import PtbXl, verify_sha256sums

FOLDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 10, 10]
SCP_CODES = [
    {"NORM": 100.0, "SR": 0.0}, {"IMI": 80.0, "SR": 0.0}, {"AMI": 100.0, "PVC": 100.0, "SR": 0.0},
    {"NDT": 100.0, "AFIB": 0.0}, {"NORM": 100.0, "SR": 0.0}, {"IMI": 50.0, "AMI": 50.0, "SR": 0.0},
    {"NORM": 80.0, "AFIB": 0.0}, {"PVC": 100.0, "SR": 0.0}, {"IMI": 100.0, "NDT": 100.0, "SR": 0.0},
    {"NORM": 100.0, "SR": 0.0}, {"AMI": 15.0, "AFIB": 0.0}, {"NORM": 100.0, "SR": 0.0},
]
STATEMENTS = (
    ",description,diagnostic,form,rhythm,diagnostic_class,diagnostic_subclass\n"
    "NORM,normal ECG,1.0,,,NORM,NORM\n"
    "IMI,inferior myocardial infarction,1.0,,,MI,IMI\n"
    "AMI,anterior myocardial infarction,1.0,,,MI,AMI\n"
    "NDT,non-diagnostic T abnormalities,1.0,1.0,,STTC,STTC\n"
    "PVC,ventricular premature complex,,1.0,,,\n"
    "SR,sinus rhythm,,,1.0,,\n"
    "AFIB,atrial fibrillation,,,1.0,,\n")


@pytest.fixture(scope="module")
def fake_ptbxl(tmp_path_factory, sample_data_dir):
  """A 12-record PTB-XL tree (records500/00000/000NN_hr) with SHA256SUMS.txt, and its ZIP archive."""
  base = tmp_path_factory.mktemp("ptbxl")
  root = base / "ptb-xl-fake-1.0.3"
  (root / "records500" / "00000").mkdir(parents=True)
  rows = ["ecg_id,patient_id,age,sex,scp_codes,strat_fold,filename_lr,filename_hr"]
  for index, header in enumerate(find_records(sample_data_dir)[:12]):
    ecg_id = index + 1
    record = read_record(header)
    name = f"{ecg_id:05d}_hr"
    wfdb.wrsamp(name, fs=500, units=["mV"] * 12, sig_name=list(STANDARD_LEADS),
                p_signal=record.signal.T.astype(np.float64), fmt=["16"] * 12, adc_gain=[1000.0] * 12,
                baseline=[0] * 12, write_dir=str(root / "records500" / "00000"))
    age = "" if ecg_id == 5 else f"{40 + ecg_id}.0"
    codes = str(SCP_CODES[index]).replace('"', "'")
    rows.append(f'{ecg_id},{100 + ecg_id},{age},{ecg_id % 2},"{codes}",{FOLDS[index]},'
                f"records100/00000/{ecg_id:05d}_lr,records500/00000/{name}")
  (root / "ptbxl_database.csv").write_text("\n".join(rows) + "\n")
  (root / "scp_statements.csv").write_text(STATEMENTS)
  files = sorted(path for path in root.rglob("*") if path.is_file())
  (root / "SHA256SUMS.txt").write_text("".join(
      f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.relative_to(root).as_posix()}\n" for path in files))
  archive = base / "ptb-xl-fake-1.0.3.zip"
  with zipfile.ZipFile(archive, "w") as handle:
    for path in sorted(root.rglob("*")):
      handle.write(path, path.relative_to(base).as_posix())
  return root, archive


def _download_config(**kwargs):
  return tfds.download.DownloadConfig(try_download_gcs=False, **kwargs)


def _as_numpy(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split)))


def test_ptbxl_from_manual_dir(fake_ptbxl, tmp_path):
  root, _ = fake_ptbxl
  builder = PtbXl(config="superdiag", data_dir=tmp_path / "data")
  builder.download_and_prepare(download_config=_download_config(manual_dir=root.parent))
  assert {name: split.num_examples for name, split in builder.info.splits.items()} == {
      "train": 8, "validation": 2, "test": 2}
  names = builder.info.features["label_ids"].feature.names
  assert names == ["MI", "NORM", "STTC"] and builder.info.metadata["label_names"] == names
  examples = {int(example["ecg_id"]): example for example in _as_numpy(builder, "train")}
  assert sorted(examples) == [1, 2, 3, 4, 5, 6, 7, 8]
  np.testing.assert_array_equal(examples[4]["labels"], [0, 0, 1])  # NDT -> STTC
  np.testing.assert_array_equal(examples[6]["labels"], [1, 0, 0])  # IMI + AMI -> MI
  np.testing.assert_array_equal(examples[8]["labels"], [0, 0, 0])  # PVC only: no diagnostic class
  assert list(examples[1]["label_ids"]) == [1]
  assert examples[3]["strat_fold"] == 3 and examples[3]["sex"] == 1 and examples[3]["age"] == 43.0
  assert np.isnan(examples[5]["age"])
  expected = prepare_record(*(lambda r: (r.signal, r.fs, r.lead_names))(
      read_record(root / "records500" / "00000" / "00002_hr.hea")))
  assert examples[2]["signal"].shape == (12, 5000)
  np.testing.assert_array_equal(examples[2]["signal"], expected)
  test_ids = sorted(int(example["ecg_id"]) for example in _as_numpy(builder, "test"))
  assert test_ids == [11, 12]


def test_ptbxl_downloads_and_verifies_a_local_archive(fake_ptbxl, tmp_path, monkeypatch):
  _, archive = fake_ptbxl
  monkeypatch.setattr(PtbXl, "ARCHIVE_URL", str(archive))
  builder = PtbXl(config="rhythm", data_dir=tmp_path / "data")
  builder.download_and_prepare(download_dir=tmp_path / "downloads", download_config=_download_config())
  assert builder.info.features["label_ids"].feature.names == ["AFIB", "SR"]
  validation = {int(example["ecg_id"]): example["labels"] for example in _as_numpy(builder, "validation")}
  assert sorted(validation) == [9, 10]
  np.testing.assert_array_equal(validation[9], [0, 1])


def test_sha256_verification_names_corrupt_and_missing_files(fake_ptbxl, tmp_path):
  root, _ = fake_ptbxl
  assert verify_sha256sums(root) == 26  # 12 x (.hea + .dat) + 2 CSVs
  copy = tmp_path / "copy"
  for path in root.rglob("*"):
    if path.is_file():
      target = copy / path.relative_to(root)
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(path.read_bytes())
  (copy / "scp_statements.csv").write_text(STATEMENTS.replace("sinus rhythm", "sinus  rhythm"))
  with pytest.raises(ValueError, match=r"corrupt: SHA-256 of scp_statements.csv is [0-9a-f]{64}, SHA256SUMS.txt says"):
    verify_sha256sums(copy)
  (copy / "scp_statements.csv").write_text(STATEMENTS)
  (copy / "records500" / "00000" / "00007_hr.dat").unlink()
  with pytest.raises(ValueError, match=r"incomplete: records500/00000/00007_hr.dat is listed .* but missing"):
    verify_sha256sums(copy)


def test_ptbxl_refuses_a_folder_without_ptbxl(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "readme.txt").write_text("not PTB-XL")
  builder = PtbXl(config="all", data_dir=tmp_path / "data")
  with pytest.raises(FileNotFoundError, match=r"no PTB-XL tree in .*manual: expected a folder holding"):
    builder.download_and_prepare(download_config=_download_config(manual_dir=tmp_path / "manual"))


def _fill_splits(path, splits):
  lines = path.read_text().splitlines()
  header = lines[0].split(",")
  column = header.index("split")
  rows = [line.split(",") for line in lines[1:]]
  for row, split in zip(rows, splits):
    row[column] = split
  path.write_text("\n".join(",".join(row) for row in [header] + rows) + "\n")


def test_labels_template_command_and_folder_builder(tmp_path, capsys):
  from hubert_ecg_jax.cli import main
  from hubert_ecg_jax.data.synthetic import SYNTHETIC_CLASSES, generate_dataset, write_wfdb_folder
  from hubert_ecg_jax.data.tfds_folder import EcgFolder, read_labels_csv

  folder = tmp_path / "records"
  write_wfdb_folder(folder / "wfdb", 5, seed=4, duration_s=6.0)
  signals, _ = generate_dataset(1, seed=9, fs=250, duration_s=6.0)
  np.save(folder / "extra.npy", signals[0])
  assert main(["labels-template", str(folder), "--labels", "AF,custom", "--with-split"]) == 0
  assert "6 records" in capsys.readouterr().out
  labels_csv = folder / "labels.csv"
  codes = sorted(c.snomed_code for c in list(SYNTHETIC_CLASSES.values())[:5])
  lines = labels_csv.read_text().splitlines()
  assert lines[0].split(",") == ["record", "fs", "split"] + sorted(codes + ["AF", "custom"])
  assert lines[1].startswith("extra.npy,,,")  # nothing known: every cell left to the user
  nsr_row = lines[2].split(",")  # wfdb/SYN00000.hea is NSR
  assert nsr_row[:3] == ["wfdb/SYN00000.hea", "", ""]
  assert nsr_row[3:] == ["1" if code == "426783006" else "0" for code in sorted(codes)] + ["", ""]
  assert main(["labels-template", str(folder)]) == 1  # refuses to overwrite
  assert "exists; pass overwrite (--force)" in capsys.readouterr().err

  with pytest.raises(ValueError, match=r"labels.csv:2: label '164889003' of extra.npy is ''; fill in 0 or 1"):
    read_labels_csv(labels_csv)
  main(["labels-template", str(folder), "--with-split", "--force", "--extensions", ".hea"])
  _fill_splits(labels_csv, ["train", "train", "test", "train", "test"])
  table = read_labels_csv(labels_csv)
  assert table.splits == ["train", "train", "test", "train", "test"] and table.fs == [None] * 5

  builder = EcgFolder(data_dir=tmp_path / "data")
  builder.download_and_prepare(download_config=_download_config(manual_dir=folder))
  assert builder.info.splits["train"].num_examples == 3 and builder.info.splits["test"].num_examples == 2
  assert builder.info.features["label_ids"].feature.names == sorted(codes)
  examples = {example["record"].decode(): example for example in _as_numpy(builder, "test")}
  assert sorted(examples) == ["wfdb/SYN00002.hea", "wfdb/SYN00004.hea"]
  example = examples["wfdb/SYN00002.hea"]  # SB
  np.testing.assert_array_equal(example["labels"], [code == "426177001" for code in sorted(codes)])
  expected = read_record(folder / "wfdb" / "SYN00002.hea")
  np.testing.assert_array_equal(example["signal"], prepare_record(expected.signal, expected.fs, expected.lead_names))
  assert example["signal"].shape == (12, 3000) and example["source_fs"] == 500.0


def test_labels_csv_refusals(tmp_path):
  from hubert_ecg_jax.data.tfds_folder import read_labels_csv, write_labels_template

  cases = {
      "first.csv": ("path,AF\nx.hea,1\n", r"the first column must be 'record', got columns \['path', 'AF'\]"),
      "nolabels.csv": ("record,split\nx.hea,train\n", r"no label columns"),
      "badsplit.csv": ("record,split,AF\nx.hea,tr ain,1\n", r"split 'tr ain' of x.hea must be a name"),
      "twice.csv": ("record,AF\nx.hea,1\nx.hea,0\n", r"records listed more than once: \['x.hea'\]"),
      "ragged.csv": ("record,AF\nx.hea,1,0\n", r"labels.csv|ragged.csv:2: 3 values, expected 2"),
      "badfs.csv": ("record,fs,AF\nx.npy,fast,1\n", r"fs 'fast' is not a number"),
  }
  for name, (content, message) in cases.items():
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
      read_labels_csv(tmp_path / name)
  with pytest.raises(FileNotFoundError, match=r"labels CSV .*missing.csv not found"):
    read_labels_csv(tmp_path / "missing.csv")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"no records \(.hea, .npy\) found under"):
    write_labels_template(tmp_path / "empty")
