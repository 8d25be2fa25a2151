"""Imports of optional or noisy dependencies, in one place."""

from __future__ import annotations

import contextlib
import io


def import_openmmtools():
    """Import openmmtools without the banner pymbar prints to stdout when JAX is missing."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import openmmtools  # noqa: F401
        import openmmtools.testsystems  # noqa: F401
    return openmmtools
