"""Install openmm-backmap and build its native OpenMM plugin (cpp/) with CMake.

The plugin is compiled against the torch and OpenMM that are already installed, so install with
``pip install --no-build-isolation .`` after ``torch==2.13.0``, ``openmm``, ``cmake`` and ``swig``.
If the build fails the package still installs and works with the openmm-torch or PythonForce
backends; the reason is printed and written to ``openmm_backmap/_plugin/BUILD_FAILED``.
Set ``OPENMM_BACKMAP_SKIP_PLUGIN=1`` to skip the native build.
"""

import os
import sys
from pathlib import Path

from setuptools import Distribution, find_packages, setup
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

        if getattr(self, "editable_mode", False):
            # Editable installs import the source tree, so the plugin goes there (git-ignored),
            # built incrementally in build/cpp.
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


setup(
    name="openmm-backmap",
    version="0.1.0",
    description="Atoms back from coarse-grained OpenMM simulations with conditional normalizing flows",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["openmm_backmap", "openmm_backmap.*"]),
    package_data={"openmm_backmap": ["data/*.pdb", "data/*.json"]},
    install_requires=[
        "torch>=2.4",
        "openmm>=8.2",
        "openmmtools>=0.23",
        "mdtraj>=1.10",
        "numpy>=1.24",
        "scipy>=1.10",
        "tqdm>=4.60",
        "tables>=3.8",
        "matplotlib>=3.7",
    ],
    extras_require={"test": ["pytest>=7", "pdbfixer>=1.9"]},
    entry_points={"console_scripts": ["openmm-backmap=openmm_backmap.cli:main"]},
    cmdclass={"build_py": BuildWithPlugin},
    distclass=BinaryDistribution,
    zip_safe=False,
)
