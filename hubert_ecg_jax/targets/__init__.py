"""Pre-training targets: iteration-1 frame features, hidden-state features, k-means in JAX, units."""
