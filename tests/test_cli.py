"""The command-line modules: importable together (they share flag names)."""

import importlib

from absl import flags

CLIS = ["main", "preprocess", "predict", "evaluate", "compare", "export"]
OUR_FLAGS = {"config", "workdir", "models", "seeds", "output", "pre", "post", "model", "tta"}


def test_every_cli_module_imports_alongside_the_others_without_defining_flags():
  modules = [importlib.import_module(f"resfuse_jax.{name}") for name in CLIS]
  assert not OUR_FLAGS & set(flags.FLAGS)  # defined by run(), not by import
  for module in modules:
    assert callable(module.run) and callable(module.define_flags)
