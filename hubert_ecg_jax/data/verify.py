"""Checks a records directory before a long job: every shard read, every record decoded.

TensorFlow's record reader checks the CRC-32C checksums of each record's length and data, so a
flipped byte or a cut file shows as an error at its offset. Each record is then decoded against
the schema (`records.decode_example`) and checked against the manifest: its label count and its
targets' shape; each shard's record count; record ids unique over the directory; no shard file
beside the listed ones. Shards are checked in parallel, one process each.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import pathlib
from collections import Counter

from hubert_ecg_jax.data import records as records_lib
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


def check_shard(path: str, expected: int, num_labels: int,
                target_shape: tuple[int, int] | None) -> ShardCheck:
  """Reads and decodes every record of one shard; the first problem stops the check of it."""
  check = ShardCheck(pathlib.Path(path).name, expected)
  try:
    for serialized in records_lib.iterate_shard(path):
      record = records_lib.decode_example(serialized)
      if record.labels.shape != (num_labels,):
        raise ValueError(f"record {record.record_id!r} has {record.labels.shape[0]} labels, the "
                         f"manifest {num_labels}")
      shape = None if record.targets is None else record.targets.shape
      if shape != target_shape:
        raise ValueError(f"record {record.record_id!r} has targets of shape {shape}, the manifest "
                         f"{target_shape}")
      check.record_ids.append(record.record_id)
      check.read += 1
  except Exception as error:  # anything a damaged file raises is this shard's finding
    check.problem = _first_line(error)
    return check
  if check.read != expected:
    check.problem = f"{check.read} records, the manifest lists {expected}"
  return check


def verify_records(directory: str | os.PathLike, workers: int | None = None,
                   progress: bool = True) -> tuple[list[ShardCheck], list[str]]:
  """(one check per shard, problems of the directory as a whole); all empty means sound."""
  directory = pathlib.Path(directory)
  manifest = records_lib.read_manifest(directory)
  if not manifest.complete:
    raise ValueError(f"{directory} holds an unfinished preprocessing job: finish it (rerun the "
                     "same `hubert-ecg-jax preprocess` command) before verifying")
  target_shape = ((manifest.target_codebooks, manifest.target_frames)
                  if manifest.target_codebooks else None)
  problems = []
  listed = {shard.file for shard in manifest.shards}
  extra = sorted(p.name for p in directory.glob("*.tfrecord") if p.name not in listed)
  if extra:
    problems.append(f"shard files the manifest does not list: {extra[:5]}")
  checks: list[ShardCheck] = []
  workers = max(1, min(workers or os.cpu_count() or 1, len(manifest.shards)))
  context = multiprocessing.get_context("spawn")  # TensorFlow does not survive a fork
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    futures = []
    for shard in manifest.shards:
      path = directory / shard.file
      if not path.is_file():
        checks.append(ShardCheck(shard.file, shard.num_records, problem="missing"))
        continue
      futures.append(pool.submit(check_shard, str(path), shard.num_records, manifest.num_labels,
                                 target_shape))
    with progress_bar(total=len(manifest.shards), initial=len(checks), desc="verifying",
                      unit="shard", disable=not progress) as bar:
      for future in concurrent.futures.as_completed(futures):
        checks.append(future.result())
        bar.update(1)
  order = {shard.file: index for index, shard in enumerate(manifest.shards)}
  checks.sort(key=lambda check: order[check.file])
  repeated = [rid for rid, count in Counter(rid for c in checks for rid in c.record_ids).items()
              if count > 1]
  if repeated:
    problems.append(f"{len(repeated)} record ids appear more than once, e.g. {repeated[:3]}")
  total = sum(check.read for check in checks)
  if all(check.problem is None for check in checks) and total != manifest.num_records:
    problems.append(f"{total} records in the shards, the manifest says {manifest.num_records}")
  return checks, problems


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
