"""Compiled forces: a TorchScript energy model turned into one AOTInductor package (``.pt2``).

A TorchScript model evaluated one configuration at a time is bound by per-operator dispatch: the CG
flow potential of alanine dipeptide runs ~2,000 small aten operators forward and backward, which
set the cost of an MD step whatever the binding (benchmarks/RESULTS.md).  :func:`compile_model`
traces the energy *and its gradient* into one graph of aten operators, specialised to the system's
particle count, and has AOTInductor fuse it into C++ loops in a shared library.  The package computes, in one call::

    run(positions[n, 3] (nm)[, box[3, 3] (nm)][, p_1, ..., p_m]) -> (energy, forces[n, 3][, dE/dp_1, ...])

every tensor float64 (the model runs inside in its own dtype), energy in kJ/mol, forces = -dE/dx in
kJ/mol/nm.  :func:`openmm_backmap.openmm.forces.create_force` accepts the ``.pt2`` file like a TorchScript
one (backends ``"native"`` and ``"python"``); the TorchScript file stays the portable format.

What compilation needs and fixes:

* a C++ compiler on the machine that compiles (the package then runs without one);
* the package is built for this machine's CPU instruction set and the installed torch version, and
  for a fixed number of particles and fixed global parameter list (the metadata records them, and
  the force checks them);
* the model must not branch on tensor values (``if bool(x > 0)``): such a model cannot be traced
  and :func:`compile_model` says so.  Shape checks and ``torch.where`` are fine.

After compiling, the package's energies and forces are compared with the TorchScript model's
(autograd) on several configurations, so a package that does not reproduce the model is never
written silently.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openmm_backmap.io.model_files import (
    COMPILED_FORMAT,
    COMPILED_VERSION,
    is_compiled_package,
    load_model_bytes,
    load_torchscript,
    parse_compiled_metadata,
    torchscript_metadata,
)

__all__ = ["CompiledModel", "compile_model", "load_compiled", "module_dtype"]

# The fastest settings measured on the six-bead CG flow (benchmarks/RESULTS.md, "Forces"): weights
# folded in as constants, one memory pool, and the tiny GEMMs of batch 1 generated as C++
# micro-kernels instead of library calls; freezing without the C++ GEMMs was slower.
INDUCTOR_CONFIG = {
    "freezing": True,
    "memory_planning": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    # the GEMM autotuning would print a table per matrix product
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """A model's input dtype: its first floating-point parameter's or buffer's, float64 if none (as
    the native plugin decides it)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float64


class _EnergyAndForces(torch.nn.Module):
    """Energy, forces and parameter derivatives of ``module`` in one forward (float64 in and out)."""

    def __init__(self, module: torch.nn.Module, periodic: bool, n_parameters: int) -> None:
        super().__init__()
        self.module = module
        self.periodic = periodic
        self.n_parameters = n_parameters
        self.dtype = module_dtype(module)

    def forward(self, positions: torch.Tensor, *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
        box = extra[0] if self.periodic else None
        params = extra[1:] if self.periodic else extra

        def energy(x: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
            inputs = [x.to(self.dtype)]
            if box is not None:
                inputs.append(box.to(self.dtype))
            inputs.extend(v.to(self.dtype) for v in p)
            return self.module(*inputs).reshape(()).to(torch.float64)

        argnums = tuple(range(1 + len(params)))
        grads, value = torch.func.grad_and_value(energy, argnums=argnums)(positions, *params)
        return (value, -grads[0], *grads[1:])


def _example_positions(n: int, seed: int = 0) -> torch.Tensor:
    """A non-degenerate chain of n points about 0.15 nm apart (no two points coincide)."""
    generator = torch.Generator().manual_seed(seed)
    steps = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    steps = 0.15 * steps / torch.linalg.vector_norm(steps, dim=1, keepdim=True)
    return torch.cumsum(steps, dim=0)


def _reference(
    module: torch.nn.Module, positions: torch.Tensor, box: torch.Tensor | None, params: Sequence[torch.Tensor]
) -> tuple[float, np.ndarray, list[float]]:
    """Energy, forces and dE/dp from the model itself by autograd (the check of the package)."""
    dtype = module_dtype(module)
    x = positions.to(dtype).detach().requires_grad_(True)
    p = [v.to(dtype).detach().requires_grad_(True) for v in params]
    inputs = [x] + ([box.to(dtype)] if box is not None else []) + p
    energy = module(*inputs).reshape(())
    grads = torch.autograd.grad(energy, [x] + p, allow_unused=True)
    forces = -grads[0].to(torch.float64).numpy() if grads[0] is not None else np.zeros(tuple(x.shape))
    derivs = [float(g) if g is not None else 0.0 for g in grads[1:]]
    return float(energy.detach()), forces, derivs


class CompiledModel:
    """A loaded compiled package: ``model(positions[, box][, params...]) -> (energy, forces, derivs)``.

    ``positions`` and ``box`` are array-likes in nm, ``params`` floats; the result is a float
    (kJ/mol), an (n, 3) float64 array (kJ/mol/nm) and a list of dE/dp.  ``metadata`` is the dict
    written by :func:`compile_model`.
    """

    def __init__(self, data: bytes, origin: str = "the package bytes") -> None:
        if not is_compiled_package(data):
            raise ValueError(f"{origin} is not a compiled force package (.pt2 written by openmm-backmap compile)")
        # The loader reads from a path; it extracts what it needs, so the file can go afterwards.
        handle, path = tempfile.mkstemp(suffix=".pt2", prefix="openmm-backmap-")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            try:
                runner = torch._inductor.aoti_load_package(path)
            except Exception as error:  # noqa: BLE001 - any loader failure means the same to the user
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ValueError(
                    f"{origin} could not be loaded as a compiled package (built for another torch or CPU?): {first}"
                ) from error
        finally:
            os.unlink(path)
        self._loader = runner.loader
        # The AOTInductor runner holds one set of input/output buffers: calls are serialised.
        self._lock = threading.Lock()
        self.metadata = parse_compiled_metadata(runner.get_metadata(), origin)
        self.numParticles = int(self.metadata["num_particles"])
        self.periodic = bool(self.metadata["periodic"])
        self.globalParameters: list[str] = list(self.metadata["global_parameters"])

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The raw call: float64 tensors in the package's input order, its outputs.

        Thread-safe: concurrent calls (Contexts sharing one System, used from several threads)
        take turns on the runner.
        """
        with self._lock:
            return [t.clone() for t in self._loader.boxed_run(inputs)]

    def __call__(
        self, positions: Any, box: Any = None, params: Sequence[float] = ()
    ) -> tuple[float, np.ndarray, list[float]]:
        x = torch.as_tensor(np.asarray(positions, dtype=np.float64))
        if tuple(x.shape) != (self.numParticles, 3):
            raise ValueError(
                f"the compiled model takes positions of shape ({self.numParticles}, 3), got {tuple(x.shape)}"
            )
        inputs = [x]
        if self.periodic:
            if box is None:
                raise ValueError("this compiled model is periodic: pass the box vectors")
            inputs.append(torch.as_tensor(np.asarray(box, dtype=np.float64)).reshape(3, 3))
        if len(params) != len(self.globalParameters):
            raise ValueError(
                f"the compiled model takes {len(self.globalParameters)} global parameter(s) "
                f"{self.globalParameters}, got {len(params)}"
            )
        inputs.extend(torch.tensor(float(p), dtype=torch.float64) for p in params)
        out = self.run(inputs)
        return float(out[0]), out[1].numpy(), [float(v) for v in out[2:]]


def load_compiled(model: str | os.PathLike | bytes) -> CompiledModel:
    """Load a compiled package from a path or its bytes (ValueError when it is not one)."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"compiled model file not found: {path}")
        return CompiledModel(path.read_bytes(), str(path))
    return CompiledModel(bytes(model))


def compile_model(
    model: str | os.PathLike | bytes | torch.nn.Module,
    numParticles: int,
    out: str | os.PathLike,
    usesPeriodicBoundaryConditions: bool = False,
    globalParameters: Mapping[str, float] | None = None,
    positions: Any = None,
    box: Any = None,
    tolerance: float = 1e-4,
    threads: int = 1,
) -> dict[str, Any]:
    """Compile a TorchScript energy model (openmm-torch's signature) into a ``.pt2`` force package.

    Parameters
    ----------
    model
        A TorchScript file, its bytes, or a module (as :func:`openmm_backmap.io.model_files.load_model_bytes`).
    numParticles
        The number of particles the package is specialised to.
    out
        Where the package is written (only after it has passed the comparison with the model).
    usesPeriodicBoundaryConditions, globalParameters
        As :func:`openmm_backmap.openmm.forces.create_force`; the package takes the same inputs in the
        same order, and returns dE/dp for every global parameter.
    positions, box
        A configuration (nm) to trace and to check on (default: a random chain; a 10 nm cubic box).
        Tracing runs the model once; it does not depend on the values unless the model branches
        on them, which is refused.
    tolerance
        Largest allowed relative deviation of the package's energy and forces from the model's on
        the check configurations (relative to the largest force component / |energy| + 1).
    threads
        Threads the generated code may use.  1 (the default) generates serial loops, the fastest
        for a few dozen particles: with more, inductor writes parallel loops and, for want of
        atomic adds there, leaves the spline gradients' scatters as library calls, slower for the
        six-bead CG flow (benchmarks/RESULTS.md).

    Returns
    -------
    dict
        The metadata written into the package, with ``compile_seconds`` and ``max_deviation`` (the
        relative deviation found by the check).
    """

    n = int(numParticles)
    if n < 1:
        raise ValueError(f"numParticles must be >= 1, got {numParticles}")
    parameters = dict(globalParameters or {})
    bad = [name for name in parameters if not name or '"' in name or "\\" in name]
    if bad:
        raise ValueError(f"global parameter names must be non-empty and free of quotes and backslashes: {bad}")
    data = load_model_bytes(model)
    module = load_torchscript(data)
    for tensor in module.parameters():
        tensor.requires_grad_(False)
    x0 = _example_positions(n) if positions is None else torch.as_tensor(np.asarray(positions, dtype=np.float64))
    if tuple(x0.shape) != (n, 3):
        raise ValueError(f"positions must have shape ({n}, 3), got {tuple(x0.shape)}")
    if not torch.isfinite(x0).all():
        raise ValueError("positions contain NaN or infinite values")
    inputs = [x0]
    if usesPeriodicBoundaryConditions:
        inputs.append(
            torch.eye(3, dtype=torch.float64) * 10.0
            if box is None
            else torch.as_tensor(np.asarray(box, dtype=np.float64)).reshape(3, 3)
        )
    inputs.extend(torch.tensor(float(v), dtype=torch.float64) for v in parameters.values())
    meta: dict[str, str] = {
        "format": COMPILED_FORMAT,
        "version": COMPILED_VERSION,
        "num_particles": str(n),
        "periodic": "1" if usesPeriodicBoundaryConditions else "0",
        "global_parameters": json.dumps(list(parameters)),
        "torch_version": torch.__version__,
        "model_metadata": json.dumps(torchscript_metadata(data)),
    }

    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        error = _compile(module, inputs, usesPeriodicBoundaryConditions, meta, Path(out), tolerance)
    finally:
        torch.set_num_threads(threads_before)
    result = parse_compiled_metadata(meta, str(out))
    result["compile_seconds"] = time.perf_counter() - start
    result["max_deviation"] = error
    return result


def _compile(
    module: torch.nn.Module,
    inputs: list[torch.Tensor],
    periodic: bool,
    meta: dict[str, str],
    out: Path,
    tolerance: float,
) -> float:
    """Trace, export, compile, check and write (see :func:`compile_model`); the deviation found."""
    from torch.fx.experimental.proxy_tensor import make_fx

    wrapper = _EnergyAndForces(module, periodic, len(inputs) - 1 - int(periodic)).eval()
    try:
        graph = make_fx(wrapper, tracing_mode="real")(*inputs)
    except RuntimeError as error:
        # The model itself may be at fault; if it runs, the trace failed on a value read.
        wrapper(*inputs)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        where = next((lines[i - 1] for i, line in enumerate(lines) if "<--- HERE" in line and i > 0), "")
        raise ValueError(
            "the model branches on tensor values (e.g. `if bool(x > 0)` or int(tensor)), so it cannot "
            "be traced into one graph and compiled; use the TorchScript file, or write the branch with "
            f"torch.where{' (at: ' + where + ')' if where else ''}"
        ) from error

    class _Graph(torch.nn.Module):
        def __init__(self, gm: torch.nn.Module) -> None:
            super().__init__()
            self.gm = gm

        def forward(self, *args: torch.Tensor) -> Any:
            return self.gm(*args)

    with torch.no_grad():
        exported = torch.export.export(_Graph(graph), tuple(inputs))
    with tempfile.TemporaryDirectory(prefix="openmm-backmap-compile-") as tmp:
        staged = Path(tmp) / "model.pt2"
        try:
            torch._inductor.aoti_compile_and_package(
                exported, package_path=str(staged), inductor_configs={"aot_inductor.metadata": meta, **INDUCTOR_CONFIG}
            )
        except Exception as error:  # noqa: BLE001 - inductor raises many kinds; the cause is what matters
            lines = [line for line in str(error).strip().splitlines() if line.strip()]
            raise RuntimeError(
                "AOTInductor could not compile the model (it needs a working C++ compiler): "
                f"{lines[0] if lines else type(error).__name__}"
            ) from error
        deviation = _check_against_model(CompiledModel(staged.read_bytes(), str(staged)), module, inputs, periodic)
        if not deviation <= tolerance:
            raise ValueError(
                f"the compiled package deviates from the model by {deviation:.3g} (relative), more than "
                f"the tolerance {tolerance:g}; not written"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(staged.read_bytes())
    return deviation


def _check_against_model(
    compiled: CompiledModel, module: torch.nn.Module, inputs: Sequence[torch.Tensor], periodic: bool
) -> float:
    """Largest relative deviation of the package from the model on the traced input and three
    perturbations of its positions."""
    x0, box = inputs[0], (inputs[1] if periodic else None)
    params = list(inputs[1 + int(periodic) :])
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for k in range(4):
        x = x0 if k == 0 else x0 + 0.01 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        e_ref, f_ref, d_ref = _reference(module, x, box, params)
        e, f, d = compiled(x.numpy(), None if box is None else box.numpy(), [float(p) for p in params])
        scale_f = max(float(np.abs(f_ref).max()), 1.0)
        worst = max(worst, abs(e - e_ref) / (abs(e_ref) + 1.0), float(np.abs(f - f_ref).max()) / scale_f)
        for a, b in zip(d, d_ref):
            worst = max(worst, abs(a - b) / (abs(b) + 1.0))
    return worst
