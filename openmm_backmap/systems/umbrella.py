"""Umbrella sampling along phi, unbiased with MBAR (pymbar): basin populations that plain MD cannot reach."""

from __future__ import annotations

import math

import mdtraj as md
import numpy as np

from openmm_backmap._compat import import_pymbar
from openmm_backmap.analysis.basins import BASINS, backbone_torsions, basin_indicators
from openmm_backmap.mapping import as_mdtraj_topology
from openmm_backmap.systems.builtin import builtin_system
from openmm_backmap.systems.reference import langevin_context
from openmm_backmap.units import kT


def mbar_free_energies(u_kn: np.ndarray, n_k: np.ndarray) -> np.ndarray:
    """Dimensionless free energies f_k of K biased states (f_0 = 0), solved by pymbar's MBAR from
    reduced potentials ``u_kn`` (K, N) of every sample in every state, ``n_k`` samples drawn from
    state k."""
    mbar = import_pymbar().MBAR(
        np.asarray(u_kn, dtype=np.float64), np.asarray(n_k), relative_tolerance=1e-12, solver_protocol="robust"
    )
    return mbar.f_k - mbar.f_k[0]


def umbrella_basin_populations(
    name: str = "ala2",
    n_windows: int = 36,
    ps_per_window: float = 500.0,
    k_kjmol_rad2: float = 150.0,
    temperature: float = 300.0,
    seed: int = 1,
    equilibrate_ps: float = 20.0,
    save_every_ps: float = 1.0,
    platform: str = "Reference",
    progress: bool = True,
) -> dict:
    """Basin populations of a built-in peptide from umbrella sampling along the first residue's
    phi, unbiased with MBAR: a reference for basins that plain MD does not reach in any affordable
    time (in vacuum, alanine dipeptide's phi > 0 basins lie behind a barrier that 240 ns of MD at
    300 K never crosses).

    ``n_windows`` harmonic restraints k/2 d^2 (d the periodic distance to the window's phi) centred
    evenly on [-180, 180), run one after the other from the previous window's end. Errors: half the
    difference between the estimates from the first and the second half of every window.

    Returns a dict with ``basins`` ({name: {"population", "error"}}), ``phi_profile`` (bin
    centres in degrees, free energy in kT) and the run settings.
    """
    import openmm
    from openmm import unit
    from tqdm.auto import tqdm

    if n_windows < 2 or ps_per_window <= 0:
        raise ValueError(
            f"umbrella sampling needs >= 2 windows of positive length, got {n_windows} x {ps_per_window} ps"
        )
    topology, system, positions = builtin_system(name)
    beta = 1.0 / kT(temperature)
    torsions = backbone_torsions(topology)
    restraint = openmm.CustomTorsionForce("0.5*k_umb*d^2; d=atan2(sin(theta-phi_umb), cos(theta-phi_umb))")
    restraint.addGlobalParameter("phi_umb", -math.pi)
    restraint.addGlobalParameter("k_umb", k_kjmol_rad2)
    restraint.addTorsion(*torsions[0], [])
    restraint.setForceGroup(31)
    system.addForce(restraint)
    context, integrator = langevin_context(system, positions, temperature, 1.0, 2.0, seed, platform)
    centres = np.radians(np.linspace(-180.0, 180.0, n_windows, endpoint=False))
    steps_per_frame = max(1, int(round(save_every_ps * 500.0)))
    n_frames = max(2, int(round(ps_per_window / save_every_ps)))
    top = as_mdtraj_topology(topology)
    angles = np.empty((n_windows, n_frames, len(torsions)))
    for w in tqdm(range(n_windows), desc=f"umbrella {name}", unit="window", disable=not progress):
        context.setParameter("phi_umb", float(centres[w]))
        integrator.step(int(round(equilibrate_ps * 500.0)))
        xyz = np.empty((n_frames, top.n_atoms, 3))
        for k in range(n_frames):
            integrator.step(steps_per_frame)
            xyz[k] = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        angles[w] = md.compute_dihedrals(md.Trajectory(xyz, top), np.asarray(torsions))
    phi_all = angles[:, :, 0]
    psi_all = angles[:, :, 1]

    def estimate(part: slice) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        phi = phi_all[:, part].reshape(-1)
        psi = psi_all[:, part].reshape(-1)
        d = np.angle(np.exp(1j * (phi[None, :] - centres[:, None])))
        u_kn = beta * 0.5 * k_kjmol_rad2 * d**2
        n_k = np.full(n_windows, phi_all[:, part].shape[1])
        f = mbar_free_energies(u_kn, n_k)
        log_w = -np.logaddexp.reduce(np.log(n_k)[:, None] + f[:, None] - u_kn, axis=0)
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        ind = basin_indicators(np.degrees(phi), np.degrees(psi))
        return {b: float(w[ind[b]].sum()) for b in BASINS}, np.degrees(phi), w

    full, phi_deg, weights = estimate(slice(None))
    first, _, _ = estimate(slice(0, n_frames // 2))
    second, _, _ = estimate(slice(n_frames // 2, None))
    hist, edges = np.histogram(phi_deg, bins=72, range=(-180.0, 180.0), weights=weights)
    with np.errstate(divide="ignore"):
        profile = -np.log(hist / hist.max())
    return {
        "basins": {b: {"population": full[b], "error": 0.5 * abs(first[b] - second[b])} for b in BASINS},
        "phi_profile": {"phi_deg": (0.5 * (edges[1:] + edges[:-1])).tolist(), "free_energy_kT": profile.tolist()},
        "settings": {
            "system": name,
            "n_windows": n_windows,
            "ps_per_window": ps_per_window,
            "k_kjmol_rad2": k_kjmol_rad2,
            "temperature_K": temperature,
            "seed": seed,
            "equilibrate_ps": equilibrate_ps,
            "save_every_ps": save_every_ps,
            "platform": platform,
        },
    }
