"""Pre-training: optimizer, train state, the per-device step, launchers, checkpoints and the loop."""
