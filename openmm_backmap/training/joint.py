"""Data-free training of a joint model q(X) q(x | X) by reverse KL against exp(-beta U_AA).

The model (:class:`~openmm_backmap.models.joint.JointModel`: a CG flow and a conditional backmapper)
is trained on the all-atom energy alone. Each step draws a batch from the model and minimises the
reverse Kullback-Leibler divergence to the tempered Boltzmann density exp(-U / kT_k),

    KL(q || p_k) = E_q[U(x) / kT_k + log q(x)] + log Z_k,

whose reparameterised gradient flows through the samples into both flows. Guard rails:

* **energy cap** (log-linear): reduced energies above ``energy_cap_kT`` (measured from the energy of
  the starting structure) grow as ``cap + log(1 + u - cap)`` (:func:`~openmm_backmap.training.backmapper.soft_clip`),
  so clashing samples still push back without blowing up a step; non-finite samples are dropped;
* **gradient clipping** of the parameter-gradient norm;
* the CG flow's **priors** (walls on CG bonds, angles, non-bonded pairs) are fitted on the model's
  own samples at the end, so the exported CG potential keeps the sampled range.

**Adaptive tempering** (:class:`TemperingSchedule`). Training starts hot (``t_start``). Every
``check_every`` steps a fresh evaluation batch gives the Kish ESS/N of the importance weights
exp(-U / kT_k - log q) for the current temperature T_k. When ESS/N >= ``ess_threshold`` the model
is ready: the next temperature is the lowest T' in [max(T_target, max_cooling T_k), T_k] at which
the same samples, reweighted to exp(-U / kT'), keep ESS/N >= ``ess_drop`` x ESS/N(T_k) (bisection
in log T). If ``patience`` checks in a row fail the criterion, T is lowered by ``forced_cooling``
(recorded as forced in the history). The temperature never rises; training stops after
``final_steps`` steps at the target temperature (with the learning rate decayed on a cosine).

Statistics without data: the internal-coordinate standardisation of both flows is fitted on a
*seed ensemble* (:func:`seed_ensemble`) built from the one structure of the topology file: its
bond lengths, angles and narrow torsions jittered, its rotatable torsions (about a bond with an sp3
end, four bonded neighbours) drawn uniformly. No trajectory is used unless one is given to warm-start
by maximum likelihood.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from openmm_backmap.analysis.reweighting import kish_ess
from openmm_backmap.geometry import InternalCoordinates, bond_graph, build_zmatrix
from openmm_backmap.training.backmapper import soft_clip
from openmm_backmap.units import kT

__all__ = [
    "JointTraining",
    "annealed_draws",
    "ReverseKLSettings",
    "TemperingSchedule",
    "reverse_kl_loss",
    "rotor_rows",
    "seed_ensemble",
    "tempered_ess",
    "check_budget",
    "train_joint_from_files",
    "train_reverse_kl",
]


# ----------------------------------------------------------------------------- tempering
def tempered_ess(u_kjmol: np.ndarray, log_q: np.ndarray, temperature: float) -> float:
    """Kish ESS / N of the weights exp(-U / kT - log q) of samples with energies U (kJ/mol) and model
    log densities log q (nats) for the Boltzmann density at ``temperature`` (K)."""
    u = np.asarray(u_kjmol, dtype=np.float64)
    lw = -u / kT(temperature) - np.asarray(log_q, dtype=np.float64)
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    return kish_ess(lw) / max(lw.size, 1)


@dataclass(frozen=True)
class TemperingSchedule:
    """Adaptive tempering from ``t_start`` down to ``t_target`` (kelvin), driven by ESS/N.

    Attributes
    ----------
    t_start, t_target
        First and last temperature (K); ``t_start >= t_target > 0``.
    ess_threshold
        ESS/N of the current tempered target at or above which the model is ready to cool.
    ess_drop
        The next temperature keeps ESS/N >= ``ess_drop`` x the current ESS/N on the same samples.
    max_cooling
        Largest cooling per stage: T' >= ``max_cooling`` x T (0 < max_cooling < 1).
    patience
        Checks in a row below ``ess_threshold`` after which T is lowered by ``forced_cooling``.
    forced_cooling
        The factor of a forced stage (``max_cooling <= forced_cooling < 1``).
    max_stages
        Most stages allowed; a schedule that cannot reach the target in them is refused.

    Raises
    ------
    ValueError
        Temperatures or factors out of range, or a target that ``max_stages`` stages of at most
        ``max_cooling`` cannot reach (the message gives the lowest reachable temperature).
    """

    t_start: float
    t_target: float
    ess_threshold: float = 0.2
    ess_drop: float = 0.5
    max_cooling: float = 0.7
    patience: int = 10
    forced_cooling: float = 0.9
    max_stages: int = 200

    def __post_init__(self) -> None:
        if not (math.isfinite(self.t_target) and self.t_target > 0):
            raise ValueError(f"the target temperature must be a positive number of kelvin, got {self.t_target}")
        if not math.isfinite(self.t_start) or self.t_start < self.t_target:
            raise ValueError(
                f"the tempering schedule starts at {self.t_start} K, below the target {self.t_target} K: "
                "it only cools, so it cannot reach the target; start at or above it"
            )
        if not 0.0 < self.ess_threshold <= 1.0 or not 0.0 < self.ess_drop <= 1.0:
            raise ValueError(
                f"ess_threshold and ess_drop must lie in (0, 1], got {self.ess_threshold}, {self.ess_drop}"
            )
        if not 0.0 < self.max_cooling < 1.0 or not self.max_cooling <= self.forced_cooling < 1.0:
            raise ValueError(
                f"need 0 < max_cooling <= forced_cooling < 1, got {self.max_cooling} and {self.forced_cooling}"
            )
        if self.patience < 1 or self.max_stages < 0:
            raise ValueError(f"patience must be >= 1 and max_stages >= 0, got {self.patience}, {self.max_stages}")
        lowest = self.t_start * self.max_cooling**self.max_stages
        if lowest > self.t_target * (1.0 + 1e-12):
            raise ValueError(
                f"the tempering schedule cannot reach {self.t_target} K: {self.max_stages} stages of at most "
                f"a factor {self.max_cooling} from {self.t_start} K reach {lowest:.1f} K at best"
            )

    def min_stages(self) -> int:
        """Fewest stages from ``t_start`` to the target (every stage cooling by ``max_cooling``)."""
        if self.t_start <= self.t_target:
            return 0
        return math.ceil(math.log(self.t_target / self.t_start) / math.log(self.max_cooling) - 1e-12)

    def max_checks(self) -> int:
        """Most checks before the target is reached: every stage forced after ``patience`` checks."""
        if self.t_start <= self.t_target:
            return 0
        stages = math.ceil(math.log(self.t_target / self.t_start) / math.log(self.forced_cooling) - 1e-12)
        return stages * self.patience

    def next_temperature(
        self, temperature: float, u_kjmol: np.ndarray, log_q: np.ndarray, failures: int = 0
    ) -> tuple[float, dict[str, Any]]:
        """The temperature after a check at ``temperature`` on samples with energies ``u_kjmol``
        (kJ/mol) and model log densities ``log_q``; ``failures`` is the number of earlier checks in a
        row that did not pass. Returns (T', record) with ``ess`` (ESS/N at T), ``passed``,
        ``forced`` and ``failures`` (the updated count). T' <= T and T' >= the target always.
        """
        T = float(temperature)
        ess = tempered_ess(u_kjmol, log_q, T)
        rec: dict[str, Any] = {"ess": ess, "passed": False, "forced": False}
        if T <= self.t_target:
            rec["failures"] = 0
            return self.t_target, rec
        floor = max(self.t_target, self.max_cooling * T)
        if ess >= self.ess_threshold:
            rec["passed"] = True
            rec["failures"] = 0
            goal = self.ess_drop * ess
            if tempered_ess(u_kjmol, log_q, floor) >= goal:
                return floor, rec
            lo, hi = math.log(floor), math.log(T)  # ESS ok at hi, not at lo
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                if tempered_ess(u_kjmol, log_q, math.exp(mid)) >= goal:
                    hi = mid
                else:
                    lo = mid
            return max(self.t_target, min(T, math.exp(hi))), rec
        failures += 1
        if failures >= self.patience:
            rec["forced"] = True
            rec["failures"] = 0
            return max(self.t_target, self.forced_cooling * T), rec
        rec["failures"] = failures
        return T, rec


# ----------------------------------------------------------------------------- the loss
def reverse_kl_loss(u_reduced: Tensor, log_q: Tensor, cap: float | None = None) -> Tensor:
    """Monte-Carlo reverse KL (up to log Z): mean over samples of u + log q, with reduced energies u
    soft-clipped above ``cap`` (log-linear; a NaN or infinite energy then counts as a large finite
    one); samples whose u or log q is still non-finite are dropped."""
    if cap is not None:
        u_reduced = soft_clip(u_reduced, cap)
    ok = torch.isfinite(u_reduced) & torch.isfinite(log_q)
    if not bool(ok.any()):
        return torch.full((), math.nan, dtype=u_reduced.dtype)
    return torch.mean((u_reduced + log_q)[ok])


@dataclass(frozen=True)
class ReverseKLSettings:
    """Settings of :func:`train_reverse_kl`.

    Attributes
    ----------
    max_steps
        Most gradient steps (the schedule must be able to reach the target well within them).
    final_steps
        Steps at the target temperature before stopping (learning rate on a cosine to lr / 20).
    batch_size, eval_batch
        Samples per gradient step and per tempering check.
    check_every
        Gradient steps between tempering checks.
    lr, grad_clip
        Adam learning rate and the gradient-norm clip.
    energy_cap_kT
        Reduced energies above this many kT over the reference energy grow logarithmically.
    select_batch
        Which state at the target the model keeps: 0, the lowest reverse-KL estimate of the check's
        ``eval_batch`` samples; n > 0, the highest ESS/N at the target of n fresh samples drawn at each
        check at the target (the weights' heavy tail shows only in large batches; the reverse KL
        favours a model that has dropped a basin).
    seed
        Seeds torch's generator (the samples).
    time_limit
        Stop after this many seconds (reported: the target may then not have been reached).
    """

    max_steps: int = 20000
    final_steps: int = 1000
    batch_size: int = 256
    eval_batch: int = 1024
    check_every: int = 50
    lr: float = 5e-4
    grad_clip: float = 10.0
    energy_cap_kT: float = 100.0
    seed: int = 0
    time_limit: float | None = None
    select_batch: int = 0


def _target_ess(model, energy, n: int, chunk: int, u_ref: float, temperature: float) -> float:
    """ESS/N at ``temperature`` of ``n`` fresh samples of ``model``, drawn ``chunk`` at a time."""
    us, lqs = [], []
    with torch.no_grad():
        for k in range(0, n, chunk):
            xs, lq = model.sample(min(chunk, n - k))
            us.append((energy(xs) - u_ref).double().cpu().numpy())
            lqs.append(lq.double().cpu().numpy())
    return tempered_ess(np.concatenate(us), np.concatenate(lqs), temperature)


def check_budget(schedule: TemperingSchedule, settings: ReverseKLSettings) -> None:
    """Refuse a step budget in which ``schedule`` cannot reach its target: the fewest stages times
    ``check_every`` plus ``final_steps`` must fit in ``max_steps`` (ValueError with the numbers); and
    a negative ``select_batch``."""
    s = settings
    if s.select_batch < 0:
        raise ValueError(f"select_batch must be 0 (select by reverse KL) or a number of samples, got {s.select_batch}")
    needed = schedule.min_stages() * s.check_every + s.final_steps
    if needed > s.max_steps:
        raise ValueError(
            f"the tempering schedule cannot reach {schedule.t_target} K in {s.max_steps} steps: it needs at "
            f"least {schedule.min_stages()} stages of {s.check_every} steps plus {s.final_steps} final steps "
            f"({needed}); raise the step budget or lower the start temperature"
        )


def train_reverse_kl(
    model: torch.nn.Module,
    energy: Callable[[Tensor], Tensor],
    schedule: TemperingSchedule,
    settings: ReverseKLSettings = ReverseKLSettings(),
    u_ref: float = 0.0,
    on_check: Callable[[dict, torch.nn.Module], None] | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train ``model`` by reverse KL against exp(-U / kT) with the adaptive ``schedule``.

    Parameters
    ----------
    model
        Any module with ``sample(n) -> (samples, log_q)``, differentiable in its parameters.
    energy
        U(samples) in kJ/mol, (B,), differentiable w.r.t. the samples.
    schedule, settings
        :class:`TemperingSchedule`, :class:`ReverseKLSettings`.
    u_ref
        Reference energy (kJ/mol) the cap is measured from (e.g. the starting structure's).
    on_check
        Called after every tempering check with the check's record and the model (checkpoints).
    log
        Progress lines (None: silent).

    Returns
    -------
    dict
        ``history`` (one record per check: step, T, ess, kl, passed, forced, seconds),
        ``final_T``, ``reached_target``, ``steps``, ``seconds``, ``best_step``, ``best_kl`` and
        ``best_ess`` (the check at the target whose parameters the model holds at the end: the lowest
        reverse-KL estimate, or with ``settings.select_batch`` the highest ESS/N of that many samples,
        recorded per check as ``ess_select``; ``best_ess`` is NaN without it).

    Raises
    ------
    ValueError
        When ``max_steps`` cannot hold the fewest stages the schedule needs plus ``final_steps``.
    """
    s = settings
    check_budget(schedule, s)
    torch.manual_seed(s.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=s.lr)
    T = float(schedule.t_start)
    failures = 0
    at_target = 0
    history: list[dict] = []
    best: dict[str, Any] = {"score": -math.inf, "kl": math.inf, "ess": math.nan, "step": -1, "state": None}
    t0 = time.time()
    cpu0 = time.process_time()
    step = 0
    model.train()
    while step < s.max_steps:
        beta = 1.0 / kT(T)
        x, log_q = model.sample(s.batch_size)
        u = beta * (energy(x) - u_ref)
        loss = reverse_kl_loss(u, log_q, s.energy_cap_kT)
        opt.zero_grad()
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            opt.step()
        step += 1
        if T <= schedule.t_target:
            at_target += 1
            frac = min(at_target / max(s.final_steps, 1), 1.0)
            for g in opt.param_groups:
                g["lr"] = s.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac)))
        done = T <= schedule.t_target and at_target >= s.final_steps
        out_of_time = s.time_limit is not None and time.time() - t0 > s.time_limit
        if step % s.check_every == 0 or done or out_of_time or step == s.max_steps:
            model.eval()
            with torch.no_grad():
                xs, lq = model.sample(s.eval_batch)
                U = (energy(xs) - u_ref).double().cpu().numpy()
                lq = lq.double().cpu().numpy()
            model.train()
            finite = np.isfinite(U) & np.isfinite(lq)
            kl_target = float(np.mean(U[finite] / kT(schedule.t_target) + lq[finite])) if finite.any() else math.inf
            T_before = T
            T, rec = schedule.next_temperature(T, U, lq, failures)
            failures = rec.pop("failures")
            rec.update(
                step=step,
                T=T_before,
                T_next=T,
                kl=float(loss.detach()),
                kl_target=kl_target,
                ess_target=tempered_ess(U, lq, schedule.t_target),
                seconds=time.time() - t0,
                cpu_seconds=time.process_time() - cpu0,
            )
            if T_before <= schedule.t_target:
                score = -kl_target
                if s.select_batch > 0:
                    model.eval()
                    rec["ess_select"] = score = _target_ess(
                        model, energy, s.select_batch, s.eval_batch, u_ref, schedule.t_target
                    )
                    model.train()
                if score > best["score"]:
                    best = {
                        "score": score,
                        "kl": kl_target,
                        "ess": rec.get("ess_select", math.nan),
                        "step": step,
                        "state": copy.deepcopy(model.state_dict()),
                    }
            history.append(rec)
            if log is not None:
                log(
                    f"step {step}: T {T_before:.1f} K -> {T:.1f} K, ESS/N {rec['ess']:.3f} "
                    f"(at target {rec['ess_target']:.3f}), KL(target) {kl_target:.2f}"
                    + (f", ESS/N {rec['ess_select']:.3f} of {s.select_batch}" if "ess_select" in rec else "")
                    + (" [forced]" if rec["forced"] else "")
                )
            if on_check is not None:
                on_check(rec, model)
        if done or out_of_time:
            break
    model.eval()
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return {
        "history": history,
        "final_T": T,
        "reached_target": bool(T <= schedule.t_target),
        "steps": step,
        "seconds": time.time() - t0,
        "cpu_seconds": time.process_time() - cpu0,
        "best_step": best["step"],
        "best_kl": best["kl"],
        "best_ess": best["ess"],
        "schedule": asdict(schedule),
        "settings": asdict(s),
    }


# ----------------------------------------------------------------------------- seed ensemble
def rotor_rows(topology, zmatrix) -> np.ndarray:
    """Bool per Z-matrix row: the row's dihedral is a rotatable torsion.

    A row (i, j, k, l) is a rotor when its dihedral is a proper torsion (l is not bonded to j, so
    the angle turns about the bond j-k) and one end of that bond is an sp3 centre (four bonded
    neighbours) while both ends carry other atoms. Amide C-N bonds (three neighbours each) are not
    rotors; methyl groups, phi and psi are.
    """
    nbrs = bond_graph(topology)
    out = np.zeros(len(zmatrix.rows), dtype=bool)
    for r, (_, j, k, ref) in enumerate(np.asarray(zmatrix.rows, dtype=np.int64)):
        if ref in nbrs[j] or k not in nbrs[j]:
            continue
        dj, dk = len(nbrs[j]), len(nbrs[k])
        out[r] = max(dj, dk) == 4 and min(dj, dk) >= 2
    return out


@dataclass(frozen=True)
class SeedWidths:
    """Jitter of the seed ensemble: log bond lengths, angles (rad), narrow dihedrals (rad)."""

    log_bond: float = 0.02
    angle: float = 0.05
    dihedral: float = 0.15


def seed_ensemble(topology, x0, n: int = 4096, seed: int = 0, widths: SeedWidths | None = None) -> np.ndarray:
    """Configurations (n, n_atoms, 3) nm around one structure ``x0`` (n_atoms, 3) nm of an mdtraj
    topology: bond lengths, angles and narrow dihedrals of a whole-molecule Z-matrix jittered by
    ``widths``, rotatable torsions (:func:`rotor_rows`) uniform on the circle.

    They fix the flows' standardisation (shift and scale of every internal coordinate, which
    dihedrals are circular) without simulation data; they are not a Boltzmann sample.
    """
    widths = SeedWidths() if widths is None else widths
    heavy = [a.element is None or a.element.symbol != "H" for a in topology.atoms]
    z = build_zmatrix(bond_graph(topology), [], heavy)
    ic = InternalCoordinates(z).double()
    x0 = torch.as_tensor(np.asarray(x0, dtype=np.float64)).reshape(1, -1, 3)
    r, theta, phi, root = ic.to_internal(x0)
    g = torch.Generator().manual_seed(int(seed))
    rot = torch.as_tensor(rotor_rows(topology, z))

    def normal(shape):
        return torch.randn(shape, generator=g, dtype=torch.float64)

    r = r * torch.exp(widths.log_bond * normal((n, r.shape[1])))
    theta = torch.clamp(theta + widths.angle * normal((n, theta.shape[1])), 0.05, math.pi - 0.05)
    uniform = (torch.rand((n, phi.shape[1]), generator=g, dtype=torch.float64) * 2.0 - 1.0) * math.pi
    phi = torch.where(rot, uniform, phi + widths.dihedral * normal((n, phi.shape[1])))
    root = root.repeat(n, 1)
    root = torch.stack(
        [
            root[:, 0] * torch.exp(widths.log_bond * normal(n)),
            root[:, 1] * torch.exp(widths.log_bond * normal(n)),
            torch.clamp(root[:, 2] + widths.angle * normal(n), 0.05, math.pi - 0.05),
        ],
        dim=-1,
    )
    x = ic.to_cartesian(torch.zeros(n, 0, 3, dtype=torch.float64), r, theta, phi, root)
    return x.numpy()


# ----------------------------------------------------------------------------- files -> joint model
@dataclass(frozen=True)
class JointTraining:
    """Settings of :func:`train_joint_from_files` (the ``train-joint`` command's defaults).

    Attributes
    ----------
    temperature, t_start
        Target and starting temperature (K) of the tempering schedule.
    ess_threshold, max_cooling, patience
        :class:`TemperingSchedule` settings.
    steps, final_steps, batch_size, eval_batch, check_every, lr, grad_clip, energy_cap_kT, time_limit
        :class:`ReverseKLSettings`.
    cg_layers, cg_hidden, layers, hidden, bins
        Coupling layers and widths of the CG flow and of the backmapper; spline bins of both.
    ml_epochs, ml_lr
        Maximum-likelihood warm start on a trajectory, when one is given.
    select_batch
        :class:`ReverseKLSettings`: 0 keeps the state with the lowest reverse KL at the target, n > 0
        the one with the highest ESS/N of n samples.
    n_final
        Samples drawn at the end: CG prior bounds, bead ranges and the reported ESS/N.
    checkpoint_every
        Tempering checks between intermediate checkpoints.
    refine_steps, refine_frames, refine_lr, refine_tau
        After the tempered reverse KL: steps of reverse KL of the backmapper alone at the target,
        conditioned on ``refine_frames`` fixed draws of q(X) (0 steps: none). Given X the target is
        close to unimodal, so the mode-seeking reverse KL is safe there, and the conditional ESS rises.
        With ``refine_tau`` > 1 the frames are drawn from the flow with its bond-angle latents and
        those of its narrow (not circular) dihedrals widened by that factor
        (:class:`~openmm_backmap.training.cycle.TemperedFlow`; the widely spread dihedrals such as
        phi and psi keep their uniform latents), so that frames the flow rarely draws get
        reconstructions too; any distribution of frames leaves
        the conditional target unchanged. The frames that select the best state are drawn from q(X).
    cycles, cycle_samples, cycle_per_frame, cycle_refine_steps, cycle_anneal_levels
        Then cycles of importance-weighted maximum likelihood of the CG flow
        (:func:`~openmm_backmap.training.cycle.run_cycles`, the ``cycle`` command's loop and its
        defaults otherwise): ``cycle_samples`` draws of q(X), ``cycle_per_frame`` reconstructions
        each, weights exp(-beta U_AA) / (q(X) q(x | X)), and a dynamics check of every refit; with
        ``cycle_refine_steps`` the backmapper too, each cycle, by reverse KL plus the NLL of the
        pairs resampled by weight (:func:`~openmm_backmap.training.cycle.backmapper_refinement`).
        These are mass-covering (forward-KL) terms at the target, where the reverse KL alone drops
        mass and leaves the weights a heavy tail (0 cycles: none). With ``cycle_anneal_levels`` every
        pair is annealed to exp(-beta U_AA) first (AIS with that many levels of 5-step HMC moves in the
        model's internal coordinates) and the refit uses the annealed pairs and their AIS weights.
    seed
        Seeds masks, seed ensemble and samples.
    """

    temperature: float = 300.0
    t_start: float = 1200.0
    ess_threshold: float = 0.2
    max_cooling: float = 0.7
    patience: int = 10
    steps: int = 20000
    final_steps: int = 2000
    batch_size: int = 256
    eval_batch: int = 1024
    check_every: int = 50
    lr: float = 5e-4
    grad_clip: float = 10.0
    energy_cap_kT: float = 100.0
    time_limit: float | None = None
    cg_layers: int = 6
    cg_hidden: int = 64
    layers: int = 6
    hidden: int = 128
    bins: int = 8
    ml_epochs: int = 10
    ml_lr: float = 2e-3
    n_final: int = 8192
    checkpoint_every: int = 10
    select_batch: int = 0
    refine_steps: int = 0
    refine_frames: int = 16384
    refine_lr: float = 3e-4
    refine_tau: float = 1.0
    cycles: int = 0
    cycle_samples: int = 5000
    cycle_per_frame: int = 4
    cycle_refine_steps: int = 0
    cycle_anneal_levels: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("refine_steps", "cycles", "cycle_refine_steps", "cycle_anneal_levels"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"JointTraining: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("refine_frames", "cycle_samples", "cycle_per_frame"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"JointTraining: {name} must be >= 1, got {getattr(self, name)}")
        if not float(self.refine_tau) >= 1.0:
            raise ValueError(f"JointTraining: refine_tau must be >= 1 (1: the flow itself), got {self.refine_tau}")

    def schedule(self) -> TemperingSchedule:
        return TemperingSchedule(
            t_start=self.t_start,
            t_target=self.temperature,
            ess_threshold=self.ess_threshold,
            max_cooling=self.max_cooling,
            patience=self.patience,
            forced_cooling=max(0.9, self.max_cooling),
        )

    def reverse_kl(self) -> ReverseKLSettings:
        return ReverseKLSettings(
            max_steps=self.steps,
            final_steps=self.final_steps,
            batch_size=self.batch_size,
            eval_batch=self.eval_batch,
            check_every=self.check_every,
            lr=self.lr,
            grad_clip=self.grad_clip,
            energy_cap_kT=self.energy_cap_kT,
            seed=self.seed,
            time_limit=self.time_limit,
            select_batch=self.select_batch,
        )


def load_structure(topology: str | Path):
    """(mdtraj trajectory of the topology file's first model, its positions (n, 3) nm as float64).

    Raises
    ------
    ValueError
        When the file has no usable coordinates: data-free training needs one structure of the
        molecule (bond lengths of covalent size) to build the seed ensemble from.
    """
    import mdtraj as md

    from openmm_backmap.geometry import COVALENT_BOND_RANGE_NM, bond_length_range, check_length_scale

    traj = md.load(str(topology))[0]
    x0 = traj.xyz[0].astype(np.float64)
    bonds = [(a.index, b.index) for a, b in traj.topology.bonds]
    if not bonds:
        raise ValueError(
            f"{topology} has no bonds: the joint model needs the molecule's bond graph (CONECT or residue templates)"
        )
    try:
        check_length_scale(bond_length_range(x0, bonds), COVALENT_BOND_RANGE_NM, f"the structure in {topology}")
    except ValueError as err:
        raise ValueError(
            f"{err}; data-free training needs one structure of the molecule with real coordinates "
            "(give a minimised or built PDB, or --trajectory)"
        ) from err
    return traj, x0


def minimise(
    system, x0: np.ndarray, tolerance: float = 1.0, max_iterations: int = 0, platform: str = "Reference"
) -> tuple[np.ndarray, float]:
    """Local energy minimum near ``x0`` (nm): (positions, U kJ/mol). ``tolerance`` in kJ/mol/nm,
    ``max_iterations`` 0 for no limit. For a System with constraints OpenMM repeats restrained
    minimisations until they hold, minutes from a clashing start: give an unconstrained System when
    only the energy is wanted."""
    import openmm
    from openmm import unit

    integ = openmm.VerletIntegrator(0.001)
    properties = {"Threads": "1"} if platform == "CPU" else {}
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName(platform), properties)
    ctx.setPositions(x0 * unit.nanometer)
    ctx.applyConstraints(1e-8)
    openmm.LocalEnergyMinimizer.minimize(ctx, tolerance, max_iterations)
    st = ctx.getState(getPositions=True, getEnergy=True)
    x = np.asarray(st.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
    return x, float(st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))


@torch.no_grad()
def draw(model, energy, n: int, batch: int = 2048) -> dict[str, np.ndarray]:
    """n samples of a joint model with U (kJ/mol), log q(X), log q(x | X): float64 numpy arrays."""
    parts: dict[str, list] = {"x": [], "X": [], "u": [], "log_qX": [], "log_qx": []}
    for s in range(0, n, batch):
        x, X, lqX, lqx = model.sample_parts(min(batch, n - s))
        parts["x"].append(x.double().numpy())
        parts["X"].append(X.double().numpy())
        parts["u"].append(energy(x).double().numpy())
        parts["log_qX"].append(lqX.double().numpy())
        parts["log_qx"].append(lqx.double().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def annealed_draws(model, energy, n: int, temperature: float, settings, seed: int = 0) -> dict[str, Any]:
    """n samples of a joint model annealed to exp(-U_AA / kT) (:mod:`~openmm_backmap.sampling.annealing`,
    HMC in the model's internal coordinates, :class:`~openmm_backmap.models.joint.JointCoordinates`).

    Returns float64 numpy arrays ``x`` (the annealed positions), ``log_w`` (their AIS log-weights:
    self-normalised, they turn the positions into samples of exp(-U_AA / kT)), ``x0`` and
    ``plain_log_w`` (the model's own draws and their importance log-weights, for comparison), and the
    annealing ``stats``. ``energy`` gives kJ/mol and must be differentiable.
    """
    from openmm_backmap.models.joint import JointCoordinates
    from openmm_backmap.sampling.annealing import annealed_importance

    beta = 1.0 / kT(temperature)
    torch.manual_seed(seed)
    model.eval()
    with torch.no_grad():
        x0, log_q = model.sample(int(n))
        plain = -beta * energy(x0).double() - log_q.double()
    dtype = model.dtype

    def log_q_of(x: Tensor) -> Tensor:
        return model.log_prob(x.to(dtype)).to(x.dtype)

    def log_p_of(x: Tensor) -> Tensor:
        return -beta * energy(x.to(dtype)).to(x.dtype)

    coordinates = JointCoordinates(model.cg, model.bm)
    generator = torch.Generator().manual_seed(seed + 1)
    x, log_w, stats = annealed_importance(x0.double(), log_q_of, log_p_of, settings, generator, coordinates)
    return {
        "x": x.numpy(),
        "log_w": log_w.numpy(),
        "x0": x0.double().numpy(),
        "plain_log_w": np.where(torch.isfinite(plain).numpy(), plain.numpy(), -np.inf),
        "stats": stats,
    }


def refine_at_target(model, spec: dict, energy, settings: JointTraining, log: Callable[[str], None] = print) -> dict:
    """Reverse KL of the joint model's backmapper alone at the target temperature, conditioned on
    ``settings.refine_frames`` fixed draws of its CG flow (widened by ``settings.refine_tau``; 256 more
    draws of the flow itself select the best state), through
    :func:`~openmm_backmap.training.backmapper.refine_energy` (from 1.5 x the target over the first
    fifth of the steps). Returns its summary without the history."""
    from openmm_backmap.training.backmapper import refine_energy
    from openmm_backmap.training.cycle import TemperedFlow

    s = settings
    t0 = time.time()
    torch.manual_seed(s.seed + 17)
    model.eval()
    flow = TemperedFlow(model.cg)

    @torch.no_grad()
    def frames(n: int, tau: float) -> np.ndarray:  # in chunks of 4,096 draws
        X = torch.cat([flow.sample(min(4096, n - k), tau)[0] for k in range(0, n, 4096)])
        return X.to(model.dtype).numpy()

    X, X_val = frames(s.refine_frames, s.refine_tau), frames(256, 1.0)
    out = refine_energy(
        model.bm,
        spec["backmapper"],
        energy,
        X,
        s.temperature,
        steps=s.refine_steps,
        batch_size=128,
        lr=s.refine_lr,
        t_start=1.5 * s.temperature,
        anneal_fraction=0.2,
        val_frames=X_val,
        eval_every=100,
        seed=s.seed,
        progress=False,
    )
    model.eval()
    out = {k: v for k, v in out.items() if k != "history"}
    out["seconds"] = time.time() - t0
    widened = f" (angle and narrow dihedral latents widened x{s.refine_tau:g})" if s.refine_tau != 1.0 else ""
    log(f"backmapper refined at {s.temperature} K: {s.refine_steps} steps on {s.refine_frames} CG draws{widened}")
    return out


def cycles_at_target(
    model, spec: dict, cg_map, energy, settings: JointTraining, log: Callable[[str], None] = print
) -> list[dict]:
    """``settings.cycles`` cycles of importance-weighted maximum likelihood of the joint model's CG
    flow at the target (:func:`~openmm_backmap.training.cycle.run_cycles` with the ``cycle``
    command's defaults, ``cycle_samples`` draws and ``cycle_per_frame`` reconstructions per cycle,
    every refit checked by :func:`~openmm_backmap.sampling.langevin.dynamics_check`; with
    ``cycle_refine_steps`` the backmapper refined each cycle). Returns the cycles' records."""
    from openmm_backmap.models.joint import JointCoordinates
    from openmm_backmap.sampling.langevin import dynamics_check
    from openmm_backmap.training.cycle import CycleSettings, TemperedFlow, backmapper_refinement, run_cycles

    s = settings
    cs = CycleSettings(
        cycles=s.cycles,
        samples=s.cycle_samples,
        per_frame=s.cycle_per_frame,
        refine_steps=s.cycle_refine_steps,
        anneal_levels=s.cycle_anneal_levels,
        seed=s.seed,
    )
    beta = 1.0 / kT(s.temperature)
    masses = cg_map.masses()

    def backmap(X: Tensor, k: int) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return model.bm.sample(X.to(model.dtype), int(k))

    def reduced(x: Tensor) -> Tensor:  # differentiable: the cycles' AIS moves on it
        return beta * torch.cat([energy(x[i : i + 4096].to(model.dtype)) for i in range(0, len(x), 4096)]).to(x.dtype)

    def check(module: torch.nn.Module, X: np.ndarray) -> dict:
        # the exported force's energy (flow and priors) in double precision, as OpenMM would run it
        return dynamics_check(
            copy.deepcopy(module).double().eval().energy,
            torch.as_tensor(X),
            masses,
            s.temperature,
            cs.check_steps,
            seed=s.seed,
        )

    refine = None
    if cs.refine_steps:
        refine = backmapper_refinement(model.bm, spec["backmapper"], energy, cg_map.project, s.temperature, cs)
    model.eval()
    family, fibre = TemperedFlow(model.cg), model.bm.log_prob
    coordinates = JointCoordinates(model.cg, model.bm)
    return run_cycles(family, backmap, reduced, cg_map.project, cs, None, None, log, refine, check, fibre, coordinates)


def warm_start(model, x: np.ndarray, settings: JointTraining, spec: dict, progress: bool = False) -> dict:
    """Maximum likelihood of the joint model on AA frames x (N, n_aa, 3) nm through the shared loop
    (contiguous validation blocks), before reverse KL."""
    from openmm_backmap.training.data import block_split
    from openmm_backmap.training.loop import FitSettings, fit_epochs

    split = block_split(len(x), (0.9, 0.1, 0.0), n_blocks=10, seed=settings.seed)
    xt = torch.as_tensor(x, dtype=model.dtype)
    tr, va = torch.as_tensor(split["train"]), torch.as_tensor(split["val"])

    def batch_loss(idx: Tensor, gen: torch.Generator) -> Tensor:
        return -model.log_prob(xt[tr[idx]]).mean()

    @torch.no_grad()
    def validate() -> float:
        return float(-model.log_prob(xt[va]).mean())

    fs = FitSettings(
        epochs=settings.ml_epochs,
        batch_size=settings.batch_size,
        lr=settings.ml_lr,
        seed=settings.seed,
        progress=progress,
    )
    return fit_epochs(model, len(tr), batch_loss, validate, fs, spec, spec_key="ml", desc="ML", stage="ml")


def train_joint_from_files(
    topology: str | Path,
    aa_system: str | Path,
    mapping: str,
    out: str | Path,
    settings: JointTraining = JointTraining(),
    trajectory: str | list[str] | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """What ``openmm-backmap train-joint`` does: a joint model q(X) q(x | X) from the AA energy alone.

    Reads the structure and the System (checked against each other), minimises the structure,
    fits the flows' standardisation on a seed ensemble (or on ``trajectory`` frames, which then also
    warm-start the model by maximum likelihood), trains by reverse KL with adaptive tempering
    (checkpoints every ``settings.checkpoint_every`` checks), fits the CG priors on the model's
    samples and writes the joint checkpoint ``out`` (``openmm-backmap export`` writes its two model files).

    Returns
    -------
    dict
        The reverse-KL summary and ``final`` (ESS/N of ``n_final`` samples at the target temperature).
    """
    from openmm_backmap.io.checkpoints import make_cg_spec, make_joint_spec, make_spec, save_checkpoint
    from openmm_backmap.io.trajectories import load_trajectory
    from openmm_backmap.mapping import CGMapping
    from openmm_backmap.models.backmapper import Backmapper
    from openmm_backmap.models.cg_potential import CGFlowPotential
    from openmm_backmap.models.joint import JointModel
    from openmm_backmap.openmm.energies import aa_energy, check_system_matches, constraints_from_system, load_system

    s = settings
    schedule = s.schedule()  # refuses a schedule that cannot reach the target before any work
    rkl = s.reverse_kl()
    check_budget(schedule, rkl)
    t_wall, t_cpu = time.time(), time.process_time()
    torch.manual_seed(s.seed)
    traj, x0 = load_structure(topology)
    top = traj.topology
    system = load_system(aa_system)
    elements = [a.element.symbol if a.element is not None else "" for a in top.atoms]
    check_system_matches(system, elements, f"the AA System {aa_system}", f"the topology {topology}")
    system_xml = Path(aa_system).read_text() if not str(aa_system).lstrip().startswith("<") else str(aa_system)
    cg_map = CGMapping.from_spec(mapping, top)
    cg_map.check_disjoint("a joint model")
    if cg_map.n_cg < 3:
        raise ValueError(
            f"the mapping {mapping!r} gives {cg_map.n_cg} bead(s) on this topology; the CG flow of a joint "
            "model needs at least 3 (for ALA2 use the six-bead groups JSON or backbone)"
        )
    constraints = constraints_from_system(system)
    x_min, u_min = minimise(system, x0)
    log(f"{cg_map.n_aa} atoms -> {cg_map.n_cg} beads, {len(constraints)} constraints; minimised U = {u_min:.1f} kJ/mol")
    x_data = None
    if trajectory is not None:
        files = [trajectory] if isinstance(trajectory, (str, Path)) else list(trajectory)
        x_data = np.concatenate([load_trajectory(f, str(topology)).xyz.astype(np.float64) for f in files])
        stats = x_data
    else:
        stats = seed_ensemble(top, x_min, seed=s.seed)
    cg = CGFlowPotential.from_data(
        cg_map.project(stats),
        cg_map.cg_bonds(),
        temperature=s.temperature,
        n_layers=s.cg_layers,
        hidden=s.cg_hidden,
        n_bins=s.bins,
        seed=s.seed,
    )
    bm = Backmapper.from_data(
        cg_map, stats, constraints=constraints, hidden=s.hidden, n_layers=s.layers, n_bins=s.bins, seed=s.seed
    )
    model = JointModel(cg, bm)
    energy = aa_energy(system)
    spec = make_joint_spec(
        make_cg_spec(cg, cg_map, x_min), make_spec(bm, s.temperature, x_min, system_xml), s.temperature
    )
    spec["training"]["settings"] = asdict(s)
    spec["training"]["data_free"] = trajectory is None
    if x_data is not None:
        ml = warm_start(model, x_data, s, spec, progress=progress)
        log(f"warm start: validation NLL {ml['best_val_nll']:.2f} nats after {ml['epochs']} epochs")
    checks = {"n": 0}

    def on_check(rec: dict, m) -> None:
        checks["n"] += 1
        if checks["n"] % s.checkpoint_every == 0:
            spec["training"]["progress"] = rec
            save_checkpoint(out, m, spec, stage="reverse-kl")

    summary = train_reverse_kl(model, energy, schedule, rkl, u_ref=u_min, on_check=on_check, log=log)
    if s.refine_steps:
        summary["refine"] = refine_at_target(model, spec, energy, s, log)
    if s.cycles:
        summary["cycles"] = cycles_at_target(model, spec, cg_map, energy, s, log)
    final = draw(model, energy, s.n_final)
    lw = -final["u"] / kT(s.temperature) - final["log_qX"] - final["log_qx"]
    ess = kish_ess(np.where(np.isfinite(lw), lw, -np.inf)) / len(lw)
    with torch.no_grad():
        model.cg.fit_priors(torch.as_tensor(final["X"]))
    from openmm_backmap.geometry import bond_length_range

    cg_range = list(bond_length_range(final["X"], cg_map.cg_bonds()))
    spec["cg"]["cg_bond_range_nm"] = cg_range
    spec["backmapper"]["cg_bond_range_nm"] = cg_range
    wall, cpu = time.time() - t_wall, time.process_time() - t_cpu
    info = {k: v for k, v in summary.items() if k not in ("history", "cycles")}
    if "cycles" in summary:
        info["cycles"] = [
            {
                **{
                    k: r[k]
                    for k in (
                        "cycle",
                        "n",
                        "ess_fraction",
                        "pair_ess_fraction",
                        "plain_ess_fraction",
                        "lambda",
                        "anneal",
                    )
                    if k in r
                },
                "seconds": r["seconds"],
                **({"refine_steps": r["backmapper_refit"]["steps"]} if "backmapper_refit" in r else {}),
            }
            for r in summary["cycles"]
        ]
    info.update(final_ess_per_n=ess, n_final=int(s.n_final), wall_seconds=wall, cpu_seconds=cpu, u_min_kjmol=u_min)
    spec["training"]["reverse_kl"] = info
    spec["cg"]["training"] = {"joint": info}
    spec["backmapper"]["training"] = {"joint": info}
    save_checkpoint(out, model, spec, history=summary["history"], stage="done")
    log(
        f"{'reached' if summary['reached_target'] else 'did NOT reach'} {s.temperature} K "
        f"(final T {summary['final_T']:.1f} K) in {summary['steps']} steps; ESS/N {ess:.3f} of {s.n_final} samples; "
        f"wall {wall:.0f} s, CPU {cpu:.0f} s; checkpoint {out}"
    )
    summary["final"] = {"ess_per_n": ess, "samples": final}
    return summary
