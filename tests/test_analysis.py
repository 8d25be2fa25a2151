"""Metrics: each checked on cases with a known answer."""

import mdtraj as md
import numpy as np
import pytest

from openmm_backmap.analysis.metrics import (
    bond_score,
    chiral_centres,
    chirality_errors,
    clash_score,
    energy_w1,
    js_divergence,
    kabsch_rmsd,
    ramachandran_histogram,
    rmsd_and_diversity,
)
from openmm_backmap.analysis.reweighting import Reweighted, conditional_ess, kish_ess, log_weights, reweight
from openmm_backmap.geometry import random_rotation
from openmm_backmap.io.energy_file import read_energy_file
from openmm_backmap.systems.builtin import DATA_DIR
from openmm_backmap.units import kT


@pytest.fixture(scope="module")
def peptide():
    return md.load(str(DATA_DIR / "chignolin.pdb"))


def test_kish_ess_limits():
    assert kish_ess(np.zeros(50)) == pytest.approx(50.0)
    assert kish_ess(np.array([0.0, -1000.0, -1000.0])) == pytest.approx(1.0)
    assert kish_ess(np.array([np.log(3.0), 0.0])) == pytest.approx(16 / 10)  # (3+1)^2 / (9+1)
    assert kish_ess(np.array([0.0, -np.inf, 0.0])) == pytest.approx(2.0)


def test_conditional_ess_is_one_for_exact_conditional():
    # if log q = -beta U + const, all weights within a frame are equal
    rng = np.random.default_rng(0)
    u = rng.normal(size=(5, 64)) * 10
    assert conditional_ess(u, -u / kT(300.0) + 3.0, 300.0) == pytest.approx(1.0)
    assert conditional_ess(u, np.zeros_like(u), 300.0) < 0.5


def test_importance_weights_recover_target_mean():
    # proposal N(0, 1), target N(1, 0.5^2) as exp(-beta U): the reweighted mean must be ~1
    rng = np.random.default_rng(1)
    t = 300.0
    x = rng.normal(size=200_000)
    log_q = -0.5 * x**2 - 0.5 * np.log(2 * np.pi)
    u_aa = kT(t) * 0.5 * ((x - 1.0) / 0.5) ** 2
    rw = Reweighted(log_weights(u_aa, np.zeros_like(x), log_q, t))
    assert rw.average(x) == pytest.approx(1.0, abs=0.01)
    assert rw.average(x**2) == pytest.approx(1.25, abs=0.02)
    # ESS/N -> 1 / E_q[(p/q)^2]; for p = N(1, s^2), q = N(0, 1) the integral of p^2/q is
    # sqrt(pi/a) exp(b^2/(4a) + c) / (s^2 sqrt(2 pi)) with a = 1/s^2 - 1/2, b = 2/s^2, c = -1/s^2
    s2 = 0.25
    a, b, c = 1 / s2 - 0.5, 2 / s2, -1 / s2
    second_moment = np.sqrt(np.pi / a) * np.exp(b * b / (4 * a) + c) / (s2 * np.sqrt(2 * np.pi))
    assert rw.ess_fraction == pytest.approx(1.0 / second_moment, rel=0.05)


def test_kabsch_rmsd_invariant_and_exact():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 10, 3))
    rot = np.stack([random_rotation(rng) for _ in range(3)])
    b = np.einsum("sij,snj->sni", rot, a) + rng.normal(size=(3, 1, 3))
    np.testing.assert_allclose(kabsch_rmsd(a, b), 0.0, atol=1e-7)
    c = a.copy()
    c[:, 0, 0] += 0.1  # one atom moved: rmsd is at most 0.1 / sqrt(10)
    assert np.all(kabsch_rmsd(a, c) <= 0.1 / np.sqrt(10) + 1e-12)
    assert np.all(kabsch_rmsd(a, c) > 0)


def test_bond_score_and_clash_score(peptide):
    x = peptide.xyz.astype(np.float64)
    top = peptide.topology
    assert bond_score(x, top, reference=x) == 1.0
    stretched = x.copy()
    stretched[0, 0] += [0.05, 0.0, 0.0]  # N of GLY1 pulled 0.5 A: its bonds break the 10% band
    n_bonds_of_n = sum(1 for a, b in top.bonds if 0 in (a.index, b.index))
    assert bond_score(stretched, top, reference=x) == pytest.approx(1 - n_bonds_of_n / top.n_bonds)
    assert clash_score(x, top) == 0.0
    # put residue 5's CA on top of residue 1's CA: two residues of ten clash
    clashing = x.copy()
    ca = [a.index for a in top.atoms if a.name == "CA"]
    clashing[0, ca[4]] = clashing[0, ca[0]] + 0.05
    assert clash_score(clashing, top) == pytest.approx(20.0)
    assert clash_score(clashing, top, per="sample") == pytest.approx(100.0)


def test_chirality_errors_of_mirror_image(peptide):
    x = peptide.xyz.astype(np.float64)
    top = peptide.topology
    # 7 non-glycine C-alpha plus the C-beta of two threonines
    assert len(chiral_centres(top)) == 7 + 2
    assert chirality_errors(x, top, reference=x) == 0.0
    mirror = x * np.array([1.0, 1.0, -1.0])
    assert chirality_errors(mirror, top, reference=x) == 100.0
    # L-amino acids: N, C, CB around CA have a fixed handedness in the shipped structure
    assert chirality_errors(x, top, reference=x) == 0.0


def test_energy_w1_and_js():
    rng = np.random.default_rng(3)
    a = rng.normal(size=20000)
    assert energy_w1(a, a + 2.0) == pytest.approx(2.0, abs=1e-9)
    assert energy_w1(np.append(a, np.inf), a) == pytest.approx(0.0)
    h = ramachandran_histogram(rng.uniform(-180, 180, 5000), rng.uniform(-180, 180, 5000))
    assert h.shape == (36, 36) and h.sum() == pytest.approx(1.0)
    assert js_divergence(h, h) == pytest.approx(0.0)
    p, q = np.zeros(4), np.zeros(4)
    p[0], q[1] = 1, 1
    assert js_divergence(p, q) == pytest.approx(np.log(2))


def test_rmsd_and_diversity(peptide):
    x = peptide.xyz.astype(np.float64)
    rng = np.random.default_rng(4)
    samples = x[None] + rng.normal(scale=0.02, size=(1, 8) + x.shape[1:])
    to_ref, diversity = rmsd_and_diversity(samples, x, peptide.topology)
    # independent isotropic noise: sample-sample RMSD ~ sqrt(2) x sample-reference RMSD
    assert to_ref == pytest.approx(0.02 * np.sqrt(3), rel=0.1)
    assert diversity == pytest.approx(1 - np.sqrt(2), abs=0.1)


def test_energy_file_round_trip(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text(
        "step,time_ps,sample,u_cg_kjmol,u_aa_kjmol,log_q,log_w\n"
        "1000,2.0,0,1.0,-50.0,10.0,3.0\n1000,2.0,1,1.0,-51.0,11.0,-inf\n2000,4.0,0,2.0,-49.0,9.0,3.0\n"
    )
    cols = read_energy_file(path)
    np.testing.assert_array_equal(cols["step"], [1000, 1000, 2000])
    rw = reweight(path)
    np.testing.assert_allclose(rw.weights, [0.5, 0.0, 0.5])
    assert rw.ess == pytest.approx(2.0)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        read_energy_file(tmp_path / "bad.csv")
