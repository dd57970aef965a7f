"""Benchmarks of lr_batch_callback against its peers; run ``python benchmarks/run.py``."""
