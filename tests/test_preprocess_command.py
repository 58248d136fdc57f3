"""`hubert-ecg-jax preprocess`: real records plus bad files -> shards + manifest; resume; refusals."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

from hubert_ecg_jax import cli
from hubert_ecg_jax.commands import preprocess as command
from hubert_ecg_jax.data import records as R
from hubert_ecg_jax.data.labels import snomed_codes_from_header
from hubert_ecg_jax.data.preprocess import prepare_record
from hubert_ecg_jax.data.readers import read_record

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
  manifest = command.preprocess_records(src, root / "clean", num_shards=NUM_SHARDS, workers=2,
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
    command.preprocess_records(src, out, num_shards=NUM_SHARDS, workers=1, show_progress=False)
  monkeypatch.undo()
  stopped = R.read_manifest(out)
  assert not stopped.complete and len(stopped.shards) == 2
  finished = {s.file: (out / s.file).stat().st_mtime_ns for s in stopped.shards}
  assert sorted(p.name for p in out.glob("*.tfrecord")) == sorted(finished)  # no partial shard
  assert "skipped" in capfd.readouterr().err  # bad records are reported on stderr

  manifest = command.preprocess_records(src, out, num_shards=NUM_SHARDS, workers=1, show_progress=False)
  assert {f: (out / f).stat().st_mtime_ns for f in finished} == finished  # not rewritten
  assert manifest.to_dict() == R.read_manifest(clean).to_dict()
  for shard in manifest.shards:
    assert (out / shard.file).read_bytes() == (clean / shard.file).read_bytes()
  command.preprocess_records(src, out, num_shards=NUM_SHARDS, workers=1, show_progress=False)
  assert {f: (out / f).stat().st_mtime_ns for f in finished} == finished  # a finished job: nothing to do


def test_refuses_other_jobs_and_unusable_out(clean_run, tmp_path, monkeypatch):
  src, clean, _ = clean_run
  with pytest.raises(FileExistsError, match=r"different job \(differs in \['order'\]\)"):
    command.preprocess_records(src, clean, num_shards=NUM_SHARDS, order="filter_first", workers=1)
  with pytest.raises(FileExistsError, match=r"differs in \['num_shards'\]"):
    command.preprocess_records(src, clean, num_shards=3, workers=1)
  (tmp_path / "file").write_text("")
  with pytest.raises(FileExistsError, match="is not a folder"):
    command.preprocess_records(src, tmp_path / "file", workers=1)

  def read_only(self, data):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(pathlib.Path, "write_bytes", read_only)
  with pytest.raises(PermissionError, match="is not writable"):
    command.preprocess_records(src, tmp_path / "out", workers=1)


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
