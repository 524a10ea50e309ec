"""Features to a trained head: the training loop, the run folder, fine-tuning, optimizer state, metrics."""
