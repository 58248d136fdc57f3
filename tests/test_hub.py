"""Models by Hugging Face Hub id, from a Hub cache laid out on disk (no network): HF_HOME,
HF_HUB_OFFLINE, revisions, the resolved commit in what we write, and the error when not cached."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from huggingface_hub import constants

from hubert_ecg_jax import hub
from hubert_ecg_jax.config import HubertECGConfig
from hubert_ecg_jax.model import HubertECG
from hubert_ecg_jax.pretrained import export_hf_directory, load_pretrained

REPO_ID = "test-org/tiny-ecg"
MAIN, TAGGED = "a" * 40, "b" * 40  # commits: main, and the one tag v0 points at


def _tiny_params(seed: int) -> tuple[HubertECGConfig, dict]:
  config = HubertECGConfig.preset("tiny")
  params = jax.jit(lambda key: HubertECG(config).init({"params": key}, jnp.zeros((1, 400))))(
      jax.random.key(seed))["params"]
  return config, jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> pathlib.Path:
  """HF_HOME with hub/models--test-org--tiny-ecg: two snapshots, refs/main and refs/v0."""
  home = tmp_path_factory.mktemp("hf_home")
  entry = home / "hub" / f"models--{REPO_ID.replace('/', '--')}"
  for seed, commit, ref in ((1, MAIN, "main"), (2, TAGGED, "v0")):
    export_hf_directory(*_tiny_params(seed), entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / ref).write_text(commit)
  return home


@pytest.fixture
def offline_cache(hf_home, monkeypatch) -> pathlib.Path:
  """huggingface_hub reads HF_HOME / HF_HUB_OFFLINE at import: set its constants as the env would."""
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return hf_home / "hub"


def _leaves_equal(a: dict, b: dict) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_the_cache_layout_is_the_hubs_own(offline_cache):
  cached = huggingface_hub.try_to_load_from_cache(REPO_ID, "config.json", cache_dir=offline_cache)
  assert cached == str(offline_cache / f"models--test-org--tiny-ecg/snapshots/{MAIN}/config.json")
  (repo,) = huggingface_hub.scan_cache_dir(offline_cache).repos
  assert repo.repo_id == REPO_ID
  assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {MAIN: {"main"}, TAGGED: {"v0"}}


def test_load_pretrained_by_hub_id_and_revision(offline_cache):
  snapshots = offline_cache / "models--test-org--tiny-ecg" / "snapshots"
  _, main_params = load_pretrained(snapshots / MAIN)
  _, tagged_params = load_pretrained(snapshots / TAGGED)
  assert not _leaves_equal(main_params, tagged_params)
  assert _leaves_equal(load_pretrained(REPO_ID)[1], main_params)
  assert _leaves_equal(load_pretrained(REPO_ID, revision="v0")[1], tagged_params)
  assert _leaves_equal(load_pretrained(f"{REPO_ID}@{TAGGED}")[1], tagged_params)
  assert hub.model_source(f"{REPO_ID}@v0") == {
      "path": str(snapshots / TAGGED), "repo_id": REPO_ID, "revision": "v0", "commit": TAGGED}
  assert hub.model_source(snapshots / MAIN) == {  # a snapshot by path: the commit, no revision
      "path": str(snapshots / MAIN), "repo_id": REPO_ID, "commit": MAIN}


def test_a_local_path_wins_over_a_hub_id(offline_cache, tmp_path, monkeypatch):
  config, params = _tiny_params(3)
  export_hf_directory(config, params, tmp_path / REPO_ID)
  monkeypatch.chdir(tmp_path)
  assert _leaves_equal(load_pretrained(REPO_ID)[1], params)
  assert hub.model_source(REPO_ID) == {"path": REPO_ID}


def test_offline_and_not_cached_is_a_clear_error(offline_cache):
  with pytest.raises(FileNotFoundError, match=r"test-org/absent is not in the Hub cache .*"
                     r"HF_HUB_OFFLINE is set: nothing is downloaded"):
    load_pretrained("test-org/absent")
  with pytest.raises(FileNotFoundError, match="expected a local model path or a Hugging Face Hub id"):
    load_pretrained("no/such/model/dir")


def test_convert_by_hub_id_records_the_commit(hf_home, tmp_path):
  """The console command in a fresh process: HF_HOME and HF_HUB_OFFLINE as users set them."""
  env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
  env.pop("HF_HUB_CACHE", None)
  out = tmp_path / "converted"
  done = subprocess.run([sys.executable, "-m", "hubert_ecg_jax.cli", "convert", f"{REPO_ID}@v0",
                         str(out)], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  metadata = json.loads((out / "metadata.json").read_text())
  assert metadata["source"] == f"{REPO_ID}@v0"
  assert metadata["resolved"]["commit"] == TAGGED and metadata["resolved"]["repo_id"] == REPO_ID
  ecg = pathlib.Path(__file__).resolve().parent / "data" / "cinc2021" / "E07500.hea"
  done = subprocess.run([sys.executable, "-m", "hubert_ecg_jax.cli", "embed", REPO_ID, str(ecg),
                         "--out", str(tmp_path / "emb.npy"), "--quiet"], env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert f"model {REPO_ID} at commit {MAIN}" in done.stdout
  assert np.load(tmp_path / "emb.npy").shape == (1, 32)
