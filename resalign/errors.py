"""The one exception hierarchy of resalign.

Every error a user can cause derives from :class:`ResAlignError`; the CLI prints its message on one
line and exits non-zero. Errors raised by the native extension (``resalign._native``) are mapped onto
the same classes.
"""

from __future__ import annotations


class ResAlignError(Exception):
    """Base class of every resalign error."""

    exit_code = 1


class ConfigError(ResAlignError, ValueError):
    """A configuration value, command-line flag or input file is invalid (the message names it)."""

    exit_code = 2


class RunDirLocked(ConfigError):
    """The run directory (``--out``) is being written by another resalign process."""


class DataError(ResAlignError, ValueError):
    """A dataset, prompt file or image folder is missing or malformed."""

    exit_code = 2


class ModelLoadError(ResAlignError):
    """A model folder or weights file cannot be loaded."""

    exit_code = 2


class MissingWeightsError(ModelLoadError):
    """A component needs local weights (Inception, CLIP, a classifier) that were not given."""


class PluginError(ResAlignError):
    """A plugin failed to load, registered something invalid, or clashed with another plugin."""


class DuplicateComponentError(PluginError):
    """The same (kind, name) was registered by two providers."""


class UnknownComponentError(PluginError, KeyError):
    """A component name that no plugin registered was asked for."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class NativeError(ResAlignError):
    """Base class of errors raised by the Rust extension ``resalign._native``."""


class ShapeError(NativeError, ValueError):
    """Array shapes or dtypes do not match what a kernel expects."""


class NumericalError(NativeError, ArithmeticError):
    """A kernel met NaN/inf input or a numerically invalid intermediate."""


class SolverError(ResAlignError, ArithmeticError):
    """A hypergradient solver diverged or produced non-finite values."""


class SimulationDiverged(SolverError):
    """A simulated fine-tuning of Alg. 2 diverged (non-finite values or a growing fine-tuning loss)."""


class RunInterrupted(ResAlignError):
    """A run was interrupted (Ctrl-C); its last checkpoint is on disk and it can be resumed."""

    exit_code = 130
