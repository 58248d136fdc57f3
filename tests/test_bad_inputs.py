"""Bad input, refused clearly: each error says what was expected and what was found.

Signals, record files, model inputs, configs, checkpoints, output folders, full disks, batch jobs and
k-means files, through the public functions and, where a command exists, `hubert-ecg-jax` itself.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
from types import SimpleNamespace

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import wfdb

from hubert_ecg_jax import HubertECG, HubertECGConfig, export_hf_directory, load_pretrained, preprocess_ecg
from hubert_ecg_jax.cli import main
from hubert_ecg_jax.convert import flax_to_state_dict
from hubert_ecg_jax.data import records as records_lib
from hubert_ecg_jax.data.preprocess import STANDARD_LEADS, model_inputs, prepare_record
from hubert_ecg_jax.data.readers import find_records, read_code15_hdf5, read_record
from hubert_ecg_jax.data.synthetic import generate_dataset, write_wfdb_folder
from hubert_ecg_jax.model_dir import load_model, save_model
from hubert_ecg_jax.targets.kmeans import KMeansConfig, KMeansModel

CONFIG = HubertECGConfig.preset("tiny", vocab_sizes=(8,))
FS = 500


@pytest.fixture(scope="module")
def ecg() -> np.ndarray:
  """One synthetic 12-lead ECG, (12, 3000) in mV at 500 Hz."""
  signals, _ = generate_dataset(1, seed=3, fs=FS, duration_s=6.0)
  return signals[0].astype(np.float64)


@pytest.fixture(scope="module")
def params() -> dict:
  model = HubertECG(CONFIG)
  return jax.tree.map(np.asarray, model.init({"params": jax.random.key(0)}, jnp.zeros((1, 6000)))["params"])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, params) -> pathlib.Path:
  """A Hugging Face directory (config.json + model.safetensors) of the tiny model."""
  from safetensors.numpy import save_file

  directory = tmp_path_factory.mktemp("hf")
  save_file(flax_to_state_dict(params), str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps(CONFIG.to_hf_dict()))
  return directory


def _cli_error(capsys, argv: list[str]) -> str:
  """Runs the command, checks it failed cleanly (exit 1), returns its stderr."""
  capsys.readouterr()
  assert main(argv) == 1
  return capsys.readouterr().err


def _copy_hf_dir(src: pathlib.Path, dst: pathlib.Path, **config_changes) -> pathlib.Path:
  shutil.copytree(src, dst)
  data = json.loads((dst / "config.json").read_text())
  data.update(config_changes)
  (dst / "config.json").write_text(json.dumps(data))
  return dst


def _tree_equal(a, b) -> None:
  jax.tree.map(np.testing.assert_array_equal, a, b)


# --------------------------------------------------------------------------------------------------
# Signals: `preprocess_ecg` (and `prepare_record`, its offline stage).

def _with(signal: np.ndarray, change) -> np.ndarray:
  signal = signal.copy()
  change(signal)
  return signal


SIGNAL_CASES = {
    "one-dimensional": (lambda s: s.reshape(-1)[:6000], {},
                        r"expected a 2-D signal \(12 leads, samples\), got shape \(6000,\)"),
    "wrong number of leads": (lambda s: s[:8], {}, r"expected 12 leads .* got shape \(8, 3000\)"),
    "time-major (samples, leads)": (lambda s: s.T, {}, r"expected 12 leads .* got shape \(3000, 12\)"),
    "unknown lead name": (lambda s: s, {"lead_names": list(STANDARD_LEADS[:11]) + ["V7"]},
                          r"unknown lead names \['V7'\]; expected the 12 standard leads"),
    "duplicate lead name": (lambda s: s, {"lead_names": ["I", "II", "II"] + list(STANDARD_LEADS[3:])},
                            r"duplicate leads \['II'\] in lead names"),
    "missing lead": (lambda s: s[:11], {"lead_names": list(STANDARD_LEADS[:11])},
                     r"missing leads \['V6'\] in lead names"),
    "rate below 100 Hz": (lambda s: s, {"fs": 50}, r"sampling rate must be at least 100 Hz, got 50"),
    "infinite sample": (lambda s: _with(s, lambda x: x.__setitem__((6, 7), np.inf)), {},
                        r"expected finite samples, found 1 infinite values in leads \['V1'\]"),
    "NaN samples": (lambda s: _with(s, lambda x: x.__setitem__((1, slice(10, 20)), np.nan)), {},
                    r"10 NaN samples in leads \['II'\].*nan_policy='interpolate'"),
    "NaN-only lead": (lambda s: _with(s, lambda x: x.__setitem__(5, np.nan)), {"nan_policy": "interpolate"},
                      r"leads \['aVF'\] are entirely NaN; a record needs a value in every lead"),
    "all leads flat": (lambda s: np.full_like(s, 0.25), {},
                       r"all 12 leads are flat \(each one constant over the 3000 samples\): expected an ECG"),
    "too short to filter": (lambda s: s[:, :200], {},
                            r"record too short to filter: 200 samples at 500 Hz.*needs more than 453"),
    "text samples": (lambda s: s.astype(str), {}, r"expected a real numeric signal, got dtype <U"),
}


@pytest.mark.parametrize("case", sorted(SIGNAL_CASES))
def test_preprocess_ecg_refuses_bad_signals(ecg, case):
  change, kwargs, message = SIGNAL_CASES[case]
  kwargs = dict(kwargs)
  fs = kwargs.pop("fs", FS)
  with pytest.raises(ValueError, match=message):
    preprocess_ecg(change(ecg), fs, **kwargs)


def test_single_flat_lead_is_kept_as_the_original_keeps_it(ecg):
  """Some real CinC 2021 records have unrecorded (all-zero) leads: they scale to -1, not refused."""
  signal = _with(ecg, lambda x: x.__setitem__(7, 0.0))
  prepared = prepare_record(signal, FS)
  np.testing.assert_array_equal(prepared[7], -1.0)
  assert np.ptp(prepared[0]) == pytest.approx(2.0)


def test_online_stage_refuses_infinite_and_empty_windows():
  windows = np.zeros((3, 12, 2500))
  windows[2, 4, 9] = -np.inf
  with pytest.raises(ValueError, match=r"expected finite window values, found 1 infinite values in windows \[2\]"):
    model_inputs(windows)
  with pytest.raises(ValueError, match=r"a window is entirely NaN; there is no value to fill it with"):
    model_inputs(np.full((1, 12, 2500), np.nan))
  with pytest.raises(ValueError, match=r"expected windows of shape \(batch, 12, 2500\), got \(12, 2500\)"):
    model_inputs(np.zeros((12, 2500)))


# --------------------------------------------------------------------------------------------------
# Record files.

def _write_dat_record(folder: pathlib.Path, name: str, signal: np.ndarray, fs: float = FS) -> pathlib.Path:
  wfdb.wrsamp(name, fs=fs, units=["mV"] * 12, sig_name=list(STANDARD_LEADS), p_signal=signal.T,
              fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(folder))
  return folder / f"{name}.hea"


def test_truncated_dat_is_refused_with_its_size(tmp_path, ecg):
  header = _write_dat_record(tmp_path, "rec", ecg)
  data = (tmp_path / "rec.dat").read_bytes()
  (tmp_path / "rec.dat").write_bytes(data[:1000])
  with pytest.raises(ValueError, match=r"rec.dat is truncated: 1000 bytes, expected at least 72000 for "
                     r"3000 samples of 12 channels"):
    read_record(header)


def test_header_naming_a_missing_signal_file(tmp_path, ecg):
  header = _write_dat_record(tmp_path, "rec", ecg)
  (tmp_path / "rec.dat").unlink()
  with pytest.raises(FileNotFoundError, match=r"signal file .*rec.dat named in the header is missing"):
    read_record(header)


@pytest.mark.parametrize("text,message", [
    ("not a header at all\n", r"malformed WFDB header \("),
    ("rec 12 500 3000\n", r"malformed WFDB header: it declares 12 signals and describes 0"),
    ("", r"malformed WFDB header"),
])
def test_malformed_header(tmp_path, text, message):
  (tmp_path / "rec.hea").write_text(text)
  with pytest.raises(ValueError, match=rf"rec.hea: {message}"):
    read_record(tmp_path / "rec.hea")


def test_wfdb_record_below_100_hz(tmp_path, ecg):
  header = _write_dat_record(tmp_path, "slow", ecg[:, :600], fs=50)
  with pytest.raises(ValueError, match=r"slow.hea: sampling rate must be at least 100 Hz, got 50"):
    read_record(header)


def test_npy_without_a_sampling_rate_or_with_the_wrong_leads(tmp_path, ecg):
  np.save(tmp_path / "ecg.npy", ecg)
  with pytest.raises(ValueError, match=r"ecg.npy: the sampling rate is not in the file; pass fs \(Hz\)"):
    read_record(tmp_path / "ecg.npy")
  np.save(tmp_path / "eight.npy", ecg[:8])
  with pytest.raises(ValueError, match=r"eight.npy: expected 12 leads on one axis, got shape \(8, 3000\)"):
    read_record(tmp_path / "eight.npy", fs=FS)


def test_csv_without_lead_columns(tmp_path):
  (tmp_path / "ecg.csv").write_text("time,a,b\n0.000,1,2\n0.002,3,4\n0.004,5,6\n")
  with pytest.raises(ValueError, match=r"ecg.csv: no lead columns found; expected a header row naming the "
                     r"leads \['I', 'II'.*got columns \['time', 'a', 'b'\]"):
    read_record(tmp_path / "ecg.csv")


@pytest.mark.parametrize("layout,message", [
    ({"tracings": np.zeros((2, 4096, 12), np.float32)},
     r"datasets \['exam_id'\] missing; expected the CODE-15 layout .* found \['tracings'\]"),
    ({"tracings": np.zeros((2, 4096, 8), np.float32), "exam_id": np.arange(2)},
     r"'tracings' must have shape \(N, samples, 12\), got \(2, 4096, 8\)"),
    ({"tracings": np.zeros((2, 4096, 12), np.float32), "exam_id": np.arange(3)},
     r"'exam_id' must have shape \(2,\) to match 'tracings', got \(3,\)"),
    ({"tracings": np.zeros((2, 4096, 12), np.float32), "exam_id": np.array([1.5, 2.5])},
     r"'exam_id' must hold integers, got dtype float64"),
])
def test_wrong_hdf5_layout(tmp_path, layout, message):
  path = tmp_path / "exams.hdf5"
  with h5py.File(path, "w") as handle:
    for name, value in layout.items():
      handle.create_dataset(name, data=value)
  with pytest.raises(ValueError, match=message):
    next(read_code15_hdf5(path))


def test_hdf5_that_is_not_hdf5(tmp_path):
  (tmp_path / "exams.hdf5").write_text("tracings,exam_id\n")
  with pytest.raises(ValueError, match=r"exams.hdf5: not a readable HDF5 file"):
    next(read_code15_hdf5(tmp_path / "exams.hdf5"))


# --------------------------------------------------------------------------------------------------
# Model inputs.

@pytest.mark.parametrize("shape,message", [
    ((6000,), r"HubertECG expects input of shape \(batch, samples\), found shape \(6000,\)"),
    ((1, 12, 500), r"HubertECG expects input of shape \(batch, samples\), found shape \(1, 12, 500\)"),
    ((1, 60), r"input of 60 samples is too short for the conv feature encoder: at least 82 samples"),
])
def test_model_input_of_wrong_rank_or_too_short(params, shape, message):
  with pytest.raises(ValueError, match=message):
    HubertECG(CONFIG).apply({"params": params}, jnp.zeros(shape))


def test_attention_mask_of_another_shape(params):
  with pytest.raises(ValueError, match=r"attention_mask shape \(1, 5000\) does not match input \(1, 6000\)"):
    HubertECG(CONFIG).apply({"params": params}, jnp.zeros((1, 6000)), attention_mask=jnp.ones((1, 5000)))


# --------------------------------------------------------------------------------------------------
# Configs.

@pytest.mark.parametrize("changes,message", [
    ({"hidden_size": 30, "num_attention_heads": 2},
     r"hidden_size 30 is not divisible by num_conv_pos_embedding_groups 16"),
    ({"hidden_dropout": 1.5}, r"hidden_dropout must lie in \[0, 1\], found 1.5"),
    ({"compute_dtype": "float8"}, r"compute_dtype must be one of \('float32', 'bfloat16'\), found 'float8'"),
    ({"num_attention_heads": 5}, r"hidden_size 32 is not divisible by num_attention_heads 5"),
    ({"feat_extract_norm": "batch"}, r"feat_extract_norm must be 'group' or 'layer', found 'batch'"),
    ({"vocab_sizes": (8, 0), "ensemble_length": 2}, r"vocab_sizes must be a non-empty list of positive sizes"),
    ({"hidden_act": "relu"}, r"only the exact 'gelu' activation is supported, found hidden_act='relu'"),
    ({"hiden_size": 64}, r"unknown HubertECGConfig field\(s\): \['hiden_size'\]"),
])
def test_invalid_config_values(changes, message):
  with pytest.raises(ValueError, match=message):
    CONFIG.replace(**changes)


def test_unknown_preset_and_config_json_that_is_not_json(tmp_path):
  with pytest.raises(ValueError, match=r"unknown model size 'huge': expected one of \['base', 'large'"):
    HubertECGConfig.preset("huge")
  (tmp_path / "config.json").write_text("{'hidden_size': 32,}")
  with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
    HubertECGConfig.from_json(tmp_path / "config.json")


@pytest.mark.parametrize("override,message", [
    ("train.totl_steps=10", r"unknown config key 'train.totl_steps': train has \[.*'total_steps'"),
    ("trian.total_steps=10", r"unknown config section 'trian': the config has \['data', 'model'"),
    ("train.total_steps=ten", r"--config.train.total_steps expects int, found 'ten'"),
    ("train=3", r"'train' is a section, not a value"),
    ("model.size", r"a config override must look like key.sub=value, found 'model.size'"),
])
def test_config_override_with_unknown_key_or_bad_value(override, message):
  from hubert_ecg_jax.experiment import apply_overrides, pretraining_config

  with pytest.raises(ValueError, match=message):
    apply_overrides(pretraining_config("tiny"), [override])


def test_pretrain_command_refuses_unknown_overrides_and_configs(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  err = _cli_error(capsys, ["pretrain", "demo_pretrain", workdir, "--print-config",
                            "--config.train.totl_steps=10"])
  assert "unknown config key 'train.totl_steps': train has [" in err and "'total_steps'" in err
  err = _cli_error(capsys, ["pretrain", "pretrain_huge", workdir, "--print-config"])
  assert "no config file 'pretrain_huge': give a path to a .py file with get_config() or one of [" in err
  assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# Checkpoints of another size or another model, and unsafe pickles.

def test_checkpoint_of_another_size(tmp_path, hf_dir, capsys):
  other = _copy_hf_dir(hf_dir, tmp_path / "other", hidden_size=64)
  message = (r"the weights in .*other do not match the config: .*shape mismatch at .*: the config "
             r"expects \(.*64.*\), the weights have \(.*32.*\)")
  with pytest.raises(ValueError, match=message):
    load_pretrained(other)
  assert "do not match the config" in _cli_error(capsys, ["convert", str(other), str(tmp_path / "out")])
  assert not (tmp_path / "out").exists()


def test_our_model_dir_whose_config_does_not_match_its_params(tmp_path, params, capsys):
  save_model(tmp_path / "model", CONFIG, params)
  bigger = CONFIG.replace(num_hidden_layers=3)
  bigger.save_json(tmp_path / "model" / "config.json")
  with pytest.raises(ValueError, match=r"the params in .*model do not match the config: missing \d+ "
                     r"parameter\(s\): \['encoder/layers_2/"):
    load_pretrained(tmp_path / "model")
  assert "do not match the config" in _cli_error(capsys, ["export", str(tmp_path / "model"),
                                                          str(tmp_path / "hf")])


def test_checkpoint_of_another_model(tmp_path, hf_dir, capsys):
  from safetensors.numpy import save_file

  bert = tmp_path / "bert"
  bert.mkdir()
  save_file({"bert.embeddings.word_embeddings.weight": np.zeros((4, 2), np.float32),
             "bert.encoder.layer.0.attention.self.query.weight": np.zeros((2, 2), np.float32)},
            str(bert / "model.safetensors"))
  (bert / "config.json").write_text(json.dumps(CONFIG.to_hf_dict()))
  with pytest.raises(ValueError, match=r"2 key\(s\) of the checkpoint are not HuBERT-ECG parameters \(is it "
                     r"another model\?\): \['bert.embeddings.word_embeddings.weight'"):
    load_pretrained(bert)
  typed_bert = _copy_hf_dir(hf_dir, tmp_path / "typed_bert", model_type="bert")
  err = _cli_error(capsys, ["convert", str(typed_bert), str(tmp_path / "out")])
  assert "config.json is for model_type 'bert': expected 'hubert_ecg'" in err


def test_unreadable_weights_file(tmp_path, hf_dir):
  broken = _copy_hf_dir(hf_dir, tmp_path / "broken")
  data = (broken / "model.safetensors").read_bytes()
  (broken / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
    load_pretrained(broken)


class _Payload:
  """Unpickling this creates `MARKER`: proof that code from the file ran."""
  marker: pathlib.Path

  def __reduce__(self):
    return (pathlib.Path.touch, (self.marker,))


def test_pt_with_unexpected_pickled_classes_never_runs_the_payload(tmp_path, params, capsys):
  import torch

  _Payload.marker = tmp_path / "payload-ran"
  state = {k: torch.from_numpy(np.array(v)) for k, v in flax_to_state_dict(params).items()}
  path = tmp_path / "evil.pt"
  torch.save({"model_state_dict": state, "model_config": _Payload()}, path)
  torch.load(path, weights_only=False)  # an unsafe load does run it: the payload is live
  assert _Payload.marker.exists()
  _Payload.marker.unlink()

  with pytest.raises(ValueError, match=r"evil.pt contains pickled objects other than the model config, "
                     r"refused for safety: \['builtins.getattr', 'pathlib.Path', 'pathlib.PosixPath'\]"):
    load_pretrained(path)
  assert "refused for safety" in _cli_error(capsys, ["convert", str(path), str(tmp_path / "out")])
  assert not _Payload.marker.exists() and not (tmp_path / "out").exists()


EVIL_MODULE = """
import pathlib
MARKER = pathlib.Path(__file__).with_name("imported")
MARKER.touch()


class HubertConfig:
  def __init__(self, fields):
    self.__dict__.update(fields)

  def __setstate__(self, state):
    MARKER.with_name("setstate-ran").touch()
    self.__dict__.update(state)
"""


def test_pt_config_class_is_read_as_plain_data_without_importing_its_module(tmp_path, params, monkeypatch):
  """The one class allowed in (the original's config) is never imported or run: only its fields."""
  import sys

  import torch

  (tmp_path / "evil_config.py").write_text(EVIL_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  import evil_config

  state = {k: torch.from_numpy(np.array(v)) for k, v in flax_to_state_dict(params).items()}
  fields = {k: v for k, v in CONFIG.to_hf_dict().items() if k != "model_type"}
  torch.save({"model_state_dict": state, "model_config": evil_config.HubertConfig(fields)},
             tmp_path / "original.pt")
  del sys.modules["evil_config"]
  (tmp_path / "imported").unlink()
  config, loaded = load_pretrained(tmp_path / "original.pt")
  assert config == CONFIG
  _tree_equal(loaded, params)
  assert "evil_config" not in sys.modules
  assert not (tmp_path / "imported").exists() and not (tmp_path / "setstate-ran").exists()


# --------------------------------------------------------------------------------------------------
# Output folders that cannot be written, and full disks.

def test_output_under_a_regular_file(tmp_path, hf_dir, params, capsys):
  """Root ignores file modes, so the portable unwritable output is a path below a regular file."""
  blocker = tmp_path / "notes.txt"
  blocker.write_text("a file, not a folder")
  for target in (blocker / "model", blocker / "sub" / "model"):
    err = _cli_error(capsys, ["convert", str(hf_dir), str(target)])
    assert f"cannot write {target}: {blocker} is a file, expected a folder there" in err
  err = _cli_error(capsys, ["export", str(hf_dir), str(blocker / "hf")])
  assert f"{blocker} is a file, expected a folder there" in err
  with pytest.raises(FileExistsError, match=r"notes.txt is a file: expected a folder \(new or empty\)"):
    export_hf_directory(CONFIG, params, blocker)
  assert blocker.read_text() == "a file, not a folder"


def test_output_in_a_read_only_folder(tmp_path, hf_dir, capsys, monkeypatch):
  """chmod 0o500 stops a normal user; root writes anyway, so there the OS check is made to answer
  as it would for a normal user."""
  folder = tmp_path / "read-only"
  folder.mkdir()
  folder.chmod(0o500)
  try:
    if os.geteuid() == 0:
      real_access = os.access
      monkeypatch.setattr(os, "access", lambda path, mode: False if pathlib.Path(path) == folder
                          else real_access(path, mode))
    err = _cli_error(capsys, ["convert", str(hf_dir), str(folder / "model")])
    assert f"cannot write {folder / 'model'}: the folder {folder} is not writable" in err
    assert list(folder.iterdir()) == []
  finally:
    folder.chmod(0o700)


def _disk_full(*args, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_saving_a_model_keeps_the_previous_one(tmp_path, params, monkeypatch):
  save_model(tmp_path / "model", CONFIG, params, metadata={"version": 1})
  newer = jax.tree.map(lambda a: a + 1.0, params)

  def half_written(self, path):  # the params are on disk, config.json is cut short
    pathlib.Path(path).write_text('{"hidden_size": ')
    _disk_full()

  monkeypatch.setattr(HubertECGConfig, "save_json", half_written)
  with pytest.raises(OSError) as raised:
    save_model(tmp_path / "model", CONFIG, newer, metadata={"version": 2}, overwrite=True)
  assert raised.value.errno == errno.ENOSPC
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left behind
  config, restored, metadata = load_model(tmp_path / "model")
  assert config == CONFIG and metadata == {"version": 1}
  _tree_equal(restored, params)


def test_full_disk_while_exporting_keeps_the_previous_export(tmp_path, params, monkeypatch):
  out = export_hf_directory(CONFIG, params, tmp_path / "hf")
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  write_bytes = pathlib.Path.write_bytes

  def half_then_disk_full(path: pathlib.Path, data: bytes) -> None:
    write_bytes(path, data[:len(data) // 2])
    _disk_full()

  monkeypatch.setattr(pathlib.Path, "write_bytes", half_then_disk_full)  # the weights, staged
  with pytest.raises(OSError, match="No space left on device"):
    export_hf_directory(CONFIG, jax.tree.map(lambda a: a + 1.0, params), out, overwrite=True)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_full_disk_during_a_training_checkpoint(tmp_path):
  """A checkpoint cut short is never listed or restored; the next save of that step replaces it."""
  from hubert_ecg_jax.train.checkpointing import CheckpointManager, DataPosition, abstract_like

  position = {"batches": 0}

  def save(path):
    pathlib.Path(f"{path}.json").write_text(json.dumps(position))

  def restore(path):
    position.update(json.loads(pathlib.Path(f"{path}.json").read_text()))

  def save_then_disk_full(path):
    pathlib.Path(f"{path}.json").write_text('{"batc')
    _disk_full()

  def data_position(save_fn=save):
    return DataPosition(SimpleNamespace(save=save_fn, restore=restore))

  state = {"w": jnp.arange(4.0), "b": jnp.ones(3)}
  manager = CheckpointManager(tmp_path / "ckpt")
  manager.save(1, state, data_position())
  position["batches"] = 7
  with pytest.raises(OSError) as raised:
    manager.save(2, jax.tree.map(lambda a: a + 1, state), data_position(save_then_disk_full))
  assert raised.value.errno == errno.ENOSPC
  manager.close()

  manager = CheckpointManager(tmp_path / "ckpt")  # as a resumed run sees it
  assert manager.steps == [1] and manager.latest_step == 1
  on_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  _tree_equal(manager.restore(abstract_like(state, on_device), data_position()), state)
  assert position == {"batches": 0}
  assert manager.save(2, state, data_position())
  assert manager.steps == [1, 2] and sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2"]
  manager.close()


# --------------------------------------------------------------------------------------------------
# Batch jobs: bad records reported, the job carries on; empty folders; missing files.

def test_preprocess_reports_bad_records_and_carries_on(tmp_path, ecg, capsys):
  from hubert_ecg_jax.data import records as R

  src = tmp_path / "src"
  write_wfdb_folder(src, 2, seed=1, duration_s=6.0)
  _write_dat_record(src, "TRUNCATED", ecg)
  (src / "TRUNCATED.dat").write_bytes((src / "TRUNCATED.dat").read_bytes()[:5000])
  (src / "MALFORMED.hea").write_text("twelve leads, trust me\n")
  np.save(src / "EIGHT.npy", ecg[:8])
  np.save(src / "FLAT.npy", np.zeros_like(ecg))
  np.save(src / "NANS.npy", _with(ecg, lambda x: x.__setitem__((2, slice(0, 5)), np.nan)))
  np.save(src / "INF.npy", _with(ecg, lambda x: x.__setitem__((3, 0), np.inf)))
  out = tmp_path / "out"
  assert main(["preprocess", str(src), str(out), "--fs", "500", "--shards", "1", "--workers", "1",
               "--quiet"]) == 0
  captured = capsys.readouterr()
  assert "2 records in 1 shards, 6 failed" in captured.out
  manifest = R.read_manifest(out)
  assert manifest.complete and manifest.num_records == 2
  reasons = {pathlib.Path(f["path"]).stem: f["reason"] for f in manifest.failures}
  assert sorted(reasons) == ["EIGHT", "FLAT", "INF", "MALFORMED", "NANS", "TRUNCATED"]
  assert "TRUNCATED.dat is truncated: 5000 bytes, expected at least 72000" in reasons["TRUNCATED"]
  assert "MALFORMED.hea: malformed WFDB header" in reasons["MALFORMED"]
  assert "expected 12 leads on one axis, got shape (8, 3000)" in reasons["EIGHT"]
  assert "all 12 leads are flat" in reasons["FLAT"]
  assert "5 NaN samples in leads ['III']" in reasons["NANS"]
  assert "found 1 infinite values in leads ['aVR']" in reasons["INF"]
  for name in reasons:
    assert f"skipped {src}/{name}" in captured.err
  assert sorted(r.record_id for r in R.iterate_records(out)) == ["SYN00000", "SYN00001"]


def test_empty_records_folder(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  err = _cli_error(capsys, ["preprocess", str(tmp_path / "empty"), str(tmp_path / "out"), "--quiet"])
  assert "no records found in" in err and "(looked for .hea, .npy, .hdf5 and .h5 files)" in err
  assert not (tmp_path / "out").exists()
  err = _cli_error(capsys, ["labels-template", str(tmp_path / "empty")])
  assert "no records (.hea, .npy) found under" in err
  with pytest.raises(FileNotFoundError, match=r"record folder .*missing not found"):
    find_records(tmp_path / "missing")


def test_labels_csv_referencing_missing_files(tmp_path, capsys):
  from hubert_ecg_jax.data import records as R
  from hubert_ecg_jax.data.tfds_folder import EcgFolder

  folder = tmp_path / "records"
  write_wfdb_folder(folder, 1, seed=2, duration_s=6.0)
  (folder / "labels.csv").write_text("record,AF\nSYN00000.hea,0\ngone/SYN00099.hea,1\nSYN00098.hea,1\n")
  import tensorflow_datasets as tfds

  builder = EcgFolder(data_dir=tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match=r"labels.csv lists 2 record\(s\) not found under .*records: "
                     r"\['gone/SYN00099.hea', 'SYN00098.hea'\]; expected paths relative to the manual dir"):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(folder)))

  listing = tmp_path / "listing.csv"  # the preprocess job reports them and goes on
  listing.write_text("filename,age,sex,AF\nrecords/SYN00000.hea,60,M,0\nrecords/SYN00099.hea,61,F,1\n")
  assert main(["preprocess", str(listing), str(tmp_path / "out"), "--workers", "1", "--quiet"]) == 0
  assert "1 records in 1 shards, 1 failed" in capsys.readouterr().out
  [failure] = R.read_manifest(tmp_path / "out").failures
  assert failure["path"].endswith("SYN00099.hea")
  assert "FileNotFoundError: WFDB header" in failure["reason"] and "not found" in failure["reason"]


# --------------------------------------------------------------------------------------------------
# k-means models and features.

def _kmeans_model(dim: int = 4) -> KMeansModel:
  centers = np.eye(3, dim, dtype=np.float32)
  return KMeansModel(centers, False, np.ones(3, np.int64), 0.0, (0.0,), KMeansConfig(k=3))


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory, ecg) -> pathlib.Path:
  """Two records of the synthetic ECG, prepared, in one shard."""
  directory = tmp_path_factory.mktemp("records") / "records"
  prepared = prepare_record(ecg, FS)
  records_lib.write_records(directory, [records_lib.StoredRecord(
      f"r{i}", "synthetic", prepared, np.zeros(1, np.float32), FS) for i in range(2)], ["none"])
  return directory


@pytest.mark.parametrize("content,message", [
    ("text", r"found neither an .npz archive nor a .npy array"),
    ("npy", r"found a single array of shape \(3,\)"),
    ("npz", r"missing \['centers', 'normalize'"),
    ("truncated", r"found a damaged archive"),
])
def test_kmeans_model_file_that_is_not_one(tmp_path, records_dir, content, message, capsys):
  path = tmp_path / "kmeans.npz"
  if content == "text":
    path.write_text("centres: 100\n")
  elif content == "npy":
    with open(path, "wb") as handle:
      np.save(handle, np.zeros(3))
  elif content == "npz":
    np.savez(path, weights=np.zeros(3))
  else:
    _kmeans_model().save(path)
    path.write_bytes(path.read_bytes()[:100])
  full = rf"kmeans.npz: not a k-means model file: expected an .npz archive written by KMeansModel.save, {message}"
  with pytest.raises(ValueError, match=full):
    KMeansModel.load(path)
  err = _cli_error(capsys, ["targets", str(records_dir), str(tmp_path / "out"), "--kmeans", str(path),
                            "--feature-set", "stats"])
  assert "not a k-means model file" in err and not (tmp_path / "out").exists()


def test_features_of_the_wrong_dimension_for_a_kmeans_model(tmp_path, records_dir, capsys):
  model = _kmeans_model(dim=4)
  with pytest.raises(ValueError, match=r"expected vectors of shape \(\.\.\., 4\), got shape \(10, 3\)"):
    model.predict(np.zeros((10, 3), np.float32))
  model.save(tmp_path / "kmeans.npz")
  err = _cli_error(capsys, ["targets", str(records_dir), str(tmp_path / "out"), "--kmeans",
                            str(tmp_path / "kmeans.npz"), "--feature-set", "stats"])
  assert "k-means model 0 expects 4-dim vectors, the features have 16" in err
  assert not list((tmp_path / "out").glob("units-*"))  # no units shard written
