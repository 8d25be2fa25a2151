"""Training: ML lowers validation NLL, is deterministic and resumable; methyl augmentation keeps the
energy; energy refinement lowers the reverse KL."""

import mdtraj as md
import numpy as np
import torch
from _backmap_helpers import ala2_constraints, ala2_reference, ala2_six, ala2_traj

from openmm_backmap.io.checkpoints import load_checkpoint, make_spec
from openmm_backmap.mapping import CGMapping
from openmm_backmap.models.backmapper import Backmapper
from openmm_backmap.training.backmapper import (
    mean_nll,
    methyl_groups,
    permute_methyls,
    refine_energy,
    train_ml,
)
from openmm_backmap.training.pipeline import detect_constraints


def _sets():
    traj = ala2_traj()
    mapping = ala2_six(traj.topology)
    x = traj.xyz.astype(np.float64)
    X = mapping.project(x)
    return mapping, (x[:600], X[:600]), (x[800:], X[800:])


def _model(mapping, x, seed=0):
    torch.manual_seed(seed)
    return Backmapper.from_data(mapping, x, constraints=ala2_constraints(), hidden=32, n_layers=2)


def test_training_lowers_validation_nll():
    mapping, train, val = _sets()
    model = _model(mapping, train[0])
    xv, Xv = (torch.as_tensor(v, dtype=torch.float32) for v in val)
    before = mean_nll(model, xv, Xv)
    summary = train_ml(model, make_spec(model, 300.0), train, val, epochs=3, progress=False)
    after = mean_nll(model, xv, Xv)
    # the standardised start is already a fair Gaussian model; training must still improve on it
    assert after < before - 0.1, (before, after)
    assert abs(after - summary["best_val_nll"]) < 1e-3
    assert len(summary["history"]) == 3


def test_training_is_deterministic_and_resumes(tmp_path):
    mapping, train, val = _sets()
    ref = _model(mapping, train[0])
    train_ml(ref, make_spec(ref, 300.0), train, val, epochs=2, seed=4, progress=False)

    again = _model(mapping, train[0])
    train_ml(again, make_spec(again, 300.0), train, val, epochs=2, seed=4, progress=False)
    for (k, a), b in zip(ref.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k

    ckpt = tmp_path / "m.ckpt"
    part = _model(mapping, train[0])
    spec = make_spec(part, 300.0)
    train_ml(part, spec, train, val, epochs=2, seed=4, progress=False, checkpoint=ckpt, time_limit=0.0)
    assert len(torch.load(ckpt, weights_only=False)["history"]) == 1  # stopped after one epoch
    resumed = _model(mapping, train[0])
    train_ml(resumed, spec, train, val, epochs=2, seed=4, progress=False, checkpoint=ckpt, resume=True)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    loaded, data = load_checkpoint(ckpt)
    xv, Xv = (torch.as_tensor(v[:50], dtype=torch.float32) for v in val)
    assert torch.allclose(loaded.log_prob(xv, Xv), ref.log_prob(xv, Xv), atol=1e-4)


def test_methyl_permutation_keeps_energy():
    from openmm_backmap.openmm.energies import aa_energy

    traj = ala2_traj()
    methyls = methyl_groups(traj.topology, exclude=ala2_six(traj.topology).bead_atoms)
    assert len(methyls) == 3
    x = torch.as_tensor(traj.xyz[:20], dtype=torch.float64)
    xp = permute_methyls(x, methyls, torch.Generator().manual_seed(0))
    assert not torch.equal(x, xp)
    energy = aa_energy(ala2_reference()["system"])
    assert torch.allclose(energy(x), energy(xp), atol=1e-6)


def test_detect_constraints_finds_the_x_h_bonds():
    found = {(i, j) for i, j, _ in detect_constraints(ala2_traj())}
    expected = {(min(i, j), max(i, j)) for i, j, _ in ala2_constraints()}
    assert {(min(i, j), max(i, j)) for i, j in found} == expected


def test_energy_refinement_lowers_reverse_kl():
    # toy: atom D bonded to bead A, harmonic in its distances to A and B
    top = md.Topology()
    res = top.add_residue("TOY", top.add_chain())
    atoms = [top.add_atom(f"A{i}", md.element.carbon, res) for i in range(4)]
    for i, j in [(0, 1), (1, 2), (0, 3)]:
        top.add_bond(atoms[i], atoms[j])
    mapping = CGMapping(top, [[0], [1], [2]])
    rng = np.random.default_rng(0)
    tri = np.array([[0.0, 0.0, 0.0], [0.15, 0.0, 0.0], [0.2, 0.13, 0.0]])
    x = np.repeat(np.concatenate([tri, [[-0.1, -0.1, 0.0]]])[None], 500, 0)
    x[:, 3] += 0.05 * rng.normal(size=(500, 3))
    torch.manual_seed(0)
    model = Backmapper.from_data(mapping, x, hidden=16, n_layers=2)

    def energy(p):
        d_a = torch.linalg.vector_norm(p[:, 3] - p[:, 0], dim=-1)
        d_b = torch.linalg.vector_norm(p[:, 3] - p[:, 1], dim=-1)
        return 2000.0 * (d_a - 0.15) ** 2 + 2000.0 * (d_b - 0.25) ** 2

    X = mapping.project(x)
    beta = 1.0 / (8.314462618e-3 * 300.0)

    def reverse_kl():
        torch.manual_seed(11)
        with torch.no_grad():
            aa, lq = model.sample(torch.as_tensor(X[:100], dtype=torch.float32), 20)
            return float(torch.mean(beta * energy(aa) + lq))

    before = reverse_kl()
    summary = refine_energy(
        model,
        make_spec(model, 300.0),
        energy,
        X,
        300.0,
        steps=150,
        batch_size=64,
        lr=3e-3,
        t_start=600.0,
        val_frames=X[:32],
        eval_every=10,
        progress=False,
    )
    after = reverse_kl()
    assert after < before - 0.5, (before, after)
    assert summary["history"][0]["T"] == 600.0 and abs(summary["history"][-1]["T"] - 300.0) < 1e-9
    assert summary["best_step"] >= 75  # selection only at the target temperature
