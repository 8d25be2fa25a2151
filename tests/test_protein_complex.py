"""Protein models on complexes: several chains bound as one model.

Each chain is placed as it would be alone (its own termini), and a residue's nearest anchors
include the other chains'. So chains further apart than the anchor cutoff have exactly the density
each has alone, nearer chains condition each other, and log q stays exact. The command line, the
AA topology (one chain each, termini per chain) and the errors name the chain.
"""

from __future__ import annotations

from pathlib import Path

import mdtraj as md
import numpy as np
import openmm
import pytest
import torch
from _backmap_helpers import assert_amber_gbn2_energies, save_tiny_pretrained
from openmm import app, unit

import openmm_backmap.io.protein_models as protein_models
from openmm_backmap import cli
from openmm_backmap.backmap import backmap_trajectory
from openmm_backmap.io.backmap_model import ProteinChainModel, load_model
from openmm_backmap.models.protein import load_pretrained
from openmm_backmap.models.residues import MAPPINGS, canonical_name
from openmm_backmap.training.protein import chain_positions

CHIGNOLIN = Path(__file__).resolve().parent.parent / "openmm_backmap" / "data" / "chignolin.pdb"
SECOND = ["ACE", "LYS", "HIP", "PRO", "ASP", "NME"]


def _trace(n: int, seed: int, start=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A C-alpha trace (n, 3) nm: 0.38 nm steps, 120 degree virtual angles."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3)) + np.asarray(start)
    d = np.array([1.0, 0.0, 0.0])
    for i in range(1, n):
        v = rng.normal(size=3)
        v -= v.dot(d) * d
        v /= np.linalg.norm(v)
        d = 0.5 * d + np.sqrt(0.75) * v
        x[i] = x[i - 1] + 0.38 * d
    return x


def test_complex_density_is_exact_and_far_chains_are_independent():
    """With the shipped protein-ca weights: the complex's sampled log q equals its log_prob; with
    the chains 5 nm apart log q is the sum of each chain's own; 0.5 nm apart the chains see each
    other (log q differs); the TorchScript module gives the same."""
    model = load_pretrained("protein-ca")
    first = ["MET", "LYS", "GLU", "TRP", "GLY", "SER", "TYR"]
    a = model.for_sequence(first).double().eval()
    b = model.for_sequence(SECOND).double().eval()
    ab = model.for_chains([first, SECOND]).double().eval()
    assert ab.n_aa == a.n_aa + b.n_aa and ab.n_rows == a.n_rows + b.n_rows
    assert ab.atom_names == a.atom_names + b.atom_names
    xa = torch.as_tensor(_trace(len(first), 1))[None].repeat(4, 1, 1)
    xb = torch.as_tensor(_trace(len(SECOND), 2))[None].repeat(4, 1, 1)
    torch.manual_seed(0)
    with torch.no_grad():
        far = torch.cat([xa, xb + 5.0], dim=1)
        x, lq = ab.sample(far, 1)
        assert torch.equal(x[:, ab.beads], far)  # M x = X
        np.testing.assert_allclose(lq.numpy(), ab.log_prob(x, far).numpy(), atol=1e-8)
        own = a.log_prob(x[:, : a.n_aa], far[:, : a.n_cg]) + b.log_prob(x[:, a.n_aa :], far[:, a.n_cg :])
        np.testing.assert_allclose(ab.log_prob(x, far).numpy(), own.numpy(), atol=1e-8)
        near = torch.cat([xa, xb + torch.tensor([0.0, 0.6, 0.0], dtype=torch.float64)], dim=1)
        xn, lqn = ab.sample(near, 1)
        np.testing.assert_allclose(lqn.numpy(), ab.log_prob(xn, near).numpy(), atol=1e-8)
        own = a.log_prob(xn[:, : a.n_aa], near[:, : a.n_cg]) + b.log_prob(xn[:, a.n_aa :], near[:, a.n_cg :])
        assert float(torch.max(torch.abs(ab.log_prob(xn, near) - own))) > 1.0
        scripted = torch.jit.script(ab)
        np.testing.assert_allclose(scripted.log_prob(xn, near).numpy(), ab.log_prob(xn, near).numpy(), atol=1e-8)


@pytest.fixture(scope="module")
def shipped_dir(tmp_path_factory):
    traj = md.load(str(CHIGNOLIN))
    names, x = chain_positions(traj.topology, traj.xyz)
    return save_tiny_pretrained(tmp_path_factory.mktemp("pretrained"), list(names), x.astype(np.float64))


@pytest.fixture
def shipped(shipped_dir, monkeypatch):
    """Tiny models stand in for the shipped ones (plumbing only)."""
    monkeypatch.setattr(protein_models, "PRETRAINED_DIR", shipped_dir)
    return shipped_dir


def _complex_pdb(path: Path, chains: list[list[tuple[str, int]]], xyz_nm: np.ndarray) -> Path:
    """A CA-bead CG PDB of several chains (A, B, ...), TER after each, coordinates in order."""
    lines, n = [], 0
    for c, residues in enumerate(chains):
        for name, seq in residues:
            bead = MAPPINGS["ca"][canonical_name(name)][0]
            x, y, z = xyz_nm[n] * 10.0
            lines.append(
                f"ATOM  {n + 1:5d} {bead:^4s} {name:3s} {chr(65 + c)}{seq:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00"
            )
            n += 1
        lines.append("TER")
    path.write_text("\n".join(lines) + "\nEND\n")
    return path


FIRST = ["GLY", "TYR", "ASP", "PRO", "GLU", "THR", "GLY", "THR", "TRP", "GLY"]  # chignolin
UNCAPPED = ["ALA", "SER", "LYS", "GLY"]


def _frames(n_frames: int, seed: int = 3) -> np.ndarray:
    """Frames of the two-chain complex FIRST + UNCAPPED, chain B 1.1 nm beside chain A."""
    rng = np.random.default_rng(seed)
    base = np.concatenate([_trace(len(FIRST), 4), _trace(len(UNCAPPED), 5, (0.0, 1.1, 0.0))])
    out = []
    for _ in range(n_frames):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        q *= np.sign(np.linalg.det(q))
        out.append(base @ q.T + rng.normal(0, 0.3, 3))
    return np.asarray(out)


def test_backmap_command_on_a_complex(shipped, tmp_path, capsys):
    """`backmap --model protein-ca` on a CG PDB of two chains: aa.pdb has both chains with their
    own termini (capped or charged as each chain says) and CG residue numbers, every sample keeps
    its frame's beads, and the CSV's log_q and u_aa_kjmol are the model's density and OpenMM's
    amber14 + GBn2 energy of the written atoms."""
    n_frames, k = 2, 2
    X = _frames(n_frames)
    chains = [[(n, 1 + r) for r, n in enumerate(FIRST)], [(n, 101 + r) for r, n in enumerate(UNCAPPED)]]
    pdb = _complex_pdb(tmp_path / "cg.pdb", chains, X[0])
    cg_top = md.load_pdb(str(pdb), standard_names=False).topology
    assert cg_top.n_chains == 2
    md.Trajectory(X.astype(np.float32), cg_top).save_dcd(str(tmp_path / "cg.dcd"))
    argv = ["backmap", "--model", "protein-ca", "--cg", str(tmp_path / "cg.dcd"), "--cg-topology", str(pdb)]
    argv += ["--samples", str(k), "--seed", "3", "--out", str(tmp_path / "aa.dcd")]
    argv += ["--energies", str(tmp_path / "e.csv"), "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err

    model = load_model("protein-ca", cg_topology=pdb)
    assert isinstance(model, ProteinChainModel) and model.cg_chain.lengths == (10, 4)
    assert "2 chain(s)" in repr(model)
    aa_pdb = app.PDBFile(str(tmp_path / "aa.pdb"))
    chains_aa = list(aa_pdb.topology.chains())
    assert [c.id for c in chains_aa] == ["A", "B"]
    assert [[r.name for r in c.residues()] for c in chains_aa] == [FIRST, UNCAPPED]
    assert [int(r.id) for r in chains_aa[1].residues()] == [101, 102, 103, 104]
    for c in chains_aa:  # charged termini of both chains
        residues = list(c.residues())
        assert {"H2", "H3"} <= {a.name for a in residues[0].atoms()}
        assert "OXT" in {a.name for a in residues[-1].atoms()}
    assert sum(a.name == "OXT" for a in aa_pdb.topology.atoms()) == 2
    aa = md.load_dcd(str(tmp_path / "aa.dcd"), top=str(tmp_path / "aa.pdb"))
    assert aa.n_frames == n_frames * k
    np.testing.assert_allclose(aa.xyz[:, model.module.beads.numpy()], np.repeat(X, k, axis=0), atol=2e-5)
    rows = np.genfromtxt(tmp_path / "e.csv", delimiter=",", names=True)
    lq = model.log_prob(aa.xyz, np.repeat(X, k, axis=0).astype(np.float32))
    np.testing.assert_allclose(rows["log_q"], lq, rtol=1e-4, atol=5e-2)
    assert_amber_gbn2_energies(aa_pdb.topology, aa.xyz, rows["u_aa_kjmol"], (0, n_frames * k - 1))


def test_complex_bad_input_names_the_chain(shipped, tmp_path):
    """A chain of one residue, a residue missing from chain B (numbering, or a C-alpha gap in a frame)
    and another complex's topology are refused, naming chain B; a gap between the chains is not a
    missing residue."""
    X = _frames(1)
    good = [[(n, 1 + r) for r, n in enumerate(FIRST)], [(n, 101 + r) for r, n in enumerate(UNCAPPED)]]

    def run(chains, frames):
        pdb = _complex_pdb(tmp_path / "cg.pdb", chains, frames[0])
        top = md.load_pdb(str(pdb), standard_names=False).topology
        md.Trajectory(frames.astype(np.float32), top).save_dcd(str(tmp_path / "cg.dcd"))
        return backmap_trajectory("protein-ca", tmp_path / "cg.dcd", pdb, tmp_path / "aa.dcd", progress=False)

    with pytest.raises(ValueError, match=r"chain B has 1 residue\(s\); a chain needs at least two"):
        run([good[0], [("ALA", 101)]], X[:, :11])
    jump = [good[0], [("ALA", 101), ("SER", 102), ("LYS", 104), ("GLY", 105)]]
    with pytest.raises(ValueError, match=r"chain B: residue numbers jump from SER102 to LYS104"):
        run(jump, X)
    gap = X.copy()
    gap[0, 12:] += 0.5  # SER102 - LYS103 of chain B 0.8 nm apart
    with pytest.raises(ValueError, match=r"beads of SER102 of chain B and LYS103 of chain B are 0\.\d+ nm apart"):
        run(good, gap)
    far = X.copy()
    far[0, 10:] += 3.0  # the chains apart: fine
    run(good, far)
    model = load_model("protein-ca", cg_topology=tmp_path / "cg.pdb")
    other = _complex_pdb(tmp_path / "other.pdb", [good[1], good[0]], X[0])
    with pytest.raises(ValueError, match=r"residues ALA SER LYS GLY / GLY TYR .* are not the model's chain GLY TYR"):
        model.check_cg_topology(other)


def test_reporter_backmaps_a_complex_in_a_cg_simulation(shipped, tmp_path):
    """BackmapReporter(model="protein-ca") on a CG Simulation of two chains (CA beads, harmonic bonds
    within each chain): the model binds the complex from the Simulation's topology, the frames carry
    both chains' atoms, and u_aa is OpenMM's amber14 + GBn2 energy of the written frame."""
    from openmm_backmap.io.energy_file import read_energy_file
    from openmm_backmap.openmm.reporter import BackmapReporter

    X = _frames(1)[0]
    top = app.Topology()
    for c, (names, first) in enumerate(((FIRST, 1), (UNCAPPED, 101))):
        chain = top.addChain(chr(65 + c))
        for r, name in enumerate(names):
            top.addAtom("CA", app.Element.getBySymbol("C"), top.addResidue(name, chain, id=str(first + r)))
    system = openmm.System()
    bonds = openmm.HarmonicBondForce()
    for _ in range(len(X)):
        system.addParticle(110.0)
    for r in list(range(len(FIRST) - 1)) + list(range(len(FIRST), len(X) - 1)):
        bonds.addBond(r, r + 1, float(np.linalg.norm(X[r + 1] - X[r])), 2000.0)
    system.addForce(bonds)
    integ = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 5.0 / unit.picosecond, 0.001 * unit.picoseconds)
    integ.setRandomNumberSeed(4)
    sim = app.Simulation(top, system, integ, openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(X)
    reporter = BackmapReporter(tmp_path / "aa.dcd", 5, model="protein-ca", energyFile=tmp_path / "w.csv")
    sim.reporters.append(reporter)
    sim.step(10)
    reporter.close()
    model = reporter.model
    assert model.cg_chain.lengths == (len(FIRST), len(UNCAPPED)) and model.topology.n_chains == 2
    aa = md.load_dcd(str(tmp_path / "aa.dcd"), top=model.topology)
    rows = read_energy_file(tmp_path / "w.csv")
    assert aa.n_frames == 2 == len(rows["step"])
    assert_amber_gbn2_energies(model.topology.to_openmm(), aa.xyz, rows["u_aa_kjmol"], range(2))
