"""The quickstart notebook runs end to end (so it never rots), on a tiny classifier and a real ECG."""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import nbformat
from nbclient import NotebookClient

from hubert_ecg_jax import HubertECGConfig
from hubert_ecg_jax.classifier import HubertECGForClassification
from hubert_ecg_jax.tasks import Task
from hubert_ecg_jax.inference import classifier_metadata
from hubert_ecg_jax.model_dir import save_model

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path, sample_data_dir, monkeypatch):
  config = HubertECGConfig.preset("tiny")
  labels = ("164889003", "426783006", "59118001")
  model = HubertECGForClassification(config, num_labels=len(labels))
  params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 6000)))["params"]
  task = Task("multi_label", labels, labels)
  save_model(tmp_path / "classifier", config, params,
             metadata=classifier_metadata(task, None, 0.1, thresholds=[0.5, 0.5, 0.5]))
  monkeypatch.setenv("HUBERT_ECG_MODEL", str(tmp_path / "classifier"))
  monkeypatch.setenv("HUBERT_ECG_SAMPLE", str(sample_data_dir / "E07500.hea"))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  work = tmp_path / "run"
  work.mkdir()
  NotebookClient(notebook, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(work)}}).execute()
  text = "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []))
  assert "(12, 5000) 500 Hz" in text and "(6000,) float32" in text
  assert "last hidden state: (1, 93, 32) layers: 3" in text
  assert all(label in text for label in labels)
  images = [output for cell in notebook.cells for output in cell.get("outputs", [])
            if "image/png" in output.get("data", {})]
  assert len(images) == 3
  assert (work / "ecg_findings.png").stat().st_size > 20_000
  assert "sinus rhythm (NSR)" in text and "explaining " in text  # findings named in words
  assert (work / "ecg_explained.png").stat().st_size > 20_000
