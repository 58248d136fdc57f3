"""A wheel install is complete: every module, every named config, and the demo, from any folder.

The wheel is built from this checkout and installed, without its dependencies, into a fresh
virtual environment that sees this environment's third-party packages (by a path entry, so the
editable install of this checkout stays invisible) but not PyTorch or transformers: the demo and
the configs must not need them.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import sysconfig
import venv
import zipfile

import pytest

from hubert_ecg_jax.experiment import named_configs

from conftest import block_imports

REPO = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN_CONFIGS = ("demo_pretrain", "pretrain_small", "pretrain_base", "pretrain_large")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("dist")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(out), str(REPO)], check=True, cwd=out)
  (path,) = out.glob("hubert_ecg_jax-*.whl")
  return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict[str, pathlib.Path]:
  """A fresh venv holding the wheel; torch and transformers raise ImportError there."""
  root = tmp_path_factory.mktemp("wheel_env")
  env_dir = root / "venv"
  venv.create(env_dir, with_pip=False)
  python = env_dir / "bin" / "python"
  site = pathlib.Path(subprocess.run(
      [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      check=True, capture_output=True, text=True).stdout.strip())
  blockers = block_imports(root / "blocked", ("torch", "transformers"))
  # Blockers first, then this environment's packages (a .pth path line adds no .pth of its own).
  (site / "_test_dependencies.pth").write_text(
      f"{blockers}\n{sysconfig.get_paths()['purelib']}\n")
  subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                  "--no-deps", "--no-index", str(wheel)], check=True)
  elsewhere = root / "elsewhere"
  elsewhere.mkdir()
  return {"python": python, "command": env_dir / "bin" / "hubert-ecg-jax", "cwd": elsewhere}


def _run(argv: list[str], cwd: pathlib.Path, timeout: float) -> subprocess.CompletedProcess:
  env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "XLA_FLAGS")}
  return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_holds_every_module_and_config(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  modules = {str(p.relative_to(REPO)) for p in (REPO / "hubert_ecg_jax").rglob("*.py")}
  configs = {f"hubert_ecg_jax/configs/{p.name}" for p in (REPO / "configs").glob("*.py")}
  assert modules - names == set()
  assert configs - names == set()
  assert len(configs) == len(named_configs()) + 1  # + __init__.py


def test_wheel_holds_the_snomed_tables(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  tables = {str(p.relative_to(REPO)) for p in (REPO / "hubert_ecg_jax" / "evaluate" / "cinc2021").iterdir()}
  assert {"hubert_ecg_jax/evaluate/cinc2021/weights.csv",
          "hubert_ecg_jax/evaluate/cinc2021/SOURCE.md"} <= tables
  assert tables - names == set()


def test_named_configs_from_another_folder(installed):
  script = f"""
import pathlib, sys
import hubert_ecg_jax
from hubert_ecg_jax.cli import main
from hubert_ecg_jax.experiment import named_configs
assert pathlib.Path(hubert_ecg_jax.__file__).is_relative_to(pathlib.Path(sys.prefix)), hubert_ecg_jax.__file__
for name in sorted(named_configs()):
  command = "pretrain" if name in {PRETRAIN_CONFIGS!r} else "finetune"
  assert main([command, name, "run_" + name, "--print-config"]) == 0, name
  print("config ok:", name)
"""
  result = _run([str(installed["python"]), "-c", script], installed["cwd"], timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  printed = {line.split(": ")[1] for line in result.stdout.splitlines() if line.startswith("config ok")}
  assert printed == set(named_configs()) and len(printed) == 11
  assert "batch_size: 448" in result.stdout  # the real recipes, not stand-ins
  assert not any(installed["cwd"].iterdir())  # --print-config writes nothing


def test_demo_from_the_wheel(installed):
  """Every step of the demo, shortened, through the installed console command."""
  result = _run([str(installed["command"]), "demo", "out", "--records", "40", "--k", "5",
                 "--pretrain-steps", "4", "--finetune-steps", "4"], installed["cwd"], timeout=900)
  output = result.stdout + result.stderr
  assert "== done in" in result.stdout, output
  out = installed["cwd"] / "out"
  for produced in ("kmeans/kmeans_k5.npz", "pretrain/model/config.json",
                   "finetune/best_model/config.json", "evaluation/metrics.json",
                   "prediction/predictions.csv"):
    assert (out / produced).is_file(), produced
  # Commands are printed as a user types them: config names and relative paths.
  assert "$ hubert-ecg-jax pretrain demo_pretrain out/pretrain " in result.stdout
  assert "$ hubert-ecg-jax finetune finetune_demo out/finetune " in result.stdout
  assert str(installed["cwd"]) not in result.stdout
  assert "\r" not in output  # progress as lines: the output is not a terminal
