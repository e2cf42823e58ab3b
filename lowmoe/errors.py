"""Errors a user can act on.

Every failure that comes from the user's input (a flag, a file, a checkpoint) is raised as a
``LowmoeError`` subclass with a one-line message saying what was found, what was expected and
what to do. The CLI prints that line and exits non-zero; the Python API lets it propagate.
"""


class LowmoeError(Exception):
    """Base class of every error lowmoe raises on purpose."""

    exit_code = 2


class ConfigError(LowmoeError):
    """A flag, option or config value is invalid."""


class CheckpointError(LowmoeError):
    """The input checkpoint is missing, incomplete or corrupt."""


class UnsupportedModelError(LowmoeError):
    """The checkpoint's family has no adapter."""


class CalibrationError(LowmoeError):
    """Calibration data is missing, empty or malformed."""


class PlanError(LowmoeError):
    """A plan file is malformed or does not fit the model."""


class OutputError(LowmoeError):
    """The output directory cannot be written safely (exists, is the input, disk full, ...)."""


class ResourceError(LowmoeError):
    """The machine ran out of memory mid-pass (the device, page-locked or ordinary host memory)."""


class DistributedError(LowmoeError):
    """A run on several processes (torchrun) lost one of them: a crash, a kill, a hang past the timeout."""

    exit_code = 1
