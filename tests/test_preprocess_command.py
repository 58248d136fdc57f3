"""`hubert-ecg-jax preprocess`: real records plus bad files -> shards + manifest; resume; refusals."""
from __future__ import annotations

import pathlib

import h5py
import numpy as np
import pytest

from hubert_ecg_jax import cli
from hubert_ecg_jax.data import ingest
from hubert_ecg_jax.data import records as R
from hubert_ecg_jax.data.labels import snomed_codes_from_header
from hubert_ecg_jax.data.preprocess import prepare_record
from hubert_ecg_jax.data.readers import read_code15_hdf5, read_record

NUM_SHARDS = 4


def _source_folder(sample_data_dir: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
  """Links to the real records, plus a record with a truncated .mat and a malformed header."""
  folder.mkdir()
  for path in sorted(sample_data_dir.iterdir()):
    if path.suffix in (".hea", ".mat"):
      (folder / path.name).symlink_to(path)
  header = (sample_data_dir / "E07500.hea").read_text().replace("E07500", "BADMAT")
  (folder / "BADMAT.hea").write_text(header)
  (folder / "BADMAT.mat").write_bytes((sample_data_dir / "E07500.mat").read_bytes()[:20000])
  (folder / "BADHEA.hea").write_text("this is not a header\n12 leads maybe\n")
  return folder


@pytest.fixture(scope="module")
def clean_run(sample_data_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("preprocess")
  src = _source_folder(sample_data_dir, root / "src")
  manifest = ingest.preprocess_records(src, root / "clean", num_shards=NUM_SHARDS, workers=2,
                                        show_progress=False)
  return src, root / "clean", manifest


def test_folder_to_shards_reports_bad_records(clean_run, sample_data_dir):
  src, out, manifest = clean_run
  assert manifest.complete and manifest.num_records == 30
  assert len(manifest.shards) == NUM_SHARDS and sum(s.num_records for s in manifest.shards) == 30
  assert manifest.source_sampling_rates == {"500": 30}
  failed = {pathlib.Path(f["path"]).name: f["reason"] for f in manifest.failures}
  assert "truncated" in failed["BADMAT.hea"] and "malformed" in failed["BADHEA.hea"]
  assert R.read_manifest(out).to_dict() == manifest.to_dict()

  real = sorted(sample_data_dir.glob("*.hea"))
  codes = {path.stem: snomed_codes_from_header(path) for path in real}
  assert manifest.label_names == sorted({c for cs in codes.values() for c in cs})
  stored = {record.record_id: record for record in R.iterate_records(out)}
  assert sorted(stored) == sorted(codes)
  for path in real:
    record, ecg = stored[path.stem], read_record(path)
    expected = prepare_record(ecg.signal, ecg.fs, lead_names=ecg.lead_names)
    assert record.signal.tobytes() == expected.tobytes()  # bit for bit the offline stage
    assert [manifest.label_names[i] for i in np.flatnonzero(record.labels)] == sorted(codes[path.stem])
    assert record.source == str(src / path.name) and record.source_fs == 500.0
  assert stored["E07500"].age == 78.0 and stored["E07500"].sex == R.SEX_MALE


def test_stopped_job_resumes_without_redoing_finished_shards(clean_run, monkeypatch, capfd):
  src, clean, _ = clean_run
  out = clean.parent / "resumed"
  real_write_shard = R.write_shard
  calls = []

  def dying_write_shard(path, examples):  # the job is killed while writing its third shard
    calls.append(path)
    if len(calls) < 3:
      return real_write_shard(path, examples)

    def first_example_then_killed():
      yield next(examples)
      raise KeyboardInterrupt

    return real_write_shard(path, first_example_then_killed())

  monkeypatch.setattr(R, "write_shard", dying_write_shard)
  with pytest.raises(KeyboardInterrupt):
    ingest.preprocess_records(src, out, num_shards=NUM_SHARDS, workers=1, show_progress=False)
  monkeypatch.undo()
  stopped = R.read_manifest(out)
  assert not stopped.complete and len(stopped.shards) == 2
  finished = {s.file: (out / s.file).stat().st_mtime_ns for s in stopped.shards}
  assert sorted(p.name for p in out.glob("*.tfrecord")) == sorted(finished)  # no partial shard
  assert "skipped" in capfd.readouterr().err  # bad records are reported on stderr

  manifest = ingest.preprocess_records(src, out, num_shards=NUM_SHARDS, workers=1, show_progress=False)
  assert {f: (out / f).stat().st_mtime_ns for f in finished} == finished  # not rewritten
  assert manifest.to_dict() == R.read_manifest(clean).to_dict()
  for shard in manifest.shards:
    assert (out / shard.file).read_bytes() == (clean / shard.file).read_bytes()
  ingest.preprocess_records(src, out, num_shards=NUM_SHARDS, workers=1, show_progress=False)
  assert {f: (out / f).stat().st_mtime_ns for f in finished} == finished  # a finished job: nothing to do


def test_refuses_other_jobs_and_unusable_out(clean_run, tmp_path, monkeypatch):
  src, clean, _ = clean_run
  with pytest.raises(FileExistsError, match=r"different job \(differs in \['order'\]\)"):
    ingest.preprocess_records(src, clean, num_shards=NUM_SHARDS, order="filter_first", workers=1)
  with pytest.raises(FileExistsError, match=r"differs in \['num_shards'\]"):
    ingest.preprocess_records(src, clean, num_shards=3, workers=1)
  (tmp_path / "file").write_text("")
  with pytest.raises(FileExistsError, match="is not a folder"):
    ingest.preprocess_records(src, tmp_path / "file", workers=1)

  def read_only(self, data):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(pathlib.Path, "write_bytes", read_only)
  with pytest.raises(PermissionError, match="is not writable"):
    ingest.preprocess_records(src, tmp_path / "out", workers=1)


def test_cli_with_csv_listing_and_labels_csv(sample_data_dir, tmp_path, capsys):
  names = ["E07500", "E07501", "HR06000", "JS20000"]
  listing = tmp_path / "listing.csv"
  rows = [f"{sample_data_dir / n}.hea,{60 + i},{'F' if i % 2 else 'M'},{i % 2},{1 - i % 2}"
          for i, n in enumerate(names)]
  listing.write_text("filename,age,sex,AF,NORM\n" + "\n".join(rows) + "\n")
  assert cli.main(["preprocess", str(listing), str(tmp_path / "out"), "--shards", "2",
                   "--workers", "1", "--quiet"]) == 0
  assert "4 records in 2 shards, 0 failed, 2 labels" in capsys.readouterr().out
  manifest = R.read_manifest(tmp_path / "out")
  assert manifest.label_names == ["AF", "NORM"] and manifest.job["label_source"] == "csv"
  stored = {r.record_id: r for r in R.iterate_records(tmp_path / "out")}
  for i, name in enumerate(names):
    np.testing.assert_array_equal(stored[name].labels, [i % 2, 1 - i % 2])
    assert stored[name].age == 60 + i and stored[name].sex == (R.SEX_FEMALE if i % 2 else R.SEX_MALE)

  folder = tmp_path / "folder"
  folder.mkdir()
  for name in names:
    for suffix in (".hea", ".mat"):
      (folder / f"{name}{suffix}").symlink_to(sample_data_dir / f"{name}{suffix}")
  labels = tmp_path / "labels.csv"
  labels.write_text("filename,age,sex,AF,NORM\n" + "\n".join(rows[:3]) + "\n")
  assert cli.main(["preprocess", str(folder), str(tmp_path / "joined"), "--labels", str(labels),
                   "--workers", "1", "--quiet"]) == 0
  manifest = R.read_manifest(tmp_path / "joined")
  assert manifest.num_records == 3 and manifest.label_names == ["AF", "NORM"]
  assert manifest.failures[0]["path"].endswith("JS20000.hea")
  assert "no row for this record in the labels CSV" in manifest.failures[0]["reason"]
  assert cli.main(["preprocess", str(folder), str(tmp_path / "joined"), "--workers", "1",
                   "--quiet"]) == 1
  assert "different job" in capsys.readouterr().err


def _code15_file(path: pathlib.Path, exam_ids: list[int], tracings: np.ndarray) -> pathlib.Path:
  with h5py.File(path, "w") as handle:
    handle["tracings"] = tracings
    handle["exam_id"] = np.asarray(exam_ids, np.int64)
  return path


@pytest.fixture
def code15_folder(tmp_path) -> pathlib.Path:
  """Two CODE-15 parts of 3 exams (4000 samples of noise zero-padded to 4096 at 400 Hz), one exam
  with a NaN sample, one all zeros."""
  tracings = np.zeros((6, 4096, 12), np.float32)
  tracings[:, 48:4048] = np.random.default_rng(7).normal(size=(6, 4000, 12))
  tracings[1, 100, 3] = np.nan
  tracings[5] = 0.0
  folder = tmp_path / "code15"
  (folder / "more").mkdir(parents=True)
  _code15_file(folder / "exams_part0.hdf5", [11, 12, 13], tracings[:3])
  _code15_file(folder / "more" / "exams_part1.h5", [21, 22, 23], tracings[3:])
  return folder


def test_code15_hdf5_folder_one_record_per_exam(code15_folder, tmp_path):
  labels = tmp_path / "exams.csv"
  labels.write_text("exam_id,age,sex,AF,NORM\n11,40,M,1,0\n13,50,F,0,1\n21,60,M,1,1\n"
                    "22,70,F,0,0\n")
  manifest = ingest.preprocess_records(code15_folder, tmp_path / "out", labels_csv=labels,
                                        label_start_index=3, num_shards=2, workers=2,
                                        show_progress=False)
  part0, part1 = code15_folder / "exams_part0.hdf5", code15_folder / "more" / "exams_part1.h5"
  assert manifest.num_records == 4 and manifest.source_sampling_rates == {"400": 4}
  failed = {f["path"]: f["reason"] for f in manifest.failures}
  assert sorted(failed) == [f"{part0}[1]", f"{part1}[2]"]
  assert "NaN" in failed[f"{part0}[1]"] and "flat" in failed[f"{part1}[2]"]
  assert manifest.label_names == ["AF", "NORM"]

  stored = {record.record_id: record for record in R.iterate_records(tmp_path / "out")}
  assert sorted(stored) == ["exams_part0/11", "exams_part0/13", "more/exams_part1/21",
                            "more/exams_part1/22"]
  expected_labels = {"11": [1, 0], "13": [0, 1], "21": [1, 1], "22": [0, 0]}
  for path, name in ((part0, "exams_part0"), (part1, "more/exams_part1")):
    for row, ecg in enumerate(read_code15_hdf5(path)):
      if f"{name}/{ecg.record_id}" not in stored:
        continue
      record = stored[f"{name}/{ecg.record_id}"]
      expected = prepare_record(ecg.signal, ecg.fs, lead_names=ecg.lead_names)
      assert record.signal.tobytes() == expected.tobytes()
      assert record.source == f"{path}[{row}]" and record.source_fs == 400.0
      np.testing.assert_array_equal(record.labels, expected_labels[ecg.record_id])
  assert stored["exams_part0/13"].age == 50.0 and stored["exams_part0/13"].sex == R.SEX_FEMALE


def test_code15_hdf5_file_from_the_cli(code15_folder, tmp_path, capsys):
  with pytest.raises(SystemExit):
    cli.main(["preprocess", "--help"])
  assert "CODE-15 HDF5" in capsys.readouterr().out
  part0 = code15_folder / "exams_part0.hdf5"
  assert cli.main(["preprocess", str(part0), str(tmp_path / "out"), "--workers", "1",
                   "--quiet"]) == 0
  assert "2 records in 1 shards, 1 failed, 0 labels" in capsys.readouterr().out
  stored = sorted(r.record_id for r in R.iterate_records(tmp_path / "out"))
  assert stored == ["exams_part0/11", "exams_part0/13"]
  # A rerun is the same job with nothing left to do: no shard is written again.
  written = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tfrecord")}
  assert cli.main(["preprocess", str(part0), str(tmp_path / "out"), "--workers", "1",
                   "--quiet"]) == 0
  assert written and {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tfrecord")} == written


def test_code15_hdf5_refusals(code15_folder, tmp_path):
  tracings = np.ones((2, 4096, 12), np.float32)
  _code15_file(tmp_path / "twice.hdf5", [5, 5], tracings)
  with pytest.raises(ValueError, match=r"record ids must be unique; 1 repeat, e.g. \['twice/5'\]"):
    ingest.preprocess_records(tmp_path / "twice.hdf5", tmp_path / "o1", workers=1)
  (code15_folder / "exams_part2.hdf5").write_text("exam_id,tracings\n")
  with pytest.raises(ValueError, match=r"exams_part2.hdf5: not a readable HDF5 file"):
    ingest.preprocess_records(code15_folder, tmp_path / "o2", workers=1)
  with h5py.File(code15_folder / "exams_part2.hdf5", "w") as handle:
    handle["tracings"] = tracings
  with pytest.raises(ValueError, match=r"exams_part2.hdf5: datasets \['exam_id'\] missing"):
    ingest.preprocess_records(code15_folder, tmp_path / "o3", workers=1)
