"""Developer tools apart from the core: benchmarks, FLOP counts and the PyTorch reference model."""
