"""ECG data: preprocessing (the original's semantics), file readers, labels, synthetic ECGs and TFDS
builders (import `tfds_ptbxl` / `tfds_folder` explicitly; they need TensorFlow Datasets)."""
from __future__ import annotations

from hubert_ecg_jax.data.labels import MultiLabelEncoder, read_split_csv
from hubert_ecg_jax.data.preprocess import (
    MODEL_FS, MODEL_INPUT_LENGTH, STANDARD_LEADS, TARGET_FS, WINDOW_SAMPLES, crop_offsets, crop_window,
    model_input, model_inputs, prepare_record, preprocess_ecg, reorder_leads)
from hubert_ecg_jax.data.readers import EcgRecord, find_records, read_code15_hdf5, read_record
from hubert_ecg_jax.data.synthetic import SYNTHETIC_CLASSES, generate_dataset, generate_ecg, write_wfdb_folder

__all__ = [
    "MODEL_FS", "MODEL_INPUT_LENGTH", "STANDARD_LEADS", "SYNTHETIC_CLASSES", "TARGET_FS", "WINDOW_SAMPLES",
    "EcgRecord", "MultiLabelEncoder", "crop_offsets", "crop_window", "find_records", "generate_dataset",
    "generate_ecg", "model_input", "model_inputs", "prepare_record", "preprocess_ecg", "read_code15_hdf5",
    "read_record", "read_split_csv", "reorder_leads", "write_wfdb_folder"]
