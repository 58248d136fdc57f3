"""Readers of ECG files into `EcgRecord`: WFDB (.hea + .dat/.mat), NumPy .npy, CSV and CODE-15 HDF5.

Every reader returns signals in mV as float32 (leads, samples) with the lead names it found, and
refuses bad input with a ValueError/FileNotFoundError that names what was expected and what was found.
Lead order is not changed here; `preprocess.reorder_leads` does that.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hubert_ecg_jax.data.labels import parse_cinc_header_comments
from hubert_ecg_jax.data.preprocess import MIN_FS, STANDARD_LEADS, canonical_lead_name

RECORD_EXTENSIONS: tuple[str, ...] = (".hea", ".npy", ".csv")
DEFAULT_FIND_EXTENSIONS: tuple[str, ...] = (".hea", ".npy")
HDF5_EXTENSIONS: tuple[str, ...] = (".h5", ".hdf5")
CODE15_FS = 400.0
# Bytes per sample of the uncompressed WFDB storage formats.
_WFDB_BYTES_PER_SAMPLE = {
    "8": 1.0, "16": 2.0, "24": 3.0, "32": 4.0, "61": 2.0, "80": 1.0, "160": 2.0,
    "212": 1.5, "310": 4.0 / 3.0, "311": 4.0 / 3.0}
_TO_MILLIVOLT = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3}
_CSV_TIME_COLUMNS = {"time": 1.0, "time_s": 1.0, "t": 1.0, "seconds": 1.0, "time_ms": 1e-3}


@dataclasses.dataclass
class EcgRecord:
  """One ECG: signal float32 (leads, samples) in mV at `fs` Hz, with names, labels and metadata."""
  signal: np.ndarray
  fs: float
  lead_names: tuple[str, ...]
  record_id: str
  labels: tuple[str, ...] = ()
  metadata: dict = dataclasses.field(default_factory=dict)


def _check_rate(fs: float | None, path: Path) -> float:
  if fs is None:
    raise ValueError(f"{path}: the sampling rate is not in the file; pass fs (Hz)")
  fs = float(fs)
  if not np.isfinite(fs) or fs < MIN_FS:
    raise ValueError(f"{path}: sampling rate must be at least {MIN_FS:g} Hz, got {fs:g}")
  return fs


def _check_wfdb_files(header, folder: Path, header_path: Path) -> None:
  """Refuses missing or truncated signal files named by a parsed WFDB header."""
  channels_per_file: dict[str, list[str]] = {}
  offsets: dict[str, int] = {}
  byte_offsets = header.byte_offset or [None] * len(header.file_name)
  for file_name, fmt, byte_offset in zip(header.file_name, header.fmt, byte_offsets):
    channels_per_file.setdefault(file_name, []).append(fmt)
    offsets[file_name] = int(byte_offset or 0)
  for file_name, formats in channels_per_file.items():
    signal_path = folder / file_name
    if not signal_path.is_file():
      raise FileNotFoundError(f"{header_path}: signal file {signal_path} named in the header is missing")
    if header.sig_len is None or any(fmt not in _WFDB_BYTES_PER_SAMPLE for fmt in formats):
      continue
    expected = offsets[file_name] + int(np.ceil(
        header.sig_len * sum(_WFDB_BYTES_PER_SAMPLE[fmt] for fmt in formats)))
    actual = signal_path.stat().st_size
    if actual < expected:
      raise ValueError(
          f"{signal_path} is truncated: {actual} bytes, expected at least {expected} for "
          f"{header.sig_len} samples of {len(formats)} channels (formats {sorted(set(formats))})")


def _check_wfdb_header(header, header_path: Path) -> None:
  """Refuses a parsed WFDB header (or record) whose signals or signal files do not add up."""
  described = len(header.file_name or [])
  if not header.n_sig or described != header.n_sig:
    raise ValueError(
        f"{header_path}: malformed WFDB header: it declares {header.n_sig} signals and describes {described}")
  _check_wfdb_files(header, header_path.parent, header_path)


def _diagnose_wfdb(record_name: str, header_path: Path) -> None:
  """Raises what is wrong with the header or signal files of a record that wfdb could not read."""
  import wfdb

  try:
    header = wfdb.rdheader(record_name)
  except Exception as error:  # wfdb raises TypeError/ValueError/IndexError on bad headers
    raise ValueError(f"{header_path}: malformed WFDB header ({type(error).__name__}: {error})") from error
  _check_wfdb_header(header, header_path)


def read_wfdb(header_path: Path, fs: float | None = None,
              lead_names: Sequence[str] | None = None) -> EcgRecord:
  """A WFDB record from its `.hea` path (signal in `.dat` or CinC `.mat` files).

  The header is parsed once, by `rdrecord` (wfdb parsing it is most of what reading costs); only a
  record it cannot read has its header parsed again, to say what is wrong."""
  import wfdb

  header_path = Path(header_path)
  if not header_path.is_file():
    raise FileNotFoundError(f"WFDB header {header_path} not found")
  record_name = str(header_path.with_suffix(""))
  try:
    record = wfdb.rdrecord(record_name, physical=True)
  except Exception as error:
    _diagnose_wfdb(record_name, header_path)
    if isinstance(error, FileNotFoundError):
      raise
    raise ValueError(f"{header_path}: cannot read the signal ({type(error).__name__}: {error})") from error
  _check_wfdb_header(record, header_path)
  if fs is not None and float(fs) != float(record.fs):
    raise ValueError(f"{header_path}: fs={fs} given but the header says {record.fs}")
  signal = record.p_signal.T.astype(np.float64)  # (leads, samples)
  for index, unit in enumerate(record.units or ["mV"] * signal.shape[0]):
    scale = _TO_MILLIVOLT.get(str(unit).strip().lower())
    if scale is None:
      raise ValueError(
          f"{header_path}: lead {record.sig_name[index]} has units {unit!r}; expected mV, uV or V")
    signal[index] *= scale
  names = tuple(record.sig_name)
  if lead_names is not None:
    if len(lead_names) != len(names):
      raise ValueError(
          f"{header_path}: {len(lead_names)} lead names given for {len(names)} signals {list(names)}")
    names = tuple(lead_names)
  labels, metadata = parse_cinc_header_comments(record.comments or [])
  return EcgRecord(
      signal=signal.astype(np.float32), fs=_check_rate(record.fs, header_path), lead_names=names,
      record_id=header_path.stem, labels=labels, metadata=metadata)


def _lead_names_for(count: int, lead_names: Sequence[str] | None, path: Path) -> tuple[str, ...]:
  if lead_names is None:
    if count != len(STANDARD_LEADS):
      raise ValueError(
          f"{path}: {count} leads found and no lead_names given; without names the 12 standard leads "
          f"{list(STANDARD_LEADS)} are assumed")
    return STANDARD_LEADS
  return tuple(str(name) for name in lead_names)


def read_npy(path: Path, fs: float | None, lead_names: Sequence[str] | None = None) -> EcgRecord:
  """A (leads, n) or (n, leads) array in mV; leads = len(lead_names) or 12. Square-ish ambiguity refused."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"NumPy file {path} not found")
  fs = _check_rate(fs, path)
  try:
    array = np.load(path, allow_pickle=False)
  except ValueError as error:
    raise ValueError(f"{path}: not a readable .npy array ({error})") from error
  if array.ndim != 2:
    raise ValueError(f"{path}: expected a 2-D array (leads, samples) or (samples, leads), got {array.shape}")
  if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
    raise ValueError(f"{path}: expected a real numeric array, got dtype {array.dtype}")
  num_leads = len(lead_names) if lead_names is not None else len(STANDARD_LEADS)
  rows_match, columns_match = array.shape[0] == num_leads, array.shape[1] == num_leads
  if rows_match and columns_match:
    raise ValueError(
        f"{path}: shape {array.shape} is ambiguous: both axes have {num_leads} entries, so the lead "
        "axis cannot be told from the time axis")
  if not rows_match and not columns_match:
    raise ValueError(f"{path}: expected {num_leads} leads on one axis, got shape {array.shape}")
  signal = array if rows_match else array.T
  names = _lead_names_for(signal.shape[0], lead_names, path)
  return EcgRecord(signal=signal.astype(np.float32), fs=fs, lead_names=names, record_id=path.stem)


def _rate_from_times(times: np.ndarray, path: Path) -> float:
  steps = np.diff(times)
  if len(steps) == 0 or not np.all(steps > 0):
    raise ValueError(f"{path}: the time column must increase strictly")
  step = float(np.median(steps))
  if np.max(np.abs(steps - step)) > 1e-3 * step:
    raise ValueError(f"{path}: the time column is not uniformly sampled (steps {steps.min():g}..{steps.max():g} s)")
  return 1.0 / step


def read_csv(path: Path, fs: float | None = None, lead_names: Sequence[str] | None = None) -> EcgRecord:
  """A CSV with one column per lead (header row of lead names) and optionally a time column.

  Without `lead_names`, every column other than the time column must be a standard lead name; with it,
  those columns are taken as the leads and the others ignored. Rate: `fs`, or from the time column
  ('time', 'time_s', 't', 'seconds' in s, 'time_ms' in ms); both given must agree.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"CSV file {path} not found")
  with open(path, newline="") as handle:
    reader = csv.reader(handle)
    header = [name.strip() for name in next(reader, [])]
    rows = [row for row in reader if row]
  time_columns = [i for i, name in enumerate(header) if name.lower() in _CSV_TIME_COLUMNS]
  if len(time_columns) > 1:
    raise ValueError(f"{path}: more than one time column: {[header[i] for i in time_columns]}")
  if lead_names is not None:
    missing = [name for name in lead_names if name not in header]
    if missing:
      raise ValueError(f"{path}: lead columns {missing} not found among the columns {header}")
    lead_columns = [header.index(name) for name in lead_names]
  else:
    lead_columns = [i for i, name in enumerate(header) if i not in time_columns]
    if not any(canonical_lead_name(header[i]) for i in lead_columns):
      raise ValueError(
          f"{path}: no lead columns found; expected a header row naming the leads "
          f"{list(STANDARD_LEADS)}, got columns {header}")
    unknown = [header[i] for i in lead_columns if canonical_lead_name(header[i]) is None]
    if unknown:
      raise ValueError(f"{path}: columns {unknown} are neither lead names nor a time column; "
                       "pass lead_names to choose the lead columns")
  try:
    values = np.array([[float(row[i]) if row[i].strip() else np.nan for i in range(len(header))]
                       for row in rows], dtype=np.float64)
  except (ValueError, IndexError) as error:
    raise ValueError(f"{path}: every row needs {len(header)} numeric values ({error})") from error
  if values.shape[0] < 2:
    raise ValueError(f"{path}: expected samples in rows, found {values.shape[0]} rows")
  if time_columns:
    unit = _CSV_TIME_COLUMNS[header[time_columns[0]].lower()]
    time_fs = _rate_from_times(values[:, time_columns[0]] * unit, path)
    if fs is not None and abs(float(fs) - time_fs) > 1e-3 * float(fs):
      raise ValueError(f"{path}: fs={fs} given but the time column says {time_fs:g} Hz")
    fs = fs if fs is not None else round(time_fs, 6)
  fs = _check_rate(fs, path)
  signal = values[:, lead_columns].T  # (leads, samples)
  return EcgRecord(signal=signal.astype(np.float32), fs=fs,
                   lead_names=tuple(header[i] for i in lead_columns), record_id=path.stem)


def read_record(path: str | os.PathLike, fs: float | None = None,
                lead_names: Sequence[str] | None = None) -> EcgRecord:
  """Reads one record, dispatching on the extension: .hea (WFDB), .npy, .csv."""
  path = Path(path)
  suffix = path.suffix.lower()
  if suffix == ".hea":
    return read_wfdb(path, fs=fs, lead_names=lead_names)
  if suffix == ".npy":
    return read_npy(path, fs=fs, lead_names=lead_names)
  if suffix == ".csv":
    return read_csv(path, fs=fs, lead_names=lead_names)
  if suffix in (".dat", ".mat"):
    raise ValueError(f"{path} is a WFDB signal file; pass its header {path.with_suffix('.hea')}")
  raise ValueError(
      f"{path}: unsupported record type {suffix!r}; expected one of {list(RECORD_EXTENSIONS)} "
      "(HDF5 CODE-15 files: read_code15_hdf5)")


@contextlib.contextmanager
def _code15_datasets(path: Path) -> Iterator[tuple[Any, Any]]:
  """The `tracings` and `exam_id` datasets of a CODE-15 HDF5 file, layout checked, kept open."""
  import h5py

  if not path.is_file():
    raise FileNotFoundError(f"HDF5 file {path} not found")
  try:
    handle = h5py.File(path, "r")
  except OSError as error:
    raise ValueError(f"{path}: not a readable HDF5 file ({error})") from error
  with handle:
    missing = [name for name in ("tracings", "exam_id") if name not in handle]
    if missing:
      raise ValueError(
          f"{path}: datasets {missing} missing; expected the CODE-15 layout 'tracings' (N, 4096, 12) "
          f"and 'exam_id' (N,), found {sorted(handle.keys())}")
    tracings, exam_ids = handle["tracings"], handle["exam_id"]
    if tracings.ndim != 3 or tracings.shape[2] != len(STANDARD_LEADS):
      raise ValueError(f"{path}: 'tracings' must have shape (N, samples, 12), got {tracings.shape}")
    if exam_ids.shape != (tracings.shape[0],):
      raise ValueError(
          f"{path}: 'exam_id' must have shape ({tracings.shape[0]},) to match 'tracings', got {exam_ids.shape}")
    if not np.issubdtype(exam_ids.dtype, np.integer):
      raise ValueError(f"{path}: 'exam_id' must hold integers, got dtype {exam_ids.dtype}")
    yield tracings, exam_ids


def _code15_record(exam_id: Any, tracing: np.ndarray) -> EcgRecord:
  """One CODE-15 exam from its id and its (samples, 12) tracing, stored padding kept."""
  exam_id = int(exam_id)
  return EcgRecord(signal=np.ascontiguousarray(np.asarray(tracing, np.float32).T), fs=CODE15_FS,
                   lead_names=STANDARD_LEADS, record_id=str(exam_id), metadata={"exam_id": exam_id})


def read_code15_hdf5(path: str | os.PathLike, chunk_size: int = 256) -> Iterator[EcgRecord]:
  """Records of a CODE-15 HDF5 part: `tracings` (N, 4096, 12) at 400 Hz and `exam_id` (N,).

  Signals are yielded as stored (the dataset's zero padding to 4096 samples is kept); `exam_id` is
  the record id and is also in metadata.
  """
  with _code15_datasets(Path(path)) as (tracings, exam_ids):
    for start in range(0, tracings.shape[0], chunk_size):
      block = tracings[start:start + chunk_size]  # (chunk, samples, 12)
      for exam_id, tracing in zip(exam_ids[start:start + chunk_size], block):
        yield _code15_record(exam_id, tracing)


def code15_exam_ids(path: str | os.PathLike) -> list[int]:
  """The exam ids of a CODE-15 HDF5 file in row order (layout checked, no tracing read)."""
  with _code15_datasets(Path(path)) as (_, exam_ids):
    return [int(exam_id) for exam_id in exam_ids[:]]


def read_code15_exam(path: str | os.PathLike, row: int) -> EcgRecord:
  """Exam `row` (0-based) of a CODE-15 HDF5 file as `read_code15_hdf5` gives it; reads that row."""
  path = Path(path)
  with _code15_datasets(path) as (tracings, exam_ids):
    if not 0 <= row < tracings.shape[0]:
      raise ValueError(f"{path}: no row {row}; the file holds {tracings.shape[0]} exams")
    return _code15_record(exam_ids[row], tracings[row])


def find_hdf5_files(folder: str | os.PathLike) -> list[Path]:
  """HDF5 files (`.h5`, `.hdf5`) under `folder`, recursive and sorted."""
  return sorted(path for path in Path(folder).rglob("*")
                if path.suffix.lower() in HDF5_EXTENSIONS and path.is_file())


def find_records(folder: str | os.PathLike,
                 extensions: Sequence[str] = DEFAULT_FIND_EXTENSIONS) -> list[Path]:
  """Record files under `folder` (recursive, sorted): one `.hea` per WFDB record, `.npy` files, and
  `.csv` files only when '.csv' is in `extensions` (a folder often holds a labels CSV too)."""
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"record folder {folder} not found")
  wanted = {ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions}
  unsupported = sorted(wanted - set(RECORD_EXTENSIONS))
  if unsupported:
    raise ValueError(f"unsupported record extensions {unsupported}; expected some of {list(RECORD_EXTENSIONS)}")
  return sorted(path for path in folder.rglob("*") if path.suffix.lower() in wanted and path.is_file())
