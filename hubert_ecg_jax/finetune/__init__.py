"""Fine-tuning: losses and loss weights, tasks, freezing and layer-wise LR decay, the data-parallel
step, the training loop with validation and early stopping, and the linear probe."""
