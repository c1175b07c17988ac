// The ARMOR op on the CPU from the packed 2:4 form (see packed_linear.h).
//
// Three stages, each an OpenMP loop over rows in one parallel region:
//   1. xb = x B'ᵀ in float32 (or x itself, converted, without B'): B' is small (bB · d_in values),
//      and applying it first lets the sparse stage read float32 inputs;
//   2. ys = xb Sᵀ from S's kept values and 2-bit positions, half a dense layer's multiplications;
//   3. y = ys A'ᵀ + bias, rounded to the storage dtype once.
// The sparse stage has two layouts. Up to LANES_MIN_TOKENS − 1 tokens (decode), one output row at a time:
// the row is streamed once per group of up to 4 tokens, and the input each kept value multiplies is
// picked out of its group of 4 by an in-lane vector permute. From LANES_MIN_TOKENS on, the tokens lie
// along the vector lanes ("more tokens" below), and the wrappers are computed the same way.
#include "packed_linear.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ARMOR_X86 1
#else
#define ARMOR_X86 0
#endif

namespace armor_cpu {
namespace {

using i64 = std::int64_t;

// --- scalar conversions (round to nearest even, as torch's casts) -------------------------------------

inline float bits_to_f32(std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline std::uint32_t f32_to_bits(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float bf16_to_f32(std::uint16_t h) { return bits_to_f32(std::uint32_t(h) << 16); }

inline std::uint16_t f32_to_bf16(float f) {
    std::uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return std::uint16_t(u >> 16);
}

inline float f16_to_f32(std::uint16_t h) {
    const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16, em = h & 0x7fffu;
    if (em >= 0x7c00u) return bits_to_f32(sign | 0x7f800000u | ((em & 0x3ffu) << 13));  // inf, NaN
    if (em >= 0x0400u) return bits_to_f32(sign | ((em << 13) + 0x38000000u));          // normal
    return bits_to_f32(sign | f32_to_bits(float(em) * 0x1p-24f));                      // subnormal
}

inline std::uint16_t f32_to_f16(float f) {
    const std::uint32_t u = f32_to_bits(f), sign = (u >> 16) & 0x8000u;
    std::uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return std::uint16_t(sign | 0x7e00u);  // NaN
    if (a >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (a < 0x38800000u) {  // below 2^-14: a half subnormal; adding 0.5 rounds it at 2^-24 in hardware
        const float r = bits_to_f32(a) + 0.5f;
        return std::uint16_t(sign | (f32_to_bits(r) - 0x3f000000u));
    }
    a += 0xc8000fffu + ((a >> 13) & 1u);  // rebias the exponent by -112 and round to nearest even
    return std::uint16_t(sign | (a >> 13));
}

template <Dtype D>
inline float load1(const void* p, i64 i) {
    if constexpr (D == Dtype::F32) return static_cast<const float*>(p)[i];
    if constexpr (D == Dtype::BF16) return bf16_to_f32(static_cast<const std::uint16_t*>(p)[i]);
    if constexpr (D == Dtype::F16) return f16_to_f32(static_cast<const std::uint16_t*>(p)[i]);
}

template <Dtype D>
inline void store1(void* p, i64 i, float v) {
    if constexpr (D == Dtype::F32) static_cast<float*>(p)[i] = v;
    if constexpr (D == Dtype::BF16) static_cast<std::uint16_t*>(p)[i] = f32_to_bf16(v);
    if constexpr (D == Dtype::F16) static_cast<std::uint16_t*>(p)[i] = f32_to_f16(v);
}

template <Dtype D>
void to_f32(const void* src, i64 offset, i64 n, float* dst) {
    for (i64 i = 0; i < n; ++i) dst[i] = load1<D>(src, offset + i);
}

// The wrappers' dot products: row `offset` … + n of a stored A' or B' with n float32 inputs.
template <Dtype D>
float dot_portable(const void* w, i64 offset, const float* x, i64 n) {
    float s = 0.f;
    for (i64 i = 0; i < n; ++i) s += load1<D>(w, offset + i) * x[i];
    return s;
}

inline i64 kept_position(const std::uint8_t* idx_row, i64 j) {  // input column of kept value j
    return 4 * (j / 2) + ((idx_row[j / 4] >> (2 * (j % 4))) & 3);
}

// --- the sparse stage: one output row for TT tokens ------------------------------------------------

// Portable: kept values in order, one float32 sum per token.
template <Dtype D, int TT>
void sparse_row_portable(const void* values, const std::uint8_t* idx_row, i64 row, const float* xb, i64 d_in,
                         float* out) {
    const i64 kept = d_in / 2, base = row * kept;
    float acc[TT] = {};
    for (i64 j = 0; j < kept; ++j) {
        const float v = load1<D>(values, base + j);
        const i64 c = kept_position(idx_row, j);
        for (int t = 0; t < TT; ++t) acc[t] += v * xb[t * d_in + c];
    }
    for (int t = 0; t < TT; ++t) out[t] = acc[t];
}

#if ARMOR_X86
#define ARMOR_AVX2 __attribute__((target("avx2,fma,f16c")))

// 16 kept values (8 groups g0…g7, 32 input columns) as two float32 registers in the order of the 128-bit
// unpack of their 16-bit form: [v0…v3 | v8…v11] (groups g0 g1 | g4 g5) and [v4…v7 | v12…v15] (g2 g3 | g6 g7).
// One load and two unpacks for 16 bf16 values (the bf16 bits are the high half of the float's).
template <Dtype D>
ARMOR_AVX2 inline void load16(const void* p, i64 i, __m256& a, __m256& b) {
    if constexpr (D == Dtype::BF16) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const std::uint16_t*>(p) + i));
        a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), h));
        b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), h));
        return;
    }
    __m256 lo, hi;
    if constexpr (D == Dtype::F32) {
        lo = _mm256_loadu_ps(static_cast<const float*>(p) + i);
        hi = _mm256_loadu_ps(static_cast<const float*>(p) + i + 8);
    } else {
        const auto* q = static_cast<const std::uint16_t*>(p) + i;
        lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
        hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 8)));
    }
    a = _mm256_permute2f128_ps(lo, hi, 0x20);
    b = _mm256_permute2f128_ps(lo, hi, 0x31);
}

// The AVX2 path reads the sparse stage's inputs with each 32 columns' groups stored in the order
// g0 g4 g1 g5 g2 g6 g3 g7 (load16's order, so that each register of inputs is one aligned load); the
// columns after the last whole 32 keep their place. Column c's place:
inline i64 avx2_column(i64 c, i64 d_in) {
    if (c >= d_in / 32 * 32) return c;
    const i64 g = c % 32 / 4;
    return c / 32 * 32 + (g % 4 * 2 + g / 4) * 4 + c % 4;
}

ARMOR_AVX2 inline float hsum(__m256 v) {  // a fixed pairwise order
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

template <Dtype D>
ARMOR_AVX2 inline __m256 load8(const void* p, i64 i) {
    if constexpr (D == Dtype::F32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(p) + i));
    if constexpr (D == Dtype::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

template <Dtype D>
ARMOR_AVX2 float dot_avx2(const void* w, i64 offset, const float* x, i64 n) {
    __m256 acc = _mm256_setzero_ps();
    i64 i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(load8<D>(w, offset + i), _mm256_loadu_ps(x + i), acc);
    float s = hsum(acc);
    for (; i < n; ++i) s += load1<D>(w, offset + i) * x[i];  // blocks of 4: 4 left over
    return s;
}

// The inputs of 8 kept values (4 groups, one per 128-bit lane of two registers of inputs: p holds the
// groups of slots 0-1 of each lane, q those of slots 2-3). A group is one lane, so the in-lane vpermilps
// picks its inputs by the 2-bit positions as they are (it reads only the low 2 bits of each control
// element); an immediate blend joins the two.
ARMOR_AVX2 inline __m256 select8(const float* pq, __m256i control) {
    const __m256 p = _mm256_permutevar_ps(_mm256_loadu_ps(pq), control);
    const __m256 q = _mm256_permutevar_ps(_mm256_loadu_ps(pq + 8), control);
    return _mm256_blend_ps(p, q, 0xCC);
}

template <Dtype D, int TT>
ARMOR_AVX2 void sparse_row_avx2(const void* values, const std::uint8_t* idx_row, i64 row, const float* xb, i64 d_in,
                                float* out) {
    const i64 kept = d_in / 2, base = row * kept;
    constexpr i64 ES = D == Dtype::F32 ? 4 : 2;  // bytes per stored value
    constexpr int NACC = TT == 1 ? 2 : 1;  // one token: two chains hide the FMA latency
    __m256 acc[NACC][TT];
    for (auto& a : acc)
        for (auto& v : a) v = _mm256_setzero_ps();
    // control element k: the position of the kept value in that slot of load16's order (2 bits each in
    // the 32-bit word of 16 positions): [p0 p1 p2 p3 | p8 … p11] and [p4 … p7 | p12 … p15]
    const __m256i shift0 = _mm256_setr_epi32(0, 2, 4, 6, 16, 18, 20, 22);
    const __m256i shift1 = _mm256_add_epi32(shift0, _mm256_set1_epi32(8));
    i64 j = 0;
    for (; j + 16 <= kept; j += 16) {  // 16 kept values: 4 idx bytes, 32 input columns (avx2_column's order)
        std::uint32_t w;
        std::memcpy(&w, idx_row + j / 4, 4);
        const __m256i wv = _mm256_set1_epi32(int(w));
        const __m256i c0 = _mm256_srlv_epi32(wv, shift0), c1 = _mm256_srlv_epi32(wv, shift1);
        __m256 v0, v1;
        // the hardware prefetcher alone leaves one core at ~half its streaming rate here: ask 2 KiB ahead
        _mm_prefetch(static_cast<const char*>(values) + (base + j) * ES + 2048, _MM_HINT_T0);
        load16<D>(values, base + j, v0, v1);
        for (int t = 0; t < TT; ++t) {
            const float* x = xb + t * d_in + 2 * j;
            acc[0][t] = _mm256_fmadd_ps(v0, select8(x, c0), acc[0][t]);
            acc[NACC - 1][t] = _mm256_fmadd_ps(v1, select8(x + 16, c1), acc[NACC - 1][t]);
        }
    }
    float tail[TT] = {};
    for (; j < kept; ++j) {  // kept % 16 is 0, 4, 8 or 12: columns in their place
        const float v = load1<D>(values, base + j);
        const i64 c = kept_position(idx_row, j);
        for (int t = 0; t < TT; ++t) tail[t] += v * xb[t * d_in + c];
    }
    for (int t = 0; t < TT; ++t) {
        __m256 s = acc[0][t];
        if constexpr (NACC == 2) s = _mm256_add_ps(s, acc[1][t]);
        out[t] = hsum(s) + tail[t];
    }
}

// --- more tokens: the tokens along the vector lanes -------------------------------------------------
// From LANES_MIN_TOKENS on, the AVX2 code turns the activations around: each input column holds a
// chunk's tokens (up to CHUNK) contiguously, so a kept value multiplies 8 tokens per instruction and no
// input is selected: its column is an address, decoded once per kept value instead of once per token.
// S is read once per chunk, by blocks of RB rows × KB columns, so that the chunk's inputs for one block of
// columns (KB · CHUNK floats, 16 KiB) are read from L1 by every row of the block, and the rows' partial
// sums (RB · CHUNK floats) wait in L2 for the next block of columns. Each row sums its kept values in
// order, in NACC interleaved chains joined at the end: an order fixed by the shapes.
constexpr i64 CHUNK = 64;  // tokens per pass over S: up to 8 registers of 8
constexpr i64 KB = 64;     // input columns per block: 32 kept values per row
constexpr i64 RB = 64;     // most output rows per block
// benchmarks/results/bench_linear_cpu.csv (2-core AVX2 machine, bf16, six shapes, ARMOR b = 128 and plain
// 2:4; its *_lanes and *_permutes rows force the other layout): the other layout's time over the chosen
// one's is 1.8-2.8 at 4 tokens, 0.77-1.6 at 16 (the lanes faster on 11 of 12), 1.35-2.1 at 32, 2.5-3.0 at 64.
constexpr i64 LANES_MIN_TOKENS = 16;

template <int NV>
constexpr int lanes_chains() { return NV >= 5 ? 1 : NV >= 3 ? 2 : 4; }  // enough to hide the FMA latency

// acc += Σ_j v[j] · x[off[j] … + 8·NV), j in order, chain j % NACC
template <int NV, int NACC>
ARMOR_AVX2 inline void lanes_segment(const float* v, const std::int32_t* off, i64 n, const float* x,
                                     __m256 (&acc)[NACC][NV]) {
    i64 j = 0;
    for (; j + NACC <= n; j += NACC)
        for (int a = 0; a < NACC; ++a) {
            const __m256 vv = _mm256_broadcast_ss(v + j + a);
            const float* xp = x + off[j + a];
            for (int i = 0; i < NV; ++i) acc[a][i] = _mm256_fmadd_ps(vv, _mm256_load_ps(xp + 8 * i), acc[a][i]);
        }
    for (int a = 0; j < n; ++j, ++a) {
        const __m256 vv = _mm256_broadcast_ss(v + j);
        const float* xp = x + off[j];
        for (int i = 0; i < NV; ++i) acc[a][i] = _mm256_fmadd_ps(vv, _mm256_load_ps(xp + 8 * i), acc[a][i]);
    }
}

template <int NV, int NACC>
ARMOR_AVX2 inline void lanes_store(__m256 (&acc)[NACC][NV], float* out) {
    for (int i = 0; i < NV; ++i) {
        __m256 s = acc[0][i];
        for (int a = 1; a < NACC; ++a) s = _mm256_add_ps(s, acc[a][i]);
        _mm256_store_ps(out + 8 * i, s);
    }
}

// n stored values from offset as float32 (a row of a wrapper)
template <Dtype D>
ARMOR_AVX2 inline void to_f32_avx2(const void* src, i64 offset, i64 n, float* dst) {
    i64 i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8<D>(src, offset + i));
    for (; i < n; ++i) dst[i] = load1<D>(src, offset + i);
}

// A wrapper on a chunk, rows [0, n) of blockdiag(W): out[c] = Σ_k W[c][k] · in[c / b · b + k], rows of
// w = 8·NV floats; off holds k · w.
template <Dtype D, int NV>
ARMOR_AVX2 void wrap_lanes(const void* W, i64 b, i64 n, const float* in, float* out, float* wrow,
                           const std::int32_t* off) {
    constexpr int NACC = lanes_chains<NV>();
#pragma omp for schedule(static)
    for (i64 c = 0; c < n; ++c) {
        to_f32_avx2<D>(W, c * b, b, wrow);
        __m256 acc[NACC][NV];
        for (auto& r : acc)
            for (auto& q : r) q = _mm256_setzero_ps();
        lanes_segment<NV, NACC>(wrow, off, b, in + c / b * b * 8 * NV, acc);
        lanes_store<NV, NACC>(acc, out + c * 8 * NV);
    }
}

// Kept values [j0, j0 + n) of one row of S as float32 (v) and their inputs' offsets from column 2·j0 in a
// chunk of w tokens (off): 16 at a time from a 32-bit word of positions, the rest one by one.
template <Dtype D>
ARMOR_AVX2 inline void decode_segment(const void* values, const std::uint8_t* idx_row, i64 base, i64 j0, i64 n,
                                      i64 w, float* v, std::int32_t* off) {
    const __m256i shift = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), three = _mm256_set1_epi32(3);
    const __m256i group = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12), wv = _mm256_set1_epi32(int(w));
    i64 j = 0;
    for (; j + 16 <= n; j += 16) {
        std::uint32_t u;
        std::memcpy(&u, idx_row + (j0 + j) / 4, 4);
        const __m256i uv = _mm256_set1_epi32(int(u));
        for (int h = 0; h < 2; ++h) {
            const __m256i bits = _mm256_srlv_epi32(uv, _mm256_add_epi32(shift, _mm256_set1_epi32(16 * h)));
            const __m256i pos = _mm256_and_si256(bits, three);
            const __m256i col = _mm256_add_epi32(_mm256_add_epi32(group, _mm256_set1_epi32(int(2 * j + 16 * h))), pos);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(off + j + 8 * h), _mm256_mullo_epi32(col, wv));
            _mm256_storeu_ps(v + j + 8 * h, load8<D>(values, base + j0 + j + 8 * h));  // one pass with the offsets
        }
    }
    for (; j < n; ++j) {  // n % 16 is 0, 4, 8 or 12 at the end of a row
        v[j] = load1<D>(values, base + j0 + j);
        off[j] = std::int32_t((kept_position(idx_row, j0 + j) - 2 * j0) * w);
    }
}

// The sparse stage on a chunk of w = 8·NV tokens, rows [r0, r1) of S: ys[r] = Σ_j S[r][j] · xc[col(j)].
// part: (r1 − r0) · NACC · w floats, 32-byte aligned.
template <Dtype D, int NV>
ARMOR_AVX2 void sparse_lanes(const void* values, const std::uint8_t* idx, i64 r0, i64 r1, i64 d_in, const float* xc,
                             float* ys, float* part) {
    constexpr int NACC = lanes_chains<NV>();
    constexpr i64 w = 8 * NV, ES = D == Dtype::F32 ? 4 : 2;
    const i64 kept = d_in / 2;
    alignas(32) float v[KB / 2];
    alignas(32) std::int32_t off[KB / 2];
    for (i64 k0 = 0; k0 < d_in; k0 += KB) {
        const i64 j0 = k0 / 2, n = std::min(KB, d_in - k0) / 2;
        for (i64 r = r0; r < r1; ++r) {
            const std::uint8_t* idx_row = idx + r * (d_in / 8);
            // S is read across its rows here: ask for this row's values and positions two blocks ahead
            _mm_prefetch(static_cast<const char*>(values) + (r * kept + j0 + KB) * ES, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(idx_row + (j0 + KB) / 4), _MM_HINT_T0);
            decode_segment<D>(values, idx_row, r * kept, j0, n, w, v, off);
            __m256 acc[NACC][NV];
            float* p = part + (r - r0) * NACC * w;
            for (int a = 0; a < NACC; ++a)
                for (int i = 0; i < NV; ++i) acc[a][i] = k0 ? _mm256_load_ps(p + a * w + 8 * i) : _mm256_setzero_ps();
            lanes_segment<NV, NACC>(v, off, n, xc + k0 * w, acc);
            if (k0 + KB < d_in) {
                for (int a = 0; a < NACC; ++a)
                    for (int i = 0; i < NV; ++i) _mm256_store_ps(p + a * w + 8 * i, acc[a][i]);
            } else {
                lanes_store<NV, NACC>(acc, ys + r * w);
            }
        }
    }
}

// 64-byte aligned float buffers, left uninitialised (every element is written before it is read): the
// lanes kernels read their rows with aligned loads
struct Floats {
    std::unique_ptr<float[]> buf;
    float* p;
    explicit Floats(i64 n)
        : buf(new float[std::size_t(n + 16)]),
          p(buf.get() + (16 - reinterpret_cast<std::uintptr_t>(buf.get()) / 4 % 16) % 16) {}
};

template <Dtype D, int NV>
ARMOR_AVX2 void run_lanes_chunk(const PackedLinearArgs& a, i64 t0, i64 tt, i64 rb, float* xf, float* xb, float* ys,
                                float* yo, float* wrow, const std::int32_t* off, float* part) {
    constexpr i64 w = 8 * NV;
    const i64 d_in = a.d_in, d_out = a.d_out;
#pragma omp for schedule(static)
    for (i64 c = 0; c < d_in; ++c) {
        float* row = xf + c * w;
        for (i64 t = 0; t < tt; ++t) row[t] = load1<D>(a.x, (t0 + t) * d_in + c);
        for (i64 t = tt; t < w; ++t) row[t] = 0.f;
    }
    if (a.B) wrap_lanes<D, NV>(a.B, a.block_B, d_in, xf, xb, wrow, off);
#pragma omp for schedule(static)
    for (i64 r0 = 0; r0 < d_out; r0 += rb)
        sparse_lanes<D, NV>(a.values, a.idx, r0, std::min(d_out, r0 + rb), d_in, a.B ? xb : xf, ys, part);
    if (a.A) wrap_lanes<D, NV>(a.A, a.block_A, d_out, ys, yo, wrow, off);
    const float* yout = a.A ? yo : ys;
#pragma omp for schedule(static)
    for (i64 c = 0; c < d_out; ++c) {
        const float b = a.bias ? load1<D>(a.bias, c) : 0.f;
        for (i64 t = 0; t < tt; ++t) store1<D>(a.y, (t0 + t) * d_out + c, yout[c * w + t] + b);
    }
}

template <Dtype D>
void run_lanes(const PackedLinearArgs& a, int nt) {
    using Chunk = void (*)(const PackedLinearArgs&, i64, i64, i64, float*, float*, float*, float*, float*,
                           const std::int32_t*, float*);
    static constexpr Chunk chunks[8] = {&run_lanes_chunk<D, 1>, &run_lanes_chunk<D, 2>, &run_lanes_chunk<D, 3>,
                                        &run_lanes_chunk<D, 4>, &run_lanes_chunk<D, 5>, &run_lanes_chunk<D, 6>,
                                        &run_lanes_chunk<D, 7>, &run_lanes_chunk<D, 8>};
    const i64 T = a.tokens, d_in = a.d_in, d_out = a.d_out, b = std::max(a.block_A, a.block_B);
    // row blocks of at most RB rows, a multiple of the thread count of them (no thread idle at the end)
    const i64 blocks = (std::max<i64>((d_out + RB - 1) / RB, 1) + nt - 1) / nt * nt;
    const i64 rb = (d_out + blocks - 1) / blocks;
    const i64 wmax = std::min(CHUNK, (T + 7) / 8 * 8);  // the widest chunk
    Floats xf(d_in * wmax), xb(a.B ? d_in * wmax : 0), ys(d_out * wmax), yo(a.A ? d_out * wmax : 0);
#pragma omp parallel num_threads(nt)
    {
        Floats wrow(b), part(rb * CHUNK);  // NACC · w <= CHUNK (lanes_chains)
        std::vector<std::int32_t> off(static_cast<std::size_t>(b));
        for (i64 t0 = 0; t0 < T; t0 += CHUNK) {
            const i64 tt = std::min(CHUNK, T - t0), nv = (tt + 7) / 8;
            for (i64 k = 0; k < b; ++k) off[std::size_t(k)] = std::int32_t(k * 8 * nv);
            chunks[nv - 1](a, t0, tt, rb, xf.p, xb.p, ys.p, yo.p, wrow.p, off.data(), part.p);
        }
    }
}

bool cpu_has_avx2() {
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                            __builtin_cpu_supports("f16c");
    return has;
}
#else
bool cpu_has_avx2() { return false; }
#endif

using SparseRow = void (*)(const void*, const std::uint8_t*, i64, const float*, i64, float*);
using Dot = float (*)(const void*, i64, const float*, i64);

template <Dtype D, int TT>
SparseRow pick_row(bool avx2) {
#if ARMOR_X86
    if (avx2) return &sparse_row_avx2<D, TT>;
#endif
    (void)avx2;
    return &sparse_row_portable<D, TT>;
}

template <Dtype D>
Dot pick_dot(bool avx2) {
#if ARMOR_X86
    if (avx2) return &dot_avx2<D>;
#endif
    (void)avx2;
    return &dot_portable<D>;
}

constexpr int MAX_TT = 4;  // tokens per pass over a row: 4 accumulators and their inputs fit 16 ymm registers

template <Dtype D>
void run(const PackedLinearArgs& a, int nt, bool portable) {
    const i64 T = a.tokens, d_in = a.d_in, d_out = a.d_out, bA = a.block_A, bB = a.block_B;
    const bool avx2 = !portable && cpu_has_avx2();
#if ARMOR_X86
    if (avx2 && T >= (a.lanes_from > 0 ? a.lanes_from : LANES_MIN_TOKENS)) return run_lanes<D>(a, nt);
#endif
    // xf: x in float32; xin: the sparse stage's inputs (x B'ᵀ, or x), in avx2_column's order on that path
    std::vector<float> xf(std::size_t(T * d_in)), xb(a.B ? std::size_t(T * d_in) : 0), ys(std::size_t(T * d_out));
    float* xin = a.B ? xb.data() : xf.data();
    const auto place = [&](i64 c) { return avx2 ? avx2_column(c, d_in) : c; };
    const SparseRow rows[MAX_TT] = {pick_row<D, 1>(avx2), pick_row<D, 2>(avx2), pick_row<D, 3>(avx2),
                                    pick_row<D, 4>(avx2)};
    const Dot dot = pick_dot<D>(avx2);
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (i64 t = 0; t < T; ++t) {
            float* row = xf.data() + t * d_in;
            if (a.B) {
                to_f32<D>(a.x, t * d_in, d_in, row);  // in place: B' reads whole blocks of it
            } else {
                for (i64 c = 0; c < d_in; ++c) row[place(c)] = load1<D>(a.x, t * d_in + c);
            }
        }
        if (a.B) {
#pragma omp for schedule(static)
            for (i64 c = 0; c < d_in; ++c) {  // xb[:, c] = B'[c/bB][c%bB, :] · x[:, block of c]
                const i64 first = c / bB * bB;
                for (i64 t = 0; t < T; ++t)
                    xb[std::size_t(t * d_in + place(c))] = dot(a.B, c * bB, xf.data() + t * d_in + first, bB);
            }
        }
#pragma omp for schedule(static)
        for (i64 r = 0; r < d_out; ++r) {
            const std::uint8_t* idx_row = a.idx + r * (d_in / 8);
            float part[MAX_TT];
            for (i64 t0 = 0; t0 < T; t0 += MAX_TT) {
                const int tt = int(std::min<i64>(MAX_TT, T - t0));
                rows[tt - 1](a.values, idx_row, r, xin + t0 * d_in, d_in, part);
                for (int t = 0; t < tt; ++t) ys[std::size_t((t0 + t) * d_out + r)] = part[t];
            }
        }
#pragma omp for schedule(static)
        for (i64 c = 0; c < d_out; ++c) {
            const float b = a.bias ? load1<D>(a.bias, c) : 0.f;
            const i64 first = c / std::max<i64>(bA, 1) * bA;
            for (i64 t = 0; t < T; ++t) {
                const float* yrow = ys.data() + t * d_out;
                store1<D>(a.y, t * d_out + c, (a.A ? dot(a.A, c * bA, yrow + first, bA) : yrow[c]) + b);
            }
        }
    }
}

int threads(int requested) {
#ifdef _OPENMP
    return requested > 0 ? requested : omp_get_max_threads();
#else
    (void)requested;
    return 1;
#endif
}

std::size_t elem_size(Dtype d) { return d == Dtype::F32 ? 4 : 2; }

}  // namespace

void packed_linear(const PackedLinearArgs& a) {
    const auto fail = [](const std::string& why) { throw std::invalid_argument("packed_linear: " + why); };
    if (a.tokens < 0 || a.d_out < 0 || a.d_in < 0 || a.d_in % 8) fail("need tokens, d_out >= 0 and d_in % 8 == 0");
    if (!a.values || !a.idx || !a.y || (a.tokens && !a.x)) fail("null x, values, idx or y");
    if (a.A && (a.block_A < 1 || a.d_out % a.block_A)) fail("block_A must divide d_out");
    if (a.B && (a.block_B < 1 || a.d_in % a.block_B)) fail("block_B must divide d_in");
    if (a.tokens == 0 || a.d_out == 0) return;
    const int nt = threads(a.num_threads);
    const bool portable = a.portable;
    switch (a.dtype) {
        case Dtype::F32: return run<Dtype::F32>(a, nt, portable);
        case Dtype::BF16: return run<Dtype::BF16>(a, nt, portable);
        case Dtype::F16: return run<Dtype::F16>(a, nt, portable);
    }
    fail("unknown dtype");
}

namespace {
template <Dtype D>
void unpack_rows_f32(const void* values, const std::uint8_t* idx, i64 row0, i64 rows, i64 d_in, float* out, int nt) {
    const i64 kept = d_in / 2;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < rows; ++r) {
        float* orow = out + r * d_in;
        std::fill(orow, orow + d_in, 0.f);
        const std::uint8_t* idx_row = idx + (row0 + r) * (d_in / 8);
        for (i64 j = 0; j < kept; ++j) orow[kept_position(idx_row, j)] = load1<D>(values, (row0 + r) * kept + j);
    }
}
}  // namespace

void unpack_rows(const void* values, const std::uint8_t* idx, i64 row0, i64 rows, i64 d_in, Dtype dtype, void* out,
                 bool out_f32, int num_threads) {
    if (d_in % 8 || rows < 0 || row0 < 0) throw std::invalid_argument("unpack_rows: need d_in % 8 == 0, rows >= 0");
    const int nt = threads(num_threads);
    if (out_f32) {
        auto* o = static_cast<float*>(out);
        switch (dtype) {
            case Dtype::F32: return unpack_rows_f32<Dtype::F32>(values, idx, row0, rows, d_in, o, nt);
            case Dtype::BF16: return unpack_rows_f32<Dtype::BF16>(values, idx, row0, rows, d_in, o, nt);
            case Dtype::F16: return unpack_rows_f32<Dtype::F16>(values, idx, row0, rows, d_in, o, nt);
        }
    }
    const std::size_t es = elem_size(dtype);
    const i64 kept = d_in / 2;
    const auto* v = static_cast<const unsigned char*>(values);
    auto* o = static_cast<unsigned char*>(out);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < rows; ++r) {
        unsigned char* orow = o + std::size_t(r * d_in) * es;
        std::memset(orow, 0, std::size_t(d_in) * es);
        const std::uint8_t* idx_row = idx + (row0 + r) * (d_in / 8);
        const unsigned char* vrow = v + std::size_t((row0 + r) * kept) * es;
        for (i64 j = 0; j < kept; ++j) std::memcpy(orow + std::size_t(kept_position(idx_row, j)) * es, vrow + j * es, es);
    }
}

const char* packed_isa() { return cpu_has_avx2() ? "avx2" : "portable"; }

}  // namespace armor_cpu
