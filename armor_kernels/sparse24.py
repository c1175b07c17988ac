"""The 2:4 pattern: checks and the portable packed form.

Groups are 4 consecutive entries along d_in (the last dimension) of each row; at most 2 are
non-zero. The portable packed form, used by checkpoints, stores for each row the kept values
(d_in / 2 of them, in column order) and their 2-bit positions inside their group, four positions
to a byte, low bits first: 2 bits per kept value, as on the sparse tensor cores.
A group with fewer than two non-zeros still stores two slots (an explicit zero), so the packed
shape is fixed and the round trip is exact.
"""
from __future__ import annotations

import torch

from .errors import InputError


def violations_24(x: torch.Tensor) -> int:
    """How many groups of 4 along the last dim (a multiple of 4) hold more than 2 non-zeros."""
    return int(((x != 0).reshape(*x.shape[:-1], -1, 4).sum(-1) > 2).sum())


def check_24(x: torch.Tensor, name: str = "S") -> None:
    """Raise ValueError unless every group of 4 along the last dim has at most 2 non-zeros."""
    if x.shape[-1] % 4:
        raise InputError(f"{name}: last dimension must be divisible by 4, got shape {tuple(x.shape)}")
    if x.is_meta:  # a placeholder a loader will fill: only its shape can be checked
        return
    bad = violations_24(x)
    if bad:
        raise InputError(f"{name}: violates 2:4 in {bad} group(s) of 4 along the last dimension")


def pack_24(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense 2:4 matrix (rows, d_in) -> (values (rows, d_in/2), idx uint8 (rows, d_in/8))."""
    if S.dim() != 2 or S.shape[1] % 8:
        raise InputError(f"S: expected a 2-D tensor with d_in divisible by 8, got shape {tuple(S.shape)}")
    check_24(S)
    rows, d_in = S.shape
    g = S.reshape(rows, d_in // 4, 4)
    # Two slots per group: the non-zeros first (stable order), padded with zeros if fewer than two.
    order = torch.argsort((g == 0).to(torch.int8), dim=-1, stable=True)[..., :2]
    order = torch.sort(order, dim=-1).values  # keep column order inside the group
    values = torch.gather(g, -1, order).reshape(rows, d_in // 2)
    pos = order.reshape(rows, d_in // 8, 4).to(torch.uint8)
    idx = pos[..., 0] | (pos[..., 1] << 2) | (pos[..., 2] << 4) | (pos[..., 3] << 6)
    return values.contiguous(), idx.contiguous()


def check_packed_24(values: torch.Tensor, idx: torch.Tensor) -> None:
    """Raise ValueError unless (values, idx) have the shapes and dtype of pack_24's output."""
    if values.dim() != 2 or idx.dim() != 2 or idx.dtype != torch.uint8:
        raise InputError(
            f"values/idx: expected 2-D values and 2-D uint8 idx, got {tuple(values.shape)} "
            f"and {tuple(idx.shape)} {idx.dtype}"
        )
    rows, half = values.shape
    if idx.shape != (rows, half // 4) or half % 4:
        raise InputError(f"idx: expected shape {(rows, half // 4)} for values {tuple(values.shape)}, "
                         f"got {tuple(idx.shape)}")


def unpack_24(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_24: (values, idx) -> dense (rows, d_in)."""
    check_packed_24(values, idx)
    rows, half = values.shape
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=idx.device)
    pos = ((idx.unsqueeze(-1) >> shifts) & 3).reshape(rows, half // 2, 2).long()
    out = torch.zeros(rows, half // 2, 4, dtype=values.dtype, device=values.device)
    out.scatter_(-1, pos, values.reshape(rows, half // 2, 2))
    return out.reshape(rows, half * 2)
