"""Self-configuration: the dataset fingerprint, the plan rules, and memory measured by XLA.

- ``fingerprint``: per-case statistics of the source files (numpy only; the preprocessing
  workers compute them), cached beside the preprocessed cache;
- ``rules``: nnU-Net v2's planning rules with named constants (spacing, patch, pooling,
  batch cap);
- ``memory``: XLA's memory analysis of the compiled training step, one timed step, the budget;
- ``search``: the largest geometry that fits, in few compiles;
- ``planner``: ``make_plan`` / ``apply_plan`` / ``plan_and_train`` (``main --plan``).

This package imports nothing at import time, so the fingerprint's worker processes
(spawned) load numpy, not JAX; import the submodule you need.
"""
