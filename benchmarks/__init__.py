"""Speed measurements, each run from the repository root: ``python -m benchmarks.<name>``."""
