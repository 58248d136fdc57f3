"""Experiment configs, one recipe a file; the wheel ships this folder as `hubert_ecg_jax.configs`.

Name one on the command line without its path: `hubert-ecg-jax pretrain pretrain_base RUN_DIR`.
"""
