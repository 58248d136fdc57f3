"""Checks a records or units directory before a long job: every shard read, every example decoded.

TensorFlow's record reader checks the CRC-32C checksums of each record's length and data, so a
flipped byte or a cut file shows as an error at its offset. Each example is then decoded against
its schema and checked against the manifest (label count; units' shape and range); each shard's
record count; record ids unique over the directory; no shard file beside the listed ones. Shards
are checked in parallel, one process each.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable

from hubert_ecg_jax.data import records as records_lib
from hubert_ecg_jax.data import units as units_lib
from hubert_ecg_jax.files import AnyPath, as_path
from hubert_ecg_jax.progress import progress_bar


@dataclasses.dataclass
class ShardCheck:
  file: str
  expected: int  # records the manifest lists for it
  read: int = 0  # records read and decoded before the first problem
  problem: str | None = None
  record_ids: list[str] = dataclasses.field(default_factory=list)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  return f"{type(error).__name__}: {text.split(' [Op:')[0]}"  # TF appends the op's name


def record_id_of_example(serialized: bytes, num_labels: int) -> str:
  """Decodes one records example against the schema and its label count; returns its id."""
  record = records_lib.decode_example(serialized)
  if record.labels.shape != (num_labels,):
    raise ValueError(f"record {record.record_id!r} has {record.labels.shape[0]} labels, the "
                     f"manifest {num_labels}")
  return record.record_id


def record_id_of_units(serialized: bytes, vocab_sizes: tuple[int, ...], frames: int) -> str:
  """Decodes one units example against its shape and vocabularies; returns its record id."""
  record_id, units = units_lib.decode_units(serialized, (len(vocab_sizes), frames))
  for codebook, (row, vocab) in enumerate(zip(units, vocab_sizes)):
    if row.min() < 0 or row.max() >= vocab:
      raise ValueError(f"record {record_id!r}: units of codebook {codebook} outside [0, {vocab})")
  return record_id


def check_shard(path: str, expected: int, record_id: Callable[[bytes], str]) -> ShardCheck:
  """Reads and decodes every example of one shard; the first problem stops the check of it."""
  check = ShardCheck(as_path(path).name, expected)
  try:
    for serialized in records_lib.iterate_shard(path):
      check.record_ids.append(record_id(serialized))
      check.read += 1
  except Exception as error:  # anything a damaged file raises is this shard's finding
    check.problem = _first_line(error)
    return check
  if check.read != expected:
    check.problem = f"{check.read} records, the manifest lists {expected}"
  return check


def verify_records(directory: str | os.PathLike, workers: int | None = None,
                   progress: bool = True) -> tuple[list[ShardCheck], list[str]]:
  """(one check per shard, problems of the directory as a whole) of a records or a units
  directory; all empty means sound."""
  directory = as_path(directory)
  if (directory / units_lib.UNITS_MANIFEST).exists():
    units = units_lib.read_units_manifest(directory)
    decode = functools.partial(record_id_of_units, vocab_sizes=tuple(units.vocab_sizes),
                               frames=units.frames)
    shards = [records_lib.ShardInfo(units_lib.units_file_name(s.file), s.num_records)
              for s in units.records_shards]
    total, pattern = units.num_records, "units-*.tfrecord"
  else:
    manifest = records_lib.read_manifest(directory)
    if not manifest.complete:
      raise ValueError(f"{directory} holds an unfinished preprocessing job: finish it (rerun the "
                       "same `hubert-ecg-jax preprocess` command) before verifying")
    decode = functools.partial(record_id_of_example, num_labels=manifest.num_labels)
    shards, total, pattern = manifest.shards, manifest.num_records, "records-*.tfrecord"
  checks, problems = _check_shards(directory, shards, decode, workers, progress), []
  listed = {shard.file for shard in shards}
  extra = sorted(p.name for p in directory.glob(pattern) if p.name not in listed)
  if extra:
    problems.append(f"shard files the manifest does not list: {extra[:5]}")
  repeated = [rid for rid, count in Counter(rid for c in checks for rid in c.record_ids).items()
              if count > 1]
  if repeated:
    problems.append(f"{len(repeated)} record ids appear more than once, e.g. {repeated[:3]}")
  read = sum(check.read for check in checks)
  if all(check.problem is None for check in checks) and read != total:
    problems.append(f"{read} records in the shards, the manifest says {total}")
  return checks, problems


def _check_shards(directory: AnyPath, shards: list[records_lib.ShardInfo],
                  decode: Callable[[bytes], str], workers: int | None, progress: bool
                  ) -> list[ShardCheck]:
  """Every shard checked, one process each, in the manifest's order."""
  checks: list[ShardCheck] = []
  workers = max(1, min(workers or os.cpu_count() or 1, len(shards)))
  context = multiprocessing.get_context("spawn")  # TensorFlow does not survive a fork
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    futures = []
    for shard in shards:
      path = directory / shard.file
      if not path.is_file():
        checks.append(ShardCheck(shard.file, shard.num_records, problem="missing"))
        continue
      futures.append(pool.submit(check_shard, str(path), shard.num_records, decode))
    with progress_bar(total=len(shards), initial=len(checks), desc="verifying", unit="shard",
                      disable=not progress) as bar:
      for future in concurrent.futures.as_completed(futures):
        checks.append(future.result())
        bar.update(1)
  order = {shard.file: index for index, shard in enumerate(shards)}
  return sorted(checks, key=lambda check: order[check.file])


def format_report(directory: str | os.PathLike, checks: list[ShardCheck], problems: list[str]) -> str:
  bad = [check for check in checks if check.problem]
  records = sum(check.read for check in checks)
  if not bad and not problems:
    return f"{directory}: {len(checks)} shards, {records} records: all sound"
  lines = [f"{directory}: {len(bad)} of {len(checks)} shards bad", "",
           "| shard | records read / listed | problem |", "| --- | ---: | --- |"]
  lines += [f"| {c.file} | {c.read} / {c.expected} | {c.problem} |" for c in bad]
  lines += [f"- {problem}" for problem in problems]
  lines += ["", "Replace each bad shard from its source (rerun `hubert-ecg-jax preprocess` into a new "
            "directory, or restore the file from a copy), then verify again."]
  return "\n".join(lines)
