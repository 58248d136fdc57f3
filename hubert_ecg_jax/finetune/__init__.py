"""Fine-tuning: losses and loss weights, tasks, freezing and layer-wise LR decay, the data-parallel
step, the job the training engine runs (validation, early stopping), and the linear probe."""
