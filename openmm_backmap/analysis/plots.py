"""Plots of the evaluation reports: Ramachandran free-energy surfaces, energies, geometry, ESS."""

from __future__ import annotations

from pathlib import Path

import mdtraj as md
import numpy as np

from openmm_backmap.analysis.basins import backbone_dihedrals
from openmm_backmap.analysis.metrics import ramachandran_histogram
from openmm_backmap.analysis.reweighting import kish_ess


def free_energy_surface(
    phi: np.ndarray, psi: np.ndarray, weights: np.ndarray | None = None, bins: int = 60
) -> np.ndarray:
    """-log p of a (phi, psi) histogram in kT, shifted to a minimum of 0 (NaN where empty)."""
    h = ramachandran_histogram(phi, psi, bins=bins, weights=weights)
    with np.errstate(divide="ignore"):
        f = -np.log(h)
    f[~np.isfinite(f)] = np.nan
    return f - np.nanmin(f)


def plot_ramachandran(axes, surfaces: dict[str, np.ndarray], vmax: float = 8.0) -> None:
    """Side-by-side free-energy surfaces (kT) on matplotlib ``axes``."""
    for ax, (title, f) in zip(axes, surfaces.items()):
        im = ax.imshow(f.T, origin="lower", extent=(-180, 180, -180, 180), vmin=0, vmax=vmax, cmap="viridis")
        ax.set_title(title)
        ax.set_xlabel("phi (deg)")
        ax.set_ylabel("psi (deg)")
    axes[-1].figure.colorbar(im, ax=list(axes), label="free energy (kT)", shrink=0.8)


def plot_backmapper_report(out: Path, top, ref, flat, sample_traj, u_aa, u_ref) -> None:
    """``ramachandran.png``, ``energies.png`` and ``geometry.png`` of a backmapper's reconstructions
    ``flat`` (S, n_aa, 3) nm against reference frames ``ref``, in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if sample_traj is not None:
        phi_r, psi_r = backbone_dihedrals(md.Trajectory(ref.astype(np.float32), top))
        phi_s, psi_s = backbone_dihedrals(sample_traj)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
        plot_ramachandran(
            axes, {"reference": free_energy_surface(phi_r, psi_r), "reconstructions": free_energy_surface(phi_s, psi_s)}
        )
        fig.savefig(out / "ramachandran.png", dpi=110)
        plt.close(fig)
    if u_aa is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        finite = u_aa[np.isfinite(u_aa)]
        lo, hi = np.percentile(np.concatenate([u_ref, finite]), [0.5, 99.5])
        ax.hist(u_ref, bins=60, range=(lo, hi), density=True, alpha=0.6, label="reference")
        ax.hist(finite, bins=60, range=(lo, hi), density=True, alpha=0.6, label="reconstructions")
        ax.set_xlabel("U_AA (kJ/mol)")
        ax.set_ylabel("density")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "energies.png", dpi=110)
        plt.close(fig)
    bonds = np.array([[a.index, b.index] for a, b in top.bonds])
    neigh: list[list[int]] = [[] for _ in range(top.n_atoms)]
    for a, b in top.bonds:
        neigh[a.index].append(b.index)
        neigh[b.index].append(a.index)
    angle_idx = [[i, j, k] for j in range(top.n_atoms) for i in neigh[j] for k in neigh[j] if i < k]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for data, label in ((ref, "reference"), (flat, "reconstructions")):
        traj = md.Trajectory(data.astype(np.float32), top)
        axes[0].hist(md.compute_distances(traj, bonds).ravel(), bins=100, density=True, alpha=0.6, label=label)
        if angle_idx:
            axes[1].hist(
                np.degrees(md.compute_angles(traj, np.array(angle_idx)).ravel()),
                bins=100,
                density=True,
                alpha=0.6,
                label=label,
            )
    axes[0].set_xlabel("bond length (nm)")
    axes[1].set_xlabel("bond angle (deg)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "geometry.png", dpi=110)
    plt.close(fig)


def plot_reweighting_report(out: Path, phi, psi, phi_r, psi_r, rw, cols) -> None:
    """``ramachandran_reweighted.png`` and ``reweighting.png`` of a reweighted reporter run, in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    weights = np.repeat(rw.weights[:, None], phi.shape[1], 1)
    plot_ramachandran(
        axes,
        {
            "AA reference": free_energy_surface(phi_r, psi_r),
            "reconstructions (raw)": free_energy_surface(phi, psi),
            "reconstructions (reweighted)": free_energy_surface(phi, psi, weights),
        },
    )
    fig.savefig(out / "ramachandran_reweighted.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    u = cols["u_aa_kjmol"]
    finite = np.isfinite(u)
    if finite.any():
        lo, hi = np.percentile(u[finite], [0.5, 99.5])
        axes[0].hist(u[finite], bins=60, range=(lo, hi), density=True, alpha=0.6, label="raw")
        axes[0].hist(
            u[finite],
            bins=60,
            range=(lo, hi),
            density=True,
            weights=rw.weights[finite] + 1e-300,
            alpha=0.6,
            label="reweighted",
        )
    axes[0].set_xlabel("U_AA (kJ/mol)")
    axes[0].legend()
    steps = np.unique(cols["step"])
    ess = [kish_ess(cols["log_w"][cols["step"] <= s]) / max((cols["step"] <= s).sum(), 1) for s in steps]
    axes[1].plot(steps, ess)
    axes[1].set_xlabel("CG step")
    axes[1].set_ylabel("ESS / N so far")
    axes[1].set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out / "reweighting.png", dpi=110)
    plt.close(fig)
