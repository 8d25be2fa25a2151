"""Internal coordinates: NeRF inverses, Jacobians vs autograd, Z-matrix construction."""

import math

import mdtraj as md
import numpy as np
import pytest
import torch
from _backmap_helpers import ala2_six, ala2_traj

from openmm_backmap.geometry import (
    InternalCoordinates,
    angles,
    build_zmatrix,
    dihedrals,
    distances,
    nerf,
    zmatrix_from_topology,
)

torch.set_default_dtype(torch.float32)


def test_nerf_inverts_internal_coordinates():
    g = torch.Generator().manual_seed(0)
    i, j, k, m = torch.randn(4, 100, 3, generator=g, dtype=torch.float64)
    r, th, ph = distances(i, j), angles(i, j, k), dihedrals(i, j, k, m)
    assert torch.allclose(nerf(j, k, m, r, th, ph), i, atol=1e-12)
    assert th.min() >= 0 and th.max() <= math.pi


def test_dihedral_sign_matches_mdtraj():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(4, 20, 3, generator=g, dtype=torch.float64)
    ours = dihedrals(p[0], p[1], p[2], p[3]).numpy()
    traj = md.Trajectory(p.permute(1, 0, 2).numpy().astype(np.float32), None)
    theirs = md.compute_dihedrals(traj, [[0, 1, 2, 3]])[:, 0]
    assert np.allclose(ours, theirs, atol=1e-5)


def _chain(n):
    return [[j for j in (i - 1, i + 1) if 0 <= j < n] for i in range(n)]


def test_zmatrix_refs_are_placed_before_use():
    traj = ala2_traj()
    anchors = ala2_six(traj.topology).bead_atoms.tolist()
    z = zmatrix_from_topology(traj.topology, anchors)
    placed = set(anchors)
    order = np.concatenate(z.levels)
    for row in z.rows[order]:
        assert set(row[1:].tolist()) <= placed
        placed.add(int(row[0]))
    assert placed == set(range(traj.n_atoms))
    # improper references: a hydrogen on a centre with placed heavy neighbours uses the two placed
    # first (HA on CA: N and CB come before C in the mapping's bead order)
    names = [a.name for a in traj.topology.atoms]
    row_of = {int(r[0]): r for r in z.rows}
    ha = row_of[names.index("HA")]
    assert [names[int(a)] for a in ha[1:]] == ["CA", "N", "CB"]


def test_ic_round_trip_with_anchors_and_without():
    traj = ala2_traj()
    x = torch.tensor(traj.xyz[:50], dtype=torch.float64)
    anchors = ala2_six(traj.topology).bead_atoms.tolist()
    ic = InternalCoordinates(zmatrix_from_topology(traj.topology, anchors)).double()
    r, th, ph, root = ic.to_internal(x)
    assert torch.allclose(ic.to_cartesian(x[:, anchors], r, th, ph, root), x, atol=1e-10)
    ic0 = InternalCoordinates(zmatrix_from_topology(traj.topology, [])).double()
    r, th, ph, root = ic0.to_internal(x)
    y = ic0.to_cartesian(x[:, :0], r, th, ph, root)
    assert torch.allclose(torch.cdist(y, y), torch.cdist(x, x), atol=1e-10)
    # handedness is kept: an improper dihedral has the same sign
    n, ca, c, cb = 6, 8, 14, 10
    assert torch.allclose(
        dihedrals(y[:, cb], y[:, ca], y[:, n], y[:, c]), dihedrals(x[:, cb], x[:, ca], x[:, n], x[:, c])
    )


def test_log_jacobian_matches_autograd():
    traj = ala2_traj()
    x = torch.tensor(traj.xyz[0:1], dtype=torch.float64)
    anchors = ala2_six(traj.topology).bead_atoms.tolist()
    ic = InternalCoordinates(zmatrix_from_topology(traj.topology, anchors)).double()
    r, th, ph, root = ic.to_internal(x)
    free = ic.rows[:, 0]
    flat = torch.cat([r, th, ph], dim=-1)[0]
    n = r.shape[1]

    def f(v):
        out = ic.to_cartesian(x[:, anchors], v[None, :n], v[None, n : 2 * n], v[None, 2 * n :], root)
        return out[0, free].reshape(-1)

    jac = torch.autograd.functional.jacobian(f, flat)
    sign, logdet = torch.linalg.slogdet(jac)
    assert sign != 0
    assert torch.allclose(logdet, ic.log_jacobian(r, th, root)[0], atol=1e-9)


def test_zero_anchor_root_jacobian_matches_autograd():
    # 3 atoms: (t, rotation, r01, r2, theta) -> x; volume element r01^2 r2^2 sin(theta) dt dR
    neighbours = _chain(3)
    z = build_zmatrix(neighbours, [])
    ic = InternalCoordinates(z).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 3, generator=g, dtype=torch.float64)
    r, th, ph, root = ic.to_internal(x)

    def place(p):
        # p = (tx, ty, tz, a, b, c, r01, r2, theta); rotation from exp of a skew matrix
        w = p[3:6]
        k = torch.zeros(3, 3, dtype=p.dtype)
        k[0, 1], k[0, 2], k[1, 2] = -w[2], w[1], -w[0]
        k = k - k.T
        rot = torch.linalg.matrix_exp(k)
        y = ic.to_cartesian(x[:, :0], r, th, ph, p[None, 6:9])[0]
        return (y @ rot.T + p[:3]).reshape(-1)

    p0 = torch.cat([torch.zeros(6, dtype=torch.float64), root[0]])
    sign, logdet = torch.linalg.slogdet(torch.autograd.functional.jacobian(place, p0))
    # at w = 0 the Haar density of the exponential coordinates is 1
    assert torch.allclose(logdet, ic.log_jacobian(r, th, root)[0], atol=1e-9)


def test_zmatrix_rejects_one_or_two_anchors():
    with pytest.raises(ValueError, match="at least 3"):
        build_zmatrix(_chain(5), [0, 1])


def test_random_rotations_are_uniform_rotations():
    from openmm_backmap.geometry import random_rotation, random_rotations

    r = random_rotations(20000, np.random.default_rng(2))
    assert np.allclose(r @ r.transpose(0, 2, 1), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(r), 1.0)
    # Haar measure: E[R] = 0 and E[R_ij^2] = 1/3
    assert np.abs(r.mean(0)).max() < 0.02 and np.abs((r**2).mean(0) - 1 / 3).max() < 0.01
    assert np.allclose(np.linalg.det(random_rotation(np.random.default_rng(0))), 1.0)


def test_random_placement_is_a_rigid_motion_onto_the_centre():
    from openmm_backmap.geometry import random_placement

    rng = np.random.default_rng(3)
    X = rng.normal(size=(6, 3)) + 5.0
    centre = np.array([0.3, -1.0, 2.0])
    moved = [random_placement(X, centre, rng) for _ in range(4000)]
    d = np.linalg.norm(X[:, None] - X[None], axis=-1)
    for Y in moved[:10]:
        assert np.allclose(Y.mean(0), centre)
        assert np.allclose(np.linalg.norm(Y[:, None] - Y[None], axis=-1), d)
        assert np.linalg.det(np.linalg.lstsq(X - X.mean(0), Y - centre, rcond=None)[0]) > 0  # no mirror image
    # the orientation is uniform: a bead's direction from the centroid averages to zero
    u = np.stack([Y[0] - centre for Y in moved])
    assert np.abs(u.mean(0)).max() < 4 * np.linalg.norm(X[0] - X.mean(0)) / np.sqrt(3 * len(u))
