"""Data-free joint training: reverse-KL gradient, adaptive tempering, the paper's 2-D toys, and the
joint model's export (backmapper + CG potential) into the formats the rest of the package runs."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from openmm_backmap.flows.distributions import MixedBase
from openmm_backmap.flows.transforms import CouplingFlow
from openmm_backmap.training.joint import (
    ReverseKLSettings,
    TemperingSchedule,
    check_budget,
    reverse_kl_loss,
    tempered_ess,
    train_reverse_kl,
)
from openmm_backmap.units import kT

T = 300.0
KT = kT(T)


class ToyJoint(nn.Module):
    """q(x1) q(x2 | x1) on the plane: a slow 1-D flow and a fast 1-D flow conditioned on x1, the
    toy counterpart of the CG flow and the backmapper (package flows, standard normal bases)."""

    def __init__(self, shift=(0.0, 0.0), scale=(1.5, 1.5), layers=4, hidden=32, bins=12, seed=0):
        super().__init__()
        line = torch.zeros(1, dtype=torch.bool)
        self.slow = CouplingFlow(line, 0, layers, bins, hidden, 2, seed=seed)
        self.fast = CouplingFlow(line, 1, layers, bins, hidden, 2, seed=seed + 1)
        self.base = MixedBase(line)
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.get_default_dtype()))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.get_default_dtype()))

    def sample(self, n):
        dtype = self.shift.dtype
        u1, u2 = torch.randn(n, 1, dtype=dtype), torch.randn(n, 1, dtype=dtype)
        z1, l1 = self.slow.inverse(u1, torch.zeros(n, 0, dtype=dtype))
        z2, l2 = self.fast.inverse(u2, z1)
        x = torch.cat([z1, z2], dim=-1) * self.scale + self.shift
        log_q = self.base.log_prob(u1) + self.base.log_prob(u2) - l1 - l2 - torch.log(self.scale).sum()
        return x, log_q


def double_well(x):
    """U (kJ/mol) of the tilted double well u = 4 (x1^2 - 1)^2 - 0.6 x1 + x2^2 / 2 (kT at 300 K)."""
    x1, x2 = x[:, 0], x[:, 1]
    return KT * (4.0 * (x1 * x1 - 1.0) ** 2 - 0.6 * x1 + 0.5 * x2 * x2)


GMM_MEANS = np.array([[-2.0, -1.0], [0.0, 2.0], [2.5, -0.5]])
GMM_WEIGHTS = np.array([0.55, 0.3, 0.15])
GMM_SIGMA = 0.4


def gmm(x):
    """U (kJ/mol) = -kT log of the three-component Gaussian mixture (isotropic, sigma 0.4)."""
    m = torch.as_tensor(GMM_MEANS, dtype=x.dtype)
    w = torch.as_tensor(GMM_WEIGHTS, dtype=x.dtype)
    d2 = ((x[:, None, :] - m[None]) ** 2).sum(-1)
    logp = torch.logsumexp(torch.log(w) - d2 / (2 * GMM_SIGMA**2) - math.log(2 * math.pi * GMM_SIGMA**2), dim=1)
    return -KT * logp


def gmm_mode(x):
    """Index of the nearest mixture mean (the modes partition the plane)."""
    return np.argmin(((x[:, None, :] - GMM_MEANS[None]) ** 2).sum(-1), axis=1)


# ----------------------------------------------------------------------------- gradient
def test_reverse_kl_gradient_matches_finite_differences():
    """The reparameterised gradient of the reverse-KL estimate (fixed noise) equals central finite
    differences of the same estimate, for parameters of both the slow and the fast flow."""
    torch.manual_seed(3)
    model = ToyJoint(layers=2, hidden=8, bins=4).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))

    def loss():
        torch.manual_seed(11)
        x, log_q = model.sample(64)
        return reverse_kl_loss(double_well(x) / KT, log_q)

    model.zero_grad()
    loss().backward()
    picks = [
        (model.slow.layers[0].net.net[-1].bias, 3),
        (model.slow.layers[1].net.net[0].weight, (2, 0)),
        (model.fast.layers[0].net.net[-1].weight, (5, 1)),
        (model.fast.layers[1].net.net[0].bias, 4),
    ]
    h = 1e-6
    for p, idx in picks:
        with torch.no_grad():
            p[idx] += h
            up = float(loss())
            p[idx] -= 2 * h
            down = float(loss())
            p[idx] += h
        fd = (up - down) / (2 * h)
        assert float(p.grad[idx]) == pytest.approx(fd, rel=1e-5, abs=1e-8)
        assert abs(fd) > 1e-6  # a parameter that matters


def test_reverse_kl_loss_caps_and_drops():
    """Above the cap the reduced energy grows as cap + log(1 + u - cap) (a NaN energy counts as cap +
    50 before the cap); without a cap, samples with a non-finite energy or log q drop out."""
    u = torch.tensor([1.0, 10.0, 1e6, float("nan")], dtype=torch.float64)
    lq = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert float(reverse_kl_loss(u, lq, cap=5.0)) == pytest.approx(
        (1.0 + 5.0 + math.log(6.0) + 5.0 + math.log1p(1e6 - 5.0) + 5.0 + math.log(51.0)) / 4
    )
    lq = torch.tensor([0.0, 0.0, float("-inf"), 0.0])
    u = torch.tensor([1.0, 2.0, 3.0, float("inf")])
    assert float(reverse_kl_loss(u, lq)) == pytest.approx(1.5)


# ----------------------------------------------------------------------------- tempering
def test_tempered_ess_of_exact_samples_and_gaussian_closed_form():
    """ESS/N is 1 for exact samples of the tempered target, and follows the Gaussian closed form
    sigma_q^2 ... for samples of a Gaussian at another temperature."""
    rng = np.random.default_rng(0)
    k = 50.0  # kJ/mol/nm^2
    x = rng.normal(0.0, math.sqrt(kT(600.0) / k), 400000)
    u = 0.5 * k * x * x
    log_q = -u / kT(600.0)  # unnormalised: ESS ignores constants
    assert tempered_ess(u, log_q, 600.0) == pytest.approx(1.0)
    # q = N(0, s_q^2), p = N(0, s_p^2): ESS/N = (E w)^2 / E w^2 = sqrt(2 s_q^2 - s_p^2) s_p / s_q^2
    sq2, sp2 = kT(600.0) / k, kT(T) / k
    exact = math.sqrt(2 * sq2 - sp2) * math.sqrt(sp2) / sq2
    assert tempered_ess(u, log_q, T) == pytest.approx(exact, rel=0.01)


def test_schedule_is_monotone_and_stops_at_the_target():
    """Checks on changing sample sets: T never rises, never passes the target, a passing check
    cools to the lowest T' that keeps ESS/N >= ess_drop x ESS/N(T) (or by max_cooling), a failing
    one keeps T until ``patience`` failures force a stage; at the target T stays."""
    rng = np.random.default_rng(1)
    sched = TemperingSchedule(t_start=1000.0, t_target=300.0, ess_threshold=0.3, max_cooling=0.7, patience=3)
    k = 50.0
    temps, T, failures = [1000.0], 1000.0, 0
    forced = passed = 0
    for check in range(60):
        # samples of a Gaussian whose temperature lags behind (every fourth check a poor model)
        t_model = T * (1.0 if check % 4 else 3.0)
        x = rng.normal(0.0, math.sqrt(kT(t_model) / k), 4000)
        u = 0.5 * k * x * x
        log_q = -u / kT(t_model)
        T_new, rec = sched.next_temperature(T, u, log_q, failures)
        failures = rec["failures"]
        assert sched.t_target <= T_new <= T
        if rec["passed"]:
            passed += 1
            assert T_new >= 0.7 * T - 1e-9
            if T_new > max(0.7 * T, 300.0) + 1e-6:  # bisection: ESS at T' on the bound
                assert tempered_ess(u, log_q, T_new) == pytest.approx(0.5 * rec["ess"], rel=1e-3)
        elif rec["forced"]:
            forced += 1
            assert T_new == pytest.approx(max(300.0, 0.9 * T))
        else:
            assert T_new == T
        T = T_new
        temps.append(T)
    assert passed > 0
    assert np.all(np.diff(temps) <= 0)
    assert temps[-1] == 300.0
    # at the target the schedule stays there, whatever the samples say
    assert sched.next_temperature(300.0, u, log_q + 100 * rng.normal(size=u.size))[0] == 300.0


def test_schedule_refuses_unreachable_targets():
    with pytest.raises(ValueError, match="below the target"):
        TemperingSchedule(t_start=250.0, t_target=300.0)
    with pytest.raises(ValueError, match="cannot reach 300.0 K"):
        TemperingSchedule(t_start=3000.0, t_target=300.0, max_cooling=0.9, max_stages=5)
    with pytest.raises(ValueError, match="positive"):
        TemperingSchedule(t_start=300.0, t_target=0.0)
    with pytest.raises(ValueError, match="forced_cooling"):
        TemperingSchedule(t_start=600.0, t_target=300.0, max_cooling=0.95, forced_cooling=0.9)
    sched = TemperingSchedule(t_start=1200.0, t_target=300.0, max_cooling=0.5)
    assert sched.min_stages() == 2
    with pytest.raises(ValueError, match="cannot reach 300.0 K in 150 steps"):
        check_budget(sched, ReverseKLSettings(max_steps=150, check_every=50, final_steps=100))
    check_budget(sched, ReverseKLSettings(max_steps=200, check_every=50, final_steps=100))


# ----------------------------------------------------------------------------- toys
def _train_toy(energy, shift, scale, seed, steps=1500):
    torch.manual_seed(seed)
    model = ToyJoint(shift=shift, scale=scale, hidden=16, bins=8, seed=seed)
    sched = TemperingSchedule(t_start=3 * T, t_target=T, ess_threshold=0.5, max_cooling=0.8, patience=4)
    settings = ReverseKLSettings(
        max_steps=steps, final_steps=400, batch_size=128, eval_batch=1024, check_every=20, lr=5e-3, seed=seed
    )
    summary = train_reverse_kl(model, energy, sched, settings, log=None)
    temps = [h["T"] for h in summary["history"]] + [summary["final_T"]]
    assert summary["reached_target"], summary["final_T"]
    print("steps", summary["steps"], "seconds", round(summary["seconds"], 1))
    assert np.all(np.diff(temps) <= 0)
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        x, log_q = model.sample(40000)
        lw = (-energy(x) / KT - log_q).double().numpy()
    w = np.exp(lw - lw.max())
    return x.double().numpy(), w / w.sum(), summary


def test_double_well_both_modes_with_exact_weights():
    """Tilted 2-D double well: both wells sampled by the model, and the reweighted well
    populations within 0.1 kT (|log p - log p_exact| < 0.1) of numerical quadrature."""
    x, w, summary = _train_toy(double_well, (0.0, 0.0), (1.2, 1.0), seed=0)
    grid = np.linspace(-4, 4, 200001)
    p = np.exp(-(4.0 * (grid**2 - 1.0) ** 2 - 0.6 * grid))
    exact_right = p[grid > 0].sum() / p.sum()
    raw_right = np.mean(x[:, 0] > 0)
    assert 0.05 < raw_right < 0.95  # the model itself holds both wells
    right = w[x[:, 0] > 0].sum()
    for got, ref in ((right, exact_right), (1 - right, 1 - exact_right)):
        assert abs(math.log(got / ref)) < 0.1
    ess = 1.0 / np.sum(w * w) / len(w)
    assert ess > 0.3, f"ESS/N {ess:.3f}"


def test_gaussian_mixture_every_mode_with_exact_weights():
    """Three-component 2-D Gaussian mixture: every mode sampled, reweighted mode weights within 0.1
    kT of the exact ones (nearest-mean cells, exact weights from 2e6 exact samples)."""
    x, w, summary = _train_toy(gmm, (0.2, 0.2), (1.8, 1.6), seed=1)
    rng = np.random.default_rng(5)
    comp = rng.choice(3, size=2_000_000, p=GMM_WEIGHTS)
    exact_x = GMM_MEANS[comp] + GMM_SIGMA * rng.normal(size=(comp.size, 2))
    exact = np.bincount(gmm_mode(exact_x), minlength=3) / comp.size
    mode = gmm_mode(x)
    raw = np.bincount(mode, minlength=3) / len(mode)
    got = np.bincount(mode, weights=w, minlength=3)
    assert np.all(raw > 0.02), f"model mode fractions {raw}"
    assert np.all(np.abs(np.log(got / exact)) < 0.1), f"{got} vs {exact}"


# ----------------------------------------------------------------------------- ALA2: checks, export, compile
@pytest.fixture(scope="module")
def ala2_files(tmp_path_factory):
    """openmmtools' alanine dipeptide in vacuum as a PDB (one structure) and a System XML."""
    import openmm
    from openmm import app

    from openmm_backmap.systems.builtin import ala2_six_bead_mapping, builtin_system

    out = tmp_path_factory.mktemp("ala2_joint")
    top, system, pos = builtin_system("ala2")
    with open(out / "ala2.pdb", "w") as fh:
        app.PDBFile.writeFile(top, pos, fh)
    (out / "ala2_system.xml").write_text(openmm.XmlSerializer.serialize(system))
    import mdtraj as md

    ala2_six_bead_mapping(md.load(str(out / "ala2.pdb")).topology).to_json(out / "six_bead.json")
    return out


@pytest.fixture(scope="module")
def tiny_joint(ala2_files):
    """A small joint model trained for a few steps at the target temperature (plumbing, not quality)."""
    from openmm_backmap.training.joint import JointTraining, train_joint_from_files

    s = JointTraining(
        t_start=T,
        steps=4,
        final_steps=3,
        check_every=2,
        batch_size=16,
        eval_batch=64,
        layers=2,
        hidden=16,
        cg_layers=2,
        cg_hidden=16,
        n_final=512,
    )
    ckpt = ala2_files / "joint.ckpt"
    summary = train_joint_from_files(
        ala2_files / "ala2.pdb",
        ala2_files / "ala2_system.xml",
        str(ala2_files / "six_bead.json"),
        ckpt,
        s,
        log=lambda m: None,
    )
    return ckpt, summary


def test_train_joint_refuses_mismatched_system_and_bad_inputs(ala2_files, tmp_path):
    import openmm

    from openmm_backmap.cli import main
    from openmm_backmap.training.joint import JointTraining, train_joint_from_files

    system = openmm.XmlSerializer.deserialize((ala2_files / "ala2_system.xml").read_text())
    small = openmm.System()
    for _ in range(5):
        small.addParticle(12.0)
    (tmp_path / "small.xml").write_text(openmm.XmlSerializer.serialize(small))
    for i in range(system.getNumParticles()):
        system.setParticleMass(i, 20.0)
    (tmp_path / "heavy.xml").write_text(openmm.XmlSerializer.serialize(system))
    pdb, mapping = ala2_files / "ala2.pdb", str(ala2_files / "six_bead.json")
    with pytest.raises(ValueError, match="has 5 particles but the topology .* has 22 atoms"):
        train_joint_from_files(pdb, tmp_path / "small.xml", mapping, tmp_path / "j.ckpt", log=lambda m: None)
    with pytest.raises(ValueError, match="particle mass"):
        train_joint_from_files(pdb, tmp_path / "heavy.xml", mapping, tmp_path / "j.ckpt", log=lambda m: None)
    # backbone on alanine dipeptide: three beads; ca: one bead, too few for a CG flow
    with pytest.raises(ValueError, match="gives 1 bead"):
        train_joint_from_files(pdb, ala2_files / "ala2_system.xml", "ca", tmp_path / "j.ckpt", log=lambda m: None)
    # a PDB without real coordinates: the seed ensemble needs one structure
    lines = [
        ln[:30] + "   0.000   0.000   0.000" + ln[54:] if ln.startswith(("ATOM", "HETATM")) else ln
        for ln in pdb.read_text().splitlines()
    ]
    (tmp_path / "flat.pdb").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="needs one structure"):
        train_joint_from_files(
            tmp_path / "flat.pdb", ala2_files / "ala2_system.xml", mapping, tmp_path / "j.ckpt", log=lambda m: None
        )
    with pytest.raises(ValueError, match="below the target"):
        train_joint_from_files(
            pdb, ala2_files / "ala2_system.xml", mapping, tmp_path / "j.ckpt", JointTraining(t_start=200.0)
        )
    args = [
        "train-joint",
        "--topology",
        str(pdb),
        "--aa-system",
        str(tmp_path / "small.xml"),
        "--mapping",
        mapping,
        "--out",
        str(tmp_path / "j.ckpt"),
    ]
    assert main(args) == 2
    assert not (tmp_path / "j.ckpt").exists()


def test_joint_export_runs_like_any_backmapper_and_cg_potential(tiny_joint, ala2_files, tmp_path):
    """`export` of a joint checkpoint writes a backmapper and a CG potential: the backmapper loads
    with load_model and gives the joint model's log q(x | X); the CG potential's energy is
    -kT log q(X) (+ priors, zero on the model's own samples); it runs in an OpenMM CG System, and the
    hybrid sampler accepts the pair."""
    import openmm
    from openmm import unit

    from openmm_backmap.cli import main
    from openmm_backmap.io.backmap_model import load_model
    from openmm_backmap.io.checkpoints import load_joint_checkpoint
    from openmm_backmap.openmm.forces import create_cg_system

    ckpt, summary = tiny_joint
    assert summary["reached_target"]
    joint, saved = load_joint_checkpoint(ckpt)
    assert saved["spec"]["training"]["data_free"] is True
    bm_path = tmp_path / "bm.pt"
    assert main(["export", str(ckpt), "-o", str(bm_path)]) == 0
    cg_path = tmp_path / "bm_cg.pt"
    assert bm_path.is_file() and cg_path.is_file()

    torch.manual_seed(0)
    with torch.no_grad():
        x, X, log_qX, log_qx = joint.sample_parts(8)
    model = load_model(bm_path)
    lq = model.module.log_prob(x.float(), X.float())
    assert np.allclose(lq.numpy(), log_qx.numpy(), atol=1e-3)
    cg = torch.jit.load(str(cg_path))
    with torch.no_grad():
        e = cg.energy(X.float())
    assert np.allclose(e.numpy(), -joint.cg.kT * log_qX.numpy(), rtol=1e-5, atol=1e-3)
    assert float(cg.prior_energy(X.float()).detach().abs().max()) == 0.0

    system = create_cg_system(saved["spec"]["cg"]["masses"], str(cg_path), backend="python")
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(X[0].double().numpy())
    u = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert u == pytest.approx(float(e[0]), abs=1e-3)

    out = tmp_path / "hybrid"
    args = [
        "hybrid",
        "--model",
        str(bm_path),
        "--cg-model",
        str(cg_path),
        "--start",
        str(ala2_files / "ala2.pdb"),
        "--iterations",
        "2",
        "--langevin-steps",
        "5",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert any(out.iterdir())


def test_joint_cg_potential_compiles(tiny_joint, tmp_path):
    """The exported CG potential compiles (`compile`) into a force package with the same energy."""
    from _backmap_helpers import needs_compiler  # noqa: F401 - the marker's condition

    from openmm_backmap.cli import main
    from openmm_backmap.io.checkpoints import load_joint_checkpoint
    from openmm_backmap.openmm.compiled import load_compiled

    if needs_compiler.args[0]:
        pytest.skip("no C++ compiler")
    ckpt, _ = tiny_joint
    assert main(["export", str(ckpt), "-o", str(tmp_path / "bm.pt"), "--cg-output", str(tmp_path / "cg.pt")]) == 0
    assert main(["compile", str(tmp_path / "cg.pt"), "-o", str(tmp_path / "cg.pt2")]) == 0
    joint, _ = load_joint_checkpoint(ckpt)
    torch.manual_seed(1)
    with torch.no_grad():
        X, _ = joint.cg.sample(3)
    module = torch.jit.load(str(tmp_path / "cg.pt"))
    package = load_compiled(tmp_path / "cg.pt2")
    for frame in range(3):
        energy, _, _ = package(X[frame].double().numpy())
        assert energy == pytest.approx(float(module(X[frame].float())), abs=1e-3)


def test_trajectory_warm_start_by_maximum_likelihood(ala2_files, tmp_path):
    """With --trajectory the statistics come from the frames and maximum likelihood runs first through
    the shared loop (plumbing: the frames here are a seed ensemble, which the fitted standardisation
    already describes, so the starting parameters may stay the best)."""
    import mdtraj as md

    from openmm_backmap.training.joint import JointTraining, seed_ensemble, train_joint_from_files

    pdb = md.load(str(ala2_files / "ala2.pdb"))
    frames = seed_ensemble(pdb.topology, pdb.xyz[0], n=400, seed=2)
    md.Trajectory(frames.astype(np.float32), pdb.topology).save_dcd(str(tmp_path / "frames.dcd"))
    s = JointTraining(
        t_start=T,
        steps=2,
        final_steps=1,
        check_every=1,
        batch_size=64,
        eval_batch=32,
        layers=2,
        hidden=16,
        cg_layers=2,
        cg_hidden=16,
        n_final=64,
        ml_epochs=3,
    )
    ckpt = tmp_path / "warm.ckpt"
    train_joint_from_files(
        ala2_files / "ala2.pdb",
        ala2_files / "ala2_system.xml",
        str(ala2_files / "six_bead.json"),
        ckpt,
        s,
        trajectory=str(tmp_path / "frames.dcd"),
        log=lambda m: None,
    )
    from openmm_backmap.io.checkpoints import read_checkpoint

    spec = read_checkpoint(ckpt)["spec"]
    assert spec["training"]["data_free"] is False
    ml = spec["training"]["ml"]
    assert ml["epochs"] == 3 and ml["n_train"] == 360 and math.isfinite(ml["best_val_nll"])
    assert spec["training"]["reverse_kl"]["reached_target"]


# ----------------------------------------------------------------------------- model selection at the target
@pytest.mark.parametrize("select_batch", [0, 2048])
def test_the_model_keeps_the_selected_state_at_the_target(select_batch):
    """At the target the model ends with the parameters of the check with the lowest reverse-KL
    estimate (select_batch 0) or the highest ESS/N of select_batch fresh samples, recorded per check."""
    torch.manual_seed(0)
    model = ToyJoint(shift=(0.0, 0.0), scale=(1.2, 1.0), hidden=8, bins=6, layers=2, seed=0)
    states = {}

    def keep(rec, m):
        states[rec["step"]] = {k: v.clone() for k, v in m.state_dict().items()}

    settings = ReverseKLSettings(
        max_steps=60, final_steps=60, batch_size=64, eval_batch=256, check_every=10, lr=5e-3, select_batch=select_batch
    )
    sched = TemperingSchedule(t_start=T, t_target=T)
    summary = train_reverse_kl(model, double_well, sched, settings, on_check=keep, log=None)
    hist = summary["history"]
    assert len(hist) == 6 and all(h["T"] == T for h in hist)
    if select_batch:
        scores = [h["ess_select"] for h in hist]
        assert all(0.0 < e <= 1.0 for e in scores)
        assert len(set(scores)) > 1  # the checks differ, so the choice is not trivial
        best = hist[int(np.argmax(scores))]
        assert summary["best_ess"] == max(scores)
    else:
        assert all("ess_select" not in h for h in hist) and math.isnan(summary["best_ess"])
        best = hist[int(np.argmin([h["kl_target"] for h in hist]))]
    assert summary["best_step"] == best["step"] and summary["best_kl"] == best["kl_target"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, states[best["step"]][k]), k
    with pytest.raises(ValueError, match="select_batch must be 0"):
        check_budget(sched, ReverseKLSettings(max_steps=60, final_steps=60, select_batch=-1))


# ----------------------------------------------------------------------------- stages at the target
def _conditional_kl(model, energy, X, seed=5):
    """Reverse KL estimate E_X E_{x ~ q(.|X)} [beta U + log q(x | X)] on fixed CG frames X."""
    torch.manual_seed(seed)
    with torch.no_grad():
        x, lq = model.bm.sample(X, 8)
        return float(torch.mean(energy(x) / KT + lq))


def test_refinement_at_the_target_lowers_the_conditional_reverse_kl(tiny_joint):
    """refine_at_target trains the backmapper alone (the CG flow is untouched) and lowers the reverse
    KL of q(x | X) against exp(-beta U) on CG frames it did not train on."""
    from openmm_backmap.io.checkpoints import load_joint_checkpoint
    from openmm_backmap.openmm.energies import aa_energy
    from openmm_backmap.training.joint import JointTraining, refine_at_target

    ckpt, _ = tiny_joint
    model, saved = load_joint_checkpoint(ckpt)
    energy = aa_energy(saved["spec"]["backmapper"]["system_xml"])
    torch.manual_seed(11)
    with torch.no_grad():
        X = model.cg.sample(128)[0].to(model.dtype)
    cg_before = {k: v.clone() for k, v in model.cg.state_dict().items()}
    before = _conditional_kl(model, energy, X)
    s = JointTraining(refine_steps=150, refine_frames=512, refine_lr=2e-3, seed=3)
    out = refine_at_target(model, saved["spec"], energy, s, log=lambda m: None)
    after = _conditional_kl(model, energy, X)
    assert out["steps"] == 150
    assert after < before - 1.0, (before, after)
    assert all(torch.equal(cg_before[k], v) for k, v in model.cg.state_dict().items())


def test_refinement_frames_from_the_widened_flow(tiny_joint, monkeypatch):
    """refine_tau > 1: the refinement trains on frames of the widened flow (angles and dihedrals
    widened, so on average less probable under the flow, with wider bond angles) and selects its
    state on frames of the flow itself; tau < 1 is refused."""
    import openmm_backmap.training.backmapper as backmapper
    from openmm_backmap.io.checkpoints import load_joint_checkpoint
    from openmm_backmap.training.joint import JointTraining, refine_at_target

    ckpt, _ = tiny_joint
    model, saved = load_joint_checkpoint(ckpt)
    seen = {}

    def angle_spread(X: np.ndarray) -> float:  # std of the C1-N-CA bond angle (beads 0, 1, 2 are bonded)
        a, b = X[:, 0] - X[:, 1], X[:, 2] - X[:, 1]
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        return float(np.std(np.arccos(np.clip(cos, -1.0, 1.0))))

    def capture(bm, spec, energy, frames, temperature, **kw):
        seen["train"], seen["val"] = frames, kw["val_frames"]
        return {"steps": 0}

    monkeypatch.setattr(backmapper, "refine_energy", capture)
    torch.manual_seed(2)
    with torch.no_grad():
        own = model.cg.sample(2048)[0].to(model.dtype)
        own_lq = model.cg.log_prob(own)
    for tau in (1.0, 1.5):
        refine_at_target(model, saved["spec"], None, JointTraining(refine_frames=2048, refine_tau=tau), lambda m: None)
        with torch.no_grad():
            lq_train = model.cg.log_prob(torch.as_tensor(seen["train"])).mean().item()
            lq_val = model.cg.log_prob(torch.as_tensor(seen["val"])).mean().item()
        assert seen["train"].shape == (2048, 6, 3) and seen["val"].shape == (256, 6, 3)
        assert abs(lq_val - own_lq.mean().item()) < 1.0
        if tau == 1.0:
            assert abs(lq_train - own_lq.mean().item()) < 0.5
            spread_own = angle_spread(seen["train"])
        else:
            assert lq_train < own_lq.mean().item() - 1.0
            assert angle_spread(seen["train"]) > 1.2 * spread_own
    with pytest.raises(ValueError, match="refine_tau must be >= 1"):
        JointTraining(refine_tau=0.5)


def test_train_joint_runs_the_stages_at_the_target_and_records_them(ala2_files, tmp_path):
    """--refine-steps and --cycles (annealed): the checkpoint records the refinement and one record per
    cycle evaluation (ESS/N of the draws and of the pairs, the annealing, the refit's tempering), and
    exports as before."""
    from openmm_backmap.cli import main
    from openmm_backmap.io.checkpoints import read_checkpoint

    ckpt = tmp_path / "staged.ckpt"
    argv = ["train-joint", "--topology", str(ala2_files / "ala2.pdb"), "--aa-system"]
    argv += [str(ala2_files / "ala2_system.xml"), "--mapping", str(ala2_files / "six_bead.json")]
    argv += ["--out", str(ckpt), "--t-start", str(T), "--steps", "4", "--final-steps", "2", "--check-every", "2"]
    argv += ["--batch-size", "16", "--eval-batch", "32", "--layers", "2", "--hidden", "16", "--cg-layers", "2"]
    argv += ["--cg-hidden", "16", "--refine-steps", "5", "--refine-frames", "64", "--refine-tau", "1.5"]
    argv += ["--cycles", "2", "--cycle-anneal-levels", "2"]
    argv += ["--cycle-samples", "200", "--cycle-per-frame", "2", "--cycle-refine-steps", "3", "--threads", "1"]
    assert main(argv) == 0
    training = read_checkpoint(ckpt)["spec"]["training"]
    rkl = training["reverse_kl"]
    assert rkl["refine"]["steps"] == 5 and training["settings"]["refine_tau"] == 1.5
    assert [c["cycle"] for c in rkl["cycles"]] == [0, 1, 2]
    assert all(0.0 < c["ess_fraction"] <= 1.0 and 0.0 < c["pair_ess_fraction"] <= 1.0 for c in rkl["cycles"])
    assert all(0.0 < c["lambda"] <= 1.0 for c in rkl["cycles"][:2]) and "lambda" not in rkl["cycles"][2]
    assert [c.get("refine_steps") for c in rkl["cycles"]] == [3, 3, None]  # the backmapper, each refit
    # annealed pairs: each its own sample, with the plain weights' ESS/N beside the AIS one
    assert all(c["anneal"]["levels"] == 2 and c["n"] == 400 for c in rkl["cycles"])
    assert all(0.0 < c["plain_ess_fraction"] <= 1.0 for c in rkl["cycles"])
    assert main(["export", str(ckpt), "-o", str(tmp_path / "bm.pt")]) == 0
    assert (tmp_path / "bm_cg.pt").is_file()
    with pytest.raises(SystemExit):
        main(argv[:-8] + ["--cycles", "-1"])
    from openmm_backmap.training.joint import JointTraining

    with pytest.raises(ValueError, match="cycle_per_frame must be >= 1"):
        JointTraining(cycle_per_frame=0)


# ----------------------------------------------------------------------------- annealing in internal coordinates
def test_joint_coordinates_map_densities_exactly(tiny_joint):
    """JointCoordinates z <-> x: the round trip keeps log q, every constrained bond keeps the System's
    length, and log q(x(z)) + log |det dx/dz| is exactly the flows' density of z (base density and
    coupling layers of both flows), i.e. the map's log-determinant is the one the models use."""
    from openmm_backmap.io.checkpoints import load_joint_checkpoint
    from openmm_backmap.models.joint import JointCoordinates
    from openmm_backmap.openmm.energies import constraints_from_system, load_system

    ckpt, _ = tiny_joint
    model, saved = load_joint_checkpoint(ckpt)
    model = model.double().eval()
    coords = JointCoordinates(model.cg, model.bm)
    torch.manual_seed(6)
    with torch.no_grad():
        x, log_q = model.sample(64)
        z = coords.to_internal(x)
        x2, ladj = coords.from_internal(z)
        torch.testing.assert_close(model.log_prob(x2), log_q, atol=1e-8, rtol=0)
        for i, j, d in constraints_from_system(load_system(saved["spec"]["backmapper"]["system_xml"])):
            assert torch.allclose(torch.linalg.norm(x2[:, i] - x2[:, j], dim=-1), torch.tensor(d, dtype=x2.dtype))
        n = coords.n_cg_dim
        u_cg, ladj_cg = model.cg.flow(z[:, :n], torch.zeros(64, 0, dtype=z.dtype))
        X = model.bm.project(x2)
        context = model.bm._context(X, x2, torch.zeros(64, dtype=z.dtype))
        u_bm, ladj_bm = model.bm.flow(z[:, n:], context)
        log_qz = model.cg.base.log_prob(u_cg) + ladj_cg + model.bm.base.log_prob(u_bm) + ladj_bm
        torch.testing.assert_close(model.log_prob(x2) + ladj, log_qz, atol=1e-8, rtol=0)


def test_joint_coordinates_refuse_a_backmapper_without_the_map(tiny_joint):
    """A backmapper exported before the internal-coordinate map existed (no ``from_internal``) is
    refused with what to do, not failed on deep inside the annealing."""
    from openmm_backmap.io.checkpoints import load_joint_checkpoint
    from openmm_backmap.models.joint import JointCoordinates

    model, _ = load_joint_checkpoint(tiny_joint[0])

    class OldExport:
        M = model.bm.M

    with pytest.raises(ValueError, match="export it again"):
        JointCoordinates(model.cg, OldExport())


def test_annealing_in_joint_coordinates_keeps_the_model_density(tiny_joint):
    """HMC on the joint model's internal coordinates with the model itself as both ends leaves it
    invariant: weights all 1, the draws moved, and the distribution of the map's log |det dx/dz|
    (a function of every bond length and angle) over the moved draws is that of fresh draws
    (Kolmogorov-Smirnov; p = 0.2-0.3 over two seeds, where moves that leave the determinant out
    give p = 1e-6 to 1e-16)."""
    from scipy import stats

    from openmm_backmap.io.checkpoints import load_joint_checkpoint
    from openmm_backmap.models.joint import JointCoordinates
    from openmm_backmap.sampling.annealing import AnnealSettings, annealed_importance

    ckpt, _ = tiny_joint
    model, _ = load_joint_checkpoint(ckpt)
    model = model.double().eval()
    torch.manual_seed(8)
    with torch.no_grad():
        x0, _ = model.sample(1500)
        fresh, _ = model.sample(1500)
    settings = AnnealSettings(levels=10, leapfrog=8, step=0.3)
    coords = JointCoordinates(model.cg, model.bm)
    x, log_w, info = annealed_importance(x0, model.log_prob, model.log_prob, settings, coordinates=coords)
    assert torch.all(log_w == 0)
    assert 0.5 < info["acceptance"][0] < 0.99
    with torch.no_grad():
        assert float(torch.mean(torch.abs(model.log_prob(x0) - model.log_prob(x)))) > 0.5
        ladj_moved = coords.from_internal(coords.to_internal(x))[1].numpy()
        ladj_fresh = coords.from_internal(coords.to_internal(fresh))[1].numpy()
    assert stats.ks_2samp(ladj_moved, ladj_fresh).pvalue > 1e-3
