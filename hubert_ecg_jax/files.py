"""Paths and atomic writes, on local disk and on object storage (gs://, s3://, ...), in one layer.

`as_path` turns what a user names into a `pathlib.Path` (a local path) or a `UrlPath` (a URL, served
by tf.io.gfile). Every writer stages its output under a temporary name beside the target and commits
it: by a rename on local disk (atomic), by a final copy on object storage, where a rename is a copy
per object and not atomic. A crash leaves the previous version or nothing, never half a file.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import pathlib
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any, Union


def _gfile() -> Any:
  import tensorflow as tf  # only URLs need it: local paths stay free of TensorFlow (worker processes)
  return tf.io.gfile


def _register_scheme(scheme: str) -> None:
  """s3:// (and hdfs://, az://) are served by tensorflow-io's file-system plugins, once imported."""
  if scheme in ("s3", "hdfs", "az"):
    try:
      import tensorflow_io  # noqa: F401  (registers the plugins with tf.io.gfile)
    except ImportError as error:
      raise ImportError(f"{scheme}:// paths need tensorflow-io (pip install tensorflow-io)") from error


class UrlPath:
  """A file or folder named by a URL (`scheme://bucket/key`) with the pathlib methods the package
  uses, served by tf.io.gfile: gs:// is built into TensorFlow, s3:// needs `import tensorflow_io`,
  ram:// (TensorFlow's in-memory file system, one per process) serves tests."""

  def __init__(self, url: str | UrlPath):
    scheme, separator, key = str(url).partition("://")
    if not (separator and scheme.isidentifier()):
      raise ValueError(f"expected a URL of the form scheme://bucket/key, found {str(url)!r}")
    _register_scheme(scheme)
    self.scheme = scheme
    self.key = posixpath.normpath(key).lstrip("/") if key.strip("/") else ""

  def __str__(self) -> str:
    return f"{self.scheme}://{self.key}"

  def __repr__(self) -> str:
    return f"UrlPath({str(self)!r})"

  def __eq__(self, other: object) -> bool:
    return isinstance(other, UrlPath) and str(self) == str(other)

  def __hash__(self) -> int:
    return hash(str(self))

  def __lt__(self, other: UrlPath) -> bool:
    return str(self) < str(other)

  def __truediv__(self, name: str | os.PathLike) -> UrlPath:
    return UrlPath(f"{self}/{os.fspath(name)}")

  @property
  def name(self) -> str:
    return posixpath.basename(self.key)

  @property
  def stem(self) -> str:
    return pathlib.PurePosixPath(self.name).stem

  @property
  def suffix(self) -> str:
    return pathlib.PurePosixPath(self.name).suffix

  @property
  def parent(self) -> UrlPath:
    return UrlPath(f"{self.scheme}://{posixpath.dirname(self.key)}")

  def with_suffix(self, suffix: str) -> UrlPath:
    return self.parent / pathlib.PurePosixPath(self.name).with_suffix(suffix).name

  def match(self, pattern: str) -> bool:
    return pathlib.PurePosixPath(self.key).match(pattern)

  def absolute(self) -> UrlPath:
    return self

  resolve = expanduser = absolute

  def exists(self) -> bool:
    return _gfile().exists(str(self))

  def is_dir(self) -> bool:
    return _gfile().isdir(str(self))

  def is_file(self) -> bool:
    return self.exists() and not self.is_dir()

  def iterdir(self) -> Iterator[UrlPath]:
    return (self / name.rstrip("/") for name in sorted(_gfile().listdir(str(self))))

  def glob(self, pattern: str) -> Iterator[UrlPath]:
    return (UrlPath(match) for match in sorted(_gfile().glob(f"{self}/{pattern}")))

  def rglob(self, pattern: str) -> Iterator[UrlPath]:
    """Files below this folder, at any depth, whose name matches `pattern`."""
    found = (UrlPath(posixpath.join(root, name)) for root, _, names in _gfile().walk(str(self))
             for name in names if fnmatch.fnmatch(name, pattern))
    return iter(sorted(found))

  def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
    if self.exists() and not exist_ok:
      raise FileExistsError(f"{self} already exists")
    if not parents and not self.parent.is_dir():
      raise FileNotFoundError(f"cannot create {self}: {self.parent} does not exist")
    _gfile().makedirs(str(self))

  def open(self, mode: str = "r", encoding: str | None = None, newline: str | None = None) -> Any:
    """A tf.io.gfile.GFile: UTF-8 in text mode, line ends left as written (as `newline=""`)."""
    if "w" in mode:
      self._prepare_overwrite()
    return _gfile().GFile(str(self), mode)

  def _prepare_overwrite(self) -> None:
    _gfile().makedirs(str(self.parent))  # ram:// lists a file only under an existing folder
    if self.scheme == "ram" and self.exists():
      self.unlink()  # ram:// appends to an existing file instead of replacing it

  def read_bytes(self) -> bytes:
    with self.open("rb") as file:
      return file.read()

  def read_text(self, encoding: str | None = None) -> str:
    return self.read_bytes().decode(encoding or "utf-8")

  def write_bytes(self, data: bytes) -> int:
    with self.open("wb") as file:
      file.write(data)
    return len(data)

  def write_text(self, text: str, encoding: str | None = None) -> int:
    return self.write_bytes(text.encode(encoding or "utf-8"))

  def unlink(self, missing_ok: bool = False) -> None:
    if missing_ok and not self.exists():
      return
    _gfile().remove(str(self))


AnyPath = Union[pathlib.Path, UrlPath]


def is_url(path: str | os.PathLike | UrlPath) -> bool:
  """Whether `path` names object storage (scheme://...; file:// is local disk)."""
  text = str(path)
  return isinstance(path, UrlPath) or ("://" in text and not text.startswith("file://"))


def as_path(path: str | os.PathLike | UrlPath) -> AnyPath:
  """`path` as a `UrlPath` when it is a URL (scheme://...), else as a `pathlib.Path`."""
  if isinstance(path, (UrlPath, pathlib.Path)):
    return path
  text = str(path)
  if text.startswith("file://"):
    return pathlib.Path(text[len("file://"):])
  return UrlPath(text) if is_url(text) else pathlib.Path(text)


ORBAX_SCHEMES = ("gs",)  # tensorstore, which writes Orbax's arrays, has drivers for file and gcs here


def orbax_native(path: str | os.PathLike | UrlPath) -> bool:
  """Whether Orbax reads and writes `path` itself: a local path or a URL of `ORBAX_SCHEMES`. Other
  URLs go through a local folder (`orbax_output`, `orbax_input`, the checkpoints' mirror)."""
  path = as_path(path)
  return not isinstance(path, UrlPath) or path.scheme in ORBAX_SCHEMES


def orbax_path(path: str | os.PathLike | UrlPath) -> Any:
  """`path` as Orbax takes it (an absolute local path, or an etils path for gs://); refuses a URL
  of another scheme, where Orbax would write its arrays to a local folder of that name."""
  path = as_path(path)
  if not isinstance(path, UrlPath):
    return path.absolute()
  if not orbax_native(path):
    raise ValueError(f"Orbax reads and writes a local path or a gs:// URL itself, found {path}: "
                     "go through a local folder (files.orbax_output, files.orbax_input)")
  from etils import epath  # Orbax's own path type

  return epath.Path(str(path))


@contextlib.contextmanager
def orbax_output(path: str | os.PathLike | UrlPath) -> Iterator[AnyPath]:
  """`atomic_path(path, folder=True)` for a folder Orbax writes in. At a URL Orbax cannot write
  (`orbax_native`), the folder is a local temporary one, committed to `path` by `commit_by_copy`."""
  path = as_path(path).absolute()
  if orbax_native(path):
    with atomic_path(path, folder=True) as staging:
      yield staging
    return
  make_parent_folder(path)
  with tempfile.TemporaryDirectory(prefix=f"{path.name}.") as local:
    yield pathlib.Path(local)
    commit_by_copy(pathlib.Path(local), path)


@contextlib.contextmanager
def orbax_input(path: str | os.PathLike | UrlPath) -> Iterator[Any]:
  """The folder `path` as Orbax reads it (`orbax_path`); at a URL Orbax cannot read, a local
  temporary copy of it, removed after the block."""
  path = as_path(path)
  if orbax_native(path):
    yield orbax_path(path)
    return
  with tempfile.TemporaryDirectory() as local:
    copy = pathlib.Path(local) / path.name
    commit_by_copy(path, copy)
    yield copy


def remove_tree(path: AnyPath) -> None:
  """Removes the file or folder `path` (and all under it) if it exists."""
  if isinstance(path, UrlPath):
    if path.exists():
      _gfile().rmtree(str(path)) if path.is_dir() else path.unlink()
  elif path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  else:
    path.unlink(missing_ok=True)


def move(source: AnyPath, target: AnyPath) -> None:
  """Renames the file or folder `source` to `target` (replacing a file, or an empty folder):
  atomic on local disk; on object storage a copy (`commit_by_copy`), then `source` is removed."""
  if isinstance(source, UrlPath) and isinstance(target, UrlPath):
    commit_by_copy(source, target)
    remove_tree(source)
  elif isinstance(source, UrlPath) or isinstance(target, UrlPath):
    raise ValueError(f"cannot move {source} to {target}: both must be local or both URLs")
  else:
    os.replace(source, target)


def make_parent_folder(path: str | os.PathLike | UrlPath) -> None:
  """Creates the folder that will hold `path`; refuses a path through a file or a read-only folder."""
  if is_url(path):
    as_path(path).parent.mkdir(parents=True, exist_ok=True)
    return
  parent = pathlib.Path(path).absolute().parent
  existing = next(folder for folder in (parent, *parent.parents) if folder.exists())
  if not existing.is_dir():
    raise FileExistsError(f"cannot write {path}: {existing} is a file, expected a folder there")
  if not os.access(existing, os.W_OK):
    raise PermissionError(f"cannot write {path}: the folder {existing} is not writable")
  parent.mkdir(parents=True, exist_ok=True)


def _prepare_copy(target: AnyPath) -> None:
  if isinstance(target, UrlPath):
    target._prepare_overwrite()
  else:
    target.parent.mkdir(parents=True, exist_ok=True)


def commit_by_copy(source: AnyPath, path: AnyPath) -> None:
  """Copies the file or folder `source` to `path`, replacing what was there; either may be local
  or a URL. In a folder the JSON documents (manifests, configs: what readers open first) are
  copied last, so a copy cut short leaves a folder that readers refuse as unfinished, never one
  they read half of."""
  if not source.is_dir():
    _prepare_copy(path)
    _gfile().copy(str(source), str(path), overwrite=True)
    return
  remove_tree(path)
  files = [posixpath.join(root, name) for root, _, names in _gfile().walk(str(source))
           for name in names]
  for name in sorted(files, key=lambda name: (name.endswith(".json"), name)):
    target = path / posixpath.relpath(name, str(source))
    _prepare_copy(target)
    _gfile().copy(name, str(target), overwrite=True)
  path.mkdir(parents=True, exist_ok=True)  # an empty folder still commits a folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike | UrlPath, folder: bool = False) -> Iterator[AnyPath]:
  """A temporary path beside `path` (an empty folder when `folder`) to write in; when the block
  succeeds it replaces `path` (an existing folder is removed first), when it fails it is removed.
  Locally the commit is a rename; on object storage a copy (see `commit_by_copy`)."""
  path = as_path(path).absolute()
  make_parent_folder(path)
  if isinstance(path, UrlPath):
    staging: AnyPath = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{path.suffix}"
    if folder:
      staging.mkdir()
  elif folder:
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  else:
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    staging = pathlib.Path(name)
  try:
    yield staging
    if isinstance(path, UrlPath):
      commit_by_copy(staging, path)
    else:
      if folder and path.exists():
        remove_tree(path)
      os.replace(staging, path)
  finally:
    remove_tree(staging)  # after a local rename there is nothing left to remove


def output_folder(out: str | os.PathLike | UrlPath, overwrite: bool = False
                  ) -> contextlib.AbstractContextManager[AnyPath]:
  """`atomic_path(out, folder=True)`, refusing an existing non-empty `out` unless `overwrite`."""
  out = as_path(out)
  if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"{out} already exists: choose another output folder or pass --overwrite")
  return atomic_path(out, folder=True)


def read_json(path: str | os.PathLike | UrlPath, expected: str) -> Any:
  """The JSON document at `path`; a missing file is refused naming what was `expected` there."""
  path = as_path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no {path.name} in {path.parent}: expected {expected}")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}: not valid JSON ({error})") from error


def write_text_atomic(path: str | os.PathLike | UrlPath, text: str) -> None:
  with atomic_path(path) as staging:
    staging.write_text(text)


def write_json_atomic(path: str | os.PathLike | UrlPath, data: Any) -> None:
  write_text_atomic(path, json.dumps(data, indent=1, sort_keys=False) + "\n")
