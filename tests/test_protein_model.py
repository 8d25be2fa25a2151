"""The residue-local protein backmapper: exact log q, locality, chirality, topologies, bad input."""

import math
from pathlib import Path

import mdtraj as md
import numpy as np
import pytest
import torch

from openmm_backmap.models import residues as R
from openmm_backmap.models.protein import ProteinBackmapper, load_pretrained
from openmm_backmap.systems.peptides import openmm_topology
from openmm_backmap.training.protein import chain_positions

CHIGNOLIN = Path(__file__).resolve().parent.parent / "openmm_backmap" / "data" / "chignolin.pdb"


@pytest.fixture(scope="module")
def chignolin():
    traj = md.load(str(CHIGNOLIN))
    names, x = chain_positions(traj.topology, traj.xyz)
    return names, x.astype(np.float64)


def _model(chignolin, mapping, noise=0.004, n_frames=40, seed=0, perturb=0.0, tree_version=R.TREE_VERSION, **kw):
    """A model whose statistics are fitted on noisy copies of chignolin (so keys of chignolin's
    residues are bounded or circular as data say), with network weights perturbed so that the
    splines are not the identity."""
    names, x = chignolin
    rng = np.random.default_rng(seed)
    xs = x + rng.normal(0.0, noise, (n_frames,) + x.shape[1:])
    stats = ProteinBackmapper.fit_statistics([(names, xs)], mapping, tree_version)
    torch.manual_seed(seed)
    model = ProteinBackmapper(mapping, stats, hidden=32, tree_version=tree_version, **kw).double()
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model


def _as_tensor(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


# ----------------------------------------------------------------------------- exact log q
def _assert_log_q_is_autograd_log_det(ch, cg: torch.Tensor) -> torch.Tensor:
    """With every bond of ``ch`` free, sampling is a bijection from base noise to the Cartesian
    positions of the placed atoms: assert log q = log p_base(u) - log |det dx/du| (autograd,
    float64) and log_prob = log q for one draw at ``cg``; returns that draw x (1, n_aa, 3)."""
    ch.free.fill_(True)
    u = ch.sample_noise(1, torch.float64, torch.device("cpu"))
    placed = ch.rows[:, 0]

    def f(v):
        x, _ = ch.sample_with_noise(cg, v.reshape(1, -1, 3))
        return x[0, placed].reshape(-1)

    jac = torch.autograd.functional.jacobian(f, u.reshape(-1), vectorize=True)
    _, logdet = torch.linalg.slogdet(jac)
    x, log_q = ch.sample_with_noise(cg, u)
    base = torch.where(
        ch.circ,
        torch.full_like(u[0, :, 2], -math.log(2 * math.pi)),
        -0.5 * u[0, :, 2] ** 2 - 0.5 * math.log(2 * math.pi),
    )
    base = base.sum() + (-0.5 * u[0, :, :2] ** 2 - 0.5 * math.log(2 * math.pi)).sum()
    assert float(log_q[0].detach()) == pytest.approx(float(base - logdet), abs=1e-6)
    assert float(ch.log_prob(x, cg)[0].detach()) == pytest.approx(float(log_q[0].detach()), abs=1e-6)
    return x.detach()


@pytest.mark.parametrize(
    "mapping,names,version",
    [
        ("ca", ["TYR", "ASP", "PRO", "GLU"], 3),
        ("ca", ["TYR", "ASP", "PRO", "GLU"], 2),
        ("ca", ["TYR", "ASP", "PRO", "GLU"], 1),
        ("ca", ["TRP", "HID", "PHE", "ALA"], 3),
        ("backbone", ["ACE", "THR", "PRO", "NME"], 3),
        ("backbone", ["ACE", "THR", "PRO", "NME"], 2),
    ],
)
def test_log_q_equals_autograd_log_det(chignolin, mapping, names, version):
    """With every bond free, sampling is a bijection from base noise to the Cartesian positions of
    the placed atoms: log q = log p_base(u) - log |det dx/du| (autograd, float64), in either
    placement-tree version."""
    model = _model(chignolin, mapping, perturb=0.3, tree_version=version)
    torch.manual_seed(1)
    cg = _as_tensor(chignolin[1][:, _beads_from_chignolin(chignolin, mapping)])
    _assert_log_q_is_autograd_log_det(model.for_sequence(names), cg)


@pytest.mark.parametrize(
    "mapping,names", [("ca", ["TYR", "ASP", "PRO", "GLU"]), ("backbone", ["ACE", "THR", "GLY", "NME"])]
)
def test_complex_log_q_equals_autograd_log_det(chignolin, mapping, names):
    """Two copies of the chain 0.6 nm apart bound as one complex, so that each chain's rows see the
    other chain's anchors: sampling stays a bijection whose log q is log p_base(u) - log |det dx/du|
    (autograd, float64), and log_prob agrees; the chains do condition each other (log q differs
    from the sum of the chains' own by more than a nat)."""
    model = _model(chignolin, mapping, perturb=0.3)
    one = _as_tensor(chignolin[1][:, _beads_from_chignolin(chignolin, mapping)])
    cg = torch.cat([one, one + torch.tensor([0.0, 0.6, 0.0], dtype=torch.float64)], dim=1)
    torch.manual_seed(2)
    ch = model.for_chains([names, names])
    x = _assert_log_q_is_autograd_log_det(ch, cg)
    single = model.for_sequence(names)
    single.free.fill_(True)
    n_aa, n_cg = single.n_aa, single.n_cg
    with torch.no_grad():
        own = single.log_prob(x[:, :n_aa], cg[:, :n_cg]) + single.log_prob(x[:, n_aa:], cg[:, n_cg:])
        assert abs(float(ch.log_prob(x, cg)[0]) - float(own[0])) > 1.0


def _beads_from_chignolin(chignolin, mapping):
    """Bead atoms (chignolin indices) for a 4-residue chain: C-alphas of residues 1-4 (``ca``), or
    CA, C of residue 4 / N, CA, C of 5 and 6 / N, CA of 7 standing for ACE-THR-GLY-NME
    (``backbone``)."""
    ch = R.build_chain(chignolin[0])
    if mapping == "ca":
        return [ch.atom(r, "CA") for r in range(1, 5)]
    spec = [(4, "CA"), (4, "C"), (5, "N"), (5, "CA"), (5, "C"), (6, "N"), (6, "CA"), (6, "C"), (7, "N"), (7, "CA")]
    return [ch.atom(r, a) for r, a in spec]


@pytest.mark.slow  # minutes: 6,000-point importance sums through the whole chain per atom
def test_row_densities_integrate_to_one(chignolin):
    """Importance sampling in Cartesian space, the other atoms held fixed: the factor of a placed
    heavy atom integrates to 1 over R^3 (Gaussian proposal fitted to draws of that atom alone), for
    a bounded (CB) and an unbounded (CG) dihedral; the factor of a hydrogen on a constrained bond
    with a circular dihedral integrates to 1 over its sphere (uniform proposal)."""
    model = _model(chignolin, "ca", noise=0.01, perturb=0.2)
    ch = model.for_sequence(["TYR", "ASP", "PRO", "GLU"])
    cg = _as_tensor(chignolin[1][:, _beads_from_chignolin(chignolin, "ca")])
    torch.manual_seed(0)
    u0 = ch.sample_noise(1, torch.float64, torch.device("cpu"))
    atoms = ch.rows[:, 0].tolist()
    rng = np.random.default_rng(3)
    m = 6000
    for name in ("CB", "CG", "HB2"):
        n = next(i for i, a in enumerate(atoms) if ch.atom_names[a] == name)
        a = atoms[n]
        if name == "HB2":
            ch.circ[n] = True
        with torch.no_grad():
            x0, _ = ch.sample_with_noise(cg, u0)
            # draws of this atom alone: its own noise varies, every earlier row keeps its noise
            u = ch.sample_noise(1000, torch.float64, torch.device("cpu"))
            uu = u0.repeat(1000, 1, 1)
            uu[:, n] = u[:, n]
            draws = ch.sample_with_noise(cg.repeat(1000, 1, 1), uu)[0][:, a].numpy()
        if name == "HB2":
            # uniform on the band of the sphere (radius r0 about j) holding every draw, in polar
            # coordinates about the axis j -> k: surface density 1 / (r0^2 (c_hi - c_lo) 2 pi)
            assert not bool(ch.free[n])
            j, k = int(ch.rows[n, 1]), int(ch.rows[n, 2])
            r0 = float(ch.r0[n])
            xj = x0[0, j].numpy()
            e = (x0[0, k].numpy() - xj) / np.linalg.norm(x0[0, k].numpy() - xj)
            cos_d = (draws - xj) @ e / np.linalg.norm(draws - xj, axis=1)
            c_lo, c_hi = np.clip(cos_d.min() - 0.1, -1, 1), np.clip(cos_d.max() + 0.1, -1, 1)
            e1 = np.cross(e, [1.0, 0.0, 0.0])
            e1 /= np.linalg.norm(e1)
            e2 = np.cross(e, e1)
            # azimuth: half uniform, half von Mises about the draws' circular mean
            az_d = np.arctan2((draws - xj) @ e2, (draws - xj) @ e1)
            mu = math.atan2(np.sin(az_d).mean(), np.cos(az_d).mean())
            kappa = 4.0
            c = rng.uniform(c_lo, c_hi, m)
            az = np.where(rng.random(m) < 0.5, rng.uniform(-math.pi, math.pi, m), rng.vonmises(mu, kappa, m))
            p_az = 0.5 / (2 * math.pi) + 0.5 * np.exp(kappa * np.cos(az - mu)) / (2 * math.pi * np.i0(kappa))
            s_ = np.sqrt(1 - c**2)
            d = c[:, None] * e + (s_ * np.cos(az))[:, None] * e1 + (s_ * np.sin(az))[:, None] * e2
            pts = xj + r0 * d
            log_prop = np.log(p_az) - math.log(r0**2 * (c_hi - c_lo))
        else:
            assert bool(ch.free[n])
            mean = draws.mean(0)
            cov = np.cov(draws.T) * 2.0
            pts = rng.multivariate_normal(mean, cov, size=m)
            dev = np.linalg.solve(np.linalg.cholesky(cov), (pts - mean).T)
            log_prop = -0.5 * (dev**2).sum(0) - 0.5 * np.linalg.slogdet(2 * math.pi * cov)[1]
        xs = x0.repeat(m, 1, 1)
        xs[:, a] = _as_tensor(pts)
        with torch.no_grad():
            lq = ch.row_log_prob(xs, cg.repeat(m, 1, 1))[:, n].numpy()
        w = np.exp(lq - log_prop)
        z, err = w.mean(), w.std() / math.sqrt(m)
        assert err < 0.05, (name, z, err)
        assert abs(z - 1.0) < 4 * err + 0.01, (name, z, err)


# ----------------------------------------------------------------------------- sampling
def test_samples_exact_beads_equivariant_and_l_chirality(chignolin):
    model = _model(chignolin, "ca")
    names, x = chignolin
    ch = model.for_sequence(names)
    cg = _as_tensor(x[:, ch.beads.numpy()])
    torch.manual_seed(2)
    u = ch.sample_noise(3, torch.float64, torch.device("cpu"))
    with torch.no_grad():
        aa, lq = ch.sample_with_noise(cg.repeat(3, 1, 1), u)
        assert torch.equal(ch.project(aa), cg.repeat(3, 1, 1))
        assert torch.allclose(ch.log_prob(aa, cg.repeat(3, 1, 1)), lq, atol=1e-8)
        rot = torch.as_tensor(R_ := _rotation(), dtype=torch.float64)
        shift = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
        aa2, lq2 = ch.sample_with_noise(cg.repeat(3, 1, 1) @ rot.T + shift, u)
    assert torch.allclose(aa2, aa @ rot.T + shift, atol=1e-9)
    assert torch.allclose(lq2, lq, atol=1e-8)
    assert R_.shape == (3, 3)
    centres = R.chiral_centres(ch.chain)
    ref = np.sign(R.signed_volumes(x, centres))
    assert np.all(np.sign(R.signed_volumes(aa.numpy(), centres)) == ref)
    # a mirror-image CG input still gives L residues: the C-alpha handedness comes from the construction
    with torch.no_grad():
        aa_m, _ = ch.sample(cg * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64), 3)
    ca_centres = centres[[ch.chain.atom_names[c] == "CA" for c in centres[:, 0]]]
    assert np.all(np.sign(R.signed_volumes(aa_m.numpy(), ca_centres)) == np.sign(R.signed_volumes(x, ca_centres)))


def test_trained_like_model_log_prob_of_its_samples_is_their_log_q(chignolin):
    """With conditioners that depend on their context (perturbed weights), log_prob of a sample is
    the log q it was drawn with: every context atom a row sees in log_prob is already placed when
    the row is sampled (in chignolin, the stage-2 side chain of TYR 2 sees the first side-chain
    atoms of ASP 3, which the residue-ordered tree lists after it)."""
    model = _model(chignolin, "ca", perturb=0.3)
    names, x = chignolin
    ch = model.for_sequence(names)
    cg = _as_tensor(x[:, ch.beads.numpy()]).repeat(4, 1, 1)
    torch.manual_seed(3)
    u = ch.sample_noise(4, torch.float64, torch.device("cpu"))
    with torch.no_grad():
        aa, lq = ch.sample_with_noise(cg, u)
        lp = ch.log_prob(aa, cg)
    assert torch.all(torch.isfinite(lq))
    assert torch.allclose(lp, lq, rtol=0.0, atol=1e-8)


def _rotation():
    q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


@pytest.mark.parametrize("mapping,version", [("backbone", 2), ("ca", 3)])
def test_scripted_chain_module_keeps_the_contract(chignolin, mapping, version):
    model = _model(chignolin, mapping, tree_version=version)
    names, x = chignolin
    ch = model.for_sequence(names).float()
    scripted = torch.jit.script(ch)
    cg = torch.as_tensor(x[:, ch.beads.numpy()], dtype=torch.float32).repeat(2, 1, 1)
    torch.manual_seed(0)
    aa, lq = scripted.sample(cg, 3)
    assert aa.shape == (6, ch.n_aa, 3) and lq.shape == (6,)
    assert torch.allclose(scripted.log_prob(aa, cg.repeat_interleave(3, 0)), lq, atol=2e-2)
    assert torch.allclose(
        ch.log_prob(aa, cg.repeat_interleave(3, 0)), scripted.log_prob(aa, cg.repeat_interleave(3, 0))
    )


def test_locality_same_environment_same_density(chignolin):
    """The rows of a residue whose environment (sequence i-2..i+2, no other bead within the cutoff)
    is the same have the same conditional density in a 30-mer and in the 5-mer cut from it."""
    model = _model(chignolin, "ca", perturb=0.2)
    seq30 = (["GLY", "TYR", "ASP", "PRO", "GLU", "THR", "TRP"] * 5)[:30]
    lo = 10
    seq5 = seq30[lo : lo + 5]
    ch30 = model.for_sequence(seq30)
    ch5 = model.for_sequence(seq5)
    i = np.arange(30)
    trace = np.stack([i * 0.34, (i % 2) * 0.17, 0.02 * np.sin(i)], axis=1)
    cg30 = _as_tensor(trace[None])
    torch.manual_seed(4)
    with torch.no_grad():
        aa30, _ = ch30.sample(cg30, 2)
        # the 5-mer's own terminal atoms (H2, H3, OXT) from a sample of the 5-mer, the rest copied
        aa5, _ = ch5.sample(cg30[:, lo : lo + 5], 2)
        for a, name in enumerate(ch5.atom_names):
            r = int(ch5.chain.atom_residue[a])
            if name in ch30.chain.residue_atoms[lo + r] and name not in ("H2", "H3", "OXT"):
                aa5[:, a] = aa30[:, ch30.chain.atom(lo + r, name)]
        lp30 = ch30.row_log_prob(aa30, cg30.repeat(2, 1, 1))
        lp5 = ch5.row_log_prob(aa5, cg30[:, lo : lo + 5].repeat(2, 1, 1))
    mid = 2
    rows5 = [n for n in range(ch5.n_rows) if int(ch5.row_res[n]) == mid]
    atom30 = {int(ch30.rows[n, 0]): n for n in range(ch30.n_rows)}
    for n in rows5:
        a5 = int(ch5.rows[n, 0])
        r5 = int(ch5.chain.atom_residue[a5])
        a30 = ch30.chain.atom(lo + r5, ch5.atom_names[a5])
        assert torch.allclose(lp5[:, n], lp30[:, atom30[a30]], atol=1e-9), ch5.keys[int(ch5.order[n])]
    assert len(rows5) > 10


# ----------------------------------------------------------------------------- topologies
@pytest.mark.parametrize("name", R.STANDARD)
def test_amber14_accepts_every_residue_and_terminus(name):
    from openmm import app

    ff = app.ForceField("amber14/protein.ff14SB.xml", "implicit/gbn2.xml")
    for seq in ([name, "ALA", "ALA"], ["ALA", name, "ALA"], ["ALA", "ALA", name], ["ACE", name, "NME"]):
        chain = R.build_chain(seq)
        top = openmm_topology(seq)
        system = ff.createSystem(top, constraints=app.HBonds)
        assert system.getNumParticles() == chain.n_atoms
        assert [a.name for a in top.atoms()] == chain.atom_names


def test_histidine_protonation_from_names():
    for name, protons in (("HIS", {"HE2"}), ("HIE", {"HE2"}), ("HID", {"HD1"}), ("HIP", {"HD1", "HE2"})):
        chain = R.build_chain(["ACE", name, "NME"])
        assert {a for a in chain.residue_atoms[1] if a in ("HD1", "HE2")} == protons


# ----------------------------------------------------------------------------- bad input
def test_unknown_residue_name_is_named(chignolin):
    model = _model(chignolin, "ca")
    with pytest.raises(ValueError, match="XYZ.*position 1"):
        model.for_sequence(["ALA", "XYZ", "GLY"])


def test_angstrom_and_gap_coordinates_are_refused(chignolin):
    model = _model(chignolin, "ca")
    names, x = chignolin
    ch = model.for_sequence(names)
    cg = _as_tensor(x[:, ch.beads.numpy()])
    with pytest.raises(ValueError, match="Angstrom"):
        ch.sample(cg * 10.0, 1)
    gap = cg.clone()
    gap[:, 5:] += torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="residues 4 and 5.*missing"):
        ch.log_prob(torch.zeros(1, ch.n_aa, 3, dtype=torch.float64), gap)
    with pytest.raises(ValueError, match="n_cg = 10"):
        ch.sample(cg[:, :9], 1)


def _dihedral_deg(x: np.ndarray, i: int, j: int, k: int, m: int) -> float:
    b1, b2, b3 = x[j] - x[i], x[k] - x[j], x[m] - x[k]
    n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
    return math.degrees(math.atan2(np.linalg.norm(b2) * np.dot(b1, n2), np.dot(n1, n2)))


def test_proline_ring_hangs_from_the_amide_plane(chignolin):
    """PRO's CD is placed from its N against the C of the residue before (N is planar: in chignolin
    the dihedral CD-N-CA-C(-1) is within 15 degrees of 180, a narrow, branch row); an N-terminal
    PRO takes its own C. CG closes the ring from CD and CB (tree version 2: the angle CG-CD-CB
    sets the ring bond CB-CG) or by a dihedral about CD-N (version 1). Every ring atom is placed
    once, after its references (build_tree checks that)."""
    names, x = chignolin
    chain = R.build_chain(names)
    r = names.index("PRO")
    for version, cg_key in ((2, "PRO:CG<CD,CB,N"), (1, "PRO:CG<CD,N,CA")):
        tree = R.build_tree(chain, "ca", version)
        rows = {tree.keys[n]: n for n in range(len(tree.keys)) if chain.atom_residue[tree.rows[n, 0]] == r}
        assert {"PRO:CB<CA,N,C", "PRO:CD<N,CA,-1C", cg_key} <= set(rows)
        n = rows["PRO:CD<N,CA,-1C"]
        assert tree.branch[n] and not tree.chiral[n] and tree.chiral[rows["PRO:CB<CA,N,C"]]
        assert abs(abs(_dihedral_deg(x[0], *tree.rows[n])) - 180.0) < 15.0
        assert not tree.chiral[rows[cg_key]]
        first = R.build_tree(R.build_chain(["PRO", "ALA", "GLY"]), "ca", version)
        assert "PRO:CD<N,CA,C" in first.keys and cg_key in first.keys


def test_only_impropers_on_a_chiral_centre_are_chiral_rows(chignolin):
    """A row is bounded as setting a chiral centre j only when the atom it places and both its
    references are substituents of j; C placed from its C-alpha against the next C-alpha (under
    ``ca``) has the backbone's freedom and is not (bounding it gave valid frames of a 10-mer
    log q = -inf)."""
    names, _ = chignolin
    chain = R.build_chain(names)
    centres = set(R.chiral_centres(chain)[:, 0].tolist())
    for mapping in ("ca", "backbone"):
        for version in (1, 2):
            tree = R.build_tree(chain, mapping, version)
            for n in np.flatnonzero(tree.chiral):
                i, j, k, m = (int(a) for a in tree.rows[n])
                assert j in centres and {i, k, m} <= set(chain.neighbours[j]), tree.keys[n]
            assert any(tree.chiral)
    tree = R.build_tree(chain, "ca", 2)
    c_rows = [n for n, key in enumerate(tree.keys) if key.split(":")[1].startswith("C<CA,+1CA")]
    assert c_rows and not any(tree.chiral[c_rows])


def test_released_bounds_give_density_beyond_the_old_interval(chignolin):
    """A model that bounds a dihedral which fresh statistics do not (a model fitted before a row
    stopped counting as chiral) gives frames beyond the interval log q = -inf; release_bounds takes
    the fresh statistics for it (and only for it), after which log q is finite."""
    model = _model(chignolin, "ca", perturb=0.1)
    names, x = chignolin
    ch = model.for_sequence(names)
    key = next(k for k in ch.keys if k.split(":")[1].startswith("C<CA,+1CA"))
    fresh = {k: dict(v) for k, v in model.stats.items()}
    n = ch.keys.index(key)
    i, j, k, m = (int(a) for a in ch.rows[n])
    phi = float(_dihedral_deg(x[0], i, j, k, m))
    model.stats[key] = {**model.stats[key], "circ": False, "h": 1.5, "mu": math.radians(phi) + 2.0}
    model._chains.clear()
    cg = _as_tensor(x[:, model.for_sequence(names).beads.numpy()])
    with torch.no_grad():
        assert torch.isneginf(model.for_sequence(names).log_prob(_as_tensor(x), cg)).all()
        chiral_key = next(k for k in ch.keys if k.endswith(":CB<CA,N,C"))
        assert model.stats[chiral_key]["h"] < math.pi  # bounded in both: stays
        assert model.release_bounds(fresh) == [key]
        assert torch.isfinite(model.for_sequence(names).log_prob(_as_tensor(x), cg)).all()
        assert model.release_bounds(fresh) == []


def test_tree_version_2_draws_each_n_ca_c_angle_from_a_placed_n(chignolin):
    """Tree version 2 under ``ca``: the planes of even residues first (phase 0), then each odd
    residue's plane places its C by a dihedral about CA(i)-CA(i+1) relative to the N its neighbour
    put down, and its conditioner sees that N and the next residue's C; the C-terminal C hangs from
    its own N likewise. Every N-CA-C angle of the chain is then made by a row that sees both atoms.
    Version 1 keeps the old rows; ``backbone`` places its planes the same way in both."""
    from openmm_backmap.models.protein import _context_atoms

    names = ["GLY", "TYR", "ASP", "PRO", "GLU", "LYS"]
    chain = R.build_chain(names)
    tree = R.build_tree(chain, "ca", 2)
    old = R.build_tree(chain, "ca", 1)
    assert not old.phase.any() and "ASP:C<CA,+1CA,-1CA" in old.keys
    c_rows = {int(chain.atom_residue[tree.rows[n, 0]]): n for n, k in enumerate(tree.keys) if ":C<" in k}
    for r, n in c_rows.items():
        i, j, k, m = tree.rows[n]
        odd = r % 2 == 1 or r == len(names) - 1
        assert tree.phase[n] == int(odd) and tree.stage[n] == 0
        assert (m == chain.atom(r, "N")) == odd, tree.keys[n]
    assert tree.keys[c_rows[1]] == "TYR:C<CA,+1CA,N" and tree.keys[c_rows[5]] == "LYS:C<CA,-1CA,N"
    # placement order: every reference placed before the row that uses it
    placed = set(R.bead_atoms(chain, "ca")[0])
    for n in tree.placement_order():
        assert set(tree.rows[n, 1:].tolist()) <= placed
        placed.add(int(tree.rows[n, 0]))
    ctx = _context_atoms(chain, tree, set(R.bead_atoms(chain, "ca")[0]), 26)
    n = c_rows[3]  # PRO's plane (odd) sees PRO's N (plane 2) and GLU's C (plane 4)
    assert {chain.atom(3, "N"), chain.atom(4, "C")} <= set(ctx[n].tolist())
    n = c_rows[2]  # ASP's plane (even) sees no atom of an odd plane
    assert not set(ctx[n].tolist()) & {chain.atom(2, "N"), chain.atom(3, "C")}
    bb = [R.build_tree(chain, "backbone", v) for v in (1, 2)]
    pro_cg = [k for k in bb[0].keys if k.startswith("PRO:CG<")]
    assert pro_cg == ["PRO:CG<CD,N,CA"] and [k for k in bb[1].keys if k.startswith("PRO:CG<")] == ["PRO:CG<CD,CB,N"]
    assert [k for k in bb[0].keys if k not in pro_cg] == [k for k in bb[1].keys if not k.startswith("PRO:CG<")]
    assert not bb[1].phase.any()
    with pytest.raises(ValueError, match="unknown placement-tree version 7"):
        R.build_tree(chain, "ca", 7)


def test_models_keep_their_tree_version_and_convert_on_request(chignolin, tmp_path):
    """A file records its tree version and loads with it; one written before versions (none in its
    configuration) loads as version 1; ``set_tree_version`` converts a model, whose new rows start
    from the unseen-key embedding, and log_prob of its own samples is its log q."""
    names, x = chignolin
    model = _model(chignolin, "ca", perturb=0.1, tree_version=1)
    loaded = ProteinBackmapper.load(model.save(tmp_path / "v1.pt"))
    assert loaded.config["tree_version"] == 1
    data = torch.load(str(tmp_path / "v1.pt"), weights_only=True)
    del data["config"]["tree_version"]
    torch.save(data, str(tmp_path / "legacy.pt"))
    legacy = ProteinBackmapper.load(tmp_path / "legacy.pt")
    assert legacy.config["tree_version"] == 1
    legacy.set_tree_version(2)
    ch = legacy.double().for_sequence(names)
    assert "TYR:C<CA,+1CA,N" in ch.keys and "PRO:CG<CD,CB,N" in ch.keys
    assert ProteinBackmapper.load(legacy.save(tmp_path / "v2.pt")).config["tree_version"] == 2
    cg = _as_tensor(x[:, ch.beads.numpy()])
    torch.manual_seed(3)
    with torch.no_grad():
        aa, lq = ch.sample(cg.repeat(3, 1, 1), 1)
        assert torch.allclose(ch.log_prob(aa, cg.repeat(3, 1, 1)), lq, atol=1e-8)
    legacy.set_tree_version(3)  # pair rows (new keys) start from the unseen-key statistics
    ch = legacy.double().for_sequence(names)
    assert "PRO:CG<CD,CB=,N" in ch.keys and bool(ch.pair.any())
    with torch.no_grad():
        aa, lq = ch.sample(cg.repeat(3, 1, 1), 1)
        assert torch.isfinite(lq).all() and torch.allclose(ch.log_prob(aa, cg.repeat(3, 1, 1)), lq, atol=1e-8)
    with pytest.raises(ValueError, match="unknown placement-tree version"):
        legacy.set_tree_version(R.LATEST_TREE_VERSION + 1)


def test_new_row_keys_get_embeddings_without_changing_the_density(chignolin, tmp_path):
    """`add_keys` (training continued on rows a saved model never had): each new key gets its own
    embedding, starting from the shared one of unseen keys, so log q is unchanged; generic and known
    keys are skipped; the grown model saves and loads."""
    names, x = chignolin
    model = _model(chignolin, "ca", perturb=0.1)
    other = ["ACE", "PRO", "TRP", "NME"]
    ch = model.for_sequence(other)
    torch.manual_seed(1)
    with torch.no_grad():
        cg = _as_tensor(x[:1, model.for_sequence(names).beads.numpy()][:, :4]).repeat(4, 1, 1)
        aa, lq = ch.sample(cg, 1)
    unseen = [k for k in R.build_tree(R.build_chain(other), "ca").keys if model.embedding_index(k) == len(model.keys)]
    assert unseen
    added = model.add_keys(unseen + ["*:CB<CA,N,C", model.keys[0]])
    assert added == list(dict.fromkeys(unseen))
    assert [model.embedding_index(k) for k in added] == list(range(len(model.keys) - len(added), len(model.keys)))
    ch2 = model.for_sequence(other)
    with torch.no_grad():
        assert torch.allclose(ch2.log_prob(aa, cg), lq, atol=1e-9)
        assert torch.allclose(ch2.log_prob(aa, cg), ch.log_prob(aa, cg), atol=1e-9)
    loaded = ProteinBackmapper.load(model.save(tmp_path / "grown.pt")).double()
    assert loaded.keys == model.keys
    with torch.no_grad():
        assert torch.allclose(loaded.for_sequence(other).log_prob(aa, cg), lq, rtol=1e-5)
    # a pair key of tree version 3 starts from the embedding of its row in the older tree
    old = next(k for k in model.keys if ":N<-1C,CA," in k)
    pair = old.replace(",CA,", ",CA=,")
    assert model.add_keys([pair, "PHE:CZ<CE1,CE2=,CD1"]) == [pair, "PHE:CZ<CE1,CE2=,CD1"]
    weight = model.net.key_emb.weight
    assert torch.equal(weight[model.embedding_index(pair)], weight[model.embedding_index(old)])
    assert torch.equal(weight[model.embedding_index("PHE:CZ<CE1,CE2=,CD1")], weight[-1])


def test_widening_keeps_the_density_and_trains_the_new_units(chignolin, tmp_path):
    """`widen` (training continued at a larger width): log q is unchanged, every new weight gets a
    gradient from the likelihood (none is dead), the wider model saves and loads with its width,
    and narrowing is refused."""
    names, x = chignolin
    model = _model(chignolin, "ca", perturb=0.1)
    ch = model.for_sequence(names)
    cg = _as_tensor(x[:, ch.beads.numpy()])
    xt = _as_tensor(x)
    with torch.no_grad():
        before = ch.log_prob(xt, cg)
    old = model.config["hidden"]
    model.widen(old + 8, seed=1)
    wide_state = {k: v.clone() for k, v in model.net.state_dict().items()}
    wide = model.for_sequence(names)
    assert model.net.lin2.weight.shape == (old + 8, old + 8)
    with torch.no_grad():
        assert torch.allclose(wide.log_prob(xt, cg), before, rtol=0, atol=1e-9)
    # the first gradient reaches the weights out of the new units; once those moved, the weights
    # into them too
    net = model.net
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    for step in range(2):
        opt.zero_grad()
        (-wide.log_prob(xt, cg).sum()).backward()
        out_of_new = (
            net.lin2.weight.grad[:old, old:],
            net.head_phi.weight.grad[:, old:],
            net.lin_rt.weight.grad[:, old : old + 8],
        )
        into_new = (net.lin_static.weight.grad[old:], net.lin_dyn.weight.grad[old:], net.lin2.weight.grad[old:])
        assert all(g.abs().sum() > 0 for g in out_of_new + (into_new if step else ()))
        opt.step()
    model.net.load_state_dict(wide_state)
    loaded = ProteinBackmapper.load(model.save(tmp_path / "wide.pt")).double()
    assert loaded.config["hidden"] == old + 8
    with torch.no_grad():
        assert torch.allclose(loaded.for_sequence(names).log_prob(xt, cg), before, rtol=1e-5)
    with pytest.raises(ValueError, match=f"cannot narrow the conditioner from {old + 8} to {old}"):
        model.widen(old)


# ----------------------------------------------------------------------------- files
def test_save_load_round_trip(chignolin, tmp_path):
    model = _model(chignolin, "ca", perturb=0.1)
    names, x = chignolin
    path = model.save(tmp_path / "m.pt")
    loaded = ProteinBackmapper.load(path).double()
    ch, ch2 = model.for_sequence(names), loaded.for_sequence(names)
    cg = _as_tensor(x[:, ch.beads.numpy()])
    xt = _as_tensor(x)
    # weights are stored in float32
    with torch.no_grad():
        assert float(ch2.log_prob(xt, cg)) == pytest.approx(float(ch.log_prob(xt, cg)), rel=1e-5)
    with pytest.raises(ValueError, match="no pretrained protein model 'nope'"):
        load_pretrained("nope")


def test_a_save_that_fails_keeps_the_earlier_file(chignolin, tmp_path, monkeypatch):
    """`save` writes beside the target and moves the file over it when complete: a write that dies
    half-way (a full disk, a killed process) leaves the earlier model readable and no partial file."""
    model = _model(chignolin, "ca", perturb=0.1)
    path = model.save(tmp_path / "m.pt")
    before = path.read_bytes()
    real_save = torch.save

    def dies_half_way(obj, f):
        real_save(obj, f)
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        model.save(path, extra={"step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    assert ProteinBackmapper.load(path).keys == model.keys


def test_canonical_hydrogen_names_fix_swaps_and_keep_the_energy(chignolin):
    """Swapping the names of equivalent hydrogens (HB2/HB3 ...) leaves the amber14 energy unchanged,
    and canonical naming undoes any such swap."""
    import openmm
    from openmm import app, unit

    names, x = chignolin
    chain = R.build_chain(names)
    pairs = R.equivalent_hydrogen_pairs(chain)
    assert {(chain.atom_names[a], chain.atom_names[b]) for a, b, *_ in pairs} >= {("HB2", "HB3"), ("HA2", "HA3")}
    canon = R.canonical_hydrogens(chain, x)
    swapped = canon.copy()
    rng = np.random.default_rng(0)
    for a, b, *_ in pairs[rng.random(len(pairs)) < 0.5]:
        swapped[:, [a, b]] = swapped[:, [b, a]]
    assert not np.array_equal(swapped, canon)
    assert np.array_equal(R.canonical_hydrogens(chain, swapped), canon)
    system = app.ForceField("amber14/protein.ff14SB.xml", "implicit/gbn2.xml").createSystem(openmm_topology(names))
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    energies = []
    for pos in (canon[0], swapped[0]):
        ctx.setPositions(pos)
        energies.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    assert energies[0] == pytest.approx(energies[1], abs=1e-6)


@pytest.mark.parametrize("name,mapping", [("protein-ca", "ca"), ("protein-backbone", "backbone")])
def test_pretrained_model_loads_and_reconstructs(chignolin, name, mapping):
    model = load_pretrained(name)
    path = Path(__file__).resolve().parent.parent / "openmm_backmap" / "pretrained" / f"{name}.pt"
    assert model.mapping == mapping and path.stat().st_size < 20 * 2**20
    names, x = chignolin
    ch = model.for_sequence(names)
    cg = torch.as_tensor(x[:, ch.beads.numpy()], dtype=torch.float32)
    with torch.no_grad():
        aa, lq = ch.sample(cg, 2)
    centres = R.chiral_centres(ch.chain)
    assert np.all(np.sign(R.signed_volumes(aa.double().numpy(), centres)) == np.sign(R.signed_volumes(x, centres)))
    bonds = np.asarray(ch.chain.bonds)
    lengths = torch.linalg.norm(aa[:, bonds[:, 0]] - aa[:, bonds[:, 1]], dim=-1).numpy()
    ref = np.linalg.norm(x[:, bonds[:, 0]] - x[:, bonds[:, 1]], axis=-1)
    assert np.mean(np.abs(lengths / ref - 1) <= 0.1) > 0.95
    assert torch.isfinite(lq).all()


def test_one_residue_chain_uses_the_rows_of_longer_chains():
    """ACE-X-NME places ACE's C and X's C against NME's C and ACE's CH3, atoms a longer chain has as
    C-alphas (rows no corpus peptide has): they take the statistics and embeddings of their cap
    analogs, not the defaults, so alanine dipeptide through protein-ca gets its closure bonds right
    (with the defaults, ALA N-CA and NME N-C came out 0.34 nm long in every sample)."""
    from openmm import unit

    from openmm_backmap.models.protein import DEFAULT_STATS
    from openmm_backmap.systems.builtin import builtin_system

    assert R.cap_analog_keys("ALA:C<CA,+1C,-1CH3") == [
        "ALA:C<CA,+1CA,-1CH3",
        "ALA:C<CA,+1C,-1CA",
        "ALA:C<CA,+1CA,-1CA",
    ]
    assert R.cap_analog_keys("ALA:N<-1C,CA,-1CH3") == ["ALA:N<-1C,CA,-1CA"]  # -1C: ACE's carbonyl, kept
    assert R.cap_analog_keys("ALA:CB<CA,N,C") == []
    model = load_pretrained("protein-ca")
    names = ["ACE", "ALA", "NME"]
    keys = model.for_sequence(names).keys
    assert all(model.lookup(k) is not DEFAULT_STATS for k in keys)
    assert all(model.embedding_index(k) < len(model.keys) for k in keys)
    topology, _, positions = builtin_system("ala2")
    _, x = chain_positions(md.Topology.from_openmm(topology), np.array([positions.value_in_unit(unit.nanometer)]))
    ch = model.for_sequence(names)
    chain = R.build_chain(names)
    torch.manual_seed(0)
    with torch.no_grad():
        aa, _ = ch.sample(torch.as_tensor(x[:, ch.beads.numpy()], dtype=torch.float32), 64)
    for a, b in ((chain.atom(1, "N"), chain.atom(1, "CA")), (chain.atom(2, "N"), chain.atom(2, "C"))):
        d = torch.linalg.norm(aa[:, a] - aa[:, b], dim=-1)
        assert float((torch.abs(d / 0.147 - 1.0) < 0.1).float().mean()) > 0.9


@pytest.mark.parametrize("mapping", ["ca", "backbone"])
def test_tree_version_3_draws_every_heavy_bond_as_a_length(mapping):
    """Tree version 3: every bond between heavy atoms that are not both beads is drawn as a length,
    either the row's own bond i-j or, on a ``pair`` row, the bond i-k to its angle reference (the
    N of each peptide plane under ``ca``, proline's CG, the atom closing each aromatic ring). In
    version 2 exactly those second bonds followed from other coordinates. Pair keys mark k."""
    names = ["ACE", *sorted(set(R.RESIDUE_NAMES) - set(R.CAPS)), "NME"]
    chain = R.build_chain(names)
    beads = set(R.bead_atoms(chain, mapping)[0])
    heavy = [e != "H" for e in chain.elements]
    bonds = {frozenset(b) for b in chain.bonds if heavy[b[0]] and heavy[b[1]] and not set(b) <= beads}

    def drawn(tree):
        out = {frozenset((int(i), int(j))) for i, j, _, _ in tree.rows}
        return out | {frozenset((int(i), int(k))) for (i, _, k, _), p in zip(tree.rows, tree.pair) if p}

    v3, v2 = R.build_tree(chain, mapping, 3), R.build_tree(chain, mapping, 2)
    assert bonds <= drawn(v3)
    assert not v2.pair.any() and [k.replace("=", "") for k in v3.keys if "=" not in k] == [
        k for k, p in zip(v2.keys, v3.pair) if not p
    ]
    missing = {tuple(sorted(chain.atom_names[a] for a in b)) for b in bonds - drawn(v2)}
    closing = {("CE2", "CZ"), ("CE1", "NE2"), ("CE2", "NE1"), ("CH2", "CZ3"), ("CB", "CG")}
    # under ca also each plane's N-CA, and NME's N-C (its C stands where a C-alpha stands)
    assert missing == (closing | {("CA", "N"), ("C", "N")} if mapping == "ca" else closing)
    pair_keys = [k for k, p in zip(v3.keys, v3.pair) if p]
    assert all(k.split("<")[1].split(",")[1].endswith("=") for k in pair_keys)
    assert "PRO:CG<CD,CB=,N" in pair_keys and ("ASN:N<-1C,CA=,-1CA" in pair_keys) == (mapping == "ca")
