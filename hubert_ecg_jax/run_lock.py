"""One job at a time in a run or output directory.

A job holds `.DIR.lock`, a file beside DIR (inside, it would upset the checks and the atomic
renames of the output folder itself), with an exclusive `flock` for as long as it runs, and writes
who it is (host, process id, start time, command line) into the file. A second job on the same directory is
refused at once with that description. The kernel drops the lock when the holder dies, however it
dies (SIGKILL included), so the rerun that resumes a killed job is never blocked by a stale file;
on NFS the lock of a lost node lapses with its lease (about 90 s). Object storage (a URL) has no
lock: there one job per directory is the user's to keep.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import inspect
import json
import os
import pathlib
import shlex
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

from hubert_ecg_jax.files import is_url, make_parent_folder


class DirectoryHeldError(OSError):
  """Another live job holds the directory."""


def lock_path(directory: str | os.PathLike) -> pathlib.Path:
  directory = pathlib.Path(directory).absolute()
  return directory.parent / f".{directory.name}.lock"


def _command_line() -> str:
  return shlex.join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"


def _holder_text(path: pathlib.Path) -> str:
  try:
    holder = json.loads(path.read_text() or "{}")
  except (OSError, ValueError):
    holder = {}
  if not holder:
    return "a job that is starting"
  return (f"'{holder.get('command', '?')}' (process {holder.get('pid', '?')} on "
          f"{holder.get('host', '?')}, started {holder.get('started', '?')})")


@contextlib.contextmanager
def hold_directory(directory: str | os.PathLike, command: str | None = None,
                   take: bool = True) -> Iterator[None]:
  """Holds `directory` for the body, or raises `DirectoryHeldError`; `command` describes this job
  to the one refused (default: this process's command line).

  `take=False` holds nothing: the other processes of a multi-host job, whose process 0 holds the
  directory for all of them.
  """
  if not take or is_url(directory):
    yield
    return
  path = lock_path(directory)
  make_parent_folder(path)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise DirectoryHeldError(
        f"{directory} is in use by {_holder_text(path)}: wait for that job to end or stop it; "
        "a job that died no longer holds it") from None
  try:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    holder = {"command": command or _command_line(), "pid": os.getpid(), "host": socket.gethostname(),
              "started": started}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock; the file stays, harmless to the next holder


def holds_directory(argument: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Decorator: the function holds the directory given as its argument `argument` while it runs."""

  def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(function)

    @functools.wraps(function)
    def held(*args: Any, **kwargs: Any) -> Any:
      with hold_directory(signature.bind(*args, **kwargs).arguments[argument]):
        return function(*args, **kwargs)

    return held

  return decorate
