"""The S-step's tile sweep: exact group solves swept over every group of every tile (docs/DESIGN.md §4).

`sweep_tiles_reference` is the plain PyTorch definition (the spec; it serves every device).
Two kernels implement it: `sweep_tiles_cpu`, the C++/OpenMP kernel of csrc/cpu/sweep.cpp (the
extension armor_kernels._armor_cpu, built by setup.py; loaded here as `cpu_ext`, None when it is
not built or ARMOR_CPU_EXT=0), and `sweep_tiles_triton`, the Triton kernel. `sweep_tiles`
dispatches: Triton where `triton_switch.use_triton` says so, else the C++ kernel for float32 CPU
tensors, else the reference. The group solve itself is group_solve.py's.
"""
from __future__ import annotations

import os

import torch

from .. import extensions
from ..errors import InputError
from . import triton_switch
from .group_solve import pattern_inverses, solve_group_reference
from .triton_switch import jit, next_pow2, tl


def sweep_tiles_reference(R, A, Bt, S, passes: int = 1):
    """S-step: exact group solves swept over every group of every tile, residual kept up to date.

    All tiles are independent and processed in lockstep (the batch dim T = nA · nB):
      R  (T, bA, bB)  weighted residual (W̄ − A S B)^IJ D_J^½, updated in place
      A  (T, bA, bA)  A_I of each tile
      Bt (T, bB, bB)  B_J D_J^½ of each tile
      S  (T, bA, bB)  the tile of the sparse core, updated in place
    Row k's groups share a = A_I[:, k], so v = Rᵀa is formed once per row and kept current by a
    4-row update after each group; the residual takes one rank-one update per row
    (docs/DESIGN.md §4).
    """
    T, bA, bB = S.shape
    ng = bB // 4
    Bg = Bt.reshape(T, ng, 4, bB)
    Gram = Bg @ Bg.transpose(-1, -2)                                     # (T, ng, 4, 4)
    inv = pattern_inverses(Gram)                                         # (T, ng, 3, 6)
    Bgs, Grams, invs = Bg.unbind(1), Gram.unbind(1), inv.unbind(1)
    for _ in range(passes):
        for k in range(bA):
            a = A[:, :, k]
            n = (a * a).sum(-1)
            v = (a.unsqueeze(1) @ R).squeeze(1)                          # Rᵀa, (T, bB)
            old = S[:, k, :].clone()
            row = old.clone().reshape(T, ng, 4)
            for g in range(ng):
                s_old = row[:, g]
                f = (Bgs[g] @ v.unsqueeze(-1)).squeeze(-1) + n[:, None] * (Grams[g] @ s_old.unsqueeze(-1)).squeeze(-1)
                s_new = solve_group_reference(f, Grams[g], n, s_old, invs[g])
                v = v - n[:, None] * ((s_new - s_old).unsqueeze(1) @ Bgs[g]).squeeze(1)
                row[:, g] = s_new
            row = row.reshape(T, bB)
            R -= a.unsqueeze(-1) * ((row - old).unsqueeze(1) @ Bt)
            S[:, k, :] = row
    return R, S


def load_cpu_ext():
    """armor_kernels._armor_cpu (csrc/cpu, built by setup.py), or None: the reference then serves (a built
    one that fails to load warns: extensions.py).

    ARMOR_CPU_EXT=0 in the environment skips it (unset or any other value: load it when built).
    """
    if os.environ.get("ARMOR_CPU_EXT", "").strip() == "0":
        return None
    return extensions.load("_armor_cpu", "pip install the package: setup.py builds it")[0]


cpu_ext = load_cpu_ext()


def sweep_tiles_cpu(R, A, Bt, S, passes: int = 1):
    """The C++/OpenMP kernel (csrc/cpu/sweep.cpp): same semantics as `sweep_tiles_reference`.

    float32 CPU tensors only; non-contiguous inputs are copied and R, S written back in place.
    """
    if cpu_ext is None:
        raise RuntimeError("armor_kernels._armor_cpu is not built (pip install the package to build it)")
    T, bA, bB = S.shape
    if bB % 4 or R.shape != S.shape or A.shape != (T, bA, bA) or Bt.shape != (T, bB, bB):
        raise InputError(f"sweep_tiles: shapes R {tuple(R.shape)}, A {tuple(A.shape)}, Bt {tuple(Bt.shape)}, "
                         f"S {tuple(S.shape)} do not fit (T,bA,bB)/(T,bA,bA)/(T,bB,bB)/(T,bA,bB), bB % 4 == 0")
    Rc, Sc = R.contiguous(), S.contiguous()
    if Rc.data_ptr() == Sc.data_ptr() and Rc.numel():
        Sc = Sc.clone()
    Ac, Btc = A.contiguous(), Bt.contiguous()
    cpu_ext.sweep_tiles(Rc.data_ptr(), Ac.data_ptr(), Btc.data_ptr(), Sc.data_ptr(),
                        T, bA, bB, int(passes), torch.get_num_threads())
    if Rc is not R:
        R.copy_(Rc)
    if Sc is not S:
        S.copy_(Sc)
    return R, S


def _cpu_sweep_applies(R, A, Bt, S) -> bool:
    ts = (R, A, Bt, S)
    return (cpu_ext is not None
            and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 3 for t in ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)))


def sweep_tiles(R, A, Bt, S, passes: int = 1, *, use_triton: bool | None = None):
    """`passes` S-step sweeps over T independent tiles, in place on R and S (returned): see
    `sweep_tiles_reference` for the shapes and the arithmetic.

    Path: the Triton kernel where `triton_switch.use_triton` says so (float32; CUDA tensors, or CPU
    tensors under Triton's interpreter with use_triton=True / ARMOR_TRITON=1); else the C++ kernel
    (`sweep_tiles_cpu`) for float32 CPU tensors when it is built and no gradient is being recorded;
    else the reference.
    """
    if (triton_switch.use_triton(R, A, Bt, S, use_triton=use_triton)
            and all(t.dtype == torch.float32 for t in (R, A, Bt, S))):
        return sweep_tiles_triton(R, A, Bt, S, passes)
    if _cpu_sweep_applies(R, A, Bt, S):
        return sweep_tiles_cpu(R, A, Bt, S, passes)
    return sweep_tiles_reference(R, A, Bt, S, passes)


# ---------------------------------------------------------------------------------------------
# Triton kernel (beside the reference above, which is the spec). Dispatch goes through
# `triton_switch.use_triton`: CUDA tensors -> Triton; CPU tensors -> Triton only under Triton's
# interpreter (TRITON_INTERPRET=1 set before triton is imported) with use_triton=True or
# ARMOR_TRITON=1 (tests); otherwise the C++ kernel above, or the reference.
# ---------------------------------------------------------------------------------------------

@jit
def _sweep_kernel(R, A, Bt, S, GI, bA, bB, passes,
                  s_rt, s_ri, s_rj, s_at, s_ai, s_aj, s_bt, s_bi, s_bj, s_st, s_si, s_sj,
                  BA: tl.constexpr, BB: tl.constexpr, R_IN_REGS: tl.constexpr, RCH: tl.constexpr):
    """The S-step sweep of ONE tile t = program_id(0): `passes` × rows k × groups g, sequential,
    with exactly the arithmetic of `sweep_tiles_reference` for that tile.

    What lives where (per program):
      registers : a = A_I[:, k] (BA), v = Rᵀa (BB), d = Σ_g Δs_gᵀ B̃_g (BB: the direction of the
                  row's rank-one residual update), the group's 4 rows of B̃ (4 × BB), and the
                  whole group solve as scalars (f, G, the pattern inverses, s_old, s_new: no
                  reductions but the 4 dot products that form f);
                  with R_IN_REGS also the residual tile (BA × BB, loop-carried over rows and passes).
      global    : without R_IN_REGS the residual tile (the program's own tile; read in RCH-row
                  chunks to form v and read-modify-written once per row; L1/L2-resident);
                  S (4 values read and written per group); B̃ rows (re-read per group, L1/L2);
                  the per-group record GI = (G row-major 16, c_ii 6, c_ij 6, c_jj 6).
    One barrier per row orders the global writes (S, and R when global) against the next row's
    and the next pass's reads by other threads of the program.
    Ragged bA, bB (96, 12, ...) are masked power-of-2 aranges: the padded entries of R, a and
    B̃ are 0, so they stay 0 and add nothing to v or d.
    """
    t = tl.program_id(0).to(tl.int64)
    ri = tl.arange(0, BA)
    cj = tl.arange(0, BB)
    im = ri < bA
    jm = cj < bB
    ng = bB // 4
    R_t = R + t * s_rt
    A_t = A + t * s_at
    B_t = Bt + t * s_bt
    S_t = S + t * s_st
    if R_IN_REGS:
        Rt = tl.load(R_t + ri[:, None] * s_ri + cj[None, :] * s_rj, mask=im[:, None] & jm[None, :], other=0.0)
    for _p in range(passes):
        for k in range(bA):
            a = tl.load(A_t + ri * s_ai + k * s_aj, mask=im, other=0.0)
            n = tl.sum(a * a, axis=0)                                    # n = ‖a‖²
            if R_IN_REGS:
                v = tl.sum(Rt * a[:, None], axis=0)                      # v = Rᵀa, once per row
            else:
                v = tl.zeros([BB], dtype=tl.float32)
                for i0 in range(0, bA, RCH):
                    rr = i0 + tl.arange(0, RCH)
                    rmask = rr < bA
                    Rc = tl.load(R_t + rr[:, None] * s_ri + cj[None, :] * s_rj,
                                 mask=rmask[:, None] & jm[None, :], other=0.0)
                    ac = tl.load(A_t + rr * s_ai + k * s_aj, mask=rmask, other=0.0)
                    v += tl.sum(Rc * ac[:, None], axis=0)
            rn = 1.0 / tl.maximum(n, 1e-30)
            d = tl.zeros([BB], dtype=tl.float32)
            s_row = S_t + k * s_si
            for g in range(ng):
                b_g = B_t + (4 * g) * s_bi + cj * s_bj
                B0 = tl.load(b_g, mask=jm, other=0.0)
                B1 = tl.load(b_g + s_bi, mask=jm, other=0.0)
                B2 = tl.load(b_g + 2 * s_bi, mask=jm, other=0.0)
                B3 = tl.load(b_g + 3 * s_bi, mask=jm, other=0.0)
                o0 = tl.load(s_row + (4 * g) * s_sj)
                o1 = tl.load(s_row + (4 * g + 1) * s_sj)
                o2 = tl.load(s_row + (4 * g + 2) * s_sj)
                o3 = tl.load(s_row + (4 * g + 3) * s_sj)
                gi = GI + (t * ng + g) * 34
                g00 = tl.load(gi + 0)
                g01 = tl.load(gi + 1)
                g02 = tl.load(gi + 2)
                g03 = tl.load(gi + 3)
                g10 = tl.load(gi + 4)
                g11 = tl.load(gi + 5)
                g12 = tl.load(gi + 6)
                g13 = tl.load(gi + 7)
                g20 = tl.load(gi + 8)
                g21 = tl.load(gi + 9)
                g22 = tl.load(gi + 10)
                g23 = tl.load(gi + 11)
                g30 = tl.load(gi + 12)
                g31 = tl.load(gi + 13)
                g32 = tl.load(gi + 14)
                g33 = tl.load(gi + 15)
                # f = B̃_g R'ᵀa, R' = residual without this group: B̃_g v + n G s_old
                Go0 = g00 * o0 + g01 * o1 + g02 * o2 + g03 * o3
                Go1 = g10 * o0 + g11 * o1 + g12 * o2 + g13 * o3
                Go2 = g20 * o0 + g21 * o1 + g22 * o2 + g23 * o3
                Go3 = g30 * o0 + g31 * o1 + g32 * o2 + g33 * o3
                f0 = tl.sum(B0 * v, axis=0) + n * Go0
                f1 = tl.sum(B1 * v, axis=0) + n * Go1
                f2 = tl.sum(B2 * v, axis=0) + n * Go2
                f3 = tl.sum(B3 * v, axis=0) + n * Go3
                # the 6 patterns in PATTERNS order; s_P = G_PP⁻¹ f_P / n, gain f_P·s_P; the first
                # maximal gain wins (torch.argmax's tie rule), hence the strict '>' below
                n0 = 0.0
                n1 = 0.0
                n2 = 0.0
                n3 = 0.0
                best = 0.0
                for p in tl.static_range(6):
                    pos_i = 0 if p < 3 else (1 if p < 5 else 2)
                    pos_j = 1 if p == 0 else (2 if (p == 1 or p == 3) else 3)
                    fi = f0 if pos_i == 0 else (f1 if pos_i == 1 else f2)
                    fj = f1 if pos_j == 1 else (f2 if pos_j == 2 else f3)
                    cii = tl.load(gi + 16 + p)
                    cij = tl.load(gi + 22 + p)
                    cjj = tl.load(gi + 28 + p)
                    si = (cii * fi + cij * fj) * rn
                    sj = (cij * fi + cjj * fj) * rn
                    gain = fi * si + fj * sj
                    if p == 0:
                        best = gain
                        n0 = si
                        n1 = sj
                        n2 = 0.0 * si
                        n3 = 0.0 * si
                    else:
                        up = gain > best
                        best = tl.where(up, gain, best)
                        n0 = tl.where(up, si if pos_i == 0 else 0.0, n0)
                        n1 = tl.where(up, si if pos_i == 1 else (sj if pos_j == 1 else 0.0), n1)
                        n2 = tl.where(up, si if pos_i == 2 else (sj if pos_j == 2 else 0.0), n2)
                        n3 = tl.where(up, sj if pos_j == 3 else 0.0, n3)
                # acceptance, as group_objective: q(s) = sᵀ(n G s − 2f) must not rise; and n > 0
                Gn0 = g00 * n0 + g01 * n1 + g02 * n2 + g03 * n3
                Gn1 = g10 * n0 + g11 * n1 + g12 * n2 + g13 * n3
                Gn2 = g20 * n0 + g21 * n1 + g22 * n2 + g23 * n3
                Gn3 = g30 * n0 + g31 * n1 + g32 * n2 + g33 * n3
                q_new = (n0 * (n * Gn0 - 2.0 * f0) + n1 * (n * Gn1 - 2.0 * f1)
                         + n2 * (n * Gn2 - 2.0 * f2) + n3 * (n * Gn3 - 2.0 * f3))
                q_old = (o0 * (n * Go0 - 2.0 * f0) + o1 * (n * Go1 - 2.0 * f1)
                         + o2 * (n * Go2 - 2.0 * f2) + o3 * (n * Go3 - 2.0 * f3))
                ok = (q_new <= q_old) & (n > 0.0)
                s0 = tl.where(ok, n0, o0)
                s1 = tl.where(ok, n1, o1)
                s2 = tl.where(ok, n2, o2)
                s3 = tl.where(ok, n3, o3)
                tl.store(s_row + (4 * g) * s_sj, s0)
                tl.store(s_row + (4 * g + 1) * s_sj, s1)
                tl.store(s_row + (4 * g + 2) * s_sj, s2)
                tl.store(s_row + (4 * g + 3) * s_sj, s3)
                u = (s0 - o0) * B0 + (s1 - o1) * B1 + (s2 - o2) * B2 + (s3 - o3) * B3   # Δsᵀ B̃_g
                v = v - n * u
                d = d + u
            # the row's rank-one residual update R -= a dᵀ
            if R_IN_REGS:
                Rt = Rt - a[:, None] * d[None, :]
            else:
                for i0 in range(0, bA, RCH):
                    rr = i0 + tl.arange(0, RCH)
                    rmask = rr < bA
                    rp = R_t + rr[:, None] * s_ri + cj[None, :] * s_rj
                    mm = rmask[:, None] & jm[None, :]
                    ac = tl.load(A_t + rr * s_ai + k * s_aj, mask=rmask, other=0.0)
                    tl.store(rp, tl.load(rp, mask=mm, other=0.0) - ac[:, None] * d[None, :], mask=mm)
            tl.debug_barrier()
    if R_IN_REGS:
        tl.store(R_t + ri[:, None] * s_ri + cj[None, :] * s_rj, Rt, mask=im[:, None] & jm[None, :])


def sweep_tiles_triton(R, A, Bt, S, passes: int = 1, *, r_in_registers: bool = False,
                       num_warps: int | None = None):
    """Same contract as `sweep_tiles_reference` (float32; R and S updated in place and returned).

    The 4×4 Gram matrices and their 6 pattern inverses depend only on B̃, so they are formed once
    here with the reference's own expressions (same ridge, same bits) and read by the kernel.
    GPU knobs (defaults chosen from ptxas, not yet timed on a GPU; see the kernel's docstring):
      r_in_registers=False, num_warps=1 (default): residual tile in global memory (L1/L2), one warp
        per tile, so the 4 dot products of every group reduce within a warp (shuffles, no barrier);
        sm_90a, 128×128: 96 registers, no spills.
      r_in_registers=True (num_warps=8): residual tile held in registers, no residual traffic, but
        every reduction crosses warps; sm_90a, 128×128: 255 registers and ~820 B of spills per
        thread (64×64 with 4 warps: 254 registers, 48 B spills), so it is not the default.
    """
    T, bA, bB = S.shape
    if bB % 4 or R.shape != S.shape or A.shape != (T, bA, bA) or Bt.shape != (T, bB, bB):
        raise InputError(f"sweep_tiles: R, S (T, bA, bB) with bB % 4 == 0, A (T, bA, bA), Bt (T, bB, bB) "
                         f"expected, got {tuple(R.shape)}, {tuple(S.shape)}, {tuple(A.shape)}, {tuple(Bt.shape)}")
    if T == 0 or bA == 0 or bB == 0 or passes <= 0:
        return R, S
    ng = bB // 4
    Bg = Bt.reshape(T, ng, 4, bB)
    Gram = Bg @ Bg.transpose(-1, -2)                                   # (T, ng, 4, 4), as the reference
    inv = pattern_inverses(Gram)                                       # (T, ng, 3, 6), same ridge
    GI = torch.cat((Gram.reshape(T, ng, 16), inv.reshape(T, ng, 18)), -1).contiguous()  # (T, ng, 34)
    BA, BB = next_pow2(bA), next_pow2(bB)
    if num_warps is None:
        num_warps = 8 if r_in_registers else 1
    RCH = max(1, min(BA, (256 * num_warps) // BB))                     # ≤ 8 fp32/thread per chunk
    _sweep_kernel[(T,)](R, A, Bt, S, GI, bA, bB, int(passes),
                        *R.stride(), *A.stride(), *Bt.stride(), *S.stride(),
                        BA=BA, BB=BB, R_IN_REGS=bool(r_in_registers), RCH=RCH, num_warps=num_warps)
    return R, S
