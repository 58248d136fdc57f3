"""Readers (WFDB, .npy, CSV, CODE-15 HDF5), record discovery and labels, checked against wfdb itself."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import wfdb

from hubert_ecg_jax.data.labels import (
    MultiLabelEncoder, parse_cinc_header_comments, parse_scp_codes, ptbxl_task_label_names,
    ptbxl_task_labels, read_scp_statements, read_split_csv, snomed_codes_from_header)
from hubert_ecg_jax.data.preprocess import STANDARD_LEADS
from hubert_ecg_jax.data.readers import (code15_exam_ids, find_records, read_code15_exam,
                                         read_code15_hdf5, read_record)


def _write_dat_record(folder, name="rec", units="mV", signal=None, comments=None, gain=1000.0):
  signal = np.random.default_rng(0).normal(0, 0.5, (1000, 12)) if signal is None else signal
  wfdb.wrsamp(name, fs=500, units=[units] * 12, sig_name=list(STANDARD_LEADS), p_signal=signal,
              fmt=["16"] * 12, adc_gain=[gain] * 12, baseline=[0] * 12, comments=comments or [],
              write_dir=str(folder))
  return folder / f"{name}.hea"


def test_wfdb_mat_record_matches_wfdb(sample_data_dir):
  record = read_record(sample_data_dir / "E07500.hea")
  expected, fields = wfdb.rdsamp(str(sample_data_dir / "E07500"))
  assert record.signal.dtype == np.float32 and record.signal.shape == (12, 5000)
  np.testing.assert_allclose(record.signal, expected.T, atol=1e-6)
  assert record.fs == 500.0 and record.lead_names == STANDARD_LEADS and record.record_id == "E07500"
  assert record.labels == ("67741000119109", "426177001")
  assert record.metadata == {"age": 78.0, "sex": "Male"}


def test_wfdb_dat_record_and_units(tmp_path):
  signal = np.random.default_rng(1).normal(0, 500, (1000, 12))
  header = _write_dat_record(tmp_path, units="uV", signal=signal, comments=["Dx: 164889003", "Age: NaN"],
                             gain=1.0)
  record = read_record(header)
  np.testing.assert_allclose(record.signal, signal.T / 1000.0, atol=1e-3)
  assert record.labels == ("164889003",) and record.metadata == {"age": None}


def test_wfdb_refusals(tmp_path, sample_data_dir):
  with pytest.raises(FileNotFoundError, match=r"WFDB header .*nope.hea not found"):
    read_record(tmp_path / "nope.hea")
  header = _write_dat_record(tmp_path)
  data = (tmp_path / "rec.dat").read_bytes()
  (tmp_path / "rec.dat").write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"rec.dat is truncated: 12000 bytes, expected at least 24000"):
    read_record(header)
  (tmp_path / "rec.dat").unlink()
  with pytest.raises(FileNotFoundError, match=r"signal file .*rec.dat named in the header is missing"):
    read_record(header)
  for suffix in (".hea", ".mat"):
    shutil.copy(sample_data_dir / f"E07501{suffix}", tmp_path / f"E07501{suffix}")
  mat = (tmp_path / "E07501.mat").read_bytes()
  (tmp_path / "E07501.mat").write_bytes(mat[:-100])
  with pytest.raises(ValueError, match=r"E07501.mat is truncated: 119924 bytes, expected at least 120024"):
    read_record(tmp_path / "E07501.hea")
  (tmp_path / "bad.hea").write_text("bad 12 abc 5000\n")
  with pytest.raises(ValueError, match=r"bad.hea: malformed WFDB header: it declares 12 signals and describes 0"):
    read_record(tmp_path / "bad.hea")
  with pytest.raises(ValueError, match=r"fs=250 given but the header says 500"):
    read_record(sample_data_dir / "E07500.hea", fs=250)


def test_wfdb_rate_units_and_lead_name_checks(tmp_path, sample_data_dir):
  signal = np.random.default_rng(5).normal(0, 0.001, (1000, 12))
  wfdb.wrsamp("volts", fs=500, units=["V"] * 12, sig_name=list(STANDARD_LEADS), p_signal=signal,
              fmt=["16"] * 12, adc_gain=[1e6] * 12, baseline=[0] * 12, write_dir=str(tmp_path))
  np.testing.assert_allclose(read_record(tmp_path / "volts.hea").signal, signal.T * 1000, atol=1e-3)
  wfdb.wrsamp("slow", fs=50, units=["mV"] * 12, sig_name=list(STANDARD_LEADS), p_signal=signal,
              fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"slow.hea: sampling rate must be at least 100 Hz, got 50"):
    read_record(tmp_path / "slow.hea")
  renamed = read_record(sample_data_dir / "E07502.hea", lead_names=[f"L{i}" for i in range(12)])
  assert renamed.lead_names[11] == "L11"
  with pytest.raises(ValueError, match=r"2 lead names given for 12 signals"):
    read_record(sample_data_dir / "E07502.hea", lead_names=["I", "II"])
  with pytest.raises(ValueError, match=r"E07502.mat is a WFDB signal file; pass its header .*E07502.hea"):
    read_record(sample_data_dir / "E07502.mat")


def test_npy_both_layouts_and_refusals(tmp_path):
  signal = np.random.default_rng(2).normal(size=(12, 3000)).astype(np.float32)
  np.save(tmp_path / "leads_first.npy", signal)
  np.save(tmp_path / "time_first.npy", signal.T)
  for name in ("leads_first", "time_first"):
    record = read_record(tmp_path / f"{name}.npy", fs=500)
    np.testing.assert_array_equal(record.signal, signal)
    assert record.lead_names == STANDARD_LEADS and record.fs == 500.0 and record.record_id == name
  named = read_record(tmp_path / "time_first.npy", fs=500, lead_names=[f"L{i}" for i in range(12)])
  assert named.lead_names[0] == "L0"
  np.save(tmp_path / "square.npy", np.zeros((12, 12)))
  np.save(tmp_path / "three.npy", np.zeros((3, 1000)))
  np.save(tmp_path / "cube.npy", np.zeros((2, 12, 1000)))
  cases = [
      ("leads_first.npy", None, r"the sampling rate is not in the file; pass fs"),
      ("leads_first.npy", 99, r"sampling rate must be at least 100 Hz, got 99"),
      ("square.npy", 500, r"shape \(12, 12\) is ambiguous"),
      ("three.npy", 500, r"expected 12 leads on one axis, got shape \(3, 1000\)"),
      ("cube.npy", 500, r"expected a 2-D array .* got \(2, 12, 1000\)"),
  ]
  for name, fs, message in cases:
    with pytest.raises(ValueError, match=message):
      read_record(tmp_path / name, fs=fs)
  with pytest.raises(FileNotFoundError, match=r"NumPy file .*missing.npy not found"):
    read_record(tmp_path / "missing.npy", fs=500)
  with pytest.raises(ValueError, match=r"unsupported record type '.edf'"):
    read_record(tmp_path / "x.edf")


def _write_csv(path, header, rows):
  path.write_text(",".join(header) + "\n" + "\n".join(",".join(f"{v:.6f}" for v in row) for row in rows) + "\n")


def test_csv_with_rate_or_time_column(tmp_path):
  signal = np.random.default_rng(3).normal(size=(12, 600))
  leads = ["i", "ii", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5", "v6"]
  _write_csv(tmp_path / "plain.csv", leads, signal.T)
  record = read_record(tmp_path / "plain.csv", fs=250)
  np.testing.assert_allclose(record.signal, signal, atol=1e-6)
  assert record.lead_names == tuple(leads) and record.fs == 250.0
  times = np.arange(600) * 2.0  # 500 Hz in ms
  _write_csv(tmp_path / "timed.csv", ["time_ms"] + leads, np.column_stack([times, signal.T]))
  timed = read_record(tmp_path / "timed.csv")
  assert timed.fs == 500.0
  np.testing.assert_allclose(timed.signal, signal, atol=1e-6)
  with pytest.raises(ValueError, match=r"fs=250 given but the time column says 500 Hz"):
    read_record(tmp_path / "timed.csv", fs=250)
  chosen = read_record(tmp_path / "timed.csv", lead_names=["ii", "v1"])
  assert chosen.signal.shape == (2, 600) and chosen.lead_names == ("ii", "v1")


def test_csv_refusals(tmp_path):
  _write_csv(tmp_path / "nolead.csv", ["a", "b"], np.zeros((10, 2)))
  with pytest.raises(ValueError, match=r"no lead columns found; expected a header row naming the leads"):
    read_record(tmp_path / "nolead.csv", fs=500)
  _write_csv(tmp_path / "extra.csv", ["I", "II", "spo2"], np.zeros((10, 3)))
  with pytest.raises(ValueError, match=r"columns \['spo2'\] are neither lead names nor a time column"):
    read_record(tmp_path / "extra.csv", fs=500)
  _write_csv(tmp_path / "uneven.csv", ["time", "I"], np.array([[0, 1], [0.002, 1], [0.005, 1]]))
  with pytest.raises(ValueError, match=r"the time column is not uniformly sampled"):
    read_record(tmp_path / "uneven.csv")
  (tmp_path / "text.csv").write_text("I,II\n1,x\n2,3\n")
  with pytest.raises(ValueError, match=r"every row needs 2 numeric values"):
    read_record(tmp_path / "text.csv", fs=500)
  with pytest.raises(ValueError, match=r"lead columns \['V9'\] not found"):
    read_record(tmp_path / "text.csv", fs=500, lead_names=["V9"])


def test_code15_hdf5(tmp_path):
  tracings = np.random.default_rng(4).normal(size=(5, 4096, 12)).astype(np.float32)
  path = tmp_path / "exams_part0.hdf5"
  with h5py.File(path, "w") as handle:
    handle["tracings"] = tracings
    handle["exam_id"] = np.array([11, 12, 13, 14, 15])
  records = list(read_code15_hdf5(path, chunk_size=2))
  assert [record.record_id for record in records] == ["11", "12", "13", "14", "15"]
  assert code15_exam_ids(path) == [11, 12, 13, 14, 15]
  for row, (record, tracing) in enumerate(zip(records, tracings)):
    assert record.fs == 400.0 and record.lead_names == STANDARD_LEADS
    np.testing.assert_array_equal(record.signal, tracing.T)
    exam = read_code15_exam(path, row)
    assert exam.signal.tobytes() == record.signal.tobytes() and exam.metadata == record.metadata
  with pytest.raises(ValueError, match=r"exams_part0.hdf5: no row 5; the file holds 5 exams"):
    read_code15_exam(path, 5)
  with h5py.File(tmp_path / "wrong.hdf5", "w") as handle:
    handle["signals"] = tracings
  with pytest.raises(ValueError, match=r"datasets \['tracings', 'exam_id'\] missing; expected the CODE-15 layout"):
    list(read_code15_hdf5(tmp_path / "wrong.hdf5"))
  with h5py.File(tmp_path / "leads.hdf5", "w") as handle:
    handle["tracings"] = tracings[:, :, :8]
    handle["exam_id"] = np.arange(5)
  with pytest.raises(ValueError, match=r"'tracings' must have shape \(N, samples, 12\), got \(5, 4096, 8\)"):
    list(read_code15_hdf5(tmp_path / "leads.hdf5"))
  with h5py.File(tmp_path / "ids.hdf5", "w") as handle:
    handle["tracings"] = tracings
    handle["exam_id"] = np.arange(4)
  with pytest.raises(ValueError, match=r"'exam_id' must have shape \(5,\) to match 'tracings', got \(4,\)"):
    list(read_code15_hdf5(tmp_path / "ids.hdf5"))
  (tmp_path / "text.hdf5").write_text("not hdf5")
  with pytest.raises(ValueError, match=r"not a readable HDF5 file"):
    list(read_code15_hdf5(tmp_path / "text.hdf5"))


def test_find_records(tmp_path):
  (tmp_path / "b" / "c").mkdir(parents=True)
  _write_dat_record(tmp_path / "b" / "c", name="z1")
  _write_dat_record(tmp_path, name="a1")
  np.save(tmp_path / "b" / "x.npy", np.zeros((12, 600)))
  (tmp_path / "labels.csv").write_text("record,AF\n")
  found = [path.relative_to(tmp_path).as_posix() for path in find_records(tmp_path)]
  assert found == ["a1.hea", "b/c/z1.hea", "b/x.npy"]
  assert len(find_records(tmp_path, extensions=(".hea", ".csv"))) == 3
  with pytest.raises(ValueError, match=r"unsupported record extensions \['.edf'\]"):
    find_records(tmp_path, extensions=(".edf",))
  with pytest.raises(FileNotFoundError, match=r"record folder .*nowhere not found"):
    find_records(tmp_path / "nowhere")


def test_cinc_labels(sample_data_dir):
  codes, metadata = parse_cinc_header_comments(["# Age: 65", "#Sex: Female", "# Dx: 1,2, 1", "# Rx: Unknown"])
  assert codes == ("1", "2") and metadata == {"age": 65.0, "sex": "Female"}
  assert snomed_codes_from_header(sample_data_dir / "JS20003.hea") == ("284470004", "427084000", "55827005",
                                                                     "164934002", "427172004")


def _write_statements(path):
  path.write_text(
      ",description,diagnostic,form,rhythm,diagnostic_class,diagnostic_subclass\n"
      "NORM,normal ECG,1.0,,,NORM,NORM\n"
      "IMI,inferior MI,1.0,,,MI,IMI\n"
      "AMI,anterior MI,1.0,,,MI,AMI\n"
      "NDT,non-diagnostic T,1.0,1.0,,STTC,STTC\n"
      "PVC,ventricular premature complex,,1.0,,,\n"
      "SR,sinus rhythm,,,1.0,,\n"
      "AFIB,atrial fibrillation,,,1.0,,\n")


def test_ptbxl_tasks(tmp_path):
  _write_statements(tmp_path / "scp_statements.csv")
  statements = read_scp_statements(tmp_path / "scp_statements.csv")
  assert ptbxl_task_label_names(statements, "all") == ("AFIB", "AMI", "IMI", "NDT", "NORM", "PVC", "SR")
  assert ptbxl_task_label_names(statements, "diag") == ("AMI", "IMI", "NDT", "NORM")
  assert ptbxl_task_label_names(statements, "subdiag") == ("AMI", "IMI", "NORM", "STTC")
  assert ptbxl_task_label_names(statements, "superdiag") == ("MI", "NORM", "STTC")
  assert ptbxl_task_label_names(statements, "form") == ("NDT", "PVC")
  assert ptbxl_task_label_names(statements, "rhythm") == ("AFIB", "SR")
  codes = parse_scp_codes("{'IMI': 50.0, 'AMI': 0.0, 'NDT': 100.0, 'SR': 0.0}")
  assert codes == {"IMI": 50.0, "AMI": 0.0, "NDT": 100.0, "SR": 0.0}
  assert ptbxl_task_labels(codes, statements, "superdiag") == ("MI", "STTC")
  assert ptbxl_task_labels(codes, statements, "form") == ("NDT",)
  assert ptbxl_task_labels(codes, statements, "all") == ("AMI", "IMI", "NDT", "SR")
  with pytest.raises(ValueError, match=r"scp codes \['XYZ'\] are not in scp_statements.csv"):
    ptbxl_task_labels({"XYZ": 100.0}, statements, "all")
  with pytest.raises(ValueError, match=r"unknown PTB-XL task 'diagnostic'"):
    ptbxl_task_label_names(statements, "diagnostic")
  with pytest.raises(ValueError, match=r"malformed scp_codes"):
    parse_scp_codes("{'NORM': 100.0")
  with pytest.raises(ValueError, match=r"malformed scp_codes"):
    parse_scp_codes("['NORM']")


def test_multilabel_encoder(tmp_path):
  encoder = MultiLabelEncoder.from_label_sets([("AF", "RBBB"), ("NSR",), ("AF",), ("RARE",)], min_count=1)
  assert encoder.label_names == ("AF", "NSR", "RARE", "RBBB") and encoder.num_labels == 4
  np.testing.assert_array_equal(encoder.encode(["RBBB", "AF"]), [1, 0, 0, 1])
  np.testing.assert_array_equal([encoder.encode(["NSR"]), encoder.encode([])], [[0, 1, 0, 0], [0, 0, 0, 0]])
  assert encoder.decode(np.array([0.9, 0.1, 0.5, 0.2])) == ("AF", "RARE")
  assert MultiLabelEncoder.from_label_sets([("AF",), ("AF", "X")], min_count=2).label_names == ("AF",)
  with pytest.raises(ValueError, match=r"labels \['LBBB'\] are not among the 4 known labels"):
    encoder.encode(["LBBB"])
  np.testing.assert_array_equal(MultiLabelEncoder(encoder.label_names, "ignore").encode(["LBBB", "NSR"]), [0, 1, 0, 0])
  encoder.save(tmp_path / "labels.json")
  assert MultiLabelEncoder.load(tmp_path / "labels.json") == encoder
  with pytest.raises(ValueError, match=r"duplicate label names \['A'\]"):
    MultiLabelEncoder(("A", "B", "A"))


def test_read_split_csv(tmp_path):
  (tmp_path / "ptb.csv").write_text(
      "filename,age,sex,strat_fold,NORM,MI\n"
      "HR00001.hea.npy,56,0,3,1,0\n"
      "HR00002.hea.npy,,1,10,0,1\n")
  table = read_split_csv(tmp_path / "ptb.csv", label_start_index=4)
  assert table.filenames == ["HR00001.hea.npy", "HR00002.hea.npy"]
  assert table.label_names == ("NORM", "MI")
  np.testing.assert_array_equal(table.labels, [[1, 0], [0, 1]])
  np.testing.assert_array_equal(table.metadata["strat_fold"], [3, 10])
  assert np.isnan(table.metadata["age"][1])
  with pytest.raises(ValueError, match=r"label columns from index 3 \('strat_fold'\) must be numeric|"
                                       r"label columns from index 1 \('age'\) must be numeric"):
    read_split_csv(tmp_path / "ptb.csv", label_start_index=1)
  (tmp_path / "words.csv").write_text("filename,age,sex,AF\nx.npy,3,M,yes\n")
  with pytest.raises(ValueError, match=r"label columns from index 3 \('AF'\) must be numeric"):
    read_split_csv(tmp_path / "words.csv")
  with pytest.raises(ValueError, match=r"label_start_index 9 needs more than 9 columns"):
    read_split_csv(tmp_path / "ptb.csv", label_start_index=9)
  (tmp_path / "ragged.csv").write_text("filename,age,sex,AF\nx.npy,3,M\n")
  with pytest.raises(ValueError, match=r"lines \[2\] do not have 4 values"):
    read_split_csv(tmp_path / "ragged.csv")
