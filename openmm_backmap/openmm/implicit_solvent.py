"""Generalized Born implicit solvent in torch: batched, differentiable, checked against OpenMM.

:class:`GeneralizedBornEnergy` evaluates, for positions x (B, n, 3) in nm, the energy in kJ/mol of
one of these OpenMM forces (all with ``NoCutoff``):

* ``openmm.GBSAOBCForce``: OBC type II Born radii with OpenMM's correction for an atom buried
  inside another's scaled sphere, and the ACE surface-area term (``amber99_obc.xml`` and the like).
* The ``CustomGBForce`` that ``ForceField(..., "implicit/obc2.xml")`` builds (Amber ``igb=5``).
* The ``CustomGBForce`` that ``ForceField("amber14-all.xml", "implicit/gbn2.xml")`` builds: GBn2
  (Nguyen, Roe and Simmerling, JCTC 2013, Amber ``igb=8``), the OBC integral plus the neck
  correction read from the force's ``getd0``/``getm0`` tables, with per-atom alpha, beta, gamma.

All of them share one model. With offset radii rho_i = R_i - offset, scaled radii s_j and
r = |x_i - x_j|, the descreening integral is

    I_i = sum_{j != i} [ H(r; rho_i, s_j) + neckScale * N_ij(r) ]

    H = 0.5 (1/L - 1/U + (r - s_j^2/r)(1/U^2 - 1/L^2)/4 + log(L/U) / (2r)),  U = r + s_j,
        L = max(rho_i, |r - s_j|), and H = 0 when U < rho_i
    N_ij = m0_ij / (1 + 100 (r - d0_ij)^2 + 3e5 (r - d0_ij)^6)   for r <= R_i + R_j + neckCut

(``GBSAOBCForce`` adds 1/rho_i - 1/L to H when rho_i < s_j - r; it has no neck term). The Born
radius is B_i = 1 / (1/rho_i - tanh(alpha_i psi - beta_i psi^2 + gamma_i psi^3) / R_i), psi = I_i
rho_i, and the energy

    U = -k/2 sum_{i,j} q_i q_j (1/eps_in - exp(-kappa f_ij)/eps_out) / f_ij
        + sum_i A (R_i + 0.14)^2 (R_i / B_i)^6,
    f_ij = sqrt(r^2 + B_i B_j exp(-r^2 / (4 B_i B_j))),

where the double sum runs over all ordered pairs including i = j (f_ii = B_i gives the self term),
so no exclusion applies anywhere, as in OpenMM. k is OpenMM's Coulomb constant for GBSAOBCForce
and the 138.935485 written into the CustomGBForce expressions for the others; A is 4 pi times the
GBSAOBCForce's surface-area energy, or the 28.3919551 kJ/(mol nm^2) of the expressions.

A ``CustomGBForce`` is accepted only when its per-particle parameters, computed values, energy
terms and tabulated functions have exactly the OBC2 or GBn2 form: the expressions are split at
``;`` into the main expression and its definitions, the numeric definitions (dielectrics, kappa,
offset, neck constants) are read, and the rest is compared with the known form as text. No general
expression parser is involved; anything else is refused with a message naming what differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ONE_4PI_EPS0 = 138.93545764438198  # kJ nm / (mol e^2), the Coulomb constant of OpenMM's own forces
OBC_OFFSET = 0.009  # nm, GBSAOBCForce's dielectric offset
OBC2_TANH = (1.0, 0.8, 4.85)  # alpha, beta, gamma of OBC type II
PROBE_RADIUS = 0.14  # nm, the ACE solvent probe radius
DEFAULT_MAX_PAIRS = 1 << 15  # frames x atom pairs evaluated at once: small chunks stay in cache
_DAMP_CAP = 60.0  # largest r^2 / (4 B_i B_j) put through exp()

# Known CustomGBForce forms, whitespace removed: main expression and non-numeric definitions.
_OBC_INTEGRAL = "select(step(r+sr2-or1),0.5*(1/L-1/U+0.25*(r-sr2^2/r)*(1/(U^2)-1/(L^2))+0.5*log(L/U)/r),0)"
_OBC_INTEGRAL_DEFS = {"U": "r+sr2", "L": "max(or1,D)", "D": "abs(r-sr2)"}
_NECK = (
    "step(radius1+radius2+neckCut-r)*getm0(radindex1,radindex2)/(1+100*(r-getd0(radindex1,radindex2))^2+"
    "0.3*1000000*(r-getd0(radindex1,radindex2))^6)"
)
_FORMS = {
    "OBC2": {
        "parameters": ("charge", "or", "sr"),
        "I": (_OBC_INTEGRAL, _OBC_INTEGRAL_DEFS),
        "B": ("1/(1/or-tanh(psi-0.8*psi^2+4.85*psi^3)/radius)", {"psi": "I*or", "radius": "or+offset"}),
        "functions": (),
    },
    "GBn2": {
        "parameters": ("charge", "or", "sr", "alpha", "beta", "gamma", "radindex"),
        "I": (
            "Ivdw+neckScale*Ineck",
            {
                "Ineck": _NECK,
                "Ivdw": _OBC_INTEGRAL,
                **_OBC_INTEGRAL_DEFS,
                "radius1": "or1+offset",
                "radius2": "or2+offset",
            },
        ),
        "B": ("1/(1/or-tanh(alpha*psi-beta*psi^2+gamma*psi^3)/radius)", {"psi": "I*or", "radius": "or+offset"}),
        "functions": ("getd0", "getm0"),
    },
}
_COULOMB_CUSTOM = 138.935485  # the Coulomb constant written into the Amber CustomGBForce expressions
_SELF_TERMS = (
    "-0.5*138.935485*(1/soluteDielectric-1/solventDielectric)*charge^2/B",
    "-0.5*138.935485*(1/soluteDielectric-exp(-kappa*B)/solventDielectric)*charge^2/B",
)
_PAIR_TERMS = (
    "-138.935485*(1/soluteDielectric-1/solventDielectric)*charge1*charge2/f",
    "-138.935485*(1/soluteDielectric-exp(-kappa*f)/solventDielectric)*charge1*charge2/f",
)
_PAIR_DEFS = {"f": "sqrt(r^2+B1*B2*exp(-r^2/(4*B1*B2)))"}
_ACE_TERM = ("28.3919551*(radius+0.14)^2*(radius/B)^6", {"radius": "or+offset"})
_ACE_FACTOR_CUSTOM = 28.3919551  # 4 pi x 2.25936 kJ/(mol nm^2), as written in those expressions


class UnsupportedGBForce(ValueError):
    """An implicit-solvent force the torch energy does not implement (the message says why)."""


@dataclass
class GBParameters:
    """Everything the torch energy needs, in nm, e and kJ/mol; arrays are per atom (n,) or (n, n)."""

    form: str
    charge: np.ndarray
    offset_radius: np.ndarray  # rho_i
    scaled_radius: np.ndarray  # s_j
    tanh_radius: np.ndarray  # R_i in the Born-radius formula
    alpha: np.ndarray
    beta: np.ndarray
    gamma: np.ndarray
    coulomb: float  # k, with the polar prefactor -k/2 (1/eps_in - exp(-kappa f)/eps_out)
    solute_dielectric: float
    solvent_dielectric: float
    kappa: float = 0.0  # 1/nm
    buried_correction: bool = False  # GBSAOBCForce's term for rho_i < s_j - r
    ace_factor: float = 0.0  # A in kJ/(mol nm^2); 0 without the surface-area term
    ace_radius: np.ndarray | None = None
    neck_scale: float = 0.0
    neck_cut: np.ndarray | None = None  # (n, n) R_i + R_j + neckCut
    neck_m0: np.ndarray | None = None  # (n, n)
    neck_d0: np.ndarray | None = None  # (n, n)


# ---------------------------------------------------------------------------- reading the forces
def is_gb_force(force: Any) -> bool:
    """Whether ``force`` is one of the implicit-solvent force types this module reads."""
    return type(force).__name__ in ("GBSAOBCForce", "CustomGBForce")


def unsupported_reason(force: Any) -> str | None:
    """None if :class:`GeneralizedBornEnergy` can evaluate ``force``, else why not (one line)."""
    try:
        read_gb_parameters(force)
    except UnsupportedGBForce as err:
        return str(err)
    return None


def read_gb_parameters(force: Any) -> GBParameters:
    """The parameters of a GBSAOBCForce or an Amber OBC2/GBn2 CustomGBForce.

    Raises
    ------
    UnsupportedGBForce
        For another force type, a cutoff, or a CustomGBForce of a different form.
    """
    name = type(force).__name__
    if name == "GBSAOBCForce":
        return _read_obc_force(force)
    if name == "CustomGBForce":
        return _read_custom_gb_force(force)
    raise UnsupportedGBForce(f"{name} is not an implicit-solvent force")


def _read_obc_force(force) -> GBParameters:
    import openmm
    from openmm import unit

    if force.getNonbondedMethod() != openmm.GBSAOBCForce.NoCutoff:
        raise UnsupportedGBForce("GBSAOBCForce with a cutoff: only NoCutoff is implemented")
    rows = []
    for i in range(force.getNumParticles()):
        q, radius, scale = force.getParticleParameters(i)
        rows.append((q.value_in_unit(unit.elementary_charge), radius.value_in_unit(unit.nanometer), scale))
    q, radius, scale = np.array(rows, dtype=float).reshape(-1, 3).T
    eps_in, eps_out = force.getSoluteDielectric(), force.getSolventDielectric()
    coulomb = ONE_4PI_EPS0
    if eps_in == 0.0 or eps_out == 0.0:  # OpenMM switches the polar term off then
        coulomb, eps_in, eps_out = 0.0, 1.0, 1.0
    rho = radius - OBC_OFFSET
    ones = np.ones_like(q)
    area = force.getSurfaceAreaEnergy().value_in_unit(unit.kilojoule_per_mole / unit.nanometer**2)
    return GBParameters(
        form="GBSAOBCForce",
        charge=q,
        offset_radius=rho,
        scaled_radius=rho * scale,
        tanh_radius=radius,
        alpha=OBC2_TANH[0] * ones,
        beta=OBC2_TANH[1] * ones,
        gamma=OBC2_TANH[2] * ones,
        coulomb=coulomb,
        solute_dielectric=eps_in,
        solvent_dielectric=eps_out,
        buried_correction=True,
        ace_factor=4.0 * math.pi * area,
        ace_radius=radius,
    )


def _split_expression(text: str) -> tuple[str, dict[str, str], dict[str, float]]:
    """(main expression, symbolic definitions, numeric definitions) of an OpenMM expression."""
    parts = [p.replace(" ", "").replace("\t", "").replace("\n", "") for p in text.split(";")]
    parts = [p for p in parts if p]
    main, symbolic, numeric = parts[0], {}, {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep:
            raise UnsupportedGBForce(f"cannot read the definition {part!r} in {text!r}")
        try:
            numeric[key] = float(value)
        except ValueError:
            symbolic[key] = value
    return main, symbolic, numeric


def _expect(what: str, main: str, symbolic: dict, expected_main: str, expected_defs: dict) -> None:
    if main != expected_main:
        raise UnsupportedGBForce(f"{what} is {main!r}, expected {expected_main!r}")
    if symbolic != expected_defs:
        diff = sorted(set(symbolic.items()) ^ set(expected_defs.items()))
        raise UnsupportedGBForce(f"{what} has definitions differing from the known form in {diff}")


def _constant(what: str, numeric: dict, name: str) -> float:
    if name not in numeric:
        raise UnsupportedGBForce(f"{what} does not define {name}")
    return numeric[name]


def _read_custom_gb_force(force) -> GBParameters:
    import openmm

    cgb = openmm.CustomGBForce
    if force.getNonbondedMethod() != cgb.NoCutoff:
        raise UnsupportedGBForce("CustomGBForce with a cutoff: only NoCutoff is implemented")
    if force.getNumGlobalParameters() > 0:
        names = [force.getGlobalParameterName(i) for i in range(force.getNumGlobalParameters())]
        raise UnsupportedGBForce(f"CustomGBForce with global parameters {names}: not an Amber OBC2/GBn2 form")
    params = tuple(force.getPerParticleParameterName(i) for i in range(force.getNumPerParticleParameters()))
    form = next((k for k, v in _FORMS.items() if v["parameters"] == params), None)
    if form is None:
        known = {k: list(v["parameters"]) for k, v in _FORMS.items()}
        raise UnsupportedGBForce(f"CustomGBForce per-particle parameters {list(params)} match no known form {known}")
    spec = _FORMS[form]
    functions = sorted(force.getTabulatedFunctionName(i) for i in range(force.getNumTabulatedFunctions()))
    if functions != sorted(spec["functions"]):
        raise UnsupportedGBForce(
            f"{form} CustomGBForce tabulated functions {functions}, expected {sorted(spec['functions'])}"
        )
    values = [force.getComputedValueParameters(i) for i in range(force.getNumComputedValues())]
    if [(v[0], v[2]) for v in values] != [("I", cgb.ParticlePairNoExclusions), ("B", cgb.SingleParticle)]:
        raise UnsupportedGBForce(
            f"{form} CustomGBForce computed values {[(v[0], v[2]) for v in values]} are not "
            "[I (ParticlePairNoExclusions), B (SingleParticle)]"
        )
    main_i, sym_i, num_i = _split_expression(values[0][1])
    _expect(f"{form} computed value I", main_i, sym_i, *spec["I"])
    main_b, sym_b, num_b = _split_expression(values[1][1])
    _expect(f"{form} computed value B", main_b, sym_b, *spec["B"])
    offset_b = _constant("computed value B", num_b, "offset")

    terms = [force.getEnergyTermParameters(i) for i in range(force.getNumEnergyTerms())]
    types = [t[1] for t in terms]
    if types not in (
        [cgb.SingleParticle, cgb.ParticlePairNoExclusions],
        [cgb.SingleParticle, cgb.SingleParticle, cgb.ParticlePairNoExclusions],
    ):
        raise UnsupportedGBForce(
            f"{form} CustomGBForce energy term types {types}: expected self term, optional "
            "ACE term (SingleParticle) and pair term (ParticlePairNoExclusions)"
        )
    main_s, sym_s, num_s = _split_expression(terms[0][0])
    if main_s not in _SELF_TERMS or sym_s:
        raise UnsupportedGBForce(f"{form} self energy term is {terms[0][0]!r}, not one of {list(_SELF_TERMS)}")
    main_p, sym_p, num_p = _split_expression(terms[-1][0])
    if main_p not in _PAIR_TERMS:
        raise UnsupportedGBForce(f"{form} pair energy term is {main_p!r}, not one of {list(_PAIR_TERMS)}")
    _expect(f"{form} pair energy term", main_p, sym_p, main_p, _PAIR_DEFS)
    dielectrics = []
    for what, main, num in (("self energy term", main_s, num_s), ("pair energy term", main_p, num_p)):
        kappa = _constant(what, num, "kappa") if "exp(-kappa" in main else 0.0  # the other form has no salt
        dielectrics.append((_constant(what, num, "soluteDielectric"), _constant(what, num, "solventDielectric"), kappa))
    if dielectrics[0] != dielectrics[1]:
        raise UnsupportedGBForce(f"{form} self and pair terms disagree on (eps_in, eps_out, kappa): {dielectrics}")
    eps_in, eps_out, kappa = dielectrics[0]

    table = np.array([force.getParticleParameters(i) for i in range(force.getNumParticles())], dtype=float)
    table = table.reshape(-1, len(params))
    q, rho, sr = table[:, 0], table[:, 1], table[:, 2]
    ones = np.ones_like(q)
    out = GBParameters(
        form=form,
        charge=q,
        offset_radius=rho,
        scaled_radius=sr,
        tanh_radius=rho + offset_b,
        alpha=OBC2_TANH[0] * ones,
        beta=OBC2_TANH[1] * ones,
        gamma=OBC2_TANH[2] * ones,
        coulomb=_COULOMB_CUSTOM,
        solute_dielectric=eps_in,
        solvent_dielectric=eps_out,
        kappa=kappa,
    )
    if len(terms) == 3:
        main_a, sym_a, num_a = _split_expression(terms[1][0])
        _expect(f"{form} surface-area energy term", main_a, sym_a, *_ACE_TERM)
        out.ace_factor = _ACE_FACTOR_CUSTOM
        out.ace_radius = rho + _constant("surface-area energy term", num_a, "offset")
    if form == "GBn2":
        out.alpha, out.beta, out.gamma = table[:, 3], table[:, 4], table[:, 5]
        _read_neck(force, out, table[:, 6], num_i)
    return out


def _read_neck(force, out: GBParameters, radindex: np.ndarray, constants: dict) -> None:
    """The neck term's per-pair tables m0_ij, d0_ij and cut-off R_i + R_j + neckCut (GBn2)."""
    tables = {}
    for i in range(force.getNumTabulatedFunctions()):
        name, fn = force.getTabulatedFunctionName(i), force.getTabulatedFunction(i)
        if type(fn).__name__ != "Discrete2DFunction":
            raise UnsupportedGBForce(
                f"GBn2 tabulated function {name} is a {type(fn).__name__}, not a Discrete2DFunction"
            )
        nx, ny, values = fn.getFunctionParameters()
        tables[name] = np.asarray(values, dtype=float).reshape(ny, nx)  # values[x + nx*y] = f(x, y)
    index = np.rint(radindex).astype(int)
    for name, t in tables.items():
        if index.min() < 0 or index.max() >= min(t.shape):
            raise UnsupportedGBForce(f"GBn2 radindex {index.min()}..{index.max()} outside the {t.shape} table {name}")
    # f(radindex1, radindex2) with particle 1 = i (rows), particle 2 = j (columns)
    out.neck_m0 = tables["getm0"][index[None, :], index[:, None]]
    out.neck_d0 = tables["getd0"][index[None, :], index[:, None]]
    offset = _constant("computed value I", constants, "offset")
    radius = out.offset_radius + offset
    out.neck_cut = radius[:, None] + radius[None, :] + _constant("computed value I", constants, "neckCut")
    out.neck_scale = _constant("computed value I", constants, "neckScale")


# ---------------------------------------------------------------------------- the torch energy
class _GBEnergyFunction(torch.autograd.Function):
    """Energies with the analytic gradient saved in the forward pass (one pass over the pairs).

    The backward pass returns the saved gradient; when a graph is requested (second derivatives),
    it recomputes the gradient from differentiable torch operations instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: GeneralizedBornEnergy) -> torch.Tensor:
        energy, grad = module._evaluate_chunked(x, need_grad=ctx.needs_input_grad[0])
        ctx.module = module
        ctx.save_for_backward(x, grad if grad is not None else x.new_empty(0))
        return energy

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, grad = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is itself differentiable
            grad = ctx.module._evaluate_chunked(x, need_grad=True)[1]
        return grad_output[:, None, None] * grad, None


class GeneralizedBornEnergy(torch.nn.Module):
    """U(x) of one implicit-solvent force, for positions (B, n, 3) or (n, 3) in nm, in kJ/mol.

    Parameters
    ----------
    force
        An ``openmm.GBSAOBCForce`` or an Amber OBC2/GBn2 ``openmm.CustomGBForce`` (NoCutoff), or
        its :class:`GBParameters`.
    max_pairs
        Frames x atom pairs evaluated at once: a batch is cut into chunks of
        ``max(1, max_pairs // n^2)`` frames, so the working memory stays about
        ``max(max_pairs, n^2)`` x 8 bytes x 30 in float64, whatever the batch size.

    The parameters are float64 buffers; the output has the dtype of the input. The gradient with
    respect to the positions (minus the forces) is computed analytically in the same pass as the
    energy when the input requires grad, and is differentiable again (``create_graph=True``).
    """

    def __init__(self, force: Any, max_pairs: int = DEFAULT_MAX_PAIRS) -> None:
        super().__init__()
        p = force if isinstance(force, GBParameters) else read_gb_parameters(force)
        self.form = p.form
        self.n_atoms = len(p.charge)
        self.max_pairs = int(max_pairs)
        self.kappa = float(p.kappa)
        self.neck_scale = float(p.neck_scale)
        self.buried_correction = bool(p.buried_correction)
        self.has_neck = p.neck_m0 is not None
        self.has_ace = p.ace_factor != 0.0 and p.ace_radius is not None
        n = self.n_atoms
        f64 = torch.float64
        q = torch.as_tensor(p.charge, dtype=f64)
        # polar prefactors -k/2 q_i q_j / eps, so that U_polar = sum_ij (qq_in - qq_out exp(-kappa f)) / f
        self.register_buffer("qq_in", -0.5 * p.coulomb / p.solute_dielectric * q[:, None] * q[None, :])
        self.register_buffer("qq_out", -0.5 * p.coulomb / p.solvent_dielectric * q[:, None] * q[None, :])
        rho = torch.as_tensor(p.offset_radius, dtype=f64)
        sr = torch.as_tensor(p.scaled_radius, dtype=f64)
        self.register_buffer("rho", rho)
        self.register_buffer("rho_i", rho[:, None])
        self.register_buffer("inv_rho_i", 1.0 / rho[:, None])
        self.register_buffer("sr_j", sr[None, :])
        self.register_buffer("sr2_j", sr[None, :] ** 2)
        self.register_buffer("inv_tanh_radius", 1.0 / torch.as_tensor(p.tanh_radius, dtype=f64))
        for name in ("alpha", "beta", "gamma"):
            self.register_buffer(name, torch.as_tensor(getattr(p, name), dtype=f64))
        self.register_buffer("other_pair", 1.0 - torch.eye(n, dtype=f64))
        self.register_buffer("eye", torch.eye(n, dtype=f64))
        if self.has_ace:
            radius = torch.as_tensor(p.ace_radius, dtype=f64)
            self.register_buffer("ace_coef", p.ace_factor * (radius + PROBE_RADIUS) ** 2 * radius**6)
        if self.has_neck:
            self.register_buffer("neck_cut", torch.as_tensor(p.neck_cut, dtype=f64))
            self.register_buffer("neck_m0", torch.as_tensor(p.neck_m0, dtype=f64))
            self.register_buffer("neck_d0", torch.as_tensor(p.neck_d0, dtype=f64))
        self._cast: dict = {}

    def _params(self, dtype: torch.dtype) -> dict:
        key = (dtype, self.eye.device)
        if key not in self._cast:
            self._cast[key] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.named_buffers()}
        return self._cast[key]

    def _apply(self, fn, *args, **kwargs):
        self._cast = {}
        return super()._apply(fn, *args, **kwargs)

    # -- the model, for one chunk of frames. Temporaries are updated in place wherever autograd
    # allows it (the create_graph path runs this code under autograd, whose version counters reject
    # any in-place update of a value it saved): on CPU, each fresh (B, n, n) tensor costs about as
    # much in page faults as the arithmetic done on it.
    def _descreening(self, r: torch.Tensor, inv_r: torch.Tensor, p: dict, need_grad: bool):
        """Pair terms h_ij of I_i = sum_j h_ij and, if asked, dh_ij/dr, both (B, n, n)."""
        rho, sr = p["rho_i"], p["sr_j"]
        upper = r + sr
        r_minus_s = r - sr
        gap = r_minus_s.abs()
        lower = torch.maximum(rho, gap)
        # a pair with U = r + s_j < rho_i is masked out below (OpenMM's step(r + sr2 - or1)); with a
        # negative scaled radius s_j, U can be negative there, and log(L / U) would be NaN, which the
        # mask cannot remove (NaN * 0 = NaN): the pair's terms are computed at U = rho_i instead
        inv_u, inv_l = torch.maximum(upper, rho).reciprocal(), lower.reciprocal()
        inv_u2, inv_l2 = inv_u.square(), inv_l.square()
        c = inv_u2 - inv_l2
        b4 = torch.addcmul(r, p["sr2_j"], inv_r, value=-1.0)  # r - s^2/r
        log_lu = torch.log(lower * inv_u)
        h = inv_l - inv_u
        h.addcmul_(b4, c, value=0.25).addcmul_(log_lu, inv_r, value=0.5).mul_(0.5)
        dh = None
        if need_grad:
            # dh/dr = (da + db c + b dc + dd) / 2 with L' = dL/dr (0 where L = rho), da = 1/U^2 - L'/L^2,
            # db = (1 + s^2/r^2)/4, dc = 2 (L'/L^3 - 1/U^3), dd = (L'/L - 1/U - log(L/U)/r) / (2r)
            dl_over_l = torch.sign(r_minus_s).mul_((gap > rho).to(r.dtype)).mul_(inv_l)
            dh = inv_u2 - dl_over_l * inv_l
            dh.addcmul_(inv_r.square().mul_(p["sr2_j"]).add_(1.0), c, value=0.25)
            dc = dl_over_l * inv_l2
            dh.addcmul_(b4, dc.addcmul_(inv_u2, inv_u, value=-1.0), value=0.5)
            dd = dl_over_l - inv_u
            dh.addcmul_(dd.addcmul_(log_lu, inv_r, value=-1.0), inv_r, value=0.5).mul_(0.5)
        if self.buried_correction:  # atom i inside j's scaled sphere (rho_i < s_j - r): L = s_j - r
            buried = (r_minus_s < -rho).to(r.dtype)
            h.addcmul_(buried, p["inv_rho_i"] - inv_l)
            if need_grad:
                dh.addcmul_(buried, inv_l2, value=-1.0)
        # masks multiply (several times faster than masked_fill or where on CPU); every masked
        # value is finite, the diagonal included (r = 1 there)
        keep = (upper >= rho).to(r.dtype).mul_(p["other_pair"])
        h.mul_(keep)
        if need_grad:
            dh.mul_(keep)
        if self.has_neck:
            t = r - p["neck_d0"]
            t2 = t.square()
            den = t2.pow(3).mul_(0.3e6).add_(t2, alpha=100.0).add_(1.0)
            near = (r <= p["neck_cut"]).to(r.dtype).mul_(p["other_pair"])
            neck = near.mul_(p["neck_m0"]).mul_(self.neck_scale).div_(den)
            h.add_(neck)
            if need_grad:  # dN/dr = -N (200 t + 1.8e6 t^5) / den
                slope = t2.square().mul_(1.8e6).add_(200.0).mul_(t).div_(den)
                dh.addcmul_(neck, slope, value=-1.0)
        return h, dh

    def _evaluate(self, x: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Energies (B,) and, if ``need_grad``, dU/dx (B, n, 3) for one chunk of frames."""
        p = self._params(x.dtype)
        x = x - x.mean(1, keepdim=True)  # small coordinates keep x_i sum_j C_ij - sum_j C_ij x_j exact
        r2 = None
        for c in range(3):
            xc = x[:, :, c]
            d2 = (xc[:, :, None] - xc[:, None, :]).square()
            r2 = d2 if r2 is None else r2.add_(d2)
        r = (r2 + p["eye"]).sqrt_()  # 1 on the diagonal: finite there, masked out of every pair sum
        inv_r = r.reciprocal()
        h, dh = self._descreening(r, inv_r, p, need_grad)
        psi = h.sum(-1) * p["rho"]
        poly = psi * (p["alpha"] + psi * (-p["beta"] + psi * p["gamma"]))
        tanh = torch.tanh(poly)
        born = 1.0 / (1.0 / p["rho"] - tanh * p["inv_tanh_radius"])
        # polar energy over all ordered pairs, i = j included (f_ii = B_i is the self energy)
        bb = born[:, :, None] * born[:, None, :]
        ratio = (r2 / bb).mul_(0.25)
        # exp(-60) ~ 1e-26 is already nothing next to r^2; the cap keeps far pairs out of subnormal
        # numbers, which cost tens of times more CPU time than normal ones
        damp = torch.clamp(ratio, max=_DAMP_CAP).neg_().exp_()
        f = torch.addcmul(r2, bb, damp).sqrt_()
        inv_f = f.reciprocal()
        if self.kappa > 0.0:
            screened = p["qq_out"] * torch.exp(-self.kappa * f)
            polar = (p["qq_in"] - screened) * inv_f
        else:
            polar = (p["qq_in"] - p["qq_out"]) * inv_f
        energy = polar.sum((1, 2))
        if self.has_ace:
            ace = p["ace_coef"] * (1.0 / born) ** 6
            energy = energy + ace.sum(-1)
        if not need_grad:
            return energy, None
        dpolar_df = torch.mul(polar, inv_f).neg_()
        if self.kappa > 0.0:
            dpolar_df.addcmul_(screened, inv_f, value=self.kappa)
        half = dpolar_df.mul_(inv_f).mul_(0.5)
        dpolar_dr2 = damp.mul(-0.25).add_(1.0).mul_(half)
        dpolar_dbb = (ratio + 1.0).mul_(damp).mul_(half)
        du_dborn = 2.0 * torch.bmm(dpolar_dbb, born[:, :, None])[:, :, 0]
        if self.has_ace:
            du_dborn = du_dborn - 6.0 * ace / born
        dpoly = p["alpha"] + psi * (-2.0 * p["beta"] + 3.0 * psi * p["gamma"])
        dborn_dsum = born * born * (1.0 - tanh * tanh) * dpoly * p["rho"] * p["inv_tanh_radius"]
        g = dh.mul_((du_dborn * dborn_dsum)[:, :, None])  # dU/dI_i dh_ij/dr
        coef = (g + g.transpose(1, 2)).mul_(inv_r)  # dU/dx_i = sum_j coef_ij (x_i - x_j)
        coef.add_(dpolar_dr2, alpha=4.0).mul_(p["other_pair"])
        grad = x * coef.sum(-1, keepdim=True) - torch.bmm(coef, x)
        return energy, grad

    def _evaluate_chunked(self, x: torch.Tensor, need_grad: bool):
        chunk = max(1, self.max_pairs // (self.n_atoms * self.n_atoms))
        parts = [self._evaluate(xc, need_grad) for xc in torch.split(x, chunk)]
        energy = torch.cat([e for e, _ in parts])
        return energy, torch.cat([g for _, g in parts]) if need_grad else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """U(x) in kJ/mol for positions (B, n, 3) or (n, 3) in nm."""
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(0)
        if x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"positions have shape {tuple(x.shape)}; the force has {self.n_atoms} atoms")
        if torch.is_grad_enabled() and x.requires_grad:
            energy = _GBEnergyFunction.apply(x, self)
        else:
            energy = self._evaluate_chunked(x, need_grad=False)[0]
        return energy[0] if squeeze else energy
