"""Build hook of openmm-backmap: compile the native OpenMM plugin (cpp/) with CMake during build_py.

The metadata is in pyproject.toml; this file only adds the plugin build and marks wheels as
platform-specific.  The plugin is compiled against the torch and OpenMM already installed, so
install with ``pip install --no-build-isolation .`` (or ``-e .``) after ``torch==2.13.0``,
``openmm``, ``cmake`` and ``swig``.  If the build fails the package still installs and works with
the openmm-torch or PythonForce backends; the reason is printed and written to
``openmm_backmap/_plugin/BUILD_FAILED``.  Set ``OPENMM_BACKMAP_SKIP_PLUGIN=1`` to skip the build.
"""

import os
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "cpp"))


class BuildWithPlugin(build_py):
    """build_py that also configures, builds and installs the cpp/ plugin into the package."""

    def run(self):
        super().run()
        if os.environ.get("OPENMM_BACKMAP_SKIP_PLUGIN") == "1":
            print("openmm-backmap: OPENMM_BACKMAP_SKIP_PLUGIN=1, not building the native plugin")
            return
        from build_plugin import build_plugin  # cpp/build_plugin.py

        if self.editable_mode:
            # Editable installs (PEP 660) import the source tree, so the plugin goes there
            # (git-ignored), built incrementally in build/cpp.
            target = ROOT / "openmm_backmap" / "_plugin"
            build_dir = ROOT / "build" / "cpp"
        else:
            target = Path(self.build_lib) / "openmm_backmap" / "_plugin"
            build_dir = Path(self.get_finalized_command("build").build_temp) / "cpp"
        build_plugin(ROOT / "cpp", build_dir, target)


class BinaryDistribution(Distribution):
    """The package ships compiled plugin libraries: wheels are platform-specific."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildWithPlugin}, distclass=BinaryDistribution)
