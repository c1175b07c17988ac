// ARMOR S-step on the CPU (see sweep.h). Torch-free, Python-free C++17.
//
// Per tile, exactly the steps of sweep_tiles_reference:
//   G_g = B̃_g B̃_gᵀ (4×4 per group), pattern inverses (G_PP + ridge)⁻¹ with ridge 1e-7·(g_ii+g_jj)
//   for every pass, row k:   a = A[:, k], n = ‖a‖², v = Rᵀa
//     for every group g:     f = B̃_g v + n G_g s_old; exact solve over the 6 patterns
//                            (first max wins, like torch.argmax; NaN counts as the max);
//                            accept iff q(s_new) ≤ q(s_old) and n > 0;
//                            v -= n (s_new − s_old) B̃_g
//     R -= a ⊗ (row_new − row_old) Bt   (one rank-one update per row)
//
// Precision: the O(bB²)-per-row work (v, the f dot products, the v and R updates) is float, as in
// the reference. Two small places use double:
//   * the 4×4 Grams: accumulated in double over bB and rounded to float once, so G_PP and its
//     determinant g_ii g_jj − g_ij² (a cancellation for nearly collinear rows) start from correctly
//     rounded entries; the inverses themselves use the reference's float formula and ridge.
//   * the acceptance test q(s_new) ≤ q(s_old): q = sᵀ(n G s − 2 f) is a sum of terms of size ~f·s
//     whose difference between the two candidates can be far below float resolution, so in float
//     the decision would be round-off noise. Evaluated in double (from the float s, f, G, n) it is
//     the exact comparison of the model the reference states, which keeps the sweep monotone.
// Build with -ffp-contract=off (setup.py does) so the float solve rounds like the reference's
// elementwise torch ops (no fused multiply-adds); the bulk loops vectorise either way.
#include "sweep.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// Runtime-dispatched clones of the per-tile kernel: AVX-512 / AVX2+FMA / baseline x86-64. A build
// stays portable (no -march=native) and still gets wide vectors where the CPU has them.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(ARMOR_NO_TARGET_CLONES)
#define ARMOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define ARMOR_CLONES_NAME "x86-64-v4,x86-64-v3,default"
#else
#define ARMOR_CLONES
#define ARMOR_CLONES_NAME "none"
#endif

#define ARMOR_STR2(x) #x
#define ARMOR_STR(x) ARMOR_STR2(x)

namespace armor_cpu {
namespace {

using i64 = std::int64_t;

// The six ways to keep 2 of 4, in the reference's order (PATTERNS).
constexpr int PI[6] = {0, 0, 0, 1, 1, 2};
constexpr int PJ[6] = {1, 2, 3, 2, 3, 3};

inline i64 round16(i64 x) { return (x + 15) & ~i64(15); }

struct Layout {
    i64 at, v, u, g, c, total;
    Layout(i64 bA, i64 bB) {
        const i64 ng = bB / 4;
        at = 0;
        v = at + round16(bA * bA);
        u = v + round16(bB);
        g = u + round16(bB);
        c = g + round16(ng * 16);
        total = c + round16(ng * 18);
    }
};

// q(s) = sᵀ(n G s − 2 f), in double (see the header comment).
inline double group_q(const float* s, const float* f, const float* G, float n) {
    double q = 0.0;
    for (int r = 0; r < 4; ++r) {
        double gs = 0.0;
        for (int c = 0; c < 4; ++c) gs += double(G[r * 4 + c]) * double(s[c]);
        q += double(s[r]) * (double(n) * gs - 2.0 * double(f[r]));
    }
    return q;
}

// solve_group_reference for one group. C: (c_ii[6], c_ij[6], c_jj[6]). Returns whether s_new is
// accepted (then written to sn); false leaves s_old in place, exactly like torch.where(ok, ...).
inline bool solve_group(const float* f, const float* G, const float* C, float n, const float* so,
                        float* sn) {
    if (!(n > 0.0f)) return false;                       // ok requires n > 0
    const float rn = 1.0f / std::max(n, 1e-30f);
    float si[6], sj[6], sc[6];
    for (int p = 0; p < 6; ++p) {
        const float fi = f[PI[p]], fj = f[PJ[p]];
        si[p] = (C[p] * fi + C[6 + p] * fj) * rn;
        sj[p] = (C[6 + p] * fi + C[12 + p] * fj) * rn;
        sc[p] = fi * si[p] + fj * sj[p];
    }
    int b = 0;                                           // torch.argmax: NaN is the max, first wins
    for (int p = 1; p < 6; ++p) {
        if (std::isnan(sc[b])) break;
        if (std::isnan(sc[p]) || sc[p] > sc[b]) b = p;
    }
    const float xi = si[b], xj = sj[b];
    for (int c = 0; c < 4; ++c) {                        // si·E_i + sj·E_j, as the reference forms it
        const float ei = (c == PI[b]) ? 1.0f : 0.0f, ej = (c == PJ[b]) ? 1.0f : 0.0f;
        sn[c] = xi * ei + xj * ej;
    }
    return group_q(sn, f, G, n) <= group_q(so, f, G, n);
}

// Grams (double accumulation, rounded to float) and pattern_inverses (float, reference formula).
void gram_and_inverses(const float* __restrict Bt, i64 bB, float* __restrict G, float* __restrict C) {
    const i64 ng = bB / 4;
    for (i64 g = 0; g < ng; ++g) {
        const float* B = Bt + 4 * g * bB;
        float* Gg = G + 16 * g;
        for (int r = 0; r < 4; ++r) {
            for (int c = r; c < 4; ++c) {
                const float* x = B + r * bB;
                const float* y = B + c * bB;
                double acc = 0.0;
#pragma omp simd reduction(+ : acc)
                for (i64 j = 0; j < bB; ++j) acc += double(x[j]) * double(y[j]);
                Gg[r * 4 + c] = Gg[c * 4 + r] = float(acc);
            }
        }
        float* Cg = C + 18 * g;
        for (int p = 0; p < 6; ++p) {
            float gii = Gg[PI[p] * 5], gjj = Gg[PJ[p] * 5];
            const float gij = Gg[PI[p] * 4 + PJ[p]];
            const float eps = 1e-7f * std::max(gii + gjj, 1e-30f);
            gii = gii + eps;
            gjj = gjj + eps;
            const float det = gii * gjj - gij * gij;
            Cg[p] = gjj / det;
            Cg[6 + p] = -gij / det;
            Cg[12 + p] = gii / det;
        }
    }
}

ARMOR_CLONES
void tile_kernel(float* __restrict R, const float* __restrict A, const float* __restrict Bt,
                 float* __restrict S, i64 bA, i64 bB, int passes, float* __restrict ws) {
    const i64 ng = bB / 4;
    const Layout L(bA, bB);
    float* __restrict At = ws + L.at;
    float* __restrict v = ws + L.v;
    float* __restrict u = ws + L.u;
    float* __restrict G = ws + L.g;
    float* __restrict C = ws + L.c;

    gram_and_inverses(Bt, bB, G, C);
    for (i64 i = 0; i < bA; ++i)                         // At[k] = A[:, k], contiguous
        for (i64 k = 0; k < bA; ++k) At[k * bA + i] = A[i * bA + k];

    bool v_ready = false;
    for (int pass = 0; pass < passes; ++pass) {
        for (i64 k = 0; k < bA; ++k) {
            const float* __restrict a = At + k * bA;
            double nn = 0.0;
            for (i64 i = 0; i < bA; ++i) nn += double(a[i]) * double(a[i]);
            const float n = float(nn);

            // v = Rᵀa, unless the previous row's residual update already formed it (zero entries of
            // a skipped: A starts as I)
            if (!v_ready) {
                std::fill(v, v + bB, 0.0f);
                for (i64 i = 0; i < bA; ++i) {
                    const float ai = a[i];
                    if (ai == 0.0f) continue;
                    const float* __restrict Ri = R + i * bB;
#pragma omp simd
                    for (i64 j = 0; j < bB; ++j) v[j] += ai * Ri[j];
                }
            }
            v_ready = false;

            float* __restrict Sk = S + k * bB;
            bool changed = false;
            for (i64 g = 0; g < ng; ++g) {
                const float* __restrict B0 = Bt + (4 * g) * bB;
                const float* __restrict B1 = B0 + bB;
                const float* __restrict B2 = B1 + bB;
                const float* __restrict B3 = B2 + bB;
                float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
                for (i64 j = 0; j < bB; ++j) {
                    const float vj = v[j];
                    d0 += B0[j] * vj;
                    d1 += B1[j] * vj;
                    d2 += B2[j] * vj;
                    d3 += B3[j] * vj;
                }
                const float* Gg = G + 16 * g;
                const float so[4] = {Sk[4 * g], Sk[4 * g + 1], Sk[4 * g + 2], Sk[4 * g + 3]};
                const float d[4] = {d0, d1, d2, d3};
                float f[4];
                for (int r = 0; r < 4; ++r) {
                    const float gs = Gg[r * 4] * so[0] + Gg[r * 4 + 1] * so[1] + Gg[r * 4 + 2] * so[2] +
                                     Gg[r * 4 + 3] * so[3];
                    f[r] = d[r] + n * gs;
                }
                float sn[4];
                if (!solve_group(f, Gg, C + 18 * g, n, so, sn)) continue;
                const float e0 = sn[0] - so[0], e1 = sn[1] - so[1], e2 = sn[2] - so[2], e3 = sn[3] - so[3];
                Sk[4 * g] = sn[0];
                Sk[4 * g + 1] = sn[1];
                Sk[4 * g + 2] = sn[2];
                Sk[4 * g + 3] = sn[3];
                if (e0 == 0.0f && e1 == 0.0f && e2 == 0.0f && e3 == 0.0f) continue;
                if (!changed) {
                    std::fill(u, u + bB, 0.0f);
                    changed = true;
                }
                // w = (s_new − s_old) B̃_g;  v −= n w;  u += w  (u = (row_new − row_old) Bt)
#pragma omp simd
                for (i64 j = 0; j < bB; ++j) {
                    const float w = e0 * B0[j] + e1 * B1[j] + e2 * B2[j] + e3 * B3[j];
                    v[j] -= n * w;
                    u[j] += w;
                }
            }
            if (!changed) continue;
            // R −= a ⊗ u, fused with v = Rᵀa' of the next row a' (the same float operations in the
            // same order as two separate loops, one pass over R instead of two)
            const float* __restrict an = (k + 1 < bA) ? At + (k + 1) * bA : (pass + 1 < passes ? At : nullptr);
            if (an) std::fill(v, v + bB, 0.0f);
            for (i64 i = 0; i < bA; ++i) {
                const float ai = a[i];
                const float ni = an ? an[i] : 0.0f;
                float* __restrict Ri = R + i * bB;
                if (ai != 0.0f && ni != 0.0f) {
#pragma omp simd
                    for (i64 j = 0; j < bB; ++j) {
                        const float r = Ri[j] - ai * u[j];
                        Ri[j] = r;
                        v[j] += ni * r;
                    }
                } else if (ai != 0.0f) {
#pragma omp simd
                    for (i64 j = 0; j < bB; ++j) Ri[j] -= ai * u[j];
                } else if (ni != 0.0f) {
#pragma omp simd
                    for (i64 j = 0; j < bB; ++j) v[j] += ni * Ri[j];
                }
            }
            v_ready = an != nullptr;
        }
    }
}

}  // namespace

std::int64_t sweep_workspace_floats(std::int64_t bA, std::int64_t bB) { return Layout(bA, bB).total; }

void sweep_one_tile(float* R, const float* A, const float* Bt, float* S, std::int64_t bA,
                    std::int64_t bB, int passes, float* ws) {
    tile_kernel(R, A, Bt, S, bA, bB, passes, ws);
}

void sweep_tiles(float* R, const float* A, const float* Bt, float* S, std::int64_t T,
                 std::int64_t bA, std::int64_t bB, int passes, int num_threads) {
    if (T < 0 || bA <= 0 || bB <= 0 || bB % 4 != 0 || passes < 0)
        throw std::invalid_argument("sweep_tiles: need T >= 0, bA > 0, bB > 0 with bB % 4 == 0, passes >= 0; got T=" +
                                    std::to_string(T) + " bA=" + std::to_string(bA) + " bB=" +
                                    std::to_string(bB) + " passes=" + std::to_string(passes));
    if (T == 0 || passes == 0) return;
    if (!R || !A || !Bt || !S) throw std::invalid_argument("sweep_tiles: null data pointer");
    const i64 wsz = sweep_workspace_floats(bA, bB);
    const i64 sR = bA * bB, sA = bA * bA, sB = bB * bB;
#ifdef _OPENMP
    int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
    nt = int(std::max<i64>(1, std::min<i64>(nt, T)));
    std::vector<float> ws(std::size_t(wsz) * std::size_t(nt));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (i64 t = 0; t < T; ++t)
        tile_kernel(R + t * sR, A + t * sA, Bt + t * sB, S + t * sR, bA, bB, passes,
                    ws.data() + std::size_t(omp_get_thread_num()) * std::size_t(wsz));
#else
    (void)num_threads;
    std::vector<float> ws(static_cast<std::size_t>(wsz));
    for (i64 t = 0; t < T; ++t)
        tile_kernel(R + t * sR, A + t * sA, Bt + t * sB, S + t * sR, bA, bB, passes, ws.data());
#endif
}

const char* build_info() {
#ifdef _OPENMP
    return "openmp=" ARMOR_STR(_OPENMP) " clones=" ARMOR_CLONES_NAME;
#else
    return "openmp=off clones=" ARMOR_CLONES_NAME;
#endif
}

}  // namespace armor_cpu
