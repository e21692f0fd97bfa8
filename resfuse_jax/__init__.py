"""resfuse_jax: residual fusion of pre- and post-contrast MRI for lesion segmentation.

Layers, top to bottom (import-linter contracts in pyproject.toml): the commands
(``main``, ``predict``, ``evaluate``, ``export``, ``compare``, ``preprocess``) ->
``comparison`` -> ``train`` -> ``eval`` -> ``losses``, ``checkpointing``,
``sharding``, ``writers`` -> ``models``, ``data`` -> ``config_lib``, ``files`` -> ``errors``.
"""
