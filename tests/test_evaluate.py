"""The evaluation report: metrics against independent recomputation, plots, and the CLI."""

import json

import numpy as np
import openmm
import torch
from openmm import unit

from openmm_backmap.analysis.evaluate import evaluate_model
from openmm_backmap.analysis.metrics import energy_w1
from openmm_backmap.analysis.plots import free_energy_surface
from openmm_backmap.analysis.reweighting import conditional_ess
from openmm_backmap.cli import main
from openmm_backmap.io.backmap_model import load_model
from openmm_backmap.openmm.energies import load_system


def test_metrics_match_independent_recomputation(tiny_ala2, tmp_path):
    traj = tiny_ala2["traj"]
    metrics = evaluate_model(tiny_ala2["model"], traj, tmp_path, n_frames=12, samples=8, seed=3)
    for name in ("metrics.json", "ramachandran.png", "energies.png", "geometry.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["n_frames"] == 12
    # redraw the same samples (same seed) and recompute energies with an OpenMM Context
    model = load_model(tiny_ala2["model"], device="cpu")
    idx = np.unique(np.linspace(0, traj.n_frames - 1, 12).round().astype(int))
    ref = traj.xyz[idx].astype(np.float64)
    torch.manual_seed(3)
    aa, log_q = model.sample(model.mapping.project(ref).astype(np.float32), 8)
    ctx = openmm.Context(
        load_system(tiny_ala2["system_xml"]),
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )

    def energy(x):
        ctx.setPositions(x.astype(np.float64))
        return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    u_aa = np.array([energy(x) for x in aa]).reshape(12, 8)
    u_ref = np.array([energy(x) for x in ref])
    u_aa = np.where(np.isfinite(u_aa), u_aa, np.inf)
    w1 = energy_w1(u_aa[:, 0], u_ref)
    assert abs(metrics["energy_w1_kjmol"] - w1) < 1e-3 * max(1.0, w1)
    ess = conditional_ess(u_aa, log_q.reshape(12, 8), 300.0)
    assert abs(metrics["conditional_ess"] - ess) < 1e-3
    assert 1 / 8 - 1e-9 <= metrics["conditional_ess"] <= 1.0
    nll = -model.log_prob(ref.astype(np.float32)).mean() / 22
    assert abs(metrics["nll_per_atom"] - nll) < 1e-4 * max(1.0, abs(nll))
    assert 0.0 <= metrics["bond_score"] <= 1.0 and metrics["chirality_errors_percent"] >= 0.0
    assert metrics["rmsd_nm"] > 0.0


def test_free_energy_surface_of_a_known_density():
    rng = np.random.default_rng(0)
    phi = rng.normal(-75, 10, 200000)  # modes on bin centres
    psi = rng.normal(75, 10, 200000)
    f = free_energy_surface(phi, psi, bins=36)
    assert np.nanmin(f) == 0.0
    i, j = np.unravel_index(np.nanargmin(f), f.shape)
    assert -90 <= -180 + 10 * i <= -70 and 60 <= -180 + 10 * j <= 80  # minimum in the bin of the mode
    # a bin 20 degrees off in phi costs about (20/10)^2 / 2 = 2 kT
    assert abs(f[i - 2, j] - f[i, j] - 2.0) < 0.5


def test_evaluate_cli(tiny_ala2, tmp_path, capsys):
    paths = tiny_ala2["paths"]
    code = main(
        [
            "evaluate",
            "--model",
            str(tiny_ala2["model"]),
            "--reference",
            str(paths["dcd"]),
            "--topology",
            str(paths["pdb"]),
            "--out",
            str(tmp_path / "report"),
            "--frames",
            "5",
            "--samples",
            "4",
        ]
    )
    assert code == 0
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["samples_per_frame"] == 4
    assert "report written" in capsys.readouterr().out
    # a reference of another molecule is refused with a clear message
    other = tmp_path / "other.pdb"
    tiny_ala2["traj"][0].atom_slice(range(20)).save_pdb(str(other))
    code = main(
        [
            "evaluate",
            "--model",
            str(tiny_ala2["model"]),
            "--reference",
            str(other),
            "--topology",
            str(other),
            "--out",
            str(tmp_path / "r2"),
        ]
    )
    assert code == 2
    assert "trained for another molecule" in capsys.readouterr().err
