"""Training: the engine (resume, checkpoints, signals, non-finite stop), optimizer, train state, the
per-device step and its update tail, and pre-training (masking, objectives, the job)."""
