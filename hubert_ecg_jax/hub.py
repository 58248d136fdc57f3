"""Models by Hugging Face Hub id: `Edoardo-BS/hubert-ecg-base` wherever a model path is taken.

`resolve_model(path_or_id, revision)` returns a local path: the path itself when it exists (a local
path always wins), else the snapshot folder of the Hub repository, fetched by
`huggingface_hub.snapshot_download` into the Hub cache with the conventions its users know: `HF_HOME`
/ `HF_HUB_CACHE` place the cache, `HF_HUB_OFFLINE=1` reads the cache only, `HF_TOKEN` for gated
repos. A revision (branch, tag or commit) pins the version: `revision=` or `ORG/NAME@REVISION`.
A repository holding one original `.pt` checkpoint and no `config.json` resolves to that file.

`model_source(path_or_id)` is what we record in the metadata we write: the repository and the
resolved commit (the snapshot folder's name) for a Hub model, the path for a local one.
"""
from __future__ import annotations

import os
import pathlib
import re

from hubert_ecg_jax.files import AnyPath, as_path, is_url

# ORG/NAME with an optional @REVISION; the Hub's own rules for names (letters, digits, - _ .).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
# Weights and configs a model directory may hold (not the repository's other files).
_MODEL_FILES = ["*.json", "*.safetensors", "*.bin", "*.pt"]


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
  """'ORG/NAME' or 'ORG/NAME@REV' -> (repo id, revision or None); None when it is not one."""
  match = _HUB_ID.match(str(text))
  return None if match is None else (match["repo"], match["revision"])


def resolve_model(path_or_id: str | os.PathLike, revision: str | None = None) -> AnyPath:
  """A model path (local or a URL), or a Hub id's snapshot folder in the Hub cache (see the module
  docstring)."""
  path = as_path(path_or_id)
  if path.exists():
    return path
  parsed = None if is_url(path) else parse_hub_id(str(path_or_id))
  if parsed is None:
    raise FileNotFoundError(f"{path_or_id} does not exist: expected a local model path or a Hugging "
                            "Face Hub id such as Edoardo-BS/hubert-ecg-base, or a model's URL")
  repo_id, id_revision = parsed
  if revision is not None and id_revision is not None and revision != id_revision:
    raise ValueError(f"two revisions for {repo_id}: {id_revision!r} in the id and {revision!r}")
  snapshot = _snapshot(repo_id, revision or id_revision, str(path_or_id))
  checkpoints = sorted(snapshot.glob("*.pt"))
  if not (snapshot / "config.json").is_file() and len(checkpoints) == 1:
    return checkpoints[0]
  return snapshot


def _snapshot(repo_id: str, revision: str | None, asked: str) -> pathlib.Path:
  from huggingface_hub import constants, snapshot_download
  from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

  try:
    return pathlib.Path(snapshot_download(repo_id, revision=revision, allow_patterns=_MODEL_FILES))
  except LocalEntryNotFoundError as error:
    offline = constants.HF_HUB_OFFLINE
    raise FileNotFoundError(
        f"{asked} is not a local path, and the Hugging Face Hub model {repo_id}"
        f"{'@' + revision if revision else ''} is not in the Hub cache {constants.HF_HUB_CACHE}"
        + (" (HF_HUB_OFFLINE is set: nothing is downloaded; unset it, or fetch the model where "
           "there is a network with `huggingface-cli download " + repo_id + "`)" if offline
           else f" and could not be downloaded: {error}")) from None
  except HfHubHTTPError as error:
    raise FileNotFoundError(f"{asked} is not a local path, and the Hugging Face Hub refused "
                            f"{repo_id}: {error}") from None


def model_source(path_or_id: str | os.PathLike, revision: str | None = None) -> dict[str, str]:
  """{'path': local path} or {'repo_id', 'revision', 'commit', 'path'} for a model from the Hub
  (a snapshot folder of the Hub cache given as a path: no revision)."""
  resolved = resolve_model(path_or_id, revision)
  source = {"path": str(resolved)}
  folder = resolved if resolved.is_dir() else resolved.parent
  cache_entry = folder.parent.parent.name  # models--ORG--NAME/snapshots/COMMIT
  if folder.parent.name == "snapshots" and cache_entry.startswith("models--"):
    source.update(repo_id=cache_entry[len("models--"):].replace("--", "/"), commit=folder.name)
    parsed = parse_hub_id(str(path_or_id)) if not as_path(path_or_id).exists() else None
    if revision or parsed:  # asked by Hub id (not by the snapshot's path)
      source["revision"] = revision or parsed[1] or "main"
  return source
