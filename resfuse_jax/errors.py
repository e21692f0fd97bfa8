"""The errors a user can fix, and the clean stop; everything else is a bug.

``cli.run`` turns any ``UserError`` into one line on stderr and exit status 1,
and ``Preempted`` into exit status 0 (the checkpoint is saved, requeue the job);
any other exception keeps its traceback. Each message names the file, case or
setting and the problem. The user errors also derive from ``ValueError`` so
callers that catch bad values keep working.
"""

from __future__ import annotations


class UserError(Exception):
  """Bad input, settings or files that the user can fix; the message says how."""


class DataError(UserError, ValueError):
  """Bad or missing input data; the message names the case, file and problem."""


class ConfigError(UserError, ValueError):
  """A config value, flag or name that is not valid; the message lists the valid ones."""


class CheckpointError(UserError, ValueError):
  """A workdir, checkpoint or export that is missing, incomplete or of another model."""


class OutputError(UserError, OSError):
  """An output path that cannot be written (read-only, full, wrong type); names the path."""


class WorkdirBusy(UserError):
  """Another run holds the workdir's lock; the message names its host and PID."""


class Preempted(Exception):
  """Training stopped at a step boundary on request; the workdir resumes from there."""
