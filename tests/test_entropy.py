"""Mapping-entropy estimators against closed forms (linear-Gaussian toy), the command on a tiny
model, its refusals, and the bracket on a trained ALA2 model (slow)."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from openmm_backmap.analysis import entropy
from openmm_backmap.units import kT

T = 300.0


# ---------------------------------------------------------------------------- the toy
def _apply(A: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A acting on the atom axis of a batch of positions: (f, g) x (B, g, 3) -> (B, f, 3)."""
    return np.tensordot(A, v, axes=([1], [1])).transpose(1, 0, 2)


class GaussianToy:
    """x ~ N(mean, C) independently in each Cartesian direction, with U = kT x^T C^-1 x / 2 (kJ/mol),
    mapped by a CGMapping. q(x | X) is a Gaussian on the fibre in the backmapper's coordinates: the
    atoms that are not pivots, each group shifted so that its pivot sits on its bead (y_j = x_j -
    x_pivot + X_group for j in a group, y_j = x_j for atoms in no group). With ``scale`` = 1 and
    ``shift`` = 0 it is the exact conditional p(x | X); otherwise a deliberately wrong one (covariance
    times scale^2, mean moved by ``shift`` nm along every fibre coordinate)."""

    def __init__(self, groups, weights, pivots, precision, mean, scale=1.0, shift=0.0, seed=0):
        import mdtraj as md

        from openmm_backmap.mapping import CGMapping

        n = precision.shape[0]
        top = md.Topology()
        res = top.add_residue("TOY", top.add_chain())
        for i in range(n):
            top.add_atom(f"C{i}", md.element.carbon, res)
        self.mapping = CGMapping(top, groups, weights=weights)
        self.topology = top
        self.n_aa, self.n_cg = n, len(groups)
        self.temperature = T
        self.path = Path("toy.pt")
        self.P, self.C, self.mean = precision, np.linalg.inv(precision), np.asarray(mean, dtype=np.float64)
        M = self.mapping.matrix
        free = [j for j in range(n) if j not in set(pivots)]
        self.free = free
        T_ = np.zeros((n, n))
        T_[: self.n_cg] = M
        group_of = {int(a): g for g, idx in enumerate(self.mapping.groups) for a in idx}
        for r, j in enumerate(free):
            T_[self.n_cg + r, j] = 1.0
            if j in group_of:
                g = group_of[j]
                T_[self.n_cg + r, pivots[g]] -= 1.0
                T_[self.n_cg + r] += M[g]
        self.T, self.T_inv = T_, np.linalg.inv(T_)
        K = T_ @ self.C @ T_.T
        nc = self.n_cg
        self.gain = K[nc:, :nc] @ np.linalg.inv(K[:nc, :nc])
        self.sigma_exact = K[nc:, nc:] - self.gain @ K[:nc, nc:]
        self.sigma_q = scale**2 * self.sigma_exact
        self.shift = np.full(len(free), float(shift))
        self.mu_z = T_ @ self.mean  # (n, 3)
        self.chol_q, self.inv_q = np.linalg.cholesky(self.sigma_q), np.linalg.inv(self.sigma_q)
        self.metadata = {"n_free_dof": 3 * len(free), "constraints": [], "bead_names": self.mapping.names}
        self.rng = np.random.default_rng(seed)

    # closed forms (nats, per molecule)
    def conditional_entropy(self) -> float:
        return 1.5 * np.linalg.slogdet(2 * np.pi * np.e * self.sigma_exact)[1]

    def entropy_difference(self) -> float:
        """H(x) - H(X), which equals H(x | X) in the measure dx = dX dmu_X."""
        M = self.mapping.matrix
        return 1.5 * (
            np.linalg.slogdet(2 * np.pi * np.e * self.C)[1] - np.linalg.slogdet(2 * np.pi * np.e * M @ self.C @ M.T)[1]
        )

    def hausdorff_conditional_entropy(self) -> float:
        """H(x | X) w.r.t. the Euclidean surface measure of the fibre: larger by 3/2 log det(M M^T)."""
        M = self.mapping.matrix
        return self.entropy_difference() + 1.5 * np.linalg.slogdet(M @ M.T)[1]

    def cross_entropy(self) -> float:
        nf = len(self.free)
        inv_q = np.linalg.inv(self.sigma_q)
        kl = 0.5 * (
            np.trace(inv_q @ self.sigma_exact)
            + self.shift @ inv_q @ self.shift
            - nf
            + np.linalg.slogdet(self.sigma_q)[1]
            - np.linalg.slogdet(self.sigma_exact)[1]
        )
        return self.conditional_entropy() + 3 * kl

    # model interface
    def _fibre_mean(self, X):
        nc = self.n_cg
        return self.mu_z[nc:][None] + _apply(self.gain, X - self.mu_z[:nc][None]) + self.shift[None, :, None]

    def log_prob(self, aa, cg):
        z = _apply(self.T, np.asarray(aa, dtype=np.float64))
        y = z[:, self.n_cg :] - self._fibre_mean(np.asarray(cg, dtype=np.float64))
        quad = (_apply(self.inv_q, y) * y).sum(axis=(1, 2))
        return -0.5 * quad - 1.5 * np.linalg.slogdet(2 * np.pi * self.sigma_q)[1]

    def sample(self, cg, n, seed=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        X = np.repeat(np.asarray(cg, dtype=np.float64), n, axis=0)
        y = self._fibre_mean(X) + _apply(self.chol_q, self.rng.standard_normal((len(X), len(self.free), 3)))
        aa = _apply(self.T_inv, np.concatenate([X, y], axis=1))
        return aa, self.log_prob(aa, X)

    def energy(self, xyz):
        d = np.asarray(xyz) - self.mean[None]
        return kT(T) * 0.5 * (_apply(self.P, d) * d).sum(axis=(1, 2))

    def reference(self, n, seed):
        L = np.linalg.cholesky(self.C)
        eps = np.random.default_rng(seed).standard_normal((n, self.n_aa, 3))
        return self.mean[None] + _apply(L, eps)


def _precision(n=6):
    lap = np.diag(np.r_[1.0, 2.0 * np.ones(n - 2), 1.0]) - np.eye(n, k=1) - np.eye(n, k=-1)
    return 60.0 * lap + 8.0 * np.eye(n)  # nm^-2: springs along a chain plus a tether, widths ~0.1-0.3 nm


MEAN = np.random.default_rng(11).normal(0.0, 0.3, (6, 3))
SLICE = dict(groups=[[0], [2], [5]], weights=None, pivots=[0, 2, 5])
COM = dict(groups=[[0, 1], [2, 3, 4], [5]], weights=[[0.7, 0.3], [0.5, 0.25, 0.25], [1.0]], pivots=[0, 2, 5])
COM_OTHER_PIVOTS = dict(COM, pivots=[1, 4, 5])


def _estimate(toy, frames=2000, samples=64, seed=1):
    x = toy.reference(frames, seed=seed)
    terms = entropy.sample_terms(toy, x, toy.energy, samples, seed=seed + 1)
    # independent frames: 50 blocks of 40 make the error estimate itself steadier than the default 20
    res = entropy.entropy_from_terms(
        terms["log_q_ref"], terms["u_ref"], terms["u_samples"], terms["log_q_samples"], n_blocks=50
    )
    return entropy._with_units(res, toy, 1.0), terms


@pytest.mark.parametrize("kind", [SLICE, COM, COM_OTHER_PIVOTS], ids=["slice", "com", "com-other-pivots"])
def test_toy_exact_q_matches_closed_forms(kind):
    """H(x | X) from both routes within 2 standard errors of the closed form; the secondary figures
    (S_map^(2), S_map) within 3, so that a dozen comparisons do not fail by chance."""
    toy = GaussianToy(precision=_precision(), mean=MEAN, **kind)
    # the fibre coordinates have unit Jacobian: H(x|X) = H(x) - H(X) for either choice of pivots
    assert toy.conditional_entropy() == pytest.approx(toy.entropy_difference(), abs=1e-9)
    assert abs(np.linalg.det(toy.T)) == pytest.approx(1.0, abs=1e-12)
    res, _ = _estimate(toy)
    h = toy.conditional_entropy()
    ce, h_is = res["cross_entropy"], res["energy_route"]
    assert abs(ce["value"] - h) < 2 * ce["error"], (ce, h)
    assert abs(h_is["value"] - h) < 2 * h_is["error"], (h_is, h)
    # with the exact conditional every importance weight is Z(X): both routes agree frame by frame
    assert abs(res["gap"]["value"]) < 1e-8
    assert res["conditional_ess"]["value"] == pytest.approx(1.0, abs=1e-9)
    # energy-fluctuation form: beta U on a fibre is chi^2 / 2 with d = 3 n_free degrees of freedom
    d = 3 * len(toy.free)
    s2 = res["energy_fluctuation"]
    assert abs(s2["value"] - d / 4) < 3 * s2["error"], (s2, d / 4)
    # Giulini S_map in a box of 1 nm^3 per free atom: log Omega - H
    smap = res["giulini_smap"]
    assert abs(smap["lower"]["value"] - (0.0 - h)) < 3 * smap["lower"]["error"]
    assert res["per_removed_atom"]["cross_entropy"]["value"] == pytest.approx(ce["value"] / len(toy.free))


def test_toy_measure_factor_shows_for_centre_of_mass():
    """The surface-measure convention differs by 3/2 log det(M M^T): zero for a slice mapping, several
    nats for these centre-of-mass groups, far outside the estimate's error."""
    com = GaussianToy(precision=_precision(), mean=MEAN, **COM)
    sl = GaussianToy(precision=_precision(), mean=MEAN, **SLICE)
    assert sl.hausdorff_conditional_entropy() == pytest.approx(sl.conditional_entropy(), abs=1e-9)
    res, _ = _estimate(com)
    offset = com.hausdorff_conditional_entropy() - com.conditional_entropy()
    assert offset == pytest.approx(1.5 * math.log(0.58 * 0.375), rel=1e-9)
    assert abs(res["cross_entropy"]["value"] - com.hausdorff_conditional_entropy()) > 10 * res["cross_entropy"]["error"]


@pytest.mark.parametrize("kind", [SLICE, COM], ids=["slice", "com"])
def test_toy_wrong_q_opens_the_bracket(kind):
    toy = GaussianToy(precision=_precision(), mean=MEAN, scale=1.3, shift=0.05, **kind)
    res, _ = _estimate(toy)
    h, ce, h_is = toy.conditional_entropy(), res["cross_entropy"], res["energy_route"]
    assert abs(ce["value"] - toy.cross_entropy()) < 3 * ce["error"]  # CE = H + E KL(p || q), analytic
    assert ce["value"] - h > 5 * ce["error"]
    assert h_is["value"] <= h + 2 * h_is["error"]
    assert res["gap"]["value"] > 5 * res["gap"]["error"]
    by_k = res["energy_route_by_k"]
    assert list(by_k) == ["1", "2", "4", "8", "16", "32", "64"]
    # the estimate rises with K toward H: K = 1 (an ELBO) is far below, K = 64 close
    assert by_k["1"]["value"] < h - 5 * by_k["1"]["error"]
    assert by_k["1"]["value"] < by_k["8"]["value"] < by_k["64"]["value"]
    assert res["conditional_ess"]["value"] < 0.9


def test_estimators_refuse_k_below_two():
    toy = GaussianToy(precision=_precision(), mean=MEAN, **SLICE)
    with pytest.raises(ValueError, match="K >= 2"):
        entropy.sample_terms(toy, toy.reference(10, 0), toy.energy, 1)
    with pytest.raises(ValueError, match="K >= 2"):
        entropy.entropy_from_terms(np.zeros(5), np.zeros(5), np.zeros((5, 1)), np.zeros((5, 1)))


def test_block_error_sees_correlation():
    rng = np.random.default_rng(0)
    white = rng.standard_normal(4000)
    assert entropy.block_error(white, 20) == pytest.approx(1 / math.sqrt(4000), rel=0.4)
    # the same values in runs of 40 identical frames: 40x fewer independent samples
    runs = np.repeat(white[:100], 40)
    assert entropy.block_error(runs, 20) == pytest.approx(1 / math.sqrt(100), rel=0.4)


def test_cluster_estimate_approaches_fibre_value_from_above():
    """Giulini's data-only estimator: clusters of CG frames hold several fibres, so the within-cluster
    variance exceeds the fibre variance and falls toward it as the clusters shrink."""
    toy = GaussianToy(precision=_precision(), mean=MEAN, **SLICE)
    x = toy.reference(2000, seed=5)
    X = toy.mapping.project(x)
    u = toy.energy(x) / kT(T)
    feats = X.reshape(len(X), -1)  # the toy has no rotational symmetry: positions are features
    coarse = entropy.cluster_energy_fluctuation(u, feats, 4)["value"]
    fine = entropy.cluster_energy_fluctuation(u, feats, 60)["value"]
    d = 3 * len(toy.free)
    assert coarse > fine > d / 4 * 0.9
    assert fine < coarse - 0.3


# ---------------------------------------------------------------------------- the command
def _parse(argv):
    p = argparse.ArgumentParser()
    entropy.add_arguments(p)
    return p.parse_args(argv)


def test_command_on_tiny_model(tiny_ala2, tmp_path):
    from openmm_backmap.io.backmap_model import load_model

    paths = tiny_ala2["paths"]
    out = tmp_path / "entropy.json"
    args = _parse(
        [
            "--model",
            str(tiny_ala2["model"]),
            str(tiny_ala2["model"]),
            "--reference",
            str(paths["dcd"]),
            "--topology",
            str(paths["pdb"]),
            "--samples",
            "4",
            "--frames",
            "24",
            "--blocks",
            "4",
            "--out",
            str(out),
        ]
    )
    assert entropy.run(args) == 0
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 2
    # the same model twice, same seed: identical samples, so the paired difference is exactly zero
    (diff,) = doc["differences"]
    assert diff["energy_route"]["value"] == 0.0 and diff["cross_entropy"]["value"] == 0.0
    r = doc["results"][0]
    assert r["n_frames"] == 24 and r["samples_per_frame"] == 4
    assert r["mapping"]["beads"] == 6 and r["mapping"]["removed_atoms"] == 16
    assert set(r["energy_route_by_k"]) == {"1", "2", "4"}
    # bookkeeping: the cross-entropy is the mean -log q of the frames used, recomputed here
    model = load_model(tiny_ala2["model"], device="cpu")
    traj = tiny_ala2["traj"]
    idx = np.unique(np.linspace(0, traj.n_frames - 1, 24).round().astype(int))
    x = traj.xyz[idx]
    ce = -np.mean(model.log_prob(x, model.mapping.project(x.astype(np.float64))))
    assert r["cross_entropy"]["value"] == pytest.approx(float(ce), rel=1e-5, abs=1e-4)
    assert r["per_removed_atom"]["cross_entropy"]["value"] == pytest.approx(r["cross_entropy"]["value"] / 16)
    # 12 X-H constraints, none between beads: the fibre volume uses 4 free atoms in the box and 12 spheres
    vol = r["fibre_log_volume"]
    assert vol["constrained_free_atoms"] == 12 and vol["value"] is not None
    assert 0.0 <= r["conditional_ess"]["value"] <= 1.0
    assert out.with_suffix(".png").stat().st_size > 1000
    rows = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| model | 6 |")]
    assert len(rows) == 2


def test_command_refuses_bad_input(tiny_ala2, tmp_path):
    import openmm

    paths = tiny_ala2["paths"]
    base = ["--model", str(tiny_ala2["model"]), "--samples", "4", "--frames", "8", "--out", str(tmp_path / "e.json")]
    # a reference of another molecule
    other = tiny_ala2["traj"].atom_slice(range(10))
    other[0].save_pdb(str(tmp_path / "other.pdb"))
    other.save_dcd(str(tmp_path / "other.dcd"))
    with pytest.raises(ValueError, match="another molecule"):
        entropy.run(
            _parse(base + ["--reference", str(tmp_path / "other.dcd"), "--topology", str(tmp_path / "other.pdb")])
        )
    # a restrained run as the reference
    shutil.copy(paths["dcd"], tmp_path / "restrained.dcd")
    restraint = {"restraint": {"basin": "alpha_R", "atoms": [4, 6, 8, 14, 16]}}
    (tmp_path / "restrained.json").write_text(json.dumps(restraint))
    with pytest.raises(ValueError, match="alpha_R restraint"):
        entropy.run(_parse(base + ["--reference", str(tmp_path / "restrained.dcd"), "--topology", str(paths["pdb"])]))
    ref = ["--reference", str(paths["dcd"]), "--topology", str(paths["pdb"])]
    # an AA System without the model's constraints, and one of another size
    system = openmm.XmlSerializer.deserialize(tiny_ala2["system_xml"])
    while system.getNumConstraints():
        system.removeConstraint(0)
    (tmp_path / "flexible.xml").write_text(openmm.XmlSerializer.serialize(system))
    with pytest.raises(ValueError, match="constraints differ"):
        entropy.run(_parse(base + ref + ["--aa-system", str(tmp_path / "flexible.xml")]))
    system.addParticle(1.0)
    (tmp_path / "bigger.xml").write_text(openmm.XmlSerializer.serialize(system))
    with pytest.raises(ValueError, match="23 particles"):
        entropy.run(_parse(base + ref + ["--aa-system", str(tmp_path / "bigger.xml")]))
    # K < 2
    with pytest.raises(ValueError, match=">= 2"):
        entropy.run(_parse(base[:2] + ["--samples", "1", "--out", str(tmp_path / "e.json")] + ref))


# ---------------------------------------------------------------------------- a trained model (slow)
@pytest.mark.slow
def test_bracket_on_trained_ala2_model(tmp_path):
    """H_IS(K) <= H <= CE on a trained backmapper, and the two agree within errors when the
    conditional ESS is at least 0.5. The model is OPENMM_BACKMAP_ENTROPY_MODEL (a six-bead ALA2
    model file), else the backmapper of OPENMM_BACKMAP_DEMO (an `openmm-backmap demo` output
    directory), else the full demo run here (about 11 minutes). The reference is
    OPENMM_BACKMAP_ALA2_REFERENCE (a directory from `openmm-backmap reference ala2`, not the model's
    training run), else 5 ns generated here with a seed the demo does not use (a few minutes)."""
    from openmm_backmap.demo import run_demo
    from openmm_backmap.systems.reference import generate_reference

    model = os.environ.get("OPENMM_BACKMAP_ENTROPY_MODEL")
    if not model:
        demo = os.environ.get("OPENMM_BACKMAP_DEMO")
        if not demo:
            demo = tmp_path / "demo"
            assert run_demo(demo) == 0
        model = str(Path(demo) / "models" / "backmapper.pt")
    ref = os.environ.get("OPENMM_BACKMAP_ALA2_REFERENCE")
    if not ref:
        generate_reference("ala2", 5.0, tmp_path / "reference", seed=7, progress=False)
        ref = str(tmp_path / "reference")
    ref_dir = Path(ref.split(os.pathsep)[0])
    r = entropy.mapping_entropy(model, ref_dir / "ala2.dcd", topology=ref_dir / "ala2.pdb", samples=64, frames=1000)
    gap = r["gap"]
    assert gap["value"] > -2 * gap["error"], gap  # the energy route stays below the cross-entropy
    by_k = r["energy_route_by_k"]
    assert by_k["1"]["value"] < by_k["64"]["value"]
    if r["conditional_ess"]["value"] >= 0.5:
        # two estimates of one number, each with its error
        assert gap["value"] < 2 * math.hypot(r["cross_entropy"]["error"], r["energy_route"]["error"]), r


def test_report_for_the_demo(tiny_ala2, tmp_path):
    """The demo's entry point: one model, a trajectory in memory, entropy.json and a summary line."""
    result, line = entropy.report_mapping_entropy(tiny_ala2["model"], tiny_ala2["traj"], tmp_path, frames=8, samples=4)
    doc = json.loads((tmp_path / "entropy.json").read_text())
    assert doc["cross_entropy"]["value"] == pytest.approx(result["cross_entropy"]["value"])
    assert "per_frame" not in doc and doc["n_frames"] == 8
    assert line.startswith("H(x|X) in [") and "conditional ESS" in line
