"""Training: the one loop, checkpoint writing, distribution strategies, activation checkpointing."""
