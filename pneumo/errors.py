"""The project's own error types: failures a user can fix, whose message says what to do.

The command line reports these in one line (see :func:`pneumo.cli.main`); anything else, a bug or
an error from deep inside Keras or MLflow, keeps its traceback.
"""

from __future__ import annotations


class PneumoError(Exception):
    """Base of every error the project raises on purpose."""


class ConfigError(PneumoError, ValueError):
    """A parameter that cannot be used as given: an unknown choice or field, an impossible range, no model."""


class DataError(PneumoError, RuntimeError):
    """The data cannot be found, downloaded, read or split."""


class ImageError(PneumoError, ValueError):
    """Bytes that cannot be turned into a model input; the message names the problem, never a header value."""
