"""Configure, build and install the native OpenMM plugin (cpp/) with CMake.

Called by setup.py's build_py, or by hand for a development build into the source tree::

    python cpp/build_plugin.py                      # -> openmm_backmap/_plugin/
    python cpp/build_plugin.py --tests              # also run ctest

The plugin is compiled against the torch and OpenMM importable by *this* Python interpreter, so
their C++ ABI and versions match what runs it.  Nothing here raises: on any failure the reason is
printed and written to ``<target>/BUILD_FAILED`` and the package still installs (the openmm-torch
and PythonForce backends keep working).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import traceback
from pathlib import Path

FAILED = "BUILD_FAILED"
# The files a successful build leaves in the target; forces.py loads them by these names.
CORE_LIBRARY = "libBackmapPlugin.so"
KERNEL_LIBRARIES = ("libBackmapPluginReference.so", "libBackmapPluginCUDA.so")


class PluginBuildError(RuntimeError):
    """A reason the plugin cannot be built, stated for the user."""


def _find_tool(name: str) -> str:
    """A tool next to this interpreter (the venv's PyPI cmake/swig) first, then on PATH."""
    candidates = [Path(sys.executable).parent / name, Path(sysconfig.get_path("scripts")) / name]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise PluginBuildError(f"'{name}' not found: pip install {name}")
    return found


def _openmm_dir() -> Path:
    try:
        import openmm.version
    except ImportError as error:
        raise PluginBuildError(f"openmm is not importable ({error}): pip install openmm") from error
    lib = Path(openmm.version.openmm_library_path)
    root = lib.parent
    if not (root / "include" / "OpenMM.h").is_file():
        raise PluginBuildError(f"OpenMM C++ headers not found under {root / 'include'}")
    if not (root / "include" / "swig" / "OpenMMSwigHeaders.i").is_file():
        raise PluginBuildError(f"OpenMM's SWIG interface files not found under {root / 'include' / 'swig'}")
    return root


def _torch_dir() -> tuple[Path, bool]:
    """The torch package directory (include/, lib/) and whether it uses the C++11 ABI."""
    try:
        import torch
    except ImportError as error:
        raise PluginBuildError(f"torch is not importable ({error}): pip install torch") from error
    root = Path(torch.__file__).resolve().parent
    if not (root / "include" / "torch" / "script.h").is_file():
        raise PluginBuildError(f"torch's C++ headers not found under {root / 'include'}")
    return root, bool(torch._C._GLIBCXX_USE_CXX11_ABI)


def _run(command: list[str], cwd: Path, log) -> None:
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    process = subprocess.run(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    log.write(process.stdout)
    log.flush()
    if process.returncode != 0:
        tail = "\n".join(process.stdout.splitlines()[-40:])
        raise PluginBuildError(f"command failed ({process.returncode}): {' '.join(command)}\n{tail}")


def build_plugin(
    src_dir: Path | str,
    build_dir: Path | str,
    target_dir: Path | str,
    *,
    jobs: int | None = None,
    run_tests: bool = False,
    verbose: bool = True,
) -> bool:
    """Build the plugin in ``build_dir`` from the CMake project ``src_dir`` and install it into ``target_dir``.

    Parameters
    ----------
    src_dir
        The ``cpp/`` directory (holds CMakeLists.txt).
    build_dir
        CMake binary directory; reused between calls, so rebuilding is incremental.
    target_dir
        The package's ``_plugin/`` directory: receives the shared libraries, the SWIG module
        ``backmapplugin.py`` with its extension, and ``__init__.py``.
    jobs
        Parallel compile jobs (default: ``OPENMM_BACKMAP_BUILD_JOBS`` or 2).
    run_tests
        Build the C++ tests and run ctest (a failure is reported like a build failure).

    Returns
    -------
    bool
        True when the plugin was built and installed; False when it was not, in which case
        ``target_dir/BUILD_FAILED`` says why.  Never raises.
    """
    src_dir, build_dir, target_dir = Path(src_dir).resolve(), Path(build_dir).resolve(), Path(target_dir).resolve()
    target_dir.mkdir(parents=True, exist_ok=True)
    failed = target_dir / FAILED
    jobs = jobs or int(os.environ.get("OPENMM_BACKMAP_BUILD_JOBS", "2"))
    log_path = build_dir / "build_plugin.log"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        if failed.exists():
            failed.unlink()
        cmake = _find_tool("cmake")
        swig = _find_tool("swig")
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            raise PluginBuildError("no C++ compiler found (install g++ or set CXX)")
        openmm_dir = _openmm_dir()
        torch_dir, cxx11_abi = _torch_dir()
        with open(log_path, "w") as log:
            _run(
                [
                    cmake,
                    "-S",
                    str(src_dir),
                    "-B",
                    str(build_dir),
                    "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_INSTALL_PREFIX={target_dir}",
                    f"-DBACKMAP_TORCH_DIR={torch_dir}",
                    f"-DOPENMM_DIR={openmm_dir}",
                    f"-DPython3_EXECUTABLE={sys.executable}",
                    f"-DSWIG_EXECUTABLE={swig}",
                    f"-D_BACKMAP_TORCH_CXX11_ABI={int(cxx11_abi)}",
                    # Tests are built once asked for and then kept (CMake cache); installs skip them.
                    *(["-DBACKMAP_BUILD_TESTS=ON"] if run_tests else []),
                ],
                build_dir,
                log,
            )
            _run([cmake, "--build", str(build_dir), "--parallel", str(jobs)], build_dir, log)
            if run_tests:
                _run([_find_tool("ctest"), "--output-on-failure"], build_dir, log)
            _run([cmake, "--install", str(build_dir)], build_dir, log)
        init = target_dir / "__init__.py"
        if not init.exists():
            init.write_text('"""Native OpenMM plugin of openmm-backmap (built from cpp/; see forces.py)."""\n')
        expected = (CORE_LIBRARY, KERNEL_LIBRARIES[0], "backmapplugin.py")
        missing = [name for name in expected if not (target_dir / name).exists()]
        if missing:
            raise PluginBuildError(f"the build finished but did not install {', '.join(missing)}")
        if verbose:
            print(f"openmm-backmap: native plugin installed in {target_dir}")
        return True
    except Exception as error:  # noqa: BLE001 - the package must install even when the plugin cannot be built
        reason = str(error) if isinstance(error, PluginBuildError) else traceback.format_exc()
        message = f"openmm-backmap: native plugin NOT built: {reason}\n(full log: {log_path})\n"
        print(message, file=sys.stderr)
        try:
            failed.write_text(message)
        except OSError:
            pass
        return False


def main(argv: list[str] | None = None) -> int:
    import argparse

    root = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", default=str(root.parent / "build" / "cpp"))
    parser.add_argument("--target", default=str(root.parent / "openmm_backmap" / "_plugin"))
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--tests", action="store_true", help="build and run the C++ tests (ctest)")
    args = parser.parse_args(argv)
    ok = build_plugin(root, args.build_dir, args.target, jobs=args.jobs, run_tests=args.tests)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
