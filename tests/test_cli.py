"""The command-line modules: importable together (they share flag names), one-line errors."""

import importlib

from absl import flags

CLIS = ["main", "preprocess", "predict", "evaluate", "compare", "export"]


def test_every_cli_module_imports_alongside_the_others_without_defining_flags():
  before = set(flags.FLAGS)
  modules = [importlib.import_module(f"resfuse_jax.{name}") for name in CLIS]
  assert set(flags.FLAGS) == before  # flags are defined by run(), not by import
  for module in modules:
    assert callable(module.run) and callable(module.define_flags)
