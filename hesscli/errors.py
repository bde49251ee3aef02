"""One exception hierarchy. Only :func:`hesscli.cli.main` maps these to exit codes.

Messages are for humans: they name the input, what was found, and the fix, on one line.
"""

from __future__ import annotations

__all__ = [
    "HesscliError",
    "InputError",
    "AnalysisError",
    "BackendUnavailable",
    "UnsupportedAnalysis",
    "ResultsNotSaved",
    "ConvergenceWarning",
]


class HesscliError(Exception):
    """Root of every error hesscli raises on purpose."""

    exit_code: int = 1


class InputError(HesscliError, ValueError):
    """Bad usage or bad input (file, spec, option). CLI exit code 2."""

    exit_code = 2


class AnalysisError(HesscliError, RuntimeError):
    """An analysis failed on valid input (e.g. NaN curvature). CLI exit code 1."""

    exit_code = 1


class BackendUnavailable(InputError):
    """The selected backend's package is not installed; the message says what to install."""


class UnsupportedAnalysis(InputError):
    """The selected backend cannot run this analysis/curvature/layer; the message lists what it can."""


class ResultsNotSaved(HesscliError):
    """Results were computed but could not be written under ``--out`` (the CLI prints them). Exit code 1."""

    exit_code = 1


class ConvergenceWarning(UserWarning):
    """An iterative method stopped before reaching its tolerance (reported as converged=False)."""
