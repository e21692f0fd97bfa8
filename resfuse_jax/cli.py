"""What every ``python -m resfuse_jax.X`` command shares around its ``main``."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from resfuse_jax import backend, config_lib, data, validation, writers
from resfuse_jax.errors import Preempted, UserError

FLAGS = flags.FLAGS
HELP_ARGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")
HINT = "(run with --help to see the flags)"

flags.DEFINE_string(
  "compilation_cache",
  "",
  "XLA's persistent compilation cache: a folder, 'off', or empty for $JAX_COMPILATION_CACHE_DIR, "
  "else <$RESFUSE_CACHE or ~/.cache/resfuse_jax>/xla. A later process (a resumed run, evaluate, "
  "predict) loads what an earlier one compiled instead of compiling it again.",
)


def fail(message) -> None:
  """One line (or one per problem) on stderr, exit status 1: no log line repeating it."""
  sys.exit(f"error: {message}")


def flag_error_line(error: Exception) -> str:
  """absl's flag error as one line: the missing flags named, a config file's own error kept."""
  text = str(error)
  missing = re.findall(r"Flag --(\w+) must have a value other than None", text)
  if missing:
    return f"missing {', '.join('--' + m for m in missing)} {HINT}"
  if "Traceback" in text:  # the config file raised: its last line is the error itself
    last = [line for line in text.splitlines() if line.strip()][-1]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
  return f"{'; '.join(text.splitlines())} {HINT}"


def _module_key(main: Callable) -> str:
  """The name absl filed the command's flags under: its module, or its file under ``-m``."""
  by_module = FLAGS.flags_by_module_dict()
  for key in (main.__module__, sys.argv[0]):
    if key in by_module:
      return key
  return main.__module__


def command_help(main: Callable) -> str:
  """The command's docstring and its own flags (not those of the libraries it imports)."""
  module = sys.modules.get(main.__module__)
  text = [((module.__doc__ if module else "") or "").strip(), "", "flags:"]
  text.append(FLAGS.module_help(_module_key(main)))
  text.append(FLAGS.module_help(__name__))
  if "config" in FLAGS:
    text += [
      "",
      "  --config.<section>.<key>=VALUE: set any config key, e.g. --config.train.steps=500 "
      "(every key and its default: resfuse_jax/config_lib.py)",
    ]
  return "\n".join(text)


def _override_problem(argv: list[str]) -> str | None:
  """The first ``--config.KEY`` that the config file does not have, with the nearest key."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  keys = [m.group(1) for a in argv if (m := re.match(r"--config\.([\w.]+)", a))]
  if spec is None or not keys:
    return None
  try:
    config = config_lib.load(spec)
  except Exception:  # the file itself fails: the original message says more
    return None
  for key in keys:
    try:
      config_lib.get_path(config, key)
    except KeyError:
      return validation.unknown_key(config, key)
  return None


def parse_flags(argv: list[str], main: Callable) -> list[str]:
  """``FLAGS(argv)`` inside the error mapping: --help exits 0, a flag error is one line."""
  args = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
  if any(a in HELP_ARGS for a in args):
    print(command_help(main))
    sys.exit(0)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(flag_error_line(e))
  except UserError as e:
    fail(e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # a --config.KEY=VALUE
    fail(_override_problem(argv) or f"cannot apply the config overrides: {e} {HINT}")
  return []


class _ResolvingParser(flags.ArgumentParser):
  """ml_collections' config-file parser, given the file a shipped config's name stands for."""

  def __init__(self, parser: flags.ArgumentParser):
    self._parser = parser

  def parse(self, argument):
    return self._parser.parse(config_lib.resolve_spec(argument))

  def flag_type(self):
    return self._parser.flag_type()


def define_config_flag(help_string: str, lock_config: bool = True) -> None:
  """``--config``: a config file or a shipped config's name (``brats``), then ``:args``.

  ml_collections' own flag, so ``--config.KEY=VALUE`` overrides, ``get_config_filename`` (the
  spec as given, which ``config_lib.load`` resolves the same way) and ``get_override_values``
  keep working; only its parser is wrapped, to resolve names before loading.
  """
  config_flags.DEFINE_config_file("config", None, help_string, lock_config=lock_config)
  flag = FLAGS["config"]
  flag.parser = _ResolvingParser(flag.parser)


def define_cache_dir_flag() -> None:
  """``--cache_dir`` for the commands that build or read the preprocessed cache from a config."""
  flags.DEFINE_string(
    "cache_dir", None, "Preprocessed cache folder (overrides data.cache_dir and $RESFUSE_CACHE)."
  )


def apply_cache_dir_flag(config) -> None:
  """``--cache_dir``, when given, wins over the config's ``data.cache_dir``."""
  if flags.FLAGS.cache_dir:
    config.data.cache_dir = flags.FLAGS.cache_dir


def compilation_cache_folder(value: str) -> Path | None:
  """``--compilation_cache``: None for ``off``; a folder; "" for JAX's own setting or the user's cache."""
  if value.strip().lower() in ("off", "none", "false", "0"):
    return None
  if value:
    return Path(value)
  import jax

  return Path(jax.config.jax_compilation_cache_dir or data.default_cache_dir() / "xla")


def prepare_process(config) -> None:
  """What every command sets before JAX starts its backends: the GPU conv layout (the
  config's, else the backend's column), the platform's threefry flavour and the
  persistent compilation cache."""
  backend.apply_conv_layout(config.model.conv_layout if config is not None else "auto")
  backend.apply_rng_default()
  backend.use_compilation_cache(compilation_cache_folder(FLAGS.compilation_cache))


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)`` with library logs quieted and user errors reported as one line.

  Flags are parsed inside the mapping (``parse_flags``); a config given by ``--config`` is
  validated and the process prepared (``prepare_process``) before ``main`` runs. A ``UserError`` (bad data,
  config, flag or checkpoint: its message names the file and the problem) or a usage
  error exits with status 1 and no traceback; a ``Preempted`` stop (checkpoint saved)
  exits 0; anything else is a bug and keeps its traceback.
  """

  def wrapped(argv):
    writers.quiet_library_logs()
    try:
      config = FLAGS.config if "config" in FLAGS else None
      if config is not None:
        validation.check(config)
      prepare_process(config)
      main(argv)
    except UserError as e:
      fail(e)
    except app.UsageError as e:
      fail(f"{e} {HINT}")
    except Preempted as e:  # a clean stop: the checkpoint is saved, the job can be requeued
      logging.warning("%s", e)
      sys.exit(0)

  app.run(wrapped, flags_parser=lambda argv: parse_flags(argv, main))
