"""Protein models in `evaluate` and `hybrid`, and warm-started protein training.

The protein models here are tiny ProteinBackmappers fitted in seconds to noisy copies of
chignolin and installed under the shipped names in a temporary pretrained folder (as in
test_protein_api.py): these tests check the binding, the atom order, the energies and the
bookkeeping against an OpenMM Context and the model's own log q, not the shipped weights' quality.
Chignolin's PDB lists two atoms of TYR2 in another order than the amber14 templates, so every
figure below also checks that reference frames are put into the model's order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mdtraj as md
import numpy as np
import openmm
import pytest
import torch
from _backmap_helpers import save_tiny_pretrained
from openmm import app, unit

import openmm_backmap.io.protein_models as protein_models
from openmm_backmap.analysis.evaluate import evaluate_model
from openmm_backmap.analysis.metrics import energy_w1
from openmm_backmap.analysis.reweighting import conditional_ess
from openmm_backmap.cli import main
from openmm_backmap.io.backmap_model import ProteinChainModel, load_model
from openmm_backmap.models.protein import ProteinBackmapper
from openmm_backmap.models.residues import build_chain, build_chains, canonical_hydrogens
from openmm_backmap.training.protein import TrainConfig, chain_positions, train
from openmm_backmap.units import kT

CHIGNOLIN = Path(__file__).resolve().parent.parent / "openmm_backmap" / "data" / "chignolin.pdb"
T = 300.0


@pytest.fixture(scope="module")
def chignolin():
    """(PDB trajectory, residue names, positions (1, n, 3) nm in the templates' order)."""
    traj = md.load(str(CHIGNOLIN))
    names, x = chain_positions(traj.topology, traj.xyz)
    return traj, list(names), x.astype(np.float64)


@pytest.fixture(scope="module")
def pretrained_dir(chignolin, tmp_path_factory):
    _, names, x = chignolin
    return save_tiny_pretrained(tmp_path_factory.mktemp("pretrained"), names, x)


@pytest.fixture
def shipped(pretrained_dir, monkeypatch):
    """The tiny models stand in for the shipped ones."""
    monkeypatch.setattr(protein_models, "PRETRAINED_DIR", pretrained_dir)
    return pretrained_dir


@pytest.fixture(scope="module")
def reference(chignolin):
    """Eight noisy chignolin frames in the PDB's atom order (not the templates')."""
    traj = chignolin[0]
    rng = np.random.default_rng(5)
    xyz = traj.xyz[0] + rng.normal(0.0, 0.003, (8,) + traj.xyz.shape[1:])
    return md.Trajectory(xyz.astype(np.float32), traj.topology)


def _pdb_order_context():
    """An OpenMM Context of amber14 + GBn2 on chignolin's PDB topology (the PDB's atom order)."""
    pdb = app.PDBFile(str(CHIGNOLIN))
    system = app.ForceField("amber14-all.xml", "implicit/gbn2.xml").createSystem(
        pdb.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds
    )
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    return ctx, system


def _to_model_order(model, top: md.Topology) -> np.ndarray:
    """perm with model atom a at topology atom perm[a], matched by residue and atom name."""
    where = {(a.residue.index, a.name): a.index for a in top.atoms}
    return np.array([where[(a.residue.index, a.name)] for a in model.topology.atoms])


def _energy(ctx, x_pdb_order: np.ndarray) -> float:
    ctx.setPositions(x_pdb_order.astype(np.float64))
    return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


# ----------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("name", ["protein-ca", "protein-backbone"])
def test_evaluate_binds_a_protein_model_to_the_reference(shipped, chignolin, reference, tmp_path, name, capsys):
    """`evaluate --model protein-ca` on a reference whose atoms are in another order: the samples
    are redrawn with the seed, their energies taken from an OpenMM Context on the reference's own
    topology (the model's frames put back in the PDB's order), and energy W1, conditional ESS and
    NLL per atom recomputed from them agree with the report; the CLI writes the same figures."""
    _, names, _ = chignolin
    metrics = evaluate_model(name, reference, tmp_path / "api", n_frames=8, samples=4, seed=3)
    assert (tmp_path / "api" / "metrics.json").exists() and (tmp_path / "api" / "energies.png").exists()

    cg = md.Topology()
    chain = cg.add_chain()
    for r, res in enumerate(reference.topology.residues):
        residue = cg.add_residue(names[r], chain, resSeq=res.resSeq)
        for bead in ("CA",) if name == "protein-ca" else ("N", "CA", "C"):
            cg.add_atom(bead, md.element.carbon, residue)
    model = load_model(name, cg_topology=cg, device="cpu")
    perm = _to_model_order(model, reference.topology)
    assert not np.array_equal(perm, np.arange(len(perm)))  # the orders do differ
    ref = canonical_hydrogens(build_chain(names), reference.xyz[:, perm].astype(np.float64))
    torch.manual_seed(3)
    aa, log_q = model.sample(model.mapping.project(ref).astype(np.float32), 4)
    ctx, _ = _pdb_order_context()
    back = np.argsort(perm)
    u_aa = np.array([_energy(ctx, x[back]) for x in aa]).reshape(8, 4)
    u_ref = np.array([_energy(ctx, x) for x in reference.xyz])
    w1 = energy_w1(u_aa[:, 0], u_ref)
    assert metrics["energy_w1_kjmol"] == pytest.approx(w1, rel=1e-4, abs=1e-3)
    assert metrics["energy_w1_all_samples_kjmol"] == pytest.approx(energy_w1(u_aa, u_ref), rel=1e-4, abs=1e-3)
    ess = conditional_ess(u_aa, log_q.reshape(8, 4), T)
    assert metrics["conditional_ess"] == pytest.approx(ess, rel=1e-4)
    nll = -model.log_prob(ref.astype(np.float32)).astype(np.float64).mean() / model.n_aa
    assert metrics["nll_per_atom"] == pytest.approx(nll, rel=1e-5)
    assert 0.9 < metrics["bond_score"] <= 1.0 and metrics["chirality_errors_percent"] == 0.0

    # an AA System in the reference's order gives the same energies (here with the model bound already)
    _, system = _pdb_order_context()
    again = evaluate_model(model, reference, None, n_frames=8, samples=4, seed=3, aa_system=system, plots=False)
    assert again["energy_w1_kjmol"] == pytest.approx(metrics["energy_w1_kjmol"], rel=1e-6)
    assert again["conditional_ess"] == pytest.approx(metrics["conditional_ess"], rel=1e-6)

    # the command line, with the reference as files
    reference.save_dcd(str(tmp_path / "ref.dcd"))
    argv = ["evaluate", "--model", name, "--reference", str(tmp_path / "ref.dcd"), "--topology", str(CHIGNOLIN)]
    argv += ["--out", str(tmp_path / "cli"), "--frames", "8", "--samples", "4", "--seed", "3"]
    assert main(argv) == 0, capsys.readouterr().err
    written = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    # the DCD stores Angstrom in float32: the frames the command reads differ from the reference's
    # nm float32 in the last bit, which a clash's r^-12 amplifies; the API on the same file agrees
    from_file = md.load(str(tmp_path / "ref.dcd"), top=str(CHIGNOLIN))
    expected = evaluate_model(name, from_file, None, n_frames=8, samples=4, seed=3, plots=False)
    for key in ("energy_w1_kjmol", "conditional_ess", "nll_per_atom", "bond_score"):
        assert written[key] == pytest.approx(expected[key], rel=1e-6), key
        assert written[key] == pytest.approx(metrics[key], rel=1e-3), key


def test_evaluate_refuses_a_chain_it_cannot_bind(shipped, chignolin, reference, tmp_path, capsys):
    _, names, _ = chignolin
    # a CG topology of another sequence
    cg = md.Topology()
    chain = cg.add_chain()
    for r in range(len(names)):
        cg.add_atom("CA", md.element.carbon, cg.add_residue("ALA", chain, resSeq=r + 1))
    with pytest.raises(ValueError, match=r"the CG topology's chain ALA ALA .* is not the AA topology's chain GLY TYR"):
        evaluate_model("protein-ca", reference, None, n_frames=2, samples=2, cg_topology=cg, plots=False)
    # a CG topology with the backbone beads given to the CA model
    pdb = tmp_path / "cg.pdb"
    lines = []
    for r, res in enumerate(reference.topology.residues):
        for k, bead in enumerate(("N", "CA", "C")):
            origin = "   0.000" * 3
            lines.append(f"ATOM  {3 * r + k + 1:5d} {bead:^4s} {names[r]:3s} A{res.resSeq:4d}    {origin}")
    pdb.write_text("\n".join(lines) + "\nEND\n")
    argv = ["evaluate", "--model", "protein-ca", "--reference", str(CHIGNOLIN), "--topology", str(CHIGNOLIN)]
    argv += ["--out", str(tmp_path / "o"), "--frames", "1", "--samples", "2", "--cg-topology", str(pdb)]
    assert main(argv) == 2
    assert "has beads ['N', 'CA', 'C'], but the 'ca' mapping expects ['CA']" in capsys.readouterr().err
    # an AA reference with a residue the templates do not know
    top = reference.topology.copy()
    top.residue(3).name = "XYZ"
    with pytest.raises(ValueError, match="XYZ"):
        evaluate_model("protein-ca", md.Trajectory(reference.xyz, top), None, n_frames=2, samples=2, plots=False)


# ----------------------------------------------------------------------------- hybrid
def _ca_cg_topology(sequences: list[list[str]]) -> md.Topology:
    """A CG topology of C-alpha beads, one chain per sequence."""
    cg = md.Topology()
    for names in sequences:
        chain = cg.add_chain()
        for r, n in enumerate(names):
            cg.add_atom("CA", md.element.carbon, cg.add_residue(n, chain, resSeq=r + 1))
    return cg


def _cg_flow_file(pretrained_dir: Path, cg: md.Topology, x: np.ndarray, path: Path) -> Path:
    """A small CG flow potential over the C-alphas of ``cg``, fitted to noisy copies of the AA
    positions x (1, n, 3) nm (model order) and exported as a model file."""
    from openmm_backmap.io.backmap_model import ProteinModel
    from openmm_backmap.io.checkpoints import make_cg_spec
    from openmm_backmap.io.model_files import export_cg
    from openmm_backmap.models.cg_potential import CGFlowPotential
    from openmm_backmap.training.cg_potential import train_cg

    bound = ProteinModel("protein-ca", pretrained_dir / "protein-ca.pt").bind(cg, device="cpu")
    rng = np.random.default_rng(1)
    X = bound.mapping.project(x[0] + rng.normal(0.0, 0.01, (64,) + x.shape[1:]))
    torch.manual_seed(0)
    model = CGFlowPotential.from_data(X, bound.mapping.cg_bonds(), temperature=T, n_layers=2, hidden=16, n_hidden=1)
    spec = make_cg_spec(model, bound.mapping, reference_xyz=x[0])
    train_cg(model, spec, X[:48], X[48:], epochs=2, progress=False)
    export_cg(model, spec, path)
    return path


@pytest.fixture(scope="module")
def cg_flow(pretrained_dir, chignolin, tmp_path_factory):
    """A small CG flow potential over chignolin's C-alphas, exported as a model file."""
    _, names, x = chignolin
    return _cg_flow_file(pretrained_dir, _ca_cg_topology([names]), x, tmp_path_factory.mktemp("cg") / "cg.pt")


def test_hybrid_state_of_a_protein_model_is_amber14_gbn2_and_its_log_q(shipped, chignolin, cg_flow):
    """The hybrid sampler's inputs for `--model protein-ca --start chignolin.pdb`: the start is put
    into the model's order, U_AA is OpenMM's amber14 + GBn2 energy of the PDB's structure, the
    System's constraints are the model's; after resolution moves every chain's stored reduced
    energy and log q are those of its current configuration."""
    from openmm_backmap.openmm.energies import aa_energy, constraints_from_system
    from openmm_backmap.sampling.hybrid import BatchedHybridSampler, _load_inputs
    from openmm_backmap.sampling.protein_chains import proposal_model

    inputs = _load_inputs("protein-ca", str(cg_flow), str(CHIGNOLIN), None, None)
    model = inputs.model
    assert isinstance(model, ProteinChainModel)
    ctx, _ = _pdb_order_context()
    pdb_x = app.PDBFile(str(CHIGNOLIN)).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    perm = _to_model_order(model, md.load(str(CHIGNOLIN)).topology)
    names = [r.name for r in model.topology.residues]
    canonical = canonical_hydrogens(build_chain(names), np.asarray(pdb_x)[None, perm])[0]
    np.testing.assert_allclose(inputs.x0, canonical, atol=1e-9)  # equivalent hydrogens named as in training
    u_model = float(aa_energy(inputs.system)(torch.as_tensor(inputs.x0[None])).item())
    assert u_model == pytest.approx(_energy(ctx, np.asarray(pdb_x)), rel=1e-4)
    model_cons = {(min(int(i), int(j)), max(int(i), int(j))): d for i, j, d in model.metadata["constraints"]}
    sys_cons = {(min(i, j), max(i, j)): d for i, j, d in constraints_from_system(inputs.system)}
    assert sys_cons.keys() == model_cons.keys()
    assert max(abs(sys_cons[k] - model_cons[k]) for k in sys_cons) < 1e-6

    sampler = BatchedHybridSampler(
        proposal_model(model),
        inputs.cg_module,
        model.mapping,
        aa_energy(inputs.system),
        inputs.x0,
        3,
        T,
        seed=4,
    )
    beta = 1.0 / kT(T)

    def check_state():
        for c in range(3):
            u = _energy(ctx, sampler.x[c][np.argsort(perm)])
            assert sampler.u[c] == pytest.approx(beta * u, rel=1e-4)
            lq = model.log_prob(sampler.x[c][None].astype(np.float32))
            assert sampler.log_q[c] == pytest.approx(float(lq[0]), rel=1e-4, abs=1e-2)

    check_state()
    sampler.step(2)
    check_state()
    # a chain whose state has infinite energy accepts any finite proposal: the accepted
    # configuration's energy and log q must be stored with it
    sampler.u[:] = np.inf
    assert sampler.step(1).tolist() == [1, 1, 1]
    assert not np.allclose(sampler.x[0], inputs.x0)
    check_state()
    assert sampler.n_proposed == 3 * 3


def test_hybrid_command_runs_a_protein_model(shipped, cg_flow, tmp_path, capsys):
    out = tmp_path / "h"
    argv = ["hybrid", "--model", "protein-ca", "--cg-model", str(cg_flow), "--start", str(CHIGNOLIN)]
    argv += ["--iterations", "3", "--out", str(out), "--langevin-steps", "2", "--attempts", "2", "--seed", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    model = load_model("protein-ca", cg_topology=_ca_topology(md.load(str(CHIGNOLIN)).topology))
    traj = md.load(str(out / "trajectory.dcd"), top=model.topology)
    assert traj.n_frames == 3 and np.all(np.isfinite(traj.xyz))
    assert len((out / "acceptance.csv").read_text().splitlines()) == 1 + 6
    assert json.loads((out / "summary.json").read_text())["iterations"] == 3
    # several chains
    argv2 = [a if a != str(out) else str(tmp_path / "h2") for a in argv] + ["--chains", "2"]
    assert main(argv2) == 0, capsys.readouterr().err
    assert md.load(str(tmp_path / "h2" / "trajectory.dcd"), top=model.topology).n_frames == 6
    # a System in the start's order cannot run the model's (template-order) frames
    _, system = _pdb_order_context()
    (tmp_path / "system.xml").write_text(openmm.XmlSerializer.serialize(system))
    argv3 = [a if a != str(out) else str(tmp_path / "h3") for a in argv] + ["--aa-system", str(tmp_path / "system.xml")]
    assert main(argv3) == 2
    assert "lists atoms in another order than the protein model" in capsys.readouterr().err


def _ca_topology(top: md.Topology) -> md.Topology:
    return top.subset(top.select("name CA"))


# ----------------------------------------------------------------------------- complexes
@pytest.fixture(scope="module")
def complex_reference(reference):
    """Two chignolin chains 4 nm apart (the PDB's atom order in each), eight noisy frames."""
    other = md.Trajectory(reference.xyz + np.float32([4.0, 0.0, 0.0]), reference.topology)
    both = reference.stack(other)
    assert both.topology.n_chains == 2
    return both


def _context_of(top: md.Topology):
    """An OpenMM Context of amber14 + GBn2 on a topology as it is (its atom order, termini per chain)."""
    system = app.ForceField("amber14-all.xml", "implicit/gbn2.xml").createSystem(
        top.to_openmm(), nonbondedMethod=app.NoCutoff, constraints=app.HBonds
    )
    return openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))


def test_evaluate_and_hybrid_bind_a_complex(shipped, pretrained_dir, chignolin, complex_reference, tmp_path, capsys):
    """A reference of two chains binds the protein model to both (each with its termini): the
    samples redrawn with the seed, their energies from an OpenMM Context on the reference's own
    two-chain topology, and the report's energy W1, conditional ESS and NLL recomputed from them
    agree; the hybrid sampler starts from a two-chain structure with U_AA equal to OpenMM's and
    runs; a CG topology of one of the chains is refused, naming both."""
    _, names, _ = chignolin
    metrics = evaluate_model("protein-ca", complex_reference, None, n_frames=8, samples=4, seed=3, plots=False)

    model = load_model("protein-ca", cg_topology=_ca_cg_topology([names, names]), device="cpu")
    perm = _to_model_order(model, complex_reference.topology)
    ref = canonical_hydrogens(build_chains([names, names]), complex_reference.xyz[:, perm].astype(np.float64))
    torch.manual_seed(3)
    aa, log_q = model.sample(model.mapping.project(ref).astype(np.float32), 4)
    ctx = _context_of(complex_reference.topology)
    back = np.argsort(perm)
    u_aa = np.array([_energy(ctx, x[back]) for x in aa]).reshape(8, 4)
    u_ref = np.array([_energy(ctx, x) for x in complex_reference.xyz])
    assert metrics["energy_w1_kjmol"] == pytest.approx(energy_w1(u_aa[:, 0], u_ref), rel=1e-4, abs=1e-3)
    assert metrics["conditional_ess"] == pytest.approx(conditional_ess(u_aa, log_q.reshape(8, 4), T), rel=1e-4)
    nll = -model.log_prob(ref.astype(np.float32)).astype(np.float64).mean() / model.n_aa
    assert metrics["nll_per_atom"] == pytest.approx(nll, rel=1e-5)

    # the hybrid sampler from a two-chain start, with a CG flow over both chains' C-alphas
    from openmm_backmap.openmm.energies import aa_energy
    from openmm_backmap.sampling.hybrid import _load_inputs

    start = tmp_path / "complex.pdb"
    complex_reference[0].save_pdb(str(start))
    flow = _cg_flow_file(pretrained_dir, _ca_cg_topology([names, names]), ref[:1], tmp_path / "cg2.pt")
    inputs = _load_inputs("protein-ca", str(flow), str(start), None, None)
    pdb = app.PDBFile(str(start))
    x_pdb = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    start_ctx = _context_of(md.load(str(start)).topology)
    u_model = float(aa_energy(inputs.system)(torch.as_tensor(inputs.x0[None])).item())
    assert u_model == pytest.approx(_energy(start_ctx, x_pdb), rel=1e-4)
    out = tmp_path / "h"
    argv = ["hybrid", "--model", "protein-ca", "--cg-model", str(flow), "--start", str(start)]
    argv += ["--iterations", "2", "--out", str(out), "--langevin-steps", "2", "--attempts", "2", "--seed", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    traj = md.load(str(out / "trajectory.dcd"), top=model.topology)
    assert traj.n_frames == 2 and np.all(np.isfinite(traj.xyz))

    # a CG topology of one chain for a reference of two
    with pytest.raises(ValueError, match=r"is not the AA topology's chain GLY .* / GLY"):
        evaluate_model(
            "protein-ca",
            complex_reference,
            None,
            n_frames=2,
            samples=2,
            cg_topology=_ca_cg_topology([names]),
            plots=False,
        )


# ----------------------------------------------------------------------------- warm-started training
def _corpus(folder: Path, chignolin, n: int = 2) -> Path:
    """An n-entry corpus of noisy chignolin frames (topology.pdb, traj.dcd, manifest.json)."""
    traj = chignolin[0]
    rng = np.random.default_rng(2)
    for k in range(n):
        entry = folder / f"p{k}"
        entry.mkdir(parents=True)
        (entry / "topology.pdb").write_text(CHIGNOLIN.read_text())
        xyz = traj.xyz[0] + rng.normal(0.0, 0.004, (24,) + traj.xyz.shape[1:])
        md.Trajectory(xyz.astype(np.float32), traj.topology).save_dcd(str(entry / "traj.dcd"))
    (folder / "manifest.json").write_text(json.dumps({"finished": [f"p{k}" for k in range(n)]}))
    return folder


def _state(path: Path) -> tuple[dict, dict]:
    model = ProteinBackmapper.load(path)
    return {k: v.clone() for k, v in model.state_dict().items()}, json.loads(json.dumps(model.stats))


def test_training_starts_from_init(chignolin, tmp_path):
    """`--init`: no training time reproduces the checkpoint exactly; a zero learning rate keeps it
    through many steps (so nothing is re-initialised); a few real steps move away from it by much
    less than a fresh model is from it."""
    data = _corpus(tmp_path / "corpus", chignolin)
    base = dict(data=str(data), mapping="ca", n_val=0, batch_frames=8, peptides_per_step=1, stats_frames=8)
    base.update(hidden=16, n_bins=4, val_every=10**6, refresh_every=0, seed=3)
    start = train(TrainConfig(out=str(tmp_path / "a.pt"), time_limit=2.0, **base), log=lambda m: None)
    assert start.info["step"] > 0
    a, a_stats = _state(tmp_path / "a.pt")

    again = train(TrainConfig(out=str(tmp_path / "b.pt"), time_limit=0.0, init=str(tmp_path / "a.pt"), **base))
    assert again.info["step"] == 0 and again.info["init"] == str(tmp_path / "a.pt")
    b, b_stats = _state(tmp_path / "b.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert b_stats == a_stats

    frozen = {**base, "lr": 0.0}
    kept = train(TrainConfig(out=str(tmp_path / "c.pt"), time_limit=1.0, init=str(tmp_path / "a.pt"), **frozen))
    assert kept.info["step"] > 0
    c, _ = _state(tmp_path / "c.pt")
    assert all(torch.equal(a[k], c[k]) for k in a)

    moved = train(TrainConfig(out=str(tmp_path / "d.pt"), time_limit=1.0, init=str(tmp_path / "a.pt"), **base))
    d, _ = _state(tmp_path / "d.pt")
    fresh = train(TrainConfig(out=str(tmp_path / "e.pt"), time_limit=0.0, **{**base, "seed": 9}))
    e = {k: v for k, v in fresh.state_dict().items()}
    net = [k for k in a if k.startswith("net.") and a[k].is_floating_point()]
    step = sum(float((d[k] - a[k]).pow(2).sum()) for k in net) ** 0.5
    apart = sum(float((e[k] - a[k]).pow(2).sum()) for k in net) ** 0.5
    assert moved.info["step"] > 0 and 0.0 < step < 0.2 * apart


def test_training_converts_a_checkpoint_to_the_current_tree(chignolin, tmp_path):
    """`--init` of a tree-version-1 checkpoint with `--tree-version 2`: the model written has version
    2, the rows only version 2 has (odd residues' C from their N, proline's CG from CD and CB) get
    statistics and embeddings of their own, and the weights the two trees share start where the
    checkpoint left them (zero steps change nothing else). Without `--tree-version` a checkpoint
    keeps its own tree; a shipped model's name is accepted as `--init`."""
    data = _corpus(tmp_path / "corpus", chignolin)
    base = dict(data=str(data), mapping="ca", n_val=0, batch_frames=8, peptides_per_step=1, stats_frames=8)
    base.update(hidden=16, n_bins=4, val_every=10**6, refresh_every=0, seed=3)
    train(TrainConfig(out=str(tmp_path / "v1.pt"), max_steps=2, tree_version=1, **base), log=lambda m: None)
    v1 = ProteinBackmapper.load(tmp_path / "v1.pt")
    assert v1.config["tree_version"] == 1 and "TYR:C<CA,+1CA,N" not in v1.keys
    kept = train(TrainConfig(out=str(tmp_path / "k.pt"), time_limit=0.0, init=str(tmp_path / "v1.pt"), **base))
    assert kept.config["tree_version"] == 1
    conv = train(
        TrainConfig(out=str(tmp_path / "v2.pt"), time_limit=0.0, init=str(tmp_path / "v1.pt"), tree_version=2, **base)
    )
    v2 = ProteinBackmapper.load(tmp_path / "v2.pt")
    assert conv.config["tree_version"] == v2.config["tree_version"] == 2
    for key in ("TYR:C<CA,+1CA,N", "PRO:CG<CD,CB,N"):
        assert key in v2.keys and key in v2.stats and v2.embedding_index(key) < len(v2.keys)
    assert v2.keys[: len(v1.keys)] == v1.keys
    a, b = v1.net.state_dict(), v2.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "key_emb.weight")
    assert torch.equal(a["key_emb.weight"][:-1], b["key_emb.weight"][: len(v1.keys)])
    # on to tree 3: pair rows get statistics of their own and start from their tree-2 row's embedding
    train(
        TrainConfig(out=str(tmp_path / "v3.pt"), time_limit=0.0, init=str(tmp_path / "v2.pt"), tree_version=3, **base)
    )
    v3 = ProteinBackmapper.load(tmp_path / "v3.pt")
    assert v3.config["tree_version"] == 3 and v3.keys[: len(v2.keys)] == v2.keys
    emb2, emb3 = v2.net.key_emb.weight, v3.net.key_emb.weight
    for key in ("TYR:N<-1C,CA=,-1CA", "PRO:CG<CD,CB=,N", "TRP:CH2<CZ2,CZ3=,CE2"):
        assert key in v3.keys and key in v3.stats
    for key in ("TYR:N<-1C,CA=,-1CA", "PRO:CG<CD,CB=,N"):  # same references as a tree-2 row
        assert torch.equal(emb3[v3.embedding_index(key)], emb2[v2.embedding_index(key.replace("=", ""))])
    # a shipped model by name, at its own width (`hidden` 0)
    named = train(
        TrainConfig(**{**base, "out": str(tmp_path / "n.pt"), "time_limit": 0.0, "init": "protein-ca", "hidden": 0})
    )
    assert named.info["init"] == "protein-ca"


def test_training_widens_a_checkpoint(chignolin, tmp_path):
    """`--init` with a larger `--hidden` continues at that width from the checkpoint's densities
    (zero steps: the same log q); `--hidden 0` keeps the checkpoint's width; a smaller one is refused."""
    _, names, x = chignolin
    data = _corpus(tmp_path / "corpus", chignolin)
    base = dict(data=str(data), mapping="ca", n_val=0, batch_frames=8, peptides_per_step=1, stats_frames=8)
    base.update(n_bins=4, val_every=10**6, refresh_every=0, seed=3)
    narrow = train(TrainConfig(out=str(tmp_path / "a.pt"), max_steps=2, hidden=16, **base), log=lambda m: None)
    init = str(tmp_path / "a.pt")
    wide = train(TrainConfig(out=str(tmp_path / "w.pt"), time_limit=0.0, init=init, hidden=24, **base))
    assert wide.config["hidden"] == 24 and wide.net.lin2.weight.shape == (24, 24)
    a, b = narrow.for_sequence(names), wide.for_sequence(names)
    xt = torch.as_tensor(x[:4], dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(b.log_prob(xt, b.project(xt)), a.log_prob(xt, a.project(xt)), rtol=1e-5)
    kept = train(TrainConfig(out=str(tmp_path / "k.pt"), time_limit=0.0, init=init, hidden=0, **base))
    assert kept.config["hidden"] == 16
    with pytest.raises(ValueError, match="cannot narrow the conditioner from 16 to 8"):
        train(TrainConfig(out=str(tmp_path / "n.pt"), time_limit=0.0, init=init, hidden=8, **base))
    with pytest.raises(ValueError, match="pair_core_kt and hidden must be >= 0"):
        train(TrainConfig(out=str(tmp_path / "n.pt"), time_limit=0.0, init=init, pair_core_kt=-1.0, **base))


def test_a_late_validation_peptide_of_the_checkpoint_is_never_trained_on(chignolin, tmp_path, monkeypatch):
    """`--init` on a corpus still being written: a validation peptide of the checkpoint that the
    corpus finishes during the run joins the validation set, not the training set."""
    import openmm_backmap.training.protein as protein_training

    data = _corpus(tmp_path / "corpus", chignolin, n=4)
    base = dict(data=str(data), mapping="ca", n_val=1, batch_frames=8, peptides_per_step=1, stats_frames=8)
    base.update(hidden=16, n_bins=4, val_every=4, refresh_every=3, seed=3, time_limit=600.0)
    first = train(TrainConfig(out=str(tmp_path / "a.pt"), max_steps=4, **base), log=lambda m: None)
    (late,) = first.info["val_ids"]
    finished = [f"p{k}" for k in range(4)]
    calls = []

    def growing_corpus(folder):
        calls.append(folder)
        return [i for i in finished if i != late] if len(calls) == 1 else finished

    monkeypatch.setattr(protein_training, "corpus_ids", growing_corpus)
    later = train(TrainConfig(out=str(tmp_path / "b.pt"), max_steps=8, init=str(tmp_path / "a.pt"), **base))
    assert len(calls) > 1
    assert later.info["val_ids"] == [late] and late not in later.info["train_ids"]
    assert sorted(later.info["train_ids"] + [late]) == finished


def test_validation_corpus_joins_validation_and_is_never_trained_on(chignolin, tmp_path):
    """`--val-data DIR`: DIR's peptides are validated (their NLL counts in the objective) and are
    not training peptides; an id also in the training corpus is refused by name."""
    data = _corpus(tmp_path / "corpus", chignolin, n=2)
    extra = tmp_path / "long"
    _corpus(extra, chignolin, n=1)
    (extra / "p0").rename(extra / "lp0")
    (extra / "manifest.json").write_text(json.dumps({"finished": ["lp0"]}))
    base = dict(data=str(data), mapping="ca", n_val=0, batch_frames=8, peptides_per_step=1, stats_frames=8)
    base.update(hidden=16, n_bins=4, val_every=2, refresh_every=0, seed=3)
    lines = []
    model = train(TrainConfig(out=str(tmp_path / "a.pt"), max_steps=2, val_data=str(extra), **base), log=lines.append)
    assert model.info["val_ids"] == ["lp0"] and sorted(model.info["train_ids"]) == ["p0", "p1"]
    assert math.isfinite(model.info["val_nll_per_residue"])
    assert any("validation ['lp0']" in line for line in lines)
    (extra / "lp0").rename(extra / "p0")
    (extra / "manifest.json").write_text(json.dumps({"finished": ["p0"]}))
    with pytest.raises(ValueError, match=f"validation peptide p0 of {extra} is also in the training corpus"):
        train(TrainConfig(out=str(tmp_path / "b.pt"), max_steps=1, val_data=str(extra), **base))


def test_several_corpus_directories_train_together(chignolin, tmp_path, monkeypatch):
    """`--data A B`: the peptides of both directories are training peptides; an id in two of them
    is refused naming both directories; the command line passes several directories through."""
    import openmm_backmap.training.protein as protein_training

    first = _corpus(tmp_path / "short", chignolin, n=2)
    second = tmp_path / "long"
    _corpus(second, chignolin, n=1)
    (second / "p0").rename(second / "lp0")
    (second / "manifest.json").write_text(json.dumps({"finished": ["lp0"]}))
    base = dict(mapping="ca", n_val=0, batch_frames=8, peptides_per_step=1, stats_frames=8)
    base.update(hidden=16, n_bins=4, val_every=10**6, refresh_every=0, seed=3)
    model = train(TrainConfig(data=(str(first), str(second)), out=str(tmp_path / "a.pt"), max_steps=1, **base))
    assert sorted(model.info["train_ids"]) == ["lp0", "p0", "p1"]
    with pytest.raises(ValueError, match=f"peptide p0 is in both {first} and {first}"):
        train(TrainConfig(data=(str(first), str(first)), out=str(tmp_path / "b.pt"), max_steps=1, **base))
    seen = []
    monkeypatch.setattr(protein_training, "train", lambda config, log: seen.append(config))
    protein_training.main(["--data", str(first), str(second), "--val-data", str(second), "--out", "x.pt"])
    assert seen[0].data == (str(first), str(second)) and seen[0].val_data == (str(second),)


def test_reduced_energies_are_damped_above_the_floor_or_the_upper_quartile():
    """The guard rail of reverse KL (finetune and corpus training): energies at or below the larger
    of the floor and the batch's upper quartile of finite values pass unchanged, those above grow
    as cap + log(1 + u - cap); non-finite ones become large finite ones."""
    from openmm_backmap.training.backmapper import soft_clip_above_quartile

    u = torch.arange(100, dtype=torch.float64)
    cap = float(torch.quantile(u, 0.75))  # 74.25
    out = soft_clip_above_quartile(u, 10.0)
    assert torch.equal(out[u <= cap], u[u <= cap])
    assert float(out[99]) == pytest.approx(cap + math.log1p(99 - cap))
    assert torch.equal(soft_clip_above_quartile(u, 200.0), u)  # a floor above the batch: nothing damped
    bad = soft_clip_above_quartile(torch.tensor([1.0, 2.0, float("nan"), float("inf")]), 0.0)
    assert torch.isfinite(bad).all() and bad[2] > bad[1] and bad[3] > bad[1]


def test_energy_term_is_amber_gbn2_and_lowers_the_samples_energy(chignolin, tmp_path):
    """`energy_weight`: the reverse-KL term's reduced energy of corpus frames is beta times OpenMM's
    amber14 + GBn2 energy (the frames in the templates' order, OpenMM's in the PDB's); the same steps
    from the same start with the term give samples of lower energy than maximum likelihood alone; the
    training record holds the validation NLL, the median beta U + log q and their weighted sum. Linear
    pair cores leave the corpus frames' energies unchanged."""
    from openmm_backmap.training.protein import CorpusEnergies

    traj, names, _ = chignolin
    data = _corpus(tmp_path / "corpus", chignolin, n=3)
    base = dict(data=str(data), mapping="ca", n_val=1, batch_frames=8, peptides_per_step=1, stats_frames=8)
    base.update(hidden=16, n_bins=4, val_every=10, refresh_every=0, seed=3, time_limit=600.0)
    train(TrainConfig(out=str(tmp_path / "a.pt"), max_steps=20, **base), log=lambda m: None)

    model = ProteinBackmapper.load(tmp_path / "a.pt")
    chain = model.for_sequence(names)
    frames = md.load(str(data / "p0" / "traj.dcd"), top=str(data / "p0" / "topology.pdb"))
    _, x = chain_positions(frames.topology, frames.xyz)
    x = torch.as_tensor(x, dtype=torch.float64)
    energies = CorpusEnergies(T, cap_dof=1.0)
    reduced = energies.reduced("p0", chain, x, x[:4]).numpy()
    ctx, _ = _pdb_order_context()
    expected = [_energy(ctx, frames.xyz[k]) / kT(T) for k in range(4)]
    np.testing.assert_allclose(reduced, expected, rtol=1e-4)
    # with linear pair cores (`pair_core_kt`) thermal frames keep their energy exactly
    cored = CorpusEnergies(T, cap_dof=1.0, pair_core_kt=20.0)
    np.testing.assert_allclose(cored.reduced("p0", chain, x, x[:4]).numpy(), reduced, rtol=1e-12)
    assert cored.pair_core == pytest.approx(20.0 * kT(T))

    def median_energy(path: Path) -> float:
        chain = ProteinBackmapper.load(path).for_sequence(names)
        cg = chain.project(x[:8].float())
        with torch.random.fork_rng():
            torch.manual_seed(11)
            aa, _ = chain.sample(cg, 8)
        return float(np.median(energies.reduced("p0", chain, x, aa.detach()).numpy()))

    more = dict(base, init=str(tmp_path / "a.pt"), max_steps=40, lr=3e-3)
    ml = train(TrainConfig(out=str(tmp_path / "ml.pt"), **more), log=lambda m: None)
    both = train(TrainConfig(out=str(tmp_path / "kl.pt"), energy_weight=1.0, **more), log=lambda m: None)
    assert "val_reverse_kl_per_residue" not in ml.info
    rec = both.info
    assert rec["val_objective_per_residue"] == pytest.approx(
        rec["val_nll_per_residue"] + rec["val_reverse_kl_per_residue"]
    )
    assert median_energy(tmp_path / "kl.pt") < median_energy(tmp_path / "ml.pt") - 100.0


@pytest.mark.parametrize("mapping,name", [("ca", "protein-ca"), ("backbone", "protein-backbone")])
def test_a_capped_chain_binds_with_its_caps_beads(shipped, mapping, name):
    """An ACE/NME-capped reference (alanine dipeptide and a longer chain, built by pdbfixer): the
    model binds with the caps' beads (CA model: ACE CH3, NME C; backbone: ACE CH3 and C, NME N and C),
    and those beads sit on the reference's atoms; the mapping entropy binds the same way."""
    from openmm_backmap.analysis.entropy import _cg_topology_for
    from openmm_backmap.analysis.evaluate import bind_protein_model, chain_frames
    from openmm_backmap.systems.peptides import build_peptide

    for sequence in (["ALA"], ["ALA", "SER", "LYS"]):
        omm_top, positions = build_peptide(sequence, "capped")
        top = md.Topology.from_openmm(omm_top)
        x = np.asarray(positions.value_in_unit(unit.nanometer))[None]
        model, perm = bind_protein_model(name, top)
        caps = {"ca": (["CH3"], ["C"]), "backbone": (["CH3", "C"], ["N", "C"])}[mapping]
        assert model.metadata["bead_names"][: len(caps[0])] == caps[0]
        assert model.metadata["bead_names"][-len(caps[1]) :] == caps[1]
        assert model.n_cg == len(caps[0]) + len(caps[1]) + len(sequence) * (1 if mapping == "ca" else 3)
        bead_atoms = [a for g in model.mapping.groups for a in g]
        names = [(a.residue.index, a.name) for a in top.atoms]
        model_names = [(a.residue.index, a.name) for a in model.topology.atoms]
        assert [names[perm[a]] for a in bead_atoms] == [model_names[a] for a in bead_atoms]
        X = model.mapping.project(chain_frames(model, x, perm))
        np.testing.assert_allclose(X[0], x[0, [perm[a] for a in bead_atoms]], atol=1e-12)
        assert _cg_topology_for(name, top).metadata["bead_names"] == model.metadata["bead_names"]
