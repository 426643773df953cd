"""Sahara's score (paper §4.1, Eq. 11): pure functions of representation matrices, no model.

Representation (§4.1): M = the final-norm hidden state at each query's last prompt token, one row per query (N x d),
not mean-centred, as the authors' code does (`readout="last-layer"` takes the state before the final norm instead,
as the nnsight cookbook notebook does). Score of a head set T (Eq. 11, the code at HEAD, 6203a04): the sum of
the principal angles, in degrees, between the top-R left singular vectors of M_clean and of M_T (T ablated together):

    U1 = U_clean[:, :R],  U2 = U_T[:, :R],  sigma = svdvals(U1^T U2) clamped to [0, 1],
    score = sum(degrees(arccos(sigma)))

R = 1 by default (the authors' code; the paper gives no number), where the score is arccos(|u1 . u2|) and the SVD's
sign ambiguity cancels. The SVD always runs in float64 from the float32 readouts, whatever the model's dtype. The
left singular vectors live in query space (one weight per query), so N must exceed R: at N = R both subspaces are
all of R^N and every angle is 0.

Paper-era variant (reference/paper.md §2.2, §6.1): the code at the time of the paper (86fb3cb) called a function that
does no SVD: it normalises each *column* of the raw M and returns the angle between column 0 of M_clean and of M_T,
i.e. it measures hidden dimension 0 alone. The authors replaced it after publication; it is offered as
``score="paper-era"`` to reproduce old numbers, never by default.
"""

from __future__ import annotations

import torch


def left_basis(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-`rank` left singular vectors of [..., N, d], in float64: [..., N, rank]."""
    return torch.linalg.svd(matrix.double(), full_matrices=False).U[..., :rank]


def angles_to_basis(basis: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
    """Sum of principal angles (degrees) between `basis` [N, R] and each [K, N, d] matrix's top-R left subspace: [K]."""
    other = left_basis(ablated, basis.shape[-1])
    sigma = torch.linalg.svdvals(basis.T @ other).clamp(0.0, 1.0)  # cosines of the principal angles, sign-free
    return torch.rad2deg(torch.arccos(sigma)).sum(-1)


def subspace_angles(clean: torch.Tensor, ablated: torch.Tensor, rank: int = 1) -> torch.Tensor:
    """`subspace_angle` of `clean` [N, d] against each of `ablated` [K, N, d]: [K] float64."""
    _check_shapes(clean, ablated.shape[1:], rank)
    return angles_to_basis(left_basis(clean, rank), ablated)


def subspace_angle(clean: torch.Tensor, ablated: torch.Tensor, rank: int = 1) -> float:
    """Sum of the principal angles, in degrees, between the top-`rank` left singular subspaces of two N x d matrices."""
    return float(subspace_angles(clean, ablated[None], rank)[0])


def paper_era_angles(clean: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
    """The paper-era score (86fb3cb): angle between column 0 of the column-normalised `clean` [N, d] and of each
    `ablated` [K, N, d], in degrees, sign-free. It sees hidden dimension 0 only."""
    _check_shapes(clean, ablated.shape[1:], 1)
    return angles_to_column(unit_column(clean), ablated)


def angles_to_column(column: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
    """Angle (degrees, sign-free) between a unit vector [N] and column 0 of each [K, N, d] matrix, normalised: [K]."""
    return torch.rad2deg(torch.arccos((unit_column(ablated) @ column).abs().clamp(0.0, 1.0)))


def unit_column(matrix: torch.Tensor) -> torch.Tensor:
    """Column 0 of [..., N, d] in float64, scaled to unit length: [..., N]."""
    first = matrix.double()[..., 0]
    return first / first.norm(dim=-1, keepdim=True)


def _check_shapes(clean: torch.Tensor, ablated_shape, rank: int) -> None:
    if clean.dim() != 2 or tuple(ablated_shape) != tuple(clean.shape):
        raise ValueError(f"need matrices of the same N x d shape, not {tuple(clean.shape)} and {tuple(ablated_shape)}")
    if not 1 <= rank <= min(clean.shape):
        raise ValueError(f"rank must be from 1 to min(N, d) = {min(clean.shape)}, not {rank}")


__all__ = ["left_basis", "angles_to_basis", "subspace_angles", "subspace_angle", "paper_era_angles", "angles_to_column"]
