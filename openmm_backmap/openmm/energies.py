"""All-atom and CG energies from OpenMM Systems, batched and differentiable.

Two implementations of U(x) for positions x (B, n, 3) in nm, returning kJ/mol (B,):

* :class:`TorchSystemEnergy` re-implements the System's force terms in torch (harmonic bonds and
  angles, periodic torsions, non-periodic Coulomb + Lennard-Jones with exceptions, generalized Born
  implicit solvent from :mod:`openmm_backmap.openmm.implicit_solvent`), so a whole batch
  is one vectorised evaluation, forces come from autograd, and it runs on any torch device. It is
  validated against OpenMM in the tests (energies and forces).
* :class:`OpenMMBridgeEnergy` asks OpenMM Contexts for energies and forces, one sample at a time,
  through a torch autograd function. It works for every System OpenMM can run (CMAP, PME, custom
  forces) and is the fallback.

:func:`aa_energy` picks the torch implementation when it supports every force of the System. Units
are converted here and nowhere else: nm, kJ/mol, reduced energies u = U / kT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openmm_backmap.openmm.implicit_solvent import GeneralizedBornEnergy, is_gb_force, unsupported_reason
from openmm_backmap.units import kT

ONE_4PI_EPS0 = 138.93545764438198  # kJ nm / (mol e^2), the Coulomb constant OpenMM uses

_IGNORED_FORCES = ("CMMotionRemover", "MonteCarloBarostat", "AndersenThermostat")


def load_system(system: Any):
    """An openmm.System from a System, a path to its XML, or XML text."""
    import openmm

    if isinstance(system, openmm.System):
        return system
    text = None
    if isinstance(system, Path) or (isinstance(system, str) and not system.lstrip().startswith("<")):
        path = Path(system)
        if not path.exists():
            raise FileNotFoundError(f"System XML {path} does not exist")
        text = path.read_text()
    elif isinstance(system, str):
        text = system
    if text is None:
        raise TypeError(f"expected an openmm.System, an XML path or XML text, got {type(system).__name__}")
    try:
        out = openmm.XmlSerializer.deserialize(text)
    except Exception as err:  # noqa: BLE001 - OpenMM raises a bare Exception for bad XML
        raise ValueError(f"cannot read the System XML: {err}") from err
    if not isinstance(out, openmm.System):
        raise ValueError(f"the XML holds a {type(out).__name__}, not a System")
    return out


def model_system(model: Any, override: Any = None):
    """The AA System of a loaded backmapper (the U_AA of its samples), or None when it has none.

    ``override`` (a System, its XML path or text) when given; else the System embedded in the model
    file; else one built on the model's AA topology from the force field its metadata names
    (``force_field``: protein chain models, amber14 + GBn2 with no cutoff and bonds to hydrogen
    constrained, as the training data were made).
    """
    if override is not None:
        return load_system(override)
    if model.system_xml:
        return load_system(model.system_xml)
    files = model.metadata.get("force_field")
    if not files:
        return None
    from openmm import app

    forcefield = app.ForceField(*files)
    return forcefield.createSystem(model.topology.to_openmm(), nonbondedMethod=app.NoCutoff, constraints=app.HBonds)


MASS_TOLERANCE_DA = 0.5  # a particle's mass may differ this much from its element's (isotopes aside)


def check_system_matches(
    system, elements: Sequence[str], what: str = "the AA System", against: str = "the topology"
) -> None:
    """Refuse an AA System that is not the molecule of a topology with these element symbols.

    The rule: the particle counts must be equal; each particle's mass must be within
    ``MASS_TOLERANCE_DA`` (0.5 Da) of its element's standard mass, unless the System's total mass
    equals the topology's (to 0.01 Da per particle), which is what hydrogen-mass repartitioning
    keeps while moving mass from heavy atoms onto hydrogens.  Particles of unknown element (empty
    symbol) are not compared.

    Raises
    ------
    ValueError
        Naming both counts, or the first particles whose masses do not fit, with their elements.
    """
    from openmm.app import element as elem

    n = system.getNumParticles()
    if n != len(elements):
        raise ValueError(
            f"{what} has {n} particles but {against} has {len(elements)} atoms: it is not the same molecule"
        )
    known = [(i, elem.Element.getBySymbol(sym).mass._value) for i, sym in enumerate(elements) if sym]
    if not known:
        return
    masses = {i: system.getParticleMass(i)._value for i, _ in known}
    total_system = sum(masses.values())
    total_topology = sum(m for _, m in known)
    if abs(total_system - total_topology) <= 0.01 * len(known):
        return  # same total: standard masses or hydrogen-mass repartitioning
    bad = [(i, masses[i], m) for i, m in known if abs(masses[i] - m) > MASS_TOLERANCE_DA]
    if bad:
        shown = ", ".join(f"particle {i} ({elements[i]}) {ms:.3f} Da vs {m:.3f}" for i, ms, m in bad[:3])
        raise ValueError(
            f"{what} does not match the elements of {against}: {len(bad)} particle mass(es) differ "
            f"from their element's by more than {MASS_TOLERANCE_DA} Da ({shown}), and the total "
            f"masses differ ({total_system:.2f} vs {total_topology:.2f} Da): another molecule or "
            f"another atom order?"
        )


def constraints_from_system(system) -> list[tuple[int, int, float]]:
    """The System's distance constraints as (i, j, length in nm)."""
    from openmm import unit

    out = []
    for k in range(system.getNumConstraints()):
        i, j, d = system.getConstraintParameters(k)
        out.append((int(i), int(j), float(d.value_in_unit(unit.nanometer))))
    return out


def unsupported_forces(system) -> list[str]:
    """Names of the System's forces :class:`TorchSystemEnergy` cannot evaluate (empty if none)."""
    import openmm

    bad = []
    for force in system.getForces():
        name = type(force).__name__
        if name in _IGNORED_FORCES or name in ("HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce"):
            continue
        if is_gb_force(force):  # implicit solvent: openmm_backmap/openmm/implicit_solvent.py
            reason = unsupported_reason(force)
            if reason is None:
                continue
            name += f" ({reason})"
        elif name == "NonbondedForce":
            ok_method = force.getNonbondedMethod() == openmm.NonbondedForce.NoCutoff
            offsets = force.getNumParticleParameterOffsets() + force.getNumExceptionParameterOffsets()
            if ok_method and offsets == 0:
                continue
            name += " (only NoCutoff without parameter offsets)"
        bad.append(name)
    if system.usesPeriodicBoundaryConditions():
        bad.append("periodic boundary conditions")
    return bad


# ---------------------------------------------------------------------------- geometry in torch
# Positions are laid out (n, 3, B) inside the energy: gathering atoms then copies whole contiguous
# rows of length B and every elementwise op runs over long vectors, which on CPU is several times
# faster than gathering from (B, n, 3).
def _pick(xt: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return xt.index_select(0, idx)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1)


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a0, a1, a2 = a[:, 0], a[:, 1], a[:, 2]
    b0, b1, b2 = b[:, 0], b[:, 1], b[:, 2]
    return torch.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], dim=1)


def _distances(xt: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    d = _pick(xt, i) - _pick(xt, j)
    return torch.sqrt(_dot(d, d))


def _angles(xt: torch.Tensor, i: torch.Tensor, j: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    xj = _pick(xt, j)
    a = _pick(xt, i) - xj
    b = _pick(xt, k) - xj
    c = _cross(a, b)
    return torch.atan2(torch.sqrt(_dot(c, c)), _dot(a, b))


def _dihedrals(xt: torch.Tensor, i: torch.Tensor, j: torch.Tensor, k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # IUPAC sign convention, as OpenMM: phi = atan2(|b2| b1.(b2 x b3), (b1 x b2).(b2 x b3))
    p1, p2 = _pick(xt, j), _pick(xt, k)
    b1 = p1 - _pick(xt, i)
    b2 = p2 - p1
    b3 = _pick(xt, m) - p2
    n1 = _cross(b1, b2)
    n2 = _cross(b2, b3)
    y = torch.sqrt(_dot(b2, b2)) * _dot(b1, n2)
    return torch.atan2(y, _dot(n1, n2))


class TorchSystemEnergy(torch.nn.Module):
    """U(x) of an OpenMM System re-implemented in torch; see the module docstring for coverage.

    Parameters are stored as float64 buffers; the output has the dtype of the input. Forces that do
    not contribute energy (CMMotionRemover, barostats) are ignored; anything else unsupported raises
    ValueError naming the force (use :class:`OpenMMBridgeEnergy` for those Systems).

    ``forward(x, pair_core=E)`` (kJ/mol; default None: the System's energy exactly) gives every
    non-bonded pair with a Lennard-Jones term a linear core for training: closer than the distance
    r_c at which its Lennard-Jones energy reaches E, the pair's Lennard-Jones and Coulomb terms
    continue along their tangents at r_c. The energy is unchanged wherever no pair is above E (every
    configuration with Boltzmann weight, for a core of tens of kT), while two atoms inside each
    other cost a finite energy whose gradient pushes them apart with a force that does not fade (the
    r^-12 wall makes such energies so large that a clipped loss gives them no gradient at all), and
    the Coulomb attraction of opposite charges cannot run away once the wall is linear.
    """

    def __init__(self, system: Any) -> None:
        super().__init__()
        from openmm import unit

        system = load_system(system)
        bad = unsupported_forces(system)
        if bad:
            raise ValueError(f"the torch energy cannot evaluate: {', '.join(bad)}")
        self.n_atoms = system.getNumParticles()
        self._cast: dict = {}
        bonds, angles, torsions = [], [], []
        pairs: dict[tuple[int, int], tuple[float, float, float]] = {}
        charges = sigmas = epsilons = None
        gb_forces = []
        nm, kj, rad = unit.nanometer, unit.kilojoule_per_mole, unit.radian
        for force in system.getForces():
            name = type(force).__name__
            if name == "HarmonicBondForce":
                for b in range(force.getNumBonds()):
                    i, j, r0, k = force.getBondParameters(b)
                    bonds.append((i, j, r0.value_in_unit(nm), k.value_in_unit(kj / nm**2)))
            elif name == "HarmonicAngleForce":
                for a in range(force.getNumAngles()):
                    i, j, k_, t0, k = force.getAngleParameters(a)
                    angles.append((i, j, k_, t0.value_in_unit(rad), k.value_in_unit(kj / rad**2)))
            elif name == "PeriodicTorsionForce":
                for t in range(force.getNumTorsions()):
                    i, j, k_, l_, n, p0, k = force.getTorsionParameters(t)
                    torsions.append((i, j, k_, l_, n, p0.value_in_unit(rad), k.value_in_unit(kj)))
            elif name == "NonbondedForce":
                q, s, e = [], [], []
                for p in range(force.getNumParticles()):
                    qi, si, ei = force.getParticleParameters(p)
                    q.append(qi.value_in_unit(unit.elementary_charge))
                    s.append(si.value_in_unit(nm))
                    e.append(ei.value_in_unit(kj))
                charges, sigmas, epsilons = np.array(q), np.array(s), np.array(e)
                for x_ in range(force.getNumExceptions()):
                    i, j, qq, sig, eps = force.getExceptionParameters(x_)
                    key = (min(i, j), max(i, j))
                    pairs[key] = (
                        qq.value_in_unit(unit.elementary_charge**2),
                        sig.value_in_unit(nm),
                        eps.value_in_unit(kj),
                    )
            elif is_gb_force(force):
                gb_forces.append(force)
        f64 = torch.float64
        bonds_a = np.array(bonds, dtype=float).reshape(-1, 4)
        self.register_buffer("bond_idx", torch.as_tensor(bonds_a[:, :2], dtype=torch.long))
        self.register_buffer("bond_r0", torch.as_tensor(bonds_a[:, 2], dtype=f64))
        self.register_buffer("bond_k", torch.as_tensor(bonds_a[:, 3], dtype=f64))
        angles_a = np.array(angles, dtype=float).reshape(-1, 5)
        self.register_buffer("angle_idx", torch.as_tensor(angles_a[:, :3], dtype=torch.long))
        self.register_buffer("angle_t0", torch.as_tensor(angles_a[:, 3], dtype=f64))
        self.register_buffer("angle_k", torch.as_tensor(angles_a[:, 4], dtype=f64))
        tors_a = np.array(torsions, dtype=float).reshape(-1, 7)
        self.register_buffer("torsion_idx", torch.as_tensor(tors_a[:, :4], dtype=torch.long))
        self.register_buffer("torsion_n", torch.as_tensor(tors_a[:, 4], dtype=f64))
        self.register_buffer("torsion_p0", torch.as_tensor(tors_a[:, 5], dtype=f64))
        self.register_buffer("torsion_k", torch.as_tensor(tors_a[:, 6], dtype=f64))
        # Non-bonded pairs: every i < j that is not an exception uses combined particle parameters;
        # exceptions carry their own (zero for exclusions, scaled for 1-4 pairs).
        rows = []
        if charges is not None:
            n = self.n_atoms
            for i in range(n):
                for j in range(i + 1, n):
                    if (i, j) in pairs:
                        qq, sig, eps = pairs[(i, j)]
                    else:
                        qq = charges[i] * charges[j]
                        sig = 0.5 * (sigmas[i] + sigmas[j])
                        eps = math.sqrt(epsilons[i] * epsilons[j])
                    if qq != 0.0 or eps != 0.0:
                        rows.append((i, j, qq * ONE_4PI_EPS0, sig, 4.0 * eps))
        pair_a = np.array(rows, dtype=float).reshape(-1, 5)
        self.register_buffer("pair_idx", torch.as_tensor(pair_a[:, :2], dtype=torch.long))
        self.register_buffer("pair_qq", torch.as_tensor(pair_a[:, 2], dtype=f64))
        self.register_buffer("pair_sig", torch.as_tensor(pair_a[:, 3], dtype=f64))
        self.register_buffer("pair_4eps", torch.as_tensor(pair_a[:, 4], dtype=f64))
        self.implicit_solvent = torch.nn.ModuleList([GeneralizedBornEnergy(f) for f in gb_forces])
        for name, idx, cols in (
            ("bond", "bond_idx", ("i", "j")),
            ("angle", "angle_idx", ("i", "j", "k_idx")),
            ("pair", "pair_idx", ("i", "j")),
            ("torsion", "torsion_idx", ("i", "j", "k_idx", "l")),
        ):
            table = getattr(self, idx)
            for c, col in enumerate(cols):
                self.register_buffer(f"{name}_{col}", table[:, c].contiguous())

    def _params(self, dtype: torch.dtype) -> dict:
        """Parameter buffers cast to ``dtype`` and shaped (K, 1) to broadcast over the batch."""
        key = (dtype, self.bond_k.device)
        if key not in self._cast:
            names = (
                "bond_r0",
                "bond_k",
                "angle_t0",
                "angle_k",
                "torsion_n",
                "torsion_p0",
                "torsion_k",
                "pair_qq",
                "pair_sig",
                "pair_4eps",
            )
            self._cast[key] = {n: getattr(self, n).to(dtype)[:, None] for n in names}
        return self._cast[key]

    def _apply(self, fn, *args, **kwargs):
        self._cast = {}
        return super()._apply(fn, *args, **kwargs)

    @staticmethod
    def core_distances(sigma: torch.Tensor, four_eps: torch.Tensor, pair_core: float) -> torch.Tensor:
        """The distance r_c at which each pair's Lennard-Jones energy 4 eps (y^2 - y), y =
        (sigma / r)^6, reaches ``pair_core``; 0 for pairs without a Lennard-Jones term."""
        lj = four_eps > 0
        y = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * pair_core / torch.where(lj, four_eps, torch.ones_like(four_eps))))
        return torch.where(lj, sigma * y ** (-1.0 / 6.0), torch.zeros_like(sigma))

    def forward(self, x: torch.Tensor, pair_core: float | None = None) -> torch.Tensor:
        """U(x) in kJ/mol for positions (B, n, 3) or (n, 3) in nm; with ``pair_core`` (kJ/mol) the
        energy with linear pair cores (class docstring)."""
        if pair_core is not None and not pair_core > 0:
            raise ValueError(f"pair_core must be a positive energy in kJ/mol, got {pair_core}")
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(0)
        if x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"positions have shape {tuple(x.shape)}; the System has {self.n_atoms} atoms")
        p = self._params(x.dtype)
        xt = x.permute(1, 2, 0).contiguous()  # (n, 3, B)
        energy = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        if self.bond_idx.shape[0] > 0:
            r = _distances(xt, self.bond_i, self.bond_j)
            energy = energy + (0.5 * p["bond_k"] * (r - p["bond_r0"]) ** 2).sum(0)
        if self.angle_idx.shape[0] > 0:
            t = _angles(xt, self.angle_i, self.angle_j, self.angle_k_idx)
            energy = energy + (0.5 * p["angle_k"] * (t - p["angle_t0"]) ** 2).sum(0)
        if self.torsion_idx.shape[0] > 0:
            phi = _dihedrals(xt, self.torsion_i, self.torsion_j, self.torsion_k_idx, self.torsion_l)
            energy = energy + (p["torsion_k"] * (1.0 + torch.cos(p["torsion_n"] * phi - p["torsion_p0"]))).sum(0)
        if self.pair_idx.shape[0] > 0:
            r = _distances(xt, self.pair_i, self.pair_j)
            r_c = None if pair_core is None else self.core_distances(p["pair_sig"], p["pair_4eps"], pair_core)
            # inside a core the terms are evaluated at r_c (the tangent takes over below), so none
            # reaches the r^-12 wall and the unused branch keeps a finite gradient
            inv_r = 1.0 / (r if r_c is None else torch.maximum(r, r_c))
            s6 = (p["pair_sig"] * inv_r) ** 6
            pair_u = p["pair_qq"] * inv_r + p["pair_4eps"] * (s6 * s6 - s6)
            if r_c is not None:
                slope = -p["pair_qq"] * inv_r * inv_r + p["pair_4eps"] * inv_r * (6.0 * s6 - 12.0 * s6 * s6)
                pair_u = torch.where(r < r_c, pair_u + slope * (r - r_c), pair_u)
            energy = energy + pair_u.sum(0)
        for gb in self.implicit_solvent:
            energy = energy + gb(x)
        return energy[0] if squeeze else energy


# ---------------------------------------------------------------------------- OpenMM bridge
class _OpenMMEnergyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bridge: OpenMMBridgeEnergy) -> torch.Tensor:
        energies, forces = bridge.evaluate(x.detach().cpu().numpy().astype(np.float64))
        ctx.save_for_backward(torch.as_tensor(forces, dtype=x.dtype, device=x.device))
        return torch.as_tensor(energies, dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (forces,) = ctx.saved_tensors
        return -forces * grad_output[:, None, None], None


class OpenMMBridgeEnergy(torch.nn.Module):
    """U(x) from an OpenMM Context, per sample, with forces as the autograd gradient.

    Parameters
    ----------
    system
        An openmm.System, its XML path or XML text.
    platform
        OpenMM platform name; ``Reference`` is fastest for a few dozen atoms.
    """

    def __init__(self, system: Any, platform: str = "Reference") -> None:
        super().__init__()
        import openmm

        self.system = load_system(system)
        self.n_atoms = self.system.getNumParticles()
        self.platform = platform
        self._context = openmm.Context(
            self.system,
            openmm.VerletIntegrator(0.001),
            openmm.Platform.getPlatformByName(platform),
        )

    def evaluate(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Energies (B,) kJ/mol and forces (B, n, 3) kJ/mol/nm for positions (B, n, 3) nm.

        A sample OpenMM cannot evaluate (e.g. overlapping atoms) gets energy +inf and zero force,
        so one bad sample never hides the rest of the batch.
        """
        from openmm import unit

        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"positions have shape {x.shape}; the System has {self.n_atoms} atoms")
        energies = np.empty(x.shape[0])
        forces = np.zeros_like(x)
        kj, kjnm = unit.kilojoule_per_mole, unit.kilojoule_per_mole / unit.nanometer
        for b in range(x.shape[0]):
            if not np.all(np.isfinite(x[b])):
                energies[b] = np.inf
                continue
            self._context.setPositions(x[b])
            state = self._context.getState(getEnergy=True, getForces=True)
            energies[b] = state.getPotentialEnergy().value_in_unit(kj)
            if np.isfinite(energies[b]):
                forces[b] = state.getForces(asNumpy=True).value_in_unit(kjnm)
            else:
                energies[b] = np.inf
        return energies, forces

    def energies(self, x: np.ndarray) -> np.ndarray:
        """Energies (B,) kJ/mol of positions (B, n, 3) nm, without forces (+inf where OpenMM cannot
        evaluate a sample)."""
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"positions have shape {x.shape}; the System has {self.n_atoms} atoms")
        energies = np.full(x.shape[0], np.inf)
        for b in range(x.shape[0]):
            if np.isfinite(x[b]).all():
                self._context.setPositions(x[b])
                energy = self._context.getState(getEnergy=True).getPotentialEnergy()
                energies[b] = energy._value  # State energies are in kJ/mol
        return np.where(np.isfinite(energies), energies, np.inf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """U(x) in kJ/mol for positions (B, n, 3) or (n, 3) in nm."""
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(0)
        out = _OpenMMEnergyFunction.apply(x, self)
        return out[0] if squeeze else out


def aa_energy(system: Any, backend: str = "auto", platform: str = "Reference") -> torch.nn.Module:
    """An energy module for an OpenMM System: ``torch``, ``openmm`` or ``auto`` (torch if possible)."""
    system = load_system(system)
    if backend == "auto":
        backend = "openmm" if unsupported_forces(system) else "torch"
    if backend == "torch":
        return TorchSystemEnergy(system)
    if backend == "openmm":
        return OpenMMBridgeEnergy(system, platform=platform)
    raise ValueError(f"unknown energy backend {backend!r}; choose auto, torch or openmm")


class ReducedEnergy(torch.nn.Module):
    """u(x) = U(x) / kT, dimensionless, with an optional cap for training guard rails.

    ``clip`` (in kT) replaces u above ``clip`` by ``clip + log(1 + u - clip)``: large energies from
    clashing samples still push back, but cannot blow up a gradient step.
    """

    def __init__(self, energy: torch.nn.Module, temperature: float, clip: float | None = None) -> None:
        super().__init__()
        self.energy = energy
        self.beta = 1.0 / kT(temperature)
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.energy(x) * self.beta
        if self.clip is not None:
            c = torch.as_tensor(self.clip, dtype=u.dtype, device=u.device)
            soft = c + torch.log1p(torch.clamp(u - c, min=0.0))
            u = torch.where(u > c, soft, u)
            u = torch.nan_to_num(u, nan=float(self.clip) + 30.0, posinf=float(self.clip) + 30.0)
        return u
