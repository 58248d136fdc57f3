"""Atomic writes: a file or folder appears under its name complete, or not at all.

Every writer of the package stages its output beside the target (same file system) and renames
it into place: a crash or a full disk leaves the previous version or nothing, never half a file.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any


def make_parent_folder(path: str | os.PathLike) -> None:
  """Creates the folder that will hold `path`; refuses a path through a file or a read-only folder."""
  parent = pathlib.Path(path).absolute().parent
  existing = next(folder for folder in (parent, *parent.parents) if folder.exists())
  if not existing.is_dir():
    raise FileExistsError(f"cannot write {path}: {existing} is a file, expected a folder there")
  if not os.access(existing, os.W_OK):
    raise PermissionError(f"cannot write {path}: the folder {existing} is not writable")
  parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, folder: bool = False) -> Iterator[pathlib.Path]:
  """A temporary path beside `path` (an empty folder when `folder`) to write in; when the block
  succeeds it replaces `path` (an existing folder is removed first), when it fails it is removed."""
  path = pathlib.Path(path).absolute()
  make_parent_folder(path)
  if folder:
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  else:
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    staging = pathlib.Path(name)
  try:
    yield staging
    if folder and path.exists():
      shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True) if folder else staging.unlink(missing_ok=True)
    raise


def output_folder(out: str | os.PathLike, overwrite: bool = False
                  ) -> contextlib.AbstractContextManager[pathlib.Path]:
  """`atomic_path(out, folder=True)`, refusing an existing non-empty `out` unless `overwrite`."""
  out = pathlib.Path(out)
  if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"{out} already exists: choose another output folder or pass --overwrite")
  return atomic_path(out, folder=True)


def read_json(path: str | os.PathLike, expected: str) -> Any:
  """The JSON document at `path`; a missing file is refused naming what was `expected` there."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no {path.name} in {path.parent}: expected {expected}")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}: not valid JSON ({error})") from error


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
  with atomic_path(path) as staging:
    staging.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
