"""ECG data: readers, preprocessing (the original's semantics), labels, records, ingestion, the
tf.data pipeline, synthetic ECGs and TFDS builders (`tfds_ptbxl`, `tfds_folder`: TensorFlow Datasets)."""
