"""The vocabulary every method shares: the training setup, model shapes (from config.json and the
bundled catalog), architectures, GPUs, byte units, errors and the memory components."""
