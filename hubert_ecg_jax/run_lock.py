"""One job at a time in a run or output directory.

A job holds `DIR/.job.lock` with an exclusive `flock` for as long as it runs, and writes who it is
(host, process id, start time, command) into the file. A second job on the same directory is
refused at once with that description. The kernel drops the lock when the holder dies, however it
dies (SIGKILL included), so the rerun that resumes a killed job is never blocked by a stale file;
on NFS the lock of a lost node lapses with its lease (about 90 s).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
from collections.abc import Iterator

LOCK_NAME = ".job.lock"


class DirectoryHeldError(OSError):
  """Another live job holds the directory."""


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
def hold_directory(directory: str | os.PathLike, command: str, take: bool = True) -> Iterator[None]:
  """Holds `directory` (created if missing) for the body, or raises `DirectoryHeldError`.

  `take=False` holds nothing: the other processes of a multi-host job, whose process 0 holds the
  directory for all of them.
  """
  if not take:
    yield
    return
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / LOCK_NAME
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
    holder = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
              "started": started}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock; the file stays, harmless to the next holder
