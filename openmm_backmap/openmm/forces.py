"""Bind a TorchScript CG potential into an OpenMM System as a force.

The model is any TorchScript module with openmm-torch's signature::

    forward(positions: Tensor[n, 3] (nm)[, box: Tensor[3, 3] (nm)][, p_1: Tensor[], ...]) -> energy (kJ/mol)

where the box vectors (rows) are passed only when the force is periodic and ``p_i`` are the global
parameters, as 0-d tensors, in the order of ``globalParameters``.  Forces are -dE/dx by autograd,
and dE/dp for the parameters named in ``energyParameterDerivatives``.

Three backends run the same file with the same energies and forces:

``"native"``
    This package's own plugin (``cpp/``, built at install against the installed torch and OpenMM):
    ``openmm_backmap._plugin.backmapplugin.BackmapTorchForce``, evaluated by libtorch inside the
    Context (Reference and CPU platforms; CUDA where it was built with CUDA).
``"openmm-torch"``
    ``openmmtorch.TorchForce``, when ``import openmmtorch`` works (optional; its PyPI wheel does not
    import with CPU-only torch).
``"python"``
    ``openmm.PythonForce`` calling the module from Python: always available, slower per step, and
    it cannot report energy parameter derivatives.

Inputs are given in the module's dtype: that of its first floating-point parameter or buffer, or
float64 when it has none (an analytic model).  A float32 network therefore runs in float32 in every
backend and a float64 one keeps full precision.

The model may also be a compiled force package (``.pt2``, :mod:`openmm_backmap.openmm.compiled`,
``openmm-backmap compile``): the same energy with its forces fused into one C++ library, many times
faster per step for small systems.  The native and python backends run it (openmm-torch needs
TorchScript), on the Reference and CPU platforms.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import openmm
import torch

from openmm_backmap.geometry import check_box_fits
from openmm_backmap.io.model_files import (
    is_compiled_package,
    load_model_bytes,
    load_torchscript,
    read_compiled_metadata,
    torchscript_metadata,
)
from openmm_backmap.openmm.compiled import CompiledModel
from openmm_backmap.openmm.compiled import module_dtype as _module_dtype
from openmm_backmap.openmm.plugin import load_native_plugin, native_plugin_status

__all__ = [
    "BACKENDS",
    "available_backends",
    "create_cg_system",
    "create_force",
]

BACKENDS = ("native", "openmm-torch", "python")


# ---------------------------------------------------------------------------------------------
# Backends: availability
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _import_openmmtorch() -> tuple[Any, str]:
    """openmmtorch or None and why; cached, since a failed import is retried by Python every time."""
    try:
        import openmmtorch
    except Exception as error:  # noqa: BLE001 - ImportError, or OSError from a libtorch mismatch
        reason = f"`import openmmtorch` failed ({type(error).__name__}: {error})"
        return None, reason + "; install openmm-torch built for this torch"
    return openmmtorch, "importable"


def available_backends() -> list[str]:
    """The backends that work in this environment, in the order ``backend="auto"`` tries them."""
    backends = []
    if load_native_plugin() is not None:
        backends.append("native")
    if _import_openmmtorch()[0] is not None:
        backends.append("openmm-torch")
    backends.append("python")
    return backends


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _check_model(
    module: torch.jit.ScriptModule, numParticles: int, periodic: bool, parameters: Mapping[str, float]
) -> None:
    """Run forward on a test input of ``numParticles`` atoms; raise ValueError with the reason if it fails."""
    dtype = _module_dtype(module)
    generator = torch.Generator().manual_seed(0)
    positions = torch.rand(numParticles, 3, generator=generator, dtype=torch.float64).to(dtype) * 2.0
    inputs = [positions]
    if periodic:
        inputs.append(torch.eye(3, dtype=dtype) * 10.0)
    inputs.extend(torch.tensor(float(v), dtype=dtype) for v in parameters.values())
    try:
        energy = module(*inputs)
    except Exception as error:
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        raise ValueError(
            f"the model's forward() fails on a test input of {numParticles} particles"
            f"{' with box vectors' if periodic else ''}"
            f"{' and ' + str(len(parameters)) + ' global parameter(s)' if parameters else ''}: "
            f"{lines[-1] if lines else type(error).__name__}"
        ) from error
    if not isinstance(energy, torch.Tensor) or energy.numel() != 1:
        shape = tuple(energy.shape) if isinstance(energy, torch.Tensor) else ""
        raise ValueError(
            "the model's forward() must return one energy value (kJ/mol) as a tensor, "
            f"got {type(energy).__name__}{shape}"
        )


# ---------------------------------------------------------------------------------------------
# The PythonForce backend
# ---------------------------------------------------------------------------------------------


class TorchComputation:
    """The callback of the ``"python"`` backend: energy and forces of a TorchScript module for a State.

    Picklable (it pickles the module bytes), so a System holding its PythonForce can be written
    with ``XmlSerializer``.  Each call reads the State's positions without units into a buffer of
    its own, so Contexts that share one System (and so this object) can be evaluated from several
    threads at once.
    """

    def __init__(self, moduleBytes: bytes, periodic: bool, parameterNames: Sequence[str]):
        self._setup(moduleBytes, periodic, tuple(parameterNames))

    def _setup(self, moduleBytes: bytes, periodic: bool, parameterNames: tuple[str, ...]) -> None:
        self.moduleBytes = moduleBytes
        self.periodic = periodic
        self.parameterNames = parameterNames
        self._fast_positions = hasattr(openmm.State, "_getVectorAsNumpy")
        self._load(moduleBytes)

    def _load(self, moduleBytes: bytes) -> None:
        self.module = load_torchscript(moduleBytes)
        self.dtype = _module_dtype(self.module)

    def __getstate__(self) -> dict:
        return {"moduleBytes": self.moduleBytes, "periodic": self.periodic, "parameterNames": self.parameterNames}

    def __setstate__(self, state: dict) -> None:
        self._setup(state["moduleBytes"], state["periodic"], tuple(state["parameterNames"]))

    def _positions(self, state: openmm.State) -> np.ndarray:
        if self._fast_positions:
            buffer = np.empty((state._getNumParticles(), 3), dtype=np.float64)
            state._getVectorAsNumpy(openmm.State.Positions, buffer)
            return buffer
        return state.getPositions(asNumpy=True).value_in_unit(openmm.unit.nanometer)

    def _inputs(self, state: openmm.State) -> list[torch.Tensor]:
        """forward()'s inputs for a State, in the model's dtype: positions[, box][, parameters]."""
        positions = torch.from_numpy(self._positions(state))
        inputs = [positions if self.dtype == torch.float64 else positions.to(self.dtype)]
        if self.periodic:
            box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(openmm.unit.nanometer)
            inputs.append(torch.as_tensor(np.asarray(box), dtype=self.dtype))
        if self.parameterNames:
            values = state.getParameters()
            inputs.extend(torch.tensor(values[name], dtype=self.dtype) for name in self.parameterNames)
        return inputs

    def __call__(self, state: openmm.State) -> tuple[float, np.ndarray]:
        inputs = self._inputs(state)
        positions = inputs[0] = inputs[0].detach().requires_grad_(True)
        energy = self.module(*inputs)
        (grad,) = torch.autograd.grad(energy, positions, allow_unused=True) if energy.requires_grad else (None,)
        if grad is None:
            forces = np.zeros((positions.shape[0], 3))
        else:
            forces = -grad.detach().to(torch.float64).numpy()
        return float(energy.detach()), forces


class CompiledComputation(TorchComputation):
    """The ``"python"`` backend's callback for a compiled package: one library call per State."""

    def _load(self, moduleBytes: bytes) -> None:
        self.model = CompiledModel(moduleBytes)
        self.dtype = torch.float64  # packages take and return float64

    def __call__(self, state: openmm.State) -> tuple[float, np.ndarray]:
        inputs = self._inputs(state)
        if inputs[0].shape[0] != self.model.numParticles:
            raise ValueError(
                f"the compiled model was built for {self.model.numParticles} particles, "
                f"but the System has {inputs[0].shape[0]}"
            )
        outputs = self.model.run(inputs)
        return float(outputs[0]), outputs[1].numpy()


def _check_compiled(data: bytes, numParticles: int | None, periodic: bool, parameters: Mapping[str, float]) -> None:
    """Compare a compiled package's metadata with the force being built; ValueError naming the mismatch."""
    meta = read_compiled_metadata(data)
    if numParticles is not None and meta["num_particles"] != numParticles:
        raise ValueError(
            f"the compiled model was built for {meta['num_particles']} particles, but the System has {numParticles}"
        )
    if meta["periodic"] != bool(periodic):
        raise ValueError(
            f"the compiled model was built {'with' if meta['periodic'] else 'without'} periodic "
            f"boundary conditions, but usesPeriodicBoundaryConditions is {bool(periodic)}"
        )
    if list(meta["global_parameters"]) != list(parameters):
        raise ValueError(
            f"the compiled model takes the global parameters {meta['global_parameters']}, "
            f"but globalParameters gives {list(parameters)}"
        )


# ---------------------------------------------------------------------------------------------
# create_force / create_cg_system
# ---------------------------------------------------------------------------------------------


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        return available_backends()[0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose 'auto' or one of {', '.join(BACKENDS)}")
    if backend == "native":
        ok, reason = native_plugin_status()
        if not ok:
            raise RuntimeError(f"the native backend is not available: {reason}")
    elif backend == "openmm-torch":
        module, reason = _import_openmmtorch()
        if module is None:
            raise RuntimeError(f"the openmm-torch backend is not available: {reason}")
    return backend


def create_force(
    model: str | os.PathLike | bytes | torch.nn.Module,
    backend: str = "auto",
    usesPeriodicBoundaryConditions: bool = False,
    globalParameters: Mapping[str, float] | None = None,
    forceGroup: int = 0,
    energyParameterDerivatives: Iterable[str] = (),
    numParticles: int | None = None,
    name: str | None = None,
) -> openmm.Force:
    """Create an OpenMM force whose energy (kJ/mol) is the TorchScript ``model`` of positions (nm).

    Parameters
    ----------
    model
        Path of a TorchScript ``.pt`` file, its bytes, a ``torch.jit.ScriptModule`` or a scriptable
        ``nn.Module`` (scripted here); or a compiled force package (``.pt2``) or its bytes.
    backend
        ``"auto"`` (native if the plugin loaded, else openmm-torch if it imports, else python; a
        compiled package skips openmm-torch), ``"native"``, ``"openmm-torch"`` or ``"python"``.
    usesPeriodicBoundaryConditions
        Pass the box vectors (3, 3) in nm to forward() after the positions.
    globalParameters
        Context parameters passed to forward() as 0-d tensors, in this order; values are defaults.
    forceGroup
        The force group.
    energyParameterDerivatives
        Names of global parameters whose dE/dp is reported by ``State.getEnergyParameterDerivatives()``
        (native and openmm-torch only).
    numParticles
        If given, forward() is run once on a test input of this many particles and a failure is
        raised here, not in the middle of a simulation (for a compiled package: its particle count
        is checked).
    name
        The force's name (``Force.setName``).

    Returns
    -------
    openmm.Force
        ``BackmapTorchForce``, ``openmmtorch.TorchForce`` or ``openmm.PythonForce``.

    Raises
    ------
    FileNotFoundError, ValueError, TypeError
        As :func:`load_model_bytes`; ValueError also for an unknown backend, derivatives of unknown
        parameters, derivatives with the python backend, or a forward() that fails on the test input.
    RuntimeError
        The requested backend is not available (the message says what to install or build).
    """
    parameters = dict(globalParameters or {})
    derivatives = list(dict.fromkeys(energyParameterDerivatives))
    unknown = [d for d in derivatives if d not in parameters]
    if unknown:
        raise ValueError(f"energy parameter derivatives requested for {unknown}, which are not in globalParameters")
    data = load_model_bytes(model)
    compiled = is_compiled_package(data)
    if compiled and backend == "auto":
        chosen = "native" if native_plugin_status()[0] else "python"
    else:
        chosen = _resolve_backend(backend)
    if compiled:
        if chosen == "openmm-torch":
            raise ValueError(
                "openmm-torch runs TorchScript files only; give it the .pt model, or use the native or "
                "python backend for the compiled package"
            )
        _check_compiled(
            data, None if numParticles is None else int(numParticles), usesPeriodicBoundaryConditions, parameters
        )
    else:
        if torchscript_metadata(data).get("kind") == "backmapper":
            origin = str(model) if isinstance(model, (str, os.PathLike)) else "the model"
            raise ValueError(
                f"{origin} is a backmapper, not a CG potential: a force needs a CG potential model "
                f"file (openmm-backmap train-cg) or a TorchScript energy"
            )
        if numParticles is not None:
            _check_model(load_torchscript(data), int(numParticles), usesPeriodicBoundaryConditions, parameters)

    if chosen == "native":
        plugin = load_native_plugin()
        force = plugin.BackmapTorchForce.fromBytes(data)
    elif chosen == "openmm-torch":
        openmmtorch, _ = _import_openmmtorch()
        force = openmmtorch.TorchForce(load_torchscript(data))
    else:
        if derivatives:
            raise ValueError(
                "the python backend (openmm.PythonForce) cannot report energy parameter derivatives; "
                "use backend='native' or 'openmm-torch'"
            )
        kind = CompiledComputation if compiled else TorchComputation
        force = openmm.PythonForce(kind(data, usesPeriodicBoundaryConditions, list(parameters)), parameters)
    if chosen != "python":
        for key, value in parameters.items():
            force.addGlobalParameter(key, float(value))
        for key in derivatives:
            force.addEnergyParameterDerivative(key)
    force.setUsesPeriodicBoundaryConditions(bool(usesPeriodicBoundaryConditions))
    force.setForceGroup(int(forceGroup))
    if name is not None:
        force.setName(name)
    return force


def _model_cg_bond_range(model: Any) -> list[float] | None:
    """The CG bond-length range (nm) a CG potential model file or its compiled package records, or None."""
    if not isinstance(model, (str, os.PathLike, bytes, bytearray)):
        return None
    data = load_model_bytes(model)
    if is_compiled_package(data):
        meta = read_compiled_metadata(data).get("model_metadata") or {}
    else:
        meta = torchscript_metadata(data)
    return meta.get("cg_bond_range_nm")


def create_cg_system(
    masses: Any,
    model: str | os.PathLike | bytes | torch.nn.Module,
    backend: str = "auto",
    extraForces: Iterable[openmm.Force] = (),
    usesPeriodicBoundaryConditions: bool = False,
    boxVectors: Sequence[Any] | None = None,
    globalParameters: Mapping[str, float] | None = None,
    energyParameterDerivatives: Iterable[str] = (),
    forceGroup: int = 0,
    checkModel: bool = True,
) -> openmm.System:
    """A CG System: one particle per bead with the given masses, the model's force, and extra forces.

    Parameters
    ----------
    masses
        Bead masses in daltons (array-like), or an object with a ``masses()`` method such as
        :class:`openmm_backmap.mapping.CGMapping`.
    model, backend, usesPeriodicBoundaryConditions, globalParameters, energyParameterDerivatives, forceGroup
        As :func:`create_force`.
    extraForces
        Further OpenMM forces (e.g. harmonic bonds, a CMMotionRemover) added after the model's force.
    boxVectors
        Default periodic box vectors (three Vec3 in nm, or a 3x3 array); required when periodic.
    checkModel
        Run forward() once on a test input with the number of beads (see ``numParticles`` in
        :func:`create_force`).
    """
    if hasattr(masses, "masses") and callable(masses.masses):
        masses = masses.masses()
    masses = np.asarray(masses, dtype=np.float64).reshape(-1)
    if masses.size == 0 or not np.all(np.isfinite(masses)) or np.any(masses < 0):
        raise ValueError("masses must be a non-empty array of finite, non-negative values (daltons)")
    if usesPeriodicBoundaryConditions and boxVectors is None:
        raise ValueError("a periodic CG system needs boxVectors")
    system = openmm.System()
    for mass in masses:
        system.addParticle(float(mass))
    if boxVectors is not None:
        if openmm.unit.is_quantity(boxVectors):
            boxVectors = boxVectors.value_in_unit(openmm.unit.nanometer)
        box = np.asarray(
            [v.value_in_unit(openmm.unit.nanometer) if openmm.unit.is_quantity(v) else v for v in boxVectors],
            dtype=np.float64,
        )
        if box.shape != (3, 3):
            raise ValueError(f"boxVectors must be three 3-vectors (nm), got shape {box.shape}")
        system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in box))
        bond_range = _model_cg_bond_range(model)
        if usesPeriodicBoundaryConditions and bond_range:
            check_box_fits(box, bond_range[1], "the periodic box of the CG System")
    force = create_force(
        model,
        backend=backend,
        usesPeriodicBoundaryConditions=usesPeriodicBoundaryConditions,
        globalParameters=globalParameters,
        energyParameterDerivatives=energyParameterDerivatives,
        forceGroup=forceGroup,
        numParticles=len(masses) if checkModel else None,
    )
    system.addForce(force)
    for extra in extraForces:
        system.addForce(extra)
    return system
