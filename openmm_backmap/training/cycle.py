"""Cycle coarse graining: the CG flow potential refitted to its own backmapped, reweighted samples.

One cycle (:func:`run_cycles`):

1. draw CG configurations X from a proposal built on the current CG flow q_theta(X): a defensive
   mixture (1 - eps) q_theta + eps q_theta,tau, where q_theta,tau is the same flow with its Gaussian
   latent variables widened by tau (its density stays exact; circular latents are uniform already
   and are left as they are);
2. backmap each X with the conditional flow, x ~ q(x | X);
3. weight each pair by log w = -beta U_AA(x) - log q(x | X) - log q_prop(X): self-normalised, the
   weights turn the pairs into samples of exp(-beta U_AA), whatever the proposal and the backmapper;
   with K reconstructions per draw, the draw's weight is the mean of its K pair weights, an unbiased
   estimate of p_CG(X) / q_prop(X) (the fibre integral done by importance sampling) whose variance
   falls with K; the basin indicators are averaged over the K by weight; optionally (``anneal_levels``)
   every pair is then annealed to exp(-beta U_AA) by annealed importance sampling, so that its atoms
   and with them its CG frame M x relax to where the AA energy wants them, under an exact AIS weight
   (:mod:`openmm_backmap.sampling.annealing`): a weight cannot move a draw whose CG geometry the flow
   has wrong, AIS can;
4. refit q_theta by weighted maximum likelihood on the CG projections M x of the pairs of the last
   ``pool`` cycles (each cycle self-normalised and weighted by its ESS). Maximising
   sum_i w_i log q_theta(M x_i) minimises the relative entropy KL(p_CG || q_theta), whose minimum is
   the exact CG marginal p_CG(X) = int delta(M x - X) exp(-beta U_AA(x)) dx / Z, the potential of
   mean force; so the exact marginal is a fixed point of the cycle. Optionally (``reverse_kl_weight``)
   every refit step adds the reverse KL of q_theta against the CG marginal, estimated on fresh
   reparameterised draws with ``reverse_kl_per_frame`` reconstructions each (the backmapper held
   fixed; :func:`cg_reverse_kl`): maximum likelihood barely feels mass the flow puts where p has
   almost none (a fraction eps of the draws costs about eps nats), so a flow fitted by it smears its
   basins into the low-density gaps between them; the reverse KL moves each such draw downhill. With
   one reconstruction its minimiser is p_CG(X) exp(-KL_X) / Z', KL_X = KL(q(x | X) || p(x | X)) the
   backmapper's conditional error at X (less mass where the backmapper is worse); more
   reconstructions shrink that bias. It is an added term, not the objective. Optionally
   (``stratify``) the refit is stratified by basin (:func:`stratify`): each basin's shape is fitted
   with at least a set share of the gradient while a population term keeps the basins' weights, the
   same minimiser; maximum likelihood alone gives a basin of 1 % a 1 % share, too little to move the
   flow's mass there to where the weighted pairs are;
5. guard against weight degeneracy with ESS-based tempering of the weights: when a cycle's ESS/N is
   below ``ess_target`` the refit uses w^lambda with the largest lambda in (0, 1] whose ESS/N reaches
   the target (a partial step toward p along the geometric path q^(1 - lambda) p^lambda); lambda = 1,
   the exact step, as soon as the proposal is good enough.

Before the first refit and after every refit the current flow is evaluated on its own independent
samples: ESS/N, basin populations of the flow (raw) and reweighted (with standard errors), and two
KL estimates of the joint proposal q_theta(X) q(x | X) against exp(-beta U_AA) (upper bounds on the
CG marginal's). :mod:`openmm_backmap.training.cycle_files` runs the cycle on files (the
``openmm-backmap cycle`` command) and refits a CG flow to a reporter run.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.special import logsumexp
from torch import Tensor

from openmm_backmap.analysis.reweighting import kish_ess, normalized_weights
from openmm_backmap.geometry import distances
from openmm_backmap.models.cg_potential import ANGLE_EDGE, CGFlowPotential
from openmm_backmap.sampling.annealing import AnnealSettings, annealed_importance, hmc_at_target
from openmm_backmap.training.backmapper import soft_clip_above_quartile
from openmm_backmap.training.loop import FitSettings, fit_epochs

__all__ = [
    "CycleSettings",
    "MixtureProposal",
    "TorsionShiftedFlow",
    "TemperedFlow",
    "backmapped_pair_weights",
    "cg_reverse_kl",
    "ess_tempering",
    "evaluate_weights",
    "flow_estimate",
    "frame_weights",
    "pair_annealer",
    "run_cycles",
    "resample_strata",
    "spread_torsions",
    "stratify",
    "stratum_labels",
    "stratum_population_term",
    "weighted_refit",
    "widen_priors",
    "zero_weight_message",
]


# ---------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class CycleSettings:
    """Settings of :func:`run_cycles`.

    Attributes
    ----------
    cycles
        Refits of the CG flow (the models are evaluated cycles + 1 times).
    samples, per_frame
        CG configurations drawn per cycle, and reconstructions of each: a draw's weight is the mean of
        its reconstructions' weights (:func:`frame_weights`), so the cycle's ESS/N counts CG draws.
    defensive, tau, widen_lengths
        Fraction eps of the draws from the widened flow q_theta,tau, its latent scale tau (>= 1), and
        whether the bond-length latents are widened too (:class:`TemperedFlow`).
    ess_target
        ESS/N below which the refit tempers the weights (w^lambda, lambda < 1).
    pool
        Cycles whose samples the refit uses (the current one and up to pool - 1 before it).
    epochs, batch_size, lr, val_fraction
        Weighted maximum likelihood through the training loop; a random ``val_fraction`` of the pooled
        pairs scores the epochs (weighted NLL), the best epoch is kept.
    seed
        Seeds the draws and the refits.
    refine_steps, refine_lr
        Backmapper refinement per cycle (0: none): reverse-KL steps on exp(-beta U_AA) at the cycle's
        CG draws plus the NLL of the cycle's pairs resampled by weight (the weighted samples), through
        :func:`~openmm_backmap.training.backmapper.refine_energy`; needs a backmapper checkpoint.
    shifted, shift_steps
        Fraction of the draws from :class:`TorsionShiftedFlow` (the flow's draws with every rotatable
        dihedral turned by a multiple of 360 / ``shift_steps`` degrees, not all zero): draws in the
        torsion basins across the barriers that the flow has no mass in yet (alpha_L of alanine
        dipeptide for a flow trained on 300 K MD), with an exact density. Latent widening (``tau``)
        leaves circular latents alone and moves few draws across a barrier.
    estimate_samples
        Fresh draws of the final CG flow for the final reweighted AA estimate (``estimate`` in the last
        record, :func:`flow_estimate`; 0: none): plain importance weights, ``per_frame``
        reconstructions each, no annealing, so that many draws cost little; the last evaluation's
        ``samples`` draws alone hold too few in a basin of 1 % to weigh it within 0.2 kT.
    estimate_anneal
        Anneal every draw of the final estimate (one reconstruction each) with the cycle's AIS
        (``anneal_levels``) instead: about 25 ms a draw on alanine dipeptide, and the weights no
        longer inherit the backmapper's conditional error (the plain weights of alpha_R's draws
        sit 0.9-1.3 kT low where the annealed ones are within 0.05 kT: benchmarks/RESULTS.md).
    reverse_kl_weight, reverse_kl_batch, reverse_kl_per_frame
        Weight of the reverse-KL term in every refit step (0: none, plain weighted maximum
        likelihood), its CG draws per step and reconstructions per draw (module docstring, step 4;
        :func:`cg_reverse_kl`); needs ``fibre_sample`` in :func:`run_cycles`.
    reverse_kl_excess
        None: the term is the reverse KL; c (nats): the excess penalty of :func:`cg_reverse_kl`,
        which acts only where the flow's density exceeds the marginal's by more than e^c.
    stratify, stratify_draws
        0: plain weighted maximum likelihood. f > 0: the stratified refit of :func:`stratify`, the
        basins (the ``observables`` of :func:`run_cycles`) as strata: the shape of every basin whose
        pairs reach an ESS of :data:`STRATUM_MIN_ESS` is fitted with weight max(pi_b, f) (at most
        :data:`STRATUM_MAX_BOOST` pi_b) instead of
        its population pi_b, and a population term on ``stratify_draws`` fresh draws of the flow per
        step (each labelled by the basin of one reconstruction) keeps the populations at pi_b. The
        fixed point is the same (the exact marginal); a basin of 1 % gets the gradient it needs to
        take its shape from the weighted pairs.
    resample_moves
        0: the refit sees the annealed pairs with their AIS weights. M > 0: every basin whose pairs'
        Kish ESS is below :data:`RESAMPLE_BELOW` of their number is resampled by weight within the
        basin (:func:`resample_strata`: its total weight, the basin's population, is kept) and its
        pairs then make M HMC moves that leave exp(-beta U_AA) invariant
        (:func:`~openmm_backmap.sampling.annealing.hmc_at_target`), so that a basin whose weight
        sits on a few pairs hands the refit a spread of pairs (a resample-move step; the record's
        statistics are those of the annealed pairs before it).
    resample_in_basin
        Keep every moved pair in its basin (a move out of it is rejected: the kernel leaves exp(-beta
        U_AA) restricted to the basin invariant). A shallow basin then keeps its pairs (alpha_R of
        alanine dipeptide in vacuum: free moves take all of them out within 20 moves), and the
        stratified refit weighs its shape up. On alanine dipeptide that improved the plainly
        reweighted alpha_R (+0.37 kT against +0.88) and worsened the flow's own (-0.96 against -0.12;
        benchmarks/RESULTS.md), so it is off by default.
    check_steps, check_replicas
        Dynamics check of every refitted CG potential (0 steps: none; the check needs a ``check``
        callable in :func:`run_cycles`, which the ``cycle`` command supplies): ``check_replicas`` replicas of
        1 fs Langevin dynamics for ``check_steps`` steps (:func:`~openmm_backmap.sampling.langevin.dynamics_check`);
        a refit whose dynamics run away is undone.
    refine_spread
        Fraction of the refinement's CG frames whose rotatable dihedrals are redrawn uniformly
        (:func:`spread_torsions`): the backmapper learns the basins the CG flow has not reached yet, so
        that the cycle's first draws there get the weights they deserve. The conditional optimum
        q(x | X) = p(x | X) does not depend on which X the reverse KL is averaged over, so this changes
        where the backmapper is good, not what it converges to.
    """

    cycles: int = 6
    samples: int = 8192
    per_frame: int = 1
    defensive: float = 0.2
    tau: float = 1.5
    widen_lengths: bool = False
    ess_target: float = 0.2
    pool: int = 3
    epochs: int = 20
    batch_size: int = 512
    lr: float = 5e-4
    val_fraction: float = 0.1
    seed: int = 0
    refine_steps: int = 0
    refine_lr: float = 1e-4
    refine_spread: float = 0.0
    check_steps: int = 1000
    check_replicas: int = 32
    anneal_levels: int = 0
    anneal_leapfrog: int = 5
    anneal_step: float = 0.15
    shifted: float = 0.0
    shift_steps: int = 3
    reverse_kl_weight: float = 0.0
    reverse_kl_batch: int = 256
    reverse_kl_per_frame: int = 1
    reverse_kl_excess: float | None = None
    estimate_samples: int = 0
    stratify: float = 0.0
    stratify_draws: int = 2048
    resample_moves: int = 0
    resample_in_basin: bool = False
    estimate_anneal: bool = False

    def __post_init__(self) -> None:
        for name in ("cycles", "samples", "per_frame", "pool", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CycleSettings: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.defensive < 1.0:
            raise ValueError(f"CycleSettings: defensive must be in [0, 1), got {self.defensive}")
        if self.tau < 1.0:
            raise ValueError(f"CycleSettings: tau must be >= 1, got {self.tau}")
        if not 0.0 < self.ess_target <= 1.0:
            raise ValueError(f"CycleSettings: ess_target must be in (0, 1], got {self.ess_target}")
        if self.check_steps < 0 or self.check_replicas < 1:
            raise ValueError("CycleSettings: check_steps must be >= 0 and check_replicas >= 1")
        if self.refine_steps < 0:
            raise ValueError(f"CycleSettings: refine_steps must be >= 0, got {self.refine_steps}")
        if not 0.0 <= self.refine_spread <= 1.0:
            raise ValueError(f"CycleSettings: refine_spread must be in [0, 1], got {self.refine_spread}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"CycleSettings: val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if not 0.0 <= self.shifted < 1.0 or self.defensive + self.shifted >= 1.0:
            raise ValueError(
                f"CycleSettings: shifted must be in [0, 1) and defensive + shifted < 1, got shifted {self.shifted} "
                f"with defensive {self.defensive}"
            )
        if self.reverse_kl_weight < 0 or self.reverse_kl_batch < 1 or self.reverse_kl_per_frame < 1:
            raise ValueError(
                "CycleSettings: reverse_kl_weight must be >= 0, reverse_kl_batch and reverse_kl_per_frame >= 1, got "
                f"{self.reverse_kl_weight}, {self.reverse_kl_batch} and {self.reverse_kl_per_frame}"
            )
        if self.reverse_kl_excess is not None and (self.reverse_kl_excess < 0 or not self.reverse_kl_weight):
            raise ValueError(
                f"CycleSettings: reverse_kl_excess ({self.reverse_kl_excess}) must be >= 0 and shapes the reverse-KL "
                f"term, so it needs reverse_kl_weight > 0 (got {self.reverse_kl_weight})"
            )
        if not 0.0 <= self.stratify < 1.0 or self.stratify_draws < 1:
            raise ValueError(
                f"CycleSettings: stratify must be in [0, 1) and stratify_draws >= 1, got {self.stratify} and "
                f"{self.stratify_draws}"
            )
        if self.resample_in_basin and not self.resample_moves:
            raise ValueError(
                "CycleSettings: resample_in_basin keeps the resample-move step's pairs in their basins, so "
                "it needs resample_moves > 0"
            )
        if self.resample_moves < 0 or (self.resample_moves and not self.anneal_levels):
            raise ValueError(
                f"CycleSettings: resample_moves ({self.resample_moves}) must be >= 0 and moves annealed pairs, so it "
                f"needs anneal_levels > 0 (got {self.anneal_levels})"
            )
        if self.estimate_samples < 0:
            raise ValueError(f"CycleSettings: estimate_samples must be >= 0, got {self.estimate_samples}")
        if self.estimate_anneal and not (self.estimate_samples and self.anneal_levels):
            raise ValueError(
                "CycleSettings: estimate_anneal anneals the final estimate's draws with the cycle's AIS, so it needs "
                f"estimate_samples > 0 and anneal_levels > 0 (got {self.estimate_samples} and {self.anneal_levels})"
            )
        if self.shift_steps < 2:
            raise ValueError(f"CycleSettings: shift_steps must be >= 2, got {self.shift_steps}")
        if self.anneal_levels < 0:
            raise ValueError(f"CycleSettings: anneal_levels must be >= 0, got {self.anneal_levels}")
        if self.anneal_levels:
            self.anneal()  # checks the leapfrog steps and the step

    def anneal(self) -> AnnealSettings:
        """The :class:`~openmm_backmap.sampling.annealing.AnnealSettings` of the cycle's AIS."""
        return AnnealSettings(levels=self.anneal_levels, leapfrog=self.anneal_leapfrog, step=self.anneal_step)


# ---------------------------------------------------------------------------- proposals
class TemperedFlow:
    """A :class:`~openmm_backmap.models.cg_potential.CGFlowPotential` and its latent-widened twins.

    ``sample(n, tau)`` draws the flow with its standard-normal latent variables scaled by ``tau``;
    ``log_prob(X, tau)`` is that proposal's exact density (nats, the measure of
    :meth:`CGFlowPotential.log_prob`). tau = 1 is the flow itself. ``module`` is the trainable model.

    The coupling flow keeps every latent variable in the place of its internal coordinate, so the
    latents can be widened by kind. With ``widen_lengths=False`` only the latents of bond angles and
    dihedrals are widened. The stiff bond lengths stay as the flow has them: widening them puts
    widened draws on strained bonds, whose weights are wasted. On alanine dipeptide (eps 0.2,
    tau 1.5, 8,000 draws, two seeds) the draws' ESS/N rose from 0.41-0.45 to 0.44-0.46 with one
    reconstruction each, and from 0.60-0.63 to 0.63-0.64 with four (benchmarks/RESULTS.md).
    """

    def __init__(self, model: CGFlowPotential, widen_lengths: bool = False) -> None:
        self.module = model
        self.widen_lengths = bool(widen_lengths)

    def _tau(self, tau: float) -> Tensor:
        """Per latent variable: tau, or 1 where it is circular or a length that stays as it is."""
        m = self.module
        keep = m.base.circular | ((m.ic.kind == 0) & (not self.widen_lengths))
        return torch.where(keep, torch.ones_like(m.ic.scale), torch.full_like(m.ic.scale, float(tau)))

    def _base_log_prob(self, u: Tensor, tau: float) -> Tensor:
        circ = self.module.base.circular
        t = self._tau(tau).to(u.dtype)
        normal = -0.5 * torch.square(u / t) - 0.5 * math.log(2.0 * math.pi) - torch.log(t)
        uniform = torch.where(
            (u < -math.pi) | (u > math.pi),
            torch.full_like(u, -math.inf),
            torch.full_like(u, -math.log(2.0 * math.pi)),
        )
        return torch.sum(torch.where(circ, uniform, normal), dim=-1)

    @torch.no_grad()
    def sample(self, n: int, tau: float = 1.0) -> tuple[Tensor, Tensor]:
        """X (n, n_cg, 3) nm in the flow's canonical frame and log q_tau(X) (n,) nats."""
        m = self.module
        dtype, device = m._model_dtype(), m.ic.shift.device
        u = m.base.sample(n, dtype, device) * self._tau(tau).to(dtype)
        z, ladj_flow = m.flow.inverse(u, torch.zeros(n, 0, dtype=dtype, device=device))
        X, ladj_ic = m.ic.inverse(z, torch.zeros(n, 0, 3, dtype=dtype, device=device))
        return X, self._base_log_prob(u, tau) - ladj_flow - ladj_ic

    def log_prob(self, X: Tensor, tau: float = 1.0) -> Tensor:
        """log q_tau(X) (n,) nats for X (n, n_cg, 3) nm (differentiable w.r.t. X: the cycle's AIS
        anneals from it)."""
        m = self.module
        X = X.to(m._model_dtype())
        z, ladj_ic = m.ic(X)
        u, ladj_flow = m.flow(z, m._context(X))
        return self._base_log_prob(u, tau) + ladj_flow + ladj_ic


ROTATABLE_SPREAD = 0.25


def rotatable_dihedrals(model: CGFlowPotential, min_spread: float = ROTATABLE_SPREAD) -> Tensor:
    """Indices of the rotatable dihedrals of ``model``'s Z-matrix: circular, or with a fitted spread
    (the standardisation scale) above ``min_spread`` rad."""
    ic = model.ic
    return torch.nonzero((ic.kind == 2) & ((ic.scale > min_spread) | ic.circular)).flatten()


class TorsionShiftedFlow:
    """A CG flow's draws with their rotatable dihedrals turned by a grid of angles, and its exact density.

    With S the set of shift vectors (each rotatable dihedral turned by k 2 pi / ``steps``, k = 0 ..
    steps - 1, the all-zero vector left out), a draw is X = T_s(Y), Y ~ q and s uniform on S, where
    T_s turns the dihedrals in the flow's Z-matrix (bonds, angles and the other dihedrals kept). T_s
    is a bijection whose Jacobian is 1 (the Cartesian measure of a Z-matrix depends on bond lengths
    and angles only), so

        q_S(X) = (1 / |S|) sum_s q(T_-s(X)),

    exact, |S| evaluations of the flow. Draws land in every combination of torsion basins the flow
    knows, turned: for alanine dipeptide, phi turned by 120 or 240 degrees carries C7eq and C5 across
    phi = 0 into alpha_L, which a flow trained on 300 K MD has almost no mass in.
    """

    def __init__(self, model: CGFlowPotential, steps: int = 3, min_spread: float = ROTATABLE_SPREAD) -> None:
        self.module = model
        self.dims = rotatable_dihedrals(model, min_spread)
        if self.dims.numel() == 0:
            raise ValueError(f"the CG flow has no rotatable dihedral (fitted spread > {min_spread} rad) to turn")
        grid = torch.cartesian_prod(*[torch.arange(int(steps))] * self.dims.numel()).reshape(-1, self.dims.numel())
        grid = grid[(grid != 0).any(1)]
        self.shifts = grid.to(torch.float64) * (2.0 * math.pi / int(steps))  # (|S|, n_rotatable) radians

    def _turn(self, X: Tensor, shift: Tensor) -> Tensor:
        """X (n, n_cg, 3) with the rotatable dihedrals turned by ``shift`` (n, n_rotatable) radians."""
        ic = self.module.ic
        z, _ = ic(X)
        scale = ic.scale[self.dims].to(z.dtype)
        z = z.index_add(1, self.dims, shift.to(z.dtype) / scale)
        X_new, _ = ic.inverse(z, torch.zeros(len(z), 0, 3, dtype=z.dtype, device=z.device))
        return X_new

    @torch.no_grad()
    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """X (n, n_cg, 3) nm and log q_S(X) (n,) nats."""
        Y, _ = self.module.sample(n)
        pick = torch.randint(len(self.shifts), (n,))
        X = self._turn(Y, self.shifts[pick])
        return X, self.log_prob(X)

    def log_prob(self, X: Tensor) -> Tensor:
        """log q_S(X) (n,) nats (differentiable w.r.t. X)."""
        m = self.module
        X = X.to(m._model_dtype())
        n, n_s = len(X), len(self.shifts)
        turned = self._turn(X.repeat(n_s, 1, 1), -self.shifts.repeat_interleave(n, 0))
        lq = m.log_prob(turned).reshape(n_s, n)
        return torch.logsumexp(lq, 0) - math.log(n_s)


class MixtureProposal:
    """The defensive mixture (1 - eps - eta) q + eps q_tau + eta q_S of a proposal family
    (:class:`TemperedFlow` or any object with ``sample(n, tau)`` and ``log_prob(X, tau)``) and,
    when eta > 0, its :class:`TorsionShiftedFlow` ``shifted``.

    Draws are stratified: round(eps n) from q_tau, round(eta n) from q_S, the rest from q; the mixture
    density is the proposal density of the pooled draws (deterministic multiple importance sampling).
    """

    def __init__(self, family: Any, eps: float, tau: float, eta: float = 0.0, shifted: Any = None) -> None:
        if eta > 0.0 and shifted is None:
            raise ValueError("a mixture with torsion-shifted draws (eta > 0) needs the TorsionShiftedFlow")
        self.family, self.eps, self.tau = family, float(eps), float(tau)
        self.eta, self.shifted = float(eta), shifted

    def sample(self, n: int) -> tuple[Tensor, Tensor, np.ndarray]:
        """X (n, ...), log q_mix(X) (n,), and a boolean array marking the draws of q itself."""
        n_wide = round(self.eps * n) if self.tau > 1.0 else 0
        n_shift = round(self.eta * n)
        X0, _ = self.family.sample(n - n_wide - n_shift, 1.0)
        parts = [X0]
        if n_wide:
            parts.append(self.family.sample(n_wide, self.tau)[0])
        if n_shift:
            parts.append(self.shifted.sample(n_shift)[0].to(X0.dtype))
        X = torch.cat(parts)
        own = np.zeros(n, dtype=bool)
        own[: n - n_wide - n_shift] = True
        with torch.no_grad():
            return X, self.log_prob(X), own

    def log_prob(self, X: Tensor) -> Tensor:
        lq = self.family.log_prob(X, 1.0)
        eps = self.eps if self.tau != 1.0 else 0.0
        if eps == 0.0 and self.eta == 0.0:
            return lq
        terms = [lq + math.log1p(-eps - self.eta)]
        if eps:
            terms.append(self.family.log_prob(X, self.tau) + math.log(eps))
        if self.eta:
            terms.append(self.shifted.log_prob(X).to(lq.dtype) + math.log(self.eta))
        return torch.logsumexp(torch.stack(terms), 0)


# ---------------------------------------------------------------------------- weights and statistics
def ess_tempering(log_w: np.ndarray, target: float) -> float:
    """The largest lambda in (0, 1] with Kish ESS(lambda log w) / N >= target (1 when ESS/N of the
    full weights reaches it); bisection on lambda, the ESS falling as lambda grows."""
    log_w = np.asarray(log_w, dtype=np.float64)
    finite = log_w[np.isfinite(log_w)]
    if finite.size == 0:
        raise ValueError("every weight is zero: nothing to temper")
    n = log_w.size
    if kish_ess(finite) / n >= target:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if kish_ess(mid * finite) / n >= target:
            lo = mid
        else:
            hi = mid
    return max(lo, 1e-6)


def evaluate_weights(
    log_w: np.ndarray,
    indicators: dict[str, np.ndarray] | None = None,
    own: np.ndarray | None = None,
    raw_indicators: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Statistics of one batch of weighted samples.

    Parameters
    ----------
    log_w
        Importance log-weights (n,) (-inf for an impossible sample).
    indicators
        Per basin, a boolean (n,) array; None for no basins.
    own
        Marks the samples that are independent draws of the CG flow itself (raw populations).
    raw_indicators
        Per basin, the indicators of the ``own`` draws as drawn (``own.sum()`` values), where the
        weighted samples are not the draws themselves (annealed); None: ``indicators[own]``.

    Returns
    -------
    dict
        ``n``, ``ess``, ``ess_fraction``, ``kl_forward`` (sum w log(N w), self-normalised w: an
        estimate of KL(p || q) of the joint proposal, nats), ``kl_reverse`` (log mean w - mean log w:
        KL(q || p) up to the estimate of log Z, nats), and per basin ``raw`` (population among the
        ``own`` draws and its binomial error) and ``reweighted`` (self-normalised estimate and its
        delta-method standard error sqrt(sum w_i^2 (f_i - mu)^2)).
    """
    lw = np.asarray(log_w, dtype=np.float64)
    n = lw.size
    w = normalized_weights(lw)
    finite = np.isfinite(lw)
    out: dict[str, Any] = {"n": int(n), "n_zero_weight": int((~finite).sum())}
    out["ess"] = kish_ess(lw)
    out["ess_fraction"] = out["ess"] / max(n, 1)
    pos = w > 0
    out["kl_forward"] = float(np.sum(w[pos] * np.log(n * w[pos]))) if pos.any() else float("nan")
    out["kl_reverse"] = (
        float(logsumexp(lw[finite]) - math.log(finite.sum()) - lw[finite].mean()) if finite.any() else float("nan")
    )
    if indicators:
        own = np.ones(n, dtype=bool) if own is None else np.asarray(own, dtype=bool)
        basins = {}
        for name, ind in indicators.items():
            f = np.asarray(ind, dtype=np.float64).reshape(n)
            m_own = max(int(own.sum()), 1)
            f_raw = f[own] if raw_indicators is None else np.asarray(raw_indicators[name], dtype=np.float64)
            p_raw = float(f_raw.mean()) if f_raw.size else float("nan")
            mu = float(np.sum(w * f))
            basins[name] = {
                "raw": p_raw,
                "raw_error": math.sqrt(max(p_raw * (1.0 - p_raw), 0.0) / m_own),
                "raw_count": int(f_raw.sum()),
                "reweighted": mu,
                "reweighted_error": float(np.sqrt(np.sum(w * w * (f - mu) ** 2))),
                "count": int(f.sum()),
            }
        out["basins"] = basins
        out["unvisited_basins"] = [k for k, v in basins.items() if v["count"] == 0]
    return out


def zero_weight_message(log_w: np.ndarray, what: str, indicators: dict[str, np.ndarray] | None) -> str:
    """Why every weight is zero: how many are -inf / NaN, the frame range, and the basins sampled."""
    lw = np.asarray(log_w, dtype=np.float64)
    text = (
        f"every importance weight of {what} is zero ({int(np.isnan(lw).sum())} NaN, "
        f"{int(np.isneginf(lw).sum())} -inf, {int(np.isposinf(lw).sum())} +inf log-weights; frames 0-{lw.size - 1})"
    )
    if indicators:
        seen = [k for k, v in indicators.items() if np.asarray(v).any()]
        never = [k for k, v in indicators.items() if not np.asarray(v).any()]
        text += f"; the samples lie in {', '.join(seen) or 'no basin'}"
        if never:
            text += f" and the CG model never visits {', '.join(never)}"
    return text + ": the CG model and the AA energy do not overlap (wrong System, units or temperature?)"


def frame_weights(pair_log_w: np.ndarray, k: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Importance log-weights of CG draws from the log-weights of their k reconstructions each.

    ``pair_log_w`` (n k,), frame-major, holds log w_ij = -u(x_ij) - log q(x_ij | X_i) - log q_prop(X_i).
    The draw's log-weight is log (1/k) sum_j w_ij: an unbiased estimate of p_CG(X_i) / q_prop(X_i) up
    to the constant Z, whatever k (the reconstructions integrate the fibre over M x = X_i; more of them
    only lower its variance). Returns the (n,) log-weights and a function that turns a per-pair
    observable (n k,) into the draw's self-normalised average over its reconstructions (the plain
    mean where every pair weight of the draw is zero).
    """
    lw = np.asarray(pair_log_w, dtype=np.float64).reshape(-1, k)
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    seen = np.isfinite(lw).any(1)
    total = np.full(len(lw), -np.inf)
    total[seen] = logsumexp(lw[seen], axis=1)
    share = np.full(lw.shape, 1.0 / k)
    share[seen] = np.exp(lw[seen] - total[seen, None])
    log_w = total - math.log(k)

    def frame_of(values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64).reshape(-1, k)
        return (share * v).sum(1)

    return log_w, frame_of


@torch.no_grad()
def backmapped_pair_weights(
    X: Tensor,
    log_prop: Tensor,
    backmapper: Callable[[Tensor, int], tuple[Tensor, Tensor]],
    reduced_energy: Callable[[Tensor], Tensor],
    k: int,
) -> tuple[Tensor, Tensor, np.ndarray]:
    """Backmap CG draws X (log density ``log_prop`` under their proposal) k times each and weigh the
    pairs: log w = -u(x) - log q(x | X) - log q_prop(X), frame-major (n k,), -inf where the draw or its
    term is not finite. A non-finite draw is replaced by the first finite one before backmapping (its
    weight stays -inf). Returns (the draws backmapped, x, log w)."""
    ok = torch.isfinite(X).flatten(1).all(1) & torch.isfinite(log_prop)
    X_safe = torch.where(ok[:, None, None], X, X[ok][:1].expand_as(X)) if ok.any() else X
    x, log_q = backmapper(X_safe, k)
    u = reduced_energy(x.to(torch.float64))
    pair = -u.double().cpu().numpy() - log_q.double().cpu().numpy()
    pair -= np.repeat(log_prop.double().cpu().numpy(), k)
    pair = np.where(np.repeat(ok.cpu().numpy(), k) & np.isfinite(pair), pair, -np.inf)
    return X_safe, x, pair


@torch.no_grad()
def flow_estimate(
    family: Any,
    backmapper: Callable[[Tensor, int], tuple[Tensor, Tensor]],
    reduced_energy: Callable[[Tensor], Tensor],
    n: int,
    k: int = 1,
    observables: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
    chunk: int = 4096,
    anneal: Callable[[Tensor, np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """The AA estimate of a CG flow and its backmapper: ``n`` independent draws X ~ q_theta (``family``
    as in :func:`run_cycles`, untempered), ``k`` reconstructions each, weighted by
    log w = log mean_j exp(-u(x_j) - log q(x_j | X)) - log q_theta(X) (:func:`frame_weights`).

    With ``anneal(x, finite, chunk_start) -> (x moved, log w)`` (the cycle's AIS of pairs) every pair
    is annealed and weighted on its own instead (k = 1): the basins of the relaxed pairs are
    reweighted, the raw populations stay those of the draws as drawn.

    Returns the :func:`evaluate_weights` statistics of the draws (ESS/N, KL estimates, per basin the
    flow's raw population and the reweighted one with its error), made ``chunk`` draws at a time, so
    that n can be large; ``annealed`` says which weights they are.
    """
    n, k = int(n), int(k)
    if n < 1 or k < 1 or (anneal is not None and k != 1):
        raise ValueError(f"flow_estimate: n and k must be >= 1 (k = 1 when annealed), got {n} and {k}")
    log_ws: list[np.ndarray] = []
    inds: dict[str, list[np.ndarray]] = {}
    raws: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, chunk):
        X, log_qX = family.sample(min(chunk, n - start), 1.0)
        if not bool((torch.isfinite(X).flatten(1).all(1) & torch.isfinite(log_qX)).any()):
            raise ValueError(f"flow_estimate: every draw {start}-{start + len(X) - 1} of the CG flow is non-finite")
        _, x, pair = backmapped_pair_weights(X, log_qX, backmapper, reduced_energy, k)
        log_w, frame_of = frame_weights(pair, k)
        x_np = x.detach().cpu().double().numpy()
        if anneal is not None:
            if observables is not None:
                for name, v in observables(x_np).items():
                    raws.setdefault(name, []).append(v)
            x_np, log_w = anneal(x, np.isfinite(pair), start)
            frame_of = np.asarray
        log_ws.append(log_w)
        if observables is not None:
            for name, v in observables(x_np).items():
                inds.setdefault(name, []).append(frame_of(v))
    indicators = {name: np.concatenate(v) for name, v in inds.items()} or None
    raw = {name: np.concatenate(v) for name, v in raws.items()} or None
    out = evaluate_weights(np.concatenate(log_ws), indicators, None, raw)
    out["per_frame"] = k
    out["annealed"] = anneal is not None
    return out


# ---------------------------------------------------------------------------- refit
def weighted_refit(
    model: torch.nn.Module,
    X: np.ndarray,
    weights: np.ndarray,
    epochs: int,
    batch_size: int,
    lr: float,
    val_fraction: float,
    seed: int,
    extra_loss: Callable[[], Tensor] | None = None,
    scale: np.ndarray | None = None,
) -> dict[str, Any]:
    """Weighted maximum likelihood: minimise -sum_i w_i log q(X_i) / sum_i w_i over the parameters of
    ``model`` (anything with ``log_prob(X)``), through :func:`~openmm_backmap.training.loop.fit_epochs`;
    ``extra_loss()``, when given, is added to every batch's loss (the cycle's reverse-KL term and the
    stratified refit's population term). ``scale`` (per pair) multiplies the weights of the training
    pairs only (:func:`stratify`): the held-out NLL that guards the refit keeps the plain weights.

    A random ``val_fraction`` of the pairs (at least one) is held out. The last epoch's parameters are
    kept: a cycle's improvement (hundredths of a nat) is smaller than the noise of a weighted held-out
    NLL, so keeping the "best" epoch would mostly keep noise. The held-out NLL guards against a refit
    that goes wrong: when it ends more than three standard errors above its start, the starting
    parameters are restored (``reverted`` in the summary). Returns the loop's summary with
    ``val_nll_start``, ``val_nll_end`` and ``val_nll_error`` (nats).
    """
    w = np.asarray(weights, dtype=np.float64)
    keep = w > 0
    if not keep.any():
        raise ValueError("weighted refit: every weight is zero")
    X, w = np.asarray(X)[keep], w[keep]
    w_fit = w if scale is None else w * np.asarray(scale, dtype=np.float64)[keep]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(w))
    n_val = max(1, int(round(val_fraction * len(w))))
    va, tr = order[:n_val], order[n_val:]
    if len(tr) == 0:
        tr = va
    dtype = next(model.parameters()).dtype
    # a pair the current model gives no finite density (a far-out draw) cannot enter a likelihood
    with torch.no_grad():
        lq0 = torch.cat([model.log_prob(torch.as_tensor(X[s : s + 4096], dtype=dtype)) for s in range(0, len(X), 4096)])
    finite = torch.isfinite(lq0).cpu().numpy()
    dropped = int((~finite).sum())
    tr, va = tr[finite[tr]], va[finite[va]]
    if len(tr) == 0 or len(va) == 0:
        raise ValueError("weighted refit: the model gives no finite density to the weighted pairs")
    X_tr = torch.as_tensor(X[tr], dtype=dtype)
    X_va = torch.as_tensor(X[va], dtype=dtype)
    # weights scaled to mean 1 on each part (before any stratum scale): the batch mean of w_i (-log q_i)
    # is then unbiased
    w_tr = torch.as_tensor(w_fit[tr] / w[tr].mean(), dtype=dtype)
    w_va = torch.as_tensor(w[va] / w[va].sum(), dtype=dtype)

    def held_out() -> tuple[float, float]:
        with torch.no_grad():
            nll = -model.log_prob(X_va).double()
        wv = w_va.double()
        mean = float((wv * nll).sum())
        return mean, float(torch.sqrt(torch.sum(wv * wv * (nll - mean) ** 2)))

    start_state = copy.deepcopy(model.state_dict())
    model.eval()
    val_start, _ = held_out()
    calls = [0]

    def last_epoch_wins() -> float:
        # fit_epochs keeps the lowest score: a falling counter makes it keep the last epoch
        calls[0] += 1
        return -float(calls[0])

    settings = FitSettings(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=False)
    spec: dict[str, Any] = {}
    summary = fit_epochs(
        model,
        len(tr),
        lambda idx, gen: _weighted_nll(model, X_tr[idx], w_tr[idx]) + (0.0 if extra_loss is None else extra_loss()),
        last_epoch_wins,
        settings,
        spec,
        desc="cycle",
        stage="cycle",
    )
    val_end, err = held_out()
    summary.update(val_nll_start=val_start, val_nll_end=val_end, val_nll_error=err, reverted=False)
    if refit_went_wrong(val_start, val_end, err):
        model.load_state_dict(start_state)
        summary["reverted"] = True
    summary.pop("best_val_nll", None)
    summary.pop("best_epoch", None)
    summary["n_pairs"] = int(len(w))
    summary["dropped_nonfinite"] = dropped
    return summary


def refit_went_wrong(val_start: float, val_end: float, error: float) -> bool:
    """Whether a refit's held-out weighted NLL ended more than three standard errors above its start,
    or not finite (a held-out pair the refitted model gives no density: its error is then not
    finite either, and no comparison with it can catch the failure)."""
    return not math.isfinite(val_end) or (math.isfinite(error) and val_end > val_start + 3.0 * error)


#: reduced energies (kT) above a batch's median by more than this, or above its upper quartile when that is
#: higher, are damped log-linearly in the cycle's reverse KL (:func:`cg_reverse_kl`)
REVERSE_KL_CAP_KT = 50.0


def cg_reverse_kl(
    cg: torch.nn.Module,
    fibre_sample: Callable[[Tensor], tuple[Tensor, Tensor]],
    reduced_energy: Callable[[Tensor], Tensor],
    n: int,
    k: int = 1,
    excess: float | None = None,
) -> Tensor:
    """Monte-Carlo reverse KL (nats, up to log Z) of the CG flow q_theta(X) against the CG marginal of
    exp(-u(x)), on ``n`` reparameterised draws with ``k`` reconstructions each; differentiable in the
    CG flow's parameters through X and through the backmapper's draws given X.

    The marginal's log density at X is estimated as log mean_j exp(-u(x_j) - log q(x_j | X)), x_j ~
    q(x | X) (importance sampling of the fibre integral): a lower bound whose gap, averaged over q(X),
    is the backmapper's conditional error, KL(q(x | X) || p(x | X)) for k = 1 (the joint reverse KL of
    q(X) q(x | X), whose minimiser over q(X) is p_CG(X) exp(-KL_X) / Z': it puts less mass where the
    backmapper is worse), and that shrinks toward 0 as k grows (Burda et al.'s importance-weighted
    bound), so the minimiser approaches p_CG itself.

    ``fibre_sample(X) -> (x, log q(x | X))`` draws one reconstruction per frame, differentiable w.r.t.
    X; ``reduced_energy(x)`` is u = U_AA / kT. Energies more than :data:`REVERSE_KL_CAP_KT` above the
    batch median (or above its upper quartile) grow logarithmically, and frames whose terms are not
    finite are left out, so one clash cannot swamp a step.

    With ``excess`` = c (nats) the term is the excess penalty mean relu(r - c) instead, r = log q(X) -
    log p(X) with p normalised by the batch's own importance estimate of Z: only draws where the flow
    puts more than e^c times the marginal's density count (the mass smeared into gaps), none where
    it puts less (a basin the flow underweights costs nothing, so the term cannot drain one; maximum
    likelihood fills it). It is zero when q <= e^c p everywhere.
    """
    n, k = int(n), int(k)
    X, log_qX = cg.sample(n)
    x, log_qx = fibre_sample(X.repeat_interleave(k, 0))
    u = reduced_energy(x.to(torch.float64))
    finite = torch.isfinite(u.detach())
    if not bool(finite.any()):
        raise ValueError("CG reverse KL: no draw of the batch has a finite AA energy")
    median = u.detach()[finite].median()
    u = median + soft_clip_above_quartile(u - median, REVERSE_KL_CAP_KT)
    log_w = -u - log_qx.to(torch.float64)
    log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
    log_p = torch.logsumexp(log_w.reshape(n, k), dim=1) - math.log(k)
    total = log_qX.to(torch.float64) - log_p
    total = total[torch.isfinite(total)]
    if excess is None:
        return total.mean()
    log_z = torch.logsumexp(-total.detach(), 0) - math.log(max(total.numel(), 1))
    return torch.relu(total + log_z - float(excess)).mean()


def _weighted_nll(model: torch.nn.Module, X: Tensor, w: Tensor) -> Tensor:
    """Batch mean of w_i (-log q(X_i)); a pair whose density went non-finite during the fit is left
    out of the step rather than turning it into NaN."""
    lq = model.log_prob(X)
    ok = torch.isfinite(lq)
    if not bool(ok.all()):  # again without them: no NaN can reach the gradient
        lq, w = model.log_prob(X[ok]), w[ok]
    return -(w * lq).sum() / max(int(X.shape[0]), 1)


#: a basin whose pairs' Kish ESS is below this fraction of their number is resampled and moved
#: (``CycleSettings.resample_moves``)
RESAMPLE_BELOW = 0.5


def resample_strata(
    labels: np.ndarray, log_w: np.ndarray, rng: np.random.Generator, below: float = RESAMPLE_BELOW
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resampling within strata: in every stratum whose Kish ESS is below ``below`` times its number
    of samples n_b, n_b samples are drawn by weight (systematic resampling) and each gets the
    stratum's mean weight W_b / n_b; other strata are kept as they are. Every sample i is then
    expected to be present with its own weight (n_b w_i / W_b copies of weight W_b / n_b), so the
    result is a weighted sample of the same density, with every stratum's total weight unchanged.

    Returns the indices of the kept or drawn samples (n,), their log-weights, and a mask of the
    samples that were resampled (the ones a move step should move)."""
    labels = np.asarray(labels)
    lw = np.asarray(log_w, dtype=np.float64)
    index = np.arange(lw.size)
    new_lw = lw.copy()
    moved = np.zeros(lw.size, dtype=bool)
    for b in np.unique(labels):
        members = np.flatnonzero((labels == b) & np.isfinite(lw))
        if members.size < 2 or kish_ess(lw[members]) >= below * members.size:
            continue
        w = normalized_weights(lw[members])
        positions = (rng.random() + np.arange(members.size)) / members.size
        picks = np.minimum(np.searchsorted(np.cumsum(w), positions), members.size - 1)
        index[members] = members[picks]
        new_lw[members] = logsumexp(lw[members]) - math.log(members.size)
        moved[members] = True
    return index, new_lw, moved


#: the most the stratified refit weighs a basin's shape up (c_b / pi_b): the population term's weight, and
#: with it the noise of its gradient, grows with it
STRATUM_MAX_BOOST = 20.0

#: a stratum's weighted pairs must reach this Kish ESS before the stratified refit weighs its shape up:
#: a handful of pairs, weighed up, would be fitted as a handful of points
STRATUM_MIN_ESS = 20.0


def stratum_labels(indicators: dict[str, np.ndarray]) -> np.ndarray:
    """Per sample, the index (in ``indicators``' order) of the stratum with the largest indicator
    value (basin indicators partition the plane; averaged over residues or reconstructions, the
    basin holding most of them)."""
    values = np.stack([np.asarray(v, dtype=np.float64) for v in indicators.values()])
    outside = int(np.sum(values.max(axis=0) <= 0.0))
    if outside:
        raise ValueError(
            f"strata: {outside} of {values.shape[1]} samples are in none of {', '.join(indicators)}; the "
            "indicators must partition the samples"
        )
    return np.argmax(values, axis=0)


def stratify(
    labels: np.ndarray,
    weights: np.ndarray,
    floor: float,
    n_strata: int,
    min_ess: float = STRATUM_MIN_ESS,
    max_boost: float = STRATUM_MAX_BOOST,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, float]]]:
    """The stratified refit's weights: per-pair scales of the weights and the population coefficients.

    Weighted maximum likelihood, -sum_b pi_b E_b[log q], gives each stratum b (a basin) the share
    pi_b of the gradient, its weighted population: a basin of 1 % barely shapes the flow, so the flow
    keeps whatever shape it had there. Written with the flow's conditional q(X | b) = q(X) / Q_b,
    Q_b = int_b q, the same loss is sum_b pi_b (-E_b[log q(X | b)]) + KL(pi || Q) + const: a shape term
    per stratum and a population term. The stratified refit weighs the shape terms by
    c_b = min(max(pi_b, floor), max_boost pi_b) instead, and the population term by the largest of
    the ratios, Lambda = max_b c_b / pi_b,

        L = sum_b c_b (-E_b[log q] + log Q_b) + Lambda KL(pi || Q)
          = sum_b c_b (-E_b[log q]) + sum_b (c_b - Lambda pi_b) log Q_b + const,

    whose minimiser is still q = p: each conditional q(X | b) = p(X | b) and Q_b = pi_b. The first sum
    is weighted maximum likelihood with each pair's weight scaled by c_b / pi_b; the second needs
    the gradient of log Q_b, E_q[1_b grad log q] / Q_b, which :func:`stratum_population_term` takes
    from the flow's own draws. Lambda keeps the populations as stiff as the stiffest shape term: a flow
    cannot move one basin's shape without moving mass, and with the population term at weight 1 the
    tenfold shape term of a basin of 3 % (floor 0.3) left that basin at 4.7 % (a four-bead toy; 3.1 %
    with Lambda). The noise of the population term's gradient grows with Lambda, hence the bound
    ``max_boost`` on c_b / pi_b: on alanine dipeptide, alpha_R (pi 0.0003-0.0013) weighed up to
    0.1 (Lambda 100-400) spoiled every refit (held-out NLL up by 0.5-2 nats, each refit undone). A
    stratum whose pairs have a Kish ESS below ``min_ess`` keeps c_b = pi_b: a few pairs weighed up
    would be fitted as points. With every c_b = pi_b (floor 0, or no stratum above
    its population) Lambda = 1, every coefficient is 0 and the refit is weighted maximum likelihood.

    Returns the per-pair scale (n,), the coefficients c_b - Lambda pi_b (n_strata,) and per stratum a
    summary (``pi``, ``c``, ``ess``).
    """
    labels = np.asarray(labels, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    if floor < 0.0 or floor >= 1.0:
        raise ValueError(f"stratify: floor must be in [0, 1), got {floor}")
    total = w.sum()
    if not total > 0:
        raise ValueError("stratify: every weight is zero")
    scale = np.ones_like(w)
    pi, c = np.zeros(n_strata), np.zeros(n_strata)
    summary = []
    for b in range(n_strata):
        wb = w[labels == b]
        pi[b] = wb.sum() / total
        with np.errstate(divide="ignore"):
            ess = kish_ess(np.log(wb)) if pi[b] > 0 else 0.0
        c[b] = min(max(pi[b], floor), max_boost * pi[b]) if ess >= min_ess else pi[b]
        if pi[b] > 0:
            scale[labels == b] = c[b] / pi[b]
        summary.append({"pi": float(pi[b]), "c": float(c[b]), "ess": ess})
    stiffness = float(np.max(c[pi > 0] / pi[pi > 0]))
    return scale, c - stiffness * pi, summary


def stratum_population_term(
    model: torch.nn.Module, label_draws: Callable[[Tensor], np.ndarray], coef: np.ndarray, n: int
) -> Tensor:
    """sum_b coef_b log Q_b of :func:`stratify`, as a surrogate with its gradient: on n fresh draws of
    ``model`` (``sample(n)``, held fixed), sum_b coef_b mean_{j in b} log q(X_j), whose gradient
    estimates E_q[1_b grad log q] / Q_b = grad log Q_b (the score-function identity; the draws'
    density is the model's own, so no weight enters). ``label_draws(X)`` gives each draw's stratum
    (-1: none). Strata with no draw are left out of the step."""
    with torch.no_grad():
        X, _ = model.sample(int(n))
    labels = torch.as_tensor(np.asarray(label_draws(X)), dtype=torch.long)
    lq = model.log_prob(X)
    ok = torch.isfinite(lq.detach())
    total = lq.new_zeros(())
    for b, c in enumerate(np.asarray(coef, dtype=np.float64)):
        inside = (labels == b) & ok
        if c != 0.0 and bool(inside.any()):
            total = total + float(c) * lq[inside].mean()
    return total


@torch.no_grad()
def widen_priors(model: CGFlowPotential, X: np.ndarray) -> dict[str, int]:
    """Widen (never narrow) the prior walls of ``model`` so that the CG positions X (N, n_cg, 3) nm lie
    inside them with the model's margins: a basin the data never reached must not be walled off.
    Returns how many bond, angle and pair bounds moved."""
    X = torch.as_tensor(np.asarray(X), dtype=model.bond_lo.dtype)
    pri = model.spec["priors"]
    moved = {"bonds": 0, "angles": 0, "pairs": 0}
    if len(X) == 0:
        return moved
    if model.bond_idx.shape[0]:
        r = distances(X[:, model.bond_idx[:, 0]], X[:, model.bond_idx[:, 1]])
        lo = torch.minimum(model.bond_lo, torch.clamp(r.min(0).values - pri["bond_margin_nm"], min=0.0))
        hi = torch.maximum(model.bond_hi, r.max(0).values + pri["bond_margin_nm"])
        moved["bonds"] = int(((lo != model.bond_lo) | (hi != model.bond_hi)).sum())
        model.bond_lo.copy_(lo)
        model.bond_hi.copy_(hi)
    if model.angle_idx.shape[0]:
        a = model._angles(X)
        amin, amax = a.min(0).values, a.max(0).values
        # as fit_statistics: the margin, but never closer to 0 or pi than ANGLE_EDGE unless the samples are
        lo = torch.minimum(torch.clamp(amin - pri["angle_margin_rad"], min=ANGLE_EDGE), amin)
        hi = torch.maximum(torch.clamp(amax + pri["angle_margin_rad"], max=math.pi - ANGLE_EDGE), amax)
        lo, hi = torch.minimum(model.angle_lo, lo), torch.maximum(model.angle_hi, hi)
        moved["angles"] = int(((lo != model.angle_lo) | (hi != model.angle_hi)).sum())
        model.angle_lo.copy_(lo)
        model.angle_hi.copy_(hi)
    if model.pair_idx.shape[0]:
        d = distances(X[:, model.pair_idx[:, 0]], X[:, model.pair_idx[:, 1]])
        lo = torch.minimum(model.pair_min, torch.clamp(d.min(0).values - pri["pair_margin_nm"], min=0.0))
        moved["pairs"] = int((lo != model.pair_min).sum())
        model.pair_min.copy_(lo)
    return moved


# fitted spread (rad) above which a dihedral of the CG flow's Z-matrix counts as rotatable; below it
# lie the stiff dihedrals (impropers that carry chirality, planar groups), which are never redrawn


@torch.no_grad()
def spread_torsions(
    model: CGFlowPotential, X: Tensor, generator: torch.Generator | None = None, min_spread: float = ROTATABLE_SPREAD
) -> Tensor:
    """CG frames X (n, n_cg, 3) nm with every rotatable dihedral of ``model``'s Z-matrix redrawn
    uniformly on (-pi, pi], bonds, angles and stiff dihedrals kept.

    A dihedral is rotatable when the flow treats it as circular or its fitted spread (the
    standardisation scale) exceeds ``min_spread`` rad. The frames cover torsion basins the data and
    the flow never reached (alpha_L of alanine dipeptide from 300 K MD), for conditioning a
    backmapper there; they carry no density and must not enter importance weights.
    """
    ic = model.ic
    dtype = ic.scale.dtype
    X = torch.as_tensor(X).to(dtype)
    z, _ = ic(X)
    dims = rotatable_dihedrals(model, min_spread)
    if dims.numel() == 0:
        raise ValueError(f"the CG flow has no rotatable dihedral (fitted spread > {min_spread} rad) to spread")
    angle = (torch.rand(len(z), dims.numel(), generator=generator, dtype=dtype) * 2.0 - 1.0) * math.pi
    z[:, dims] = angle / ic.scale[dims]
    X_new, _ = ic.inverse(z, torch.zeros(len(z), 0, 3, dtype=dtype))
    return X_new


# ---------------------------------------------------------------------------- the cycle
def backmapper_refinement(
    net: torch.nn.Module,
    spec: dict,
    energy: Callable[[Tensor], Tensor],
    project: Callable[[np.ndarray], np.ndarray],
    temperature: float,
    settings: CycleSettings,
    cg: CGFlowPotential | None = None,
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], dict]:
    """The ``refine`` callable of :func:`run_cycles` for a backmapper ``net`` (training spec ``spec``):
    ``settings.refine_steps`` steps of :func:`~openmm_backmap.training.backmapper.refine_energy` at the
    cycle's CG draws (a ``settings.refine_spread`` fraction of them with their torsions spread by
    :func:`spread_torsions`, which needs ``cg``), reverse KL on U_AA (``energy``, kJ/mol) plus the NLL
    of the cycle's pairs resampled by weight: the weighted samples keep q(x | X) covering where p puts
    mass, where the reverse KL alone narrows it and leaves the weights a heavy tail."""
    from openmm_backmap.training.backmapper import refine_energy

    if settings.refine_spread > 0 and cg is None:
        raise ValueError("refine_spread needs the CG flow (cg=) to spread the torsions of")

    def refine(X: np.ndarray, x: np.ndarray, w: np.ndarray) -> dict:
        pick = np.random.default_rng(settings.seed).choice(len(w), size=len(w), p=w / w.sum())
        pairs = (x[pick], project(x[pick]))
        frames = X
        n_spread = round(settings.refine_spread * len(X))
        if n_spread:
            gen = torch.Generator().manual_seed(settings.seed + len(X))
            spread = spread_torsions(cg, torch.as_tensor(X[:n_spread]), gen).double().numpy()
            frames = np.concatenate([X[n_spread:], spread])
        net.train()
        summary = refine_energy(
            net,
            spec,
            energy,
            frames,
            temperature,
            steps=settings.refine_steps,
            batch_size=64,
            lr=settings.refine_lr,
            t_start=temperature,
            ml_data=pairs,
            ml_weight=0.3,
            seed=settings.seed,
            progress=False,
        )
        net.eval()
        return summary

    return refine


def run_cycles(
    family: Any,
    backmapper: Callable[[Tensor, int], tuple[Tensor, Tensor]],
    reduced_energy: Callable[[Tensor], Tensor],
    project: Callable[[np.ndarray], np.ndarray],
    settings: CycleSettings = CycleSettings(),
    observables: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
    on_cycle: Callable[[int, dict], None] | None = None,
    log: Callable[[str], None] = print,
    refine: Callable[[np.ndarray, np.ndarray, np.ndarray], dict] | None = None,
    check: Callable[[torch.nn.Module, np.ndarray], dict] | None = None,
    fibre_log_prob: Callable[[Tensor, Tensor], Tensor] | None = None,
    coordinates: Any = None,
    fibre_sample: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
) -> list[dict[str, Any]]:
    """Run ``settings.cycles`` cycles (module docstring) and evaluate the flow before each refit and
    after the last.

    Parameters
    ----------
    family
        The CG proposal family: ``module`` (the trainable CG flow, with ``log_prob(X)``),
        ``sample(n, tau)`` and ``log_prob(X, tau)`` (:class:`TemperedFlow` for a CG flow potential).
    backmapper
        ``backmapper(X, k) -> (x, log q(x | X))``: k reconstructions per CG frame (frame-major).
    reduced_energy
        ``u(x) = U_AA(x) / kT`` (dimensionless) for a batch of AA positions; differentiable when the
        settings anneal.
    project
        The mapping X = M x on numpy arrays (N, n_aa, 3) -> (N, n_cg, 3), and on torch tensors when
        the settings anneal.
    observables
        Per basin, boolean indicators of a batch of AA positions (numpy); None for none.
    on_cycle
        Called as ``on_cycle(c, record)`` after each evaluation (c = 0 .. cycles) and its refit.
    refine
        Optional backmapper refinement after each refit: ``refine(X, x, w)`` with the cycle's CG
        draws, their reconstructions and normalised weights; returns a summary.
    check
        Optional dynamics check of each refitted CG flow: ``check(module, X)`` with
        ``settings.check_replicas`` starting frames drawn by weight from the refit's pairs; a result
        whose ``stable`` is False undoes the refit (``reverted`` in the record), so that no cycle hands
        on a potential whose dynamics come apart (:func:`~openmm_backmap.sampling.langevin.dynamics_check`).
    fibre_log_prob
        ``fibre_log_prob(x, X) -> log q(x | X)`` of the backmapper, differentiable w.r.t. x and X;
        needed when ``settings.anneal_levels`` > 0 (the density AIS anneals from is
        log q_prop(M x) + log q(x | M x)).
    coordinates
        What the AIS moves (:func:`~openmm_backmap.sampling.annealing.annealed_importance`): for a
        molecule :class:`~openmm_backmap.models.joint.JointCoordinates` of the CG flow and the
        backmapper (keeps constrained bonds); None for Cartesian positions.
    fibre_sample
        ``fibre_sample(X) -> (x, log q(x | X))``, one reconstruction per frame, differentiable w.r.t. X
        (the backmapper's parameters need not be: they are not trained by it); needed when
        ``settings.reverse_kl_weight`` > 0 (:func:`cg_reverse_kl`).

    Returns
    -------
    list of dict
        One record per evaluation: the :func:`evaluate_weights` statistics, ``lambda``, ``refit``
        (the loop summary) and ``seconds``; the last one also ``estimate`` (:func:`flow_estimate`)
        when ``settings.estimate_samples`` > 0.

    Raises
    ------
    ValueError
        Every weight of a cycle is zero (the message names the basins the samples reach and miss).
    """
    s = settings
    if s.anneal_levels and fibre_log_prob is None:
        raise ValueError("annealing (anneal_levels > 0) needs the backmapper's fibre_log_prob")
    if (s.stratify or s.resample_moves) and observables is None:
        raise ValueError(
            "the stratified refit (stratify > 0) and the resample-move step (resample_moves > 0) need basin "
            "observables: their strata are the basins"
        )
    extra_loss = None
    if s.reverse_kl_weight:
        if fibre_sample is None:
            raise ValueError("the reverse-KL term (reverse_kl_weight > 0) needs the backmapper's fibre_sample")

        def extra_loss() -> Tensor:
            kl = cg_reverse_kl(
                family.module,
                fibre_sample,
                reduced_energy,
                s.reverse_kl_batch,
                s.reverse_kl_per_frame,
                s.reverse_kl_excess,
            )
            return s.reverse_kl_weight * kl

    def label_draws(X: Tensor) -> np.ndarray:
        # a CG draw's stratum: the basin of one reconstruction (-1 where it is not finite)
        x, _ = backmapper(X.detach(), 1)
        x_np = x.detach().cpu().double().numpy()
        labels = stratum_labels(observables(x_np))
        return np.where(np.isfinite(x_np).all(axis=(1, 2)), labels, -1)

    torch.manual_seed(s.seed)
    pool: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    history: list[dict[str, Any]] = []
    for c in range(s.cycles + 1):
        t0 = time.time()
        last = c == s.cycles
        # the last evaluation draws the final flow alone: its raw populations are its own
        proposal = MixtureProposal(
            family,
            0.0 if last else s.defensive,
            s.tau,
            0.0 if last else s.shifted,
            TorsionShiftedFlow(family.module, s.shift_steps) if s.shifted and not last else None,
        )
        family.module.eval()
        with torch.no_grad():
            X, log_prop, own = proposal.sample(s.samples)
        k = s.per_frame
        X_safe, x, pair_log_w = backmapped_pair_weights(X, log_prop, backmapper, reduced_energy, k)
        log_prop_np = log_prop.double().cpu().numpy()
        x_np = x.detach().cpu().double().numpy()
        log_w, frame_of = frame_weights(pair_log_w, k)
        plain_log_w = log_w
        ind = observables(x_np) if observables is not None else None
        if s.anneal_levels:
            # every pair annealed on its own: the relaxed pairs are the weighted sample, one CG frame each
            x_np, log_w, stats = _anneal_pairs(
                x, np.isfinite(pair_log_w), proposal, fibre_log_prob, reduced_energy, project, s, c, coordinates
            )
            own_pairs = np.repeat(own, k)
            raw = {name: v[own_pairs] for name, v in ind.items()} if ind is not None else None
            ind = observables(x_np) if observables is not None else None
            record = evaluate_weights(log_w, ind, own_pairs, raw)
            record["anneal"] = stats
            record["plain_ess_fraction"] = kish_ess(plain_log_w) / max(len(own), 1)
            k = 1
            if s.resample_moves and ind is not None and not last:
                # the refit's pairs: degenerate basins resampled and moved (the record keeps the AIS sample)
                x_np, log_w, ind, record["resample"] = _resample_move(
                    x_np, log_w, ind, observables, reduced_energy, s, c, coordinates, stats
                )
        else:
            if ind is not None:
                ind = {name: frame_of(v) for name, v in ind.items()}
            record = evaluate_weights(log_w, ind, own)
        record["cycle"] = c
        record["per_frame"] = s.per_frame
        record["pair_ess_fraction"] = kish_ess(pair_log_w) / max(pair_log_w.size, 1)
        # the flow's own draws weighted against the flow alone: the CG potential + backmapper as a
        # Boltzmann generator (the same as the record's at the last evaluation, which draws the flow only)
        with torch.no_grad():
            own_t = torch.as_tensor(own)
            lq_flow = family.log_prob(X[own_t], 1.0).double().cpu().numpy()
        lw_flow = np.where(np.isfinite(plain_log_w[own]), plain_log_w[own] + log_prop_np[own] - lq_flow, -np.inf)
        flow = evaluate_weights(lw_flow)
        record["flow"] = {key: flow[key] for key in ("n", "ess", "ess_fraction", "kl_forward", "kl_reverse")}
        if record["ess"] == 0.0:
            raise ValueError(zero_weight_message(log_w, f"cycle {c}", ind))
        if not last:
            lam = ess_tempering(log_w, s.ess_target)
            # the CG projections of the first reconstruction of each draw (M x = X for every one of them)
            pool.append((project(x_np[::k]), lam * log_w, None if ind is None else stratum_labels(ind)))
            pool = pool[-s.pool :]
            # each cycle self-normalised, weighted by its ESS (consistent for lambda = 1)
            Xp = np.concatenate([p[0] for p in pool])
            wp = np.concatenate([normalized_weights(p[1]) * kish_ess(p[1]) for p in pool])
            scale, loss, strata = None, extra_loss, None
            if s.stratify:
                scale, coef, strata = stratify(np.concatenate([p[2] for p in pool]), wp, s.stratify, len(ind))
                loss = _with_population_term(extra_loss, family.module, label_draws, coef, s.stratify_draws)
            before = copy.deepcopy(family.module.state_dict())
            refit = weighted_refit(
                family.module, Xp, wp, s.epochs, s.batch_size, s.lr, s.val_fraction, s.seed + 1000 * c, loss, scale
            )
            if strata is not None:
                refit["strata"] = dict(zip(ind, strata, strict=True))
            if isinstance(family.module, CGFlowPotential):
                heavy = wp >= 0.01 * wp[wp > 0].mean()
                refit["priors_widened"] = widen_priors(family.module, Xp[heavy])
            if check is not None and not refit["reverted"]:
                # starting frames drawn by weight: where the refitted potential's dynamics will run
                rng = np.random.default_rng(s.seed + 7919 * c)
                start = Xp[rng.choice(len(wp), size=s.check_replicas, p=wp / wp.sum())]
                refit["dynamics_check"] = check(family.module, start)
                if not refit["dynamics_check"]["stable"]:
                    family.module.load_state_dict(before)
                    refit["reverted"] = True
                    log(f"cycle {c}: the refitted CG potential failed the dynamics check, refit undone")
            record["lambda"] = lam
            record["refit"] = {k2: v for k2, v in refit.items() if k2 != "history"}
            if refine is not None:
                if s.anneal_levels:
                    X_now, w_now = project(x_np), normalized_weights(log_w)
                else:
                    X_now, w_now = X_safe.detach().cpu().double().numpy(), normalized_weights(pair_log_w)
                summary = refine(X_now, x_np, w_now)
                record["backmapper_refit"] = {k2: v for k2, v in summary.items() if k2 != "history"}
        if last and s.estimate_samples:
            family.module.eval()
            anneal = None
            if s.estimate_anneal:
                anneal = pair_annealer(proposal, fibre_log_prob, reduced_energy, project, s, coordinates, c + 1)
            record["estimate"] = flow_estimate(
                family,
                backmapper,
                reduced_energy,
                s.estimate_samples,
                1 if anneal is not None else s.per_frame,
                observables,
                anneal=anneal,
            )
        record["seconds"] = time.time() - t0
        history.append(record)
        log(_summary_line(record))
        if on_cycle is not None:
            on_cycle(c, record)
    return history


def _with_population_term(
    extra_loss: Callable[[], Tensor] | None,
    model: torch.nn.Module,
    label_draws: Callable[[Tensor], np.ndarray],
    coef: np.ndarray,
    draws: int,
) -> Callable[[], Tensor] | None:
    """``extra_loss`` plus the stratified refit's population term (None when every coefficient is 0:
    the refit is then plain weighted maximum likelihood)."""
    if not np.any(coef):
        return extra_loss

    def loss() -> Tensor:
        term = stratum_population_term(model, label_draws, coef, draws)
        return term if extra_loss is None else term + extra_loss()

    return loss


def _resample_move(
    x: np.ndarray,
    log_w: np.ndarray,
    ind: dict[str, np.ndarray],
    observables: Callable[[np.ndarray], dict[str, np.ndarray]],
    reduced_energy: Callable[[Tensor], Tensor],
    s: CycleSettings,
    cycle: int,
    coordinates: Any,
    anneal_stats: dict,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict]:
    """The annealed pairs with their degenerate basins resampled (:func:`resample_strata`) and moved
    by ``s.resample_moves`` HMC moves at exp(-u), from the AIS's last step; their basin indicators
    taken again after the moves, and a summary (per basin the ESS before, which were resampled, the
    moves' acceptance)."""
    rng = np.random.default_rng(s.seed + 15485863 * (cycle + 1))
    labels = stratum_labels(ind)
    index, new_lw, moved = resample_strata(labels, log_w, rng)
    names = list(ind)
    summary: dict[str, Any] = {
        "ess_before": {n: kish_ess(log_w[labels == b]) for b, n in enumerate(names)},
        "resampled": {n: bool(moved[labels == b].any()) for b, n in enumerate(names)},
        "distinct": {n: int(np.unique(index[(labels == b) & moved]).size) for b, n in enumerate(names)},
    }
    x_new = x[index].copy()
    if moved.any():
        step = float(np.mean(anneal_stats["final_step"]))
        settings = AnnealSettings(levels=1, leapfrog=s.anneal_leapfrog, step=step)
        generator = torch.Generator().manual_seed(s.seed + 32452843 * (cycle + 1))
        start = torch.as_tensor(x_new[moved])

        def basin(y: Tensor) -> Tensor:
            return torch.as_tensor(stratum_labels(observables(y.detach().cpu().double().numpy())))

        # with resample_in_basin each pair stays in its basin: the moves leave exp(-u) restricted to it invariant
        after, stats = hmc_at_target(
            start,
            lambda y: -reduced_energy(y),
            s.resample_moves,
            settings,
            generator,
            coordinates,
            basin if s.resample_in_basin else None,
        )
        x_new[moved] = after.double().cpu().numpy()
        summary["acceptance"] = stats["acceptance"]
    return x_new, new_lw, observables(x_new), summary


def pair_annealer(
    proposal: Any,
    fibre_log_prob: Callable[[Tensor, Tensor], Tensor],
    reduced_energy: Callable[[Tensor], Tensor],
    project: Callable[[Any], Any],
    settings: CycleSettings,
    coordinates: Any,
    seed: int = 0,
) -> Callable[[Tensor, np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """The ``anneal`` of :func:`flow_estimate`: ``anneal(x, finite, start)`` runs the cycle's AIS
    (``settings.anneal()``) on pairs x drawn from ``proposal`` (anything with ``log_prob(X)``) with one
    reconstruction each and returns the relaxed positions and their log-weights; ``start`` (the chunk's
    first draw) offsets the seed, so that every chunk gets its own random numbers."""

    def anneal(x: Tensor, finite: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        moved, log_w, _ = _anneal_pairs(
            x, finite, proposal, fibre_log_prob, reduced_energy, project, settings, seed + start, coordinates
        )
        return moved, log_w

    return anneal


def _anneal_pairs(
    x: Tensor,
    finite: np.ndarray,
    proposal: MixtureProposal,
    fibre_log_prob: Callable[[Tensor, Tensor], Tensor],
    reduced_energy: Callable[[Tensor], Tensor],
    project: Callable[[Any], Any],
    s: CycleSettings,
    cycle: int,
    coordinates: Any,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """AIS of the cycle's pairs x (frame-major) from q_prop(M x) q(x | M x) to exp(-u): the relaxed
    positions (numpy, float64), their log-weights (-inf where the plain weight was zero) and the
    annealing statistics."""
    dtype = x.dtype

    def log_q(y: Tensor) -> Tensor:
        Y = project(y.to(dtype))
        return proposal.log_prob(Y).to(y.dtype) + fibre_log_prob(y.to(dtype), Y).to(y.dtype)

    def log_p(y: Tensor) -> Tensor:
        return -reduced_energy(y)

    finite_t = torch.as_tensor(finite)
    start = x.detach().double()
    if finite_t.any():
        start = torch.where(finite_t[:, None, None], start, start[finite_t][:1].expand_as(start))
    generator = torch.Generator().manual_seed(s.seed + 104729 * (cycle + 1))
    moved, log_w, stats = annealed_importance(start, log_q, log_p, s.anneal(), generator, coordinates)
    log_w = torch.where(finite_t, log_w, torch.full_like(log_w, -math.inf))
    return moved.cpu().numpy(), log_w.cpu().numpy(), stats


def _summary_line(r: dict) -> str:
    text = f"cycle {r['cycle']}: ESS/N {r['ess_fraction']:.3f} (flow's own {r['flow']['ess_fraction']:.3f})"
    if r.get("per_frame", 1) > 1:
        text += f", pairs' ESS/N {r['pair_ess_fraction']:.3f}"
    if "anneal" in r:
        acc = ", ".join(f"{a:.2f}" for a in r["anneal"]["acceptance"])
        text += f" (annealed; plain {r['plain_ess_fraction']:.3f}, acceptance {acc})"
    text += f", KL fwd {r['kl_forward']:.3f} rev {r['kl_reverse']:.3f} nats"
    if "lambda" in r:
        text += f", lambda {r['lambda']:.3f}"
    for name, b in (r.get("basins") or {}).items():
        text += f"; {name} {b['raw']:.4f} raw / {b['reweighted']:.4f} rw"
    if "estimate" in r:
        e = r["estimate"]
        text += f"; {'annealed ' if e.get('annealed') else ''}estimate of {e['n']} draws: ESS/N {e['ess_fraction']:.3f}"
        for name, b in (e.get("basins") or {}).items():
            text += f", {name} {b['reweighted']:.4f} +- {b['reweighted_error']:.4f} rw ({b['raw']:.4f} raw)"
    return text + f" ({r['seconds']:.0f} s)"
