"""The dataset configs that ship inside the package, so ``--config=brats`` works from any folder.

Each module is a config file (``get_config(arg)``), loaded by path through ``config_lib.load`` or
the ``--config`` flag, never imported as ``resfuse_jax.configs.X``. A checkout's top-level
``configs`` is a link to this folder, so ``--config=configs/brats.py`` names the same file.
"""
