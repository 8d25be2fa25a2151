"""Imports of optional or noisy dependencies, in one place."""

from __future__ import annotations

import contextlib
import io


def import_pymbar():
    """Import pymbar without the banner it prints when JAX is missing (and its timeseries warning)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import pymbar
    return pymbar


def import_openmmtools():
    """Import openmmtools (which imports pymbar) without pymbar's banner."""
    import_pymbar()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import openmmtools  # noqa: F401
        import openmmtools.testsystems  # noqa: F401
    return openmmtools
