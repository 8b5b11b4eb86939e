/* Group rational on the CPU: forward and backward, each one pass over memory (kanc.codegen.cpu).
 *
 * The math of kanc.codegen.rational.rational_ref, in the same order of operations (Horner, then P / Q), in fp32:
 *     F_g(x) = P_g(x) / Q_g(x),  P_g = a_0 + ... + a_m x^m,  Q_g = 1 + |b_1| |x| + ... + |b_n| |x|^n
 * x is a (rows, C) view with unit column stride and row stride `sx`; C = G * D. I/O in fp32, fp16 or bf16
 * (converted here as torch rounds: to nearest even, NaN kept); coefficients arrive as fp32 (G, NP) and (G, NQ).
 *
 * The backward gives dx and the coefficient gradients dF/da_k = sum dy x^k / Q and dF/db_k = -sum dy F |x|^k / Q *
 * s(b_k), s(b) = -1 where b < 0, else +1 (kanc's convention at b = 0). Each work item is (row chunk, group): its
 * per-row sums are fp32 SIMD reductions over the group's D channels, added into double accumulators; the items'
 * partials are summed in item order after the parallel loop. Chunks do not depend on the thread count, so the
 * result is the same bits for any number of threads.
 *
 * Built with -ffp-contract=off and without -ffast-math: no FMA contraction (the reference's rounding) and NaN/inf
 * propagate as in the reference.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KANC_F32 0
#define KANC_F16 1
#define KANC_BF16 2
#define MAX_COEF 16          /* NP and NQ at most: degrees up to 15 */
#define CHUNK_ELEMENTS 8192  /* elements of one group per work item (row chunk x D), whatever the thread count */
#define LANES 8              /* fp32 lanes of the coefficient-gradient sums */
#define INLINE static inline __attribute__((always_inline))
#define PARALLEL_MIN 32768   /* below this many elements one thread does it all */

static inline float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* IEEE half <-> float, branch-free, exactly as c10::Half (fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value). */
static inline float half_to_float(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t bits = two_w < (1u << 27) ? to_bits(denormalized) : to_bits(normalized);
    return from_bits(sign | bits);
}

static inline uint16_t float_to_half(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline float bf16_to_float(uint16_t h) { return from_bits((uint32_t)h << 16); }

static inline uint16_t float_to_bf16(float f) {
    const uint32_t u = to_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? 0x7FC0u : rounded);
}

INLINE float load(const void *p, int64_t i, int dtype) {
    if (dtype == KANC_F32) return ((const float *)p)[i];
    if (dtype == KANC_F16) return half_to_float(((const uint16_t *)p)[i]);
    return bf16_to_float(((const uint16_t *)p)[i]);
}

INLINE void store(void *p, int64_t i, float v, int dtype) {
    if (dtype == KANC_F32)
        ((float *)p)[i] = v;
    else if (dtype == KANC_F16)
        ((uint16_t *)p)[i] = float_to_half(v);
    else
        ((uint16_t *)p)[i] = float_to_bf16(v);
}

/* One group's coefficients in the form the loops use: a_k, |b_k|, and k a_k, k |b_k| for the derivatives. */
typedef struct {
    float a[MAX_COEF], b[MAX_COEF], da[MAX_COEF], db[MAX_COEF];
} Coefs;

INLINE void group_coefs(const float *num, const float *den, int64_t g, int np, int nq, Coefs *c) {
    for (int k = 0; k < np; k++) {
        c->a[k] = num[g * np + k];
        c->da[k] = c->a[k] * (float)k;
    }
    for (int k = 0; k < nq; k++) {
        c->b[k] = fabsf(den[g * nq + k]);
        c->db[k] = c->b[k] * (float)(k + 1);
    }
}

/* P(x) and Q(x) in the reference's order: p = a_m; p = p x + a_k ...; q = |b_n| |x|; q = (q + |b_k|) |x| ...; + 1. */
INLINE float eval_p(const Coefs *c, float x, int np) {
    float p = c->a[np - 1];
    for (int k = np - 2; k >= 0; k--) p = p * x + c->a[k];
    return p;
}

INLINE float eval_q(const Coefs *c, float ax, int nq) {
    if (nq == 0) return 1.0f;
    float q = c->b[nq - 1] * ax;
    for (int k = nq - 2; k >= 0; k--) q = (q + c->b[k]) * ax;
    return q + 1.0f;
}

INLINE void forward_rows(const void *x, void *y, int64_t r0, int64_t r1, int64_t C, int64_t D, int64_t sx,
                                const float *num, const float *den, int np, int nq, int dtype) {
    for (int64_t g = 0; g < C / D; g++) {
        Coefs c;
        group_coefs(num, den, g, np, nq, &c);
        for (int64_t r = r0; r < r1; r++) {
            const int64_t xo = r * sx + g * D, yo = r * C + g * D;
#pragma omp simd
            for (int64_t j = 0; j < D; j++) {
                const float v = load(x, xo + j, dtype);
                store(y, yo + j, eval_p(&c, v, np) / eval_q(&c, fabsf(v), nq), dtype);
            }
        }
    }
}

/* Items of the backward: (row chunk, group) pairs, chunk = CHUNK_ELEMENTS / D rows (at least 1). */
static inline int64_t chunk_rows(int64_t D) { return D >= CHUNK_ELEMENTS ? 1 : CHUNK_ELEMENTS / D; }

/* dx of element j (offsets xo, go, dxo) and its coefficient-gradient terms added into lane l of `s`. */
INLINE void backward_element(const void *x, const void *dy, void *dx, int64_t xo, int64_t go, int64_t dxo,
                             const Coefs *c, int np, int nq, int dtype, float s[][LANES], int l) {
    const float v = load(x, xo, dtype), gy = load(dy, go, dtype);
    const float av = fabsf(v);
    const float p = eval_p(c, v, np), q = eval_q(c, av, nq);
    float dp = 0.0f, dq = 0.0f;
    if (np > 1) {
        dp = c->da[np - 1];
        for (int k = np - 2; k >= 1; k--) dp = dp * v + c->da[k];
    }
    if (nq > 0) {
        dq = c->db[nq - 1];
        for (int k = nq - 2; k >= 0; k--) dq = dq * av + c->db[k];
    }
    const float sign = v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f);
    const float rq = 1.0f / q; /* one division: F here only feeds gradients */
    const float gq = gy * rq, f = p * rq;
    store(dx, dxo, gq * (dp - f * sign * dq), dtype);
    float t = gq;
    for (int k = 0; k < np; k++) {
        s[k][l] += t;
        t = t * v;
    }
    float u = -gq * f;
    for (int k = 0; k < nq; k++) {
        u = u * av;
        s[np + k][l] += u;
    }
}

/* One item: dx over its rows and group, and its coefficient-gradient sums (np + nq doubles) into `out`. The sums
 * run in LANES fp32 lanes (at most CHUNK_ELEMENTS / LANES terms each), then in double. */
INLINE void backward_item(const void *x, const void *dy, void *dx, int64_t r0, int64_t r1, int64_t g, int64_t C,
                          int64_t D, int64_t sx, int64_t sdy, const Coefs *c, int np, int nq, int dtype,
                          double *out) {
    float s[2 * MAX_COEF][LANES];
    for (int k = 0; k < np + nq; k++)
        for (int l = 0; l < LANES; l++) s[k][l] = 0.0f;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t xo = r * sx + g * D, go = r * sdy + g * D, dxo = r * C + g * D;
        int64_t j = 0;
        for (; j + LANES <= D; j += LANES) {
#pragma omp simd
            for (int l = 0; l < LANES; l++)
                backward_element(x, dy, dx, xo + j + l, go + j + l, dxo + j + l, c, np, nq, dtype, s, l);
        }
        const int rest = (int)(D - j);
#pragma omp simd
        for (int l = 0; l < rest; l++)
            backward_element(x, dy, dx, xo + j + l, go + j + l, dxo + j + l, c, np, nq, dtype, s, l);
    }
    for (int k = 0; k < np + nq; k++) {
        double total = 0.0;
        for (int l = 0; l < LANES; l++) total += (double)s[k][l];
        out[k] = total;
    }
}

/* Rows [r0, r1) of the forward, specialised: each (dtype, degrees) call site inlines its own loop. */
static void forward_block(const void *x, void *y, int64_t r0, int64_t r1, int64_t C, int64_t D, int64_t sx,
                          const float *num, const float *den, int np, int nq, int dtype) {
    const int deg54 = np == 6 && nq == 4; /* the default degrees (5, 4): constants the compiler unrolls */
    if (dtype == KANC_F32 && deg54)
        forward_rows(x, y, r0, r1, C, D, sx, num, den, 6, 4, KANC_F32);
    else if (dtype == KANC_F16 && deg54)
        forward_rows(x, y, r0, r1, C, D, sx, num, den, 6, 4, KANC_F16);
    else if (dtype == KANC_BF16 && deg54)
        forward_rows(x, y, r0, r1, C, D, sx, num, den, 6, 4, KANC_BF16);
    else if (dtype == KANC_F32)
        forward_rows(x, y, r0, r1, C, D, sx, num, den, np, nq, KANC_F32);
    else if (dtype == KANC_F16)
        forward_rows(x, y, r0, r1, C, D, sx, num, den, np, nq, KANC_F16);
    else
        forward_rows(x, y, r0, r1, C, D, sx, num, den, np, nq, KANC_BF16);
}

static void backward_block(const void *x, const void *dy, void *dx, int64_t r0, int64_t r1, int64_t g, int64_t C,
                           int64_t D, int64_t sx, int64_t sdy, const Coefs *c, int np, int nq, int dtype,
                           double *out) {
    const int deg54 = np == 6 && nq == 4;
    if (dtype == KANC_F32 && deg54)
        backward_item(x, dy, dx, r0, r1, g, C, D, sx, sdy, c, 6, 4, KANC_F32, out);
    else if (dtype == KANC_F16 && deg54)
        backward_item(x, dy, dx, r0, r1, g, C, D, sx, sdy, c, 6, 4, KANC_F16, out);
    else if (dtype == KANC_BF16 && deg54)
        backward_item(x, dy, dx, r0, r1, g, C, D, sx, sdy, c, 6, 4, KANC_BF16, out);
    else if (dtype == KANC_F32)
        backward_item(x, dy, dx, r0, r1, g, C, D, sx, sdy, c, np, nq, KANC_F32, out);
    else if (dtype == KANC_F16)
        backward_item(x, dy, dx, r0, r1, g, C, D, sx, sdy, c, np, nq, KANC_F16, out);
    else
        backward_item(x, dy, dx, r0, r1, g, C, D, sx, sdy, c, np, nq, KANC_BF16, out);
}

static int valid(int np, int nq, int64_t C, int64_t D, int dtype) {
    return np >= 1 && np <= MAX_COEF && nq >= 0 && nq <= MAX_COEF && D >= 1 && C % D == 0 && dtype >= KANC_F32 &&
           dtype <= KANC_BF16;
}

/* Entry points (ctypes); 0 on success. */
int kanc_rational_forward(const void *x, void *y, int64_t R, int64_t C, int64_t D, int64_t sx, const float *num,
                          const float *den, int np, int nq, int dtype, int threads) {
    if (!valid(np, nq, C, D, dtype)) return 2;
    const int64_t block = 16; /* rows per parallel iteration */
    const int64_t blocks = (R + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(threads) if (R * C >= PARALLEL_MIN && threads > 1)
    for (int64_t i = 0; i < blocks; i++) {
        const int64_t r0 = i * block, r1 = r0 + block < R ? r0 + block : R;
        forward_block(x, y, r0, r1, C, D, sx, num, den, np, nq, dtype);
    }
    return 0;
}

int kanc_rational_backward(const void *x, const void *dy, void *dx, int64_t R, int64_t C, int64_t D, int64_t sx,
                           int64_t sdy, const float *num, const float *den, int np, int nq, int dtype, float *dnum,
                           float *dden, int threads) {
    if (!valid(np, nq, C, D, dtype)) return 2;
    const int64_t G = C / D, rows = chunk_rows(D), chunks = (R + rows - 1) / rows, items = chunks * G;
    const int nc = np + nq;
    double *partial = (double *)malloc(sizeof(double) * (size_t)(items > 0 ? items : 1) * (size_t)nc);
    if (partial == NULL) return 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (R * C >= PARALLEL_MIN && threads > 1)
    for (int64_t i = 0; i < items; i++) {
        const int64_t g = i % G, r0 = (i / G) * rows, r1 = r0 + rows < R ? r0 + rows : R;
        Coefs c;
        group_coefs(num, den, g, np, nq, &c);
        backward_block(x, dy, dx, r0, r1, g, C, D, sx, sdy, &c, np, nq, dtype, partial + i * nc);
    }
    for (int64_t g = 0; g < G; g++) {
        for (int k = 0; k < nc; k++) {
            double total = 0.0;
            for (int64_t ch = 0; ch < chunks; ch++) total += partial[(ch * G + g) * nc + k];
            if (k < np)
                dnum[g * np + k] = (float)total;
            else
                dden[g * nq + k - np] = (float)total * (den[g * nq + k - np] < 0.0f ? -1.0f : 1.0f);
        }
    }
    free(partial);
    return 0;
}

/* The ABI version the Python side checks after loading (bump when a signature changes). */
int kanc_cpu_abi(void) { return 1; }
