/* Group rational on the CPU: forward and backward, each one pass over memory (kanc.codegen.cpu).
 *
 * The math of kanc.codegen.rational.rational_ref, in the same order of operations (Horner, then P / Q), in fp32:
 *     F_g(x) = P_g(x) / Q_g(x),  P_g = a_0 + ... + a_m x^m,  Q_g = 1 + |b_1| |x| + ... + |b_n| |x|^n
 * x is a (rows, C) view with unit column stride and row stride `sx`; C = G * D. I/O in fp32, fp16 or bf16
 * (converted here as torch rounds: to nearest even, NaN kept); coefficients arrive as fp32 (G, NP) and (G, NQ).
 *
 * The backward gives dx and the coefficient gradients dF/da_k = sum dy x^k / Q and dF/db_k = -sum dy F |x|^k / Q *
 * s(b_k), s(b) = -1 where b < 0, else +1 (kanc's convention at b = 0). Sums run in fp32 SIMD lanes within a work
 * item, in double across items, and the items' partials are added in item order after the parallel loop. Items do
 * not depend on the thread count, so the result is the same bits for any number of threads.
 *
 * Two layouts of the loops, both vectorised along channels:
 * - wide groups (D >= NARROW): an item is (row chunk, group), the group's coefficients are scalars;
 * - narrow groups (D < NARROW, down to one channel per group): an item is a row chunk over all channels, each
 *   channel reading its group's coefficients from a per-channel table, sums kept per channel, then per group.
 *
 * Built with -ffp-contract=off and without -ffast-math: no FMA contraction (the reference's rounding) and NaN/inf
 * propagate as in the reference; -fno-trapping-math (FP exceptions are not observed) lets the compiler turn the
 * selects of the dtype conversions into vector code.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KANC_F32 0
#define KANC_F16 1
#define KANC_BF16 2
#define MAX_COEF 16          /* NP and NQ at most: degrees up to 15 */
#define CHUNK_ELEMENTS 8192  /* elements of one group per work item (wide groups), whatever the thread count */
#define ROW_CHUNK 65536      /* elements of one row chunk (narrow groups) */
#define NARROW 16            /* groups narrower than this take the per-channel layout */
#define TILE 256             /* channels per tile of that layout: their coefficients and sums stay in cache */
#define PAD 16               /* floats added to its row stride: no power-of-two strides (cache-set conflicts) */
#define LANES 8              /* fp32 lanes of a wide group's coefficient-gradient sums */
#define PARALLEL_MIN 32768   /* below this many elements one thread does it all */
#define INLINE static inline __attribute__((always_inline))

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

/* Coefficients as the loops read them: a_k, |b_k| and the derivative's k a_k, (k + 1) |b_k|, coefficient k of
 * column `col` at [k * w + col]: w = 1 and col = 0 for one group's scalars, w = C for a per-channel table. */
typedef struct {
    float *restrict a, *restrict b, *restrict da, *restrict db;
    int64_t w;
} Table;

static void fill(Table *t, const float *num, const float *den, int64_t g, int64_t col, int np, int nq) {
    for (int k = 0; k < np; k++) {
        t->a[k * t->w + col] = num[g * np + k];
        t->da[k * t->w + col] = num[g * np + k] * (float)k;
    }
    for (int k = 0; k < nq; k++) {
        t->b[k * t->w + col] = fabsf(den[g * nq + k]);
        t->db[k * t->w + col] = fabsf(den[g * nq + k]) * (float)(k + 1);
    }
}

/* P(x) and Q(x) in the reference's order: p = a_m; p = p x + a_k ...; q = |b_n| |x|; q = (q + |b_k|) |x| ...; + 1. */
INLINE float eval_p(const float *restrict a, int64_t w, int64_t col, float x, int np) {
    float p = a[(np - 1) * w + col];
    for (int k = np - 2; k >= 0; k--) p = p * x + a[k * w + col];
    return p;
}

INLINE float eval_q(const float *restrict b, int64_t w, int64_t col, float ax, int nq) {
    if (nq == 0) return 1.0f;
    float q = b[(nq - 1) * w + col] * ax;
    for (int k = nq - 2; k >= 0; k--) q = (q + b[k * w + col]) * ax;
    return q + 1.0f;
}

/* Elements read coefficient k of column `col` at [k * w + col] of the table's rows (w = 1, col = 0: scalars). */
INLINE void forward_element(const void *x, void *y, int64_t xo, int64_t yo, const Table *t, int64_t w, int64_t col,
                            int np, int nq, int dtype) {
    const float v = load(x, xo, dtype);
    store(y, yo, eval_p(t->a, w, col, v, np) / eval_q(t->b, w, col, fabsf(v), nq), dtype);
}

/* dx of one element and its coefficient-gradient terms added into s[k * ss + si]. */
INLINE void backward_element(const void *x, const void *dy, void *dx, int64_t xo, int64_t go, int64_t dxo,
                             const Table *t, int64_t w, int64_t col, int np, int nq, int dtype, float *restrict s,
                             int64_t ss, int64_t si) {
    const float *restrict da = t->da, *restrict db = t->db;
    const float v = load(x, xo, dtype), gy = load(dy, go, dtype);
    const float av = fabsf(v);
    const float p = eval_p(t->a, w, col, v, np), q = eval_q(t->b, w, col, av, nq);
    float dp = 0.0f, dq = 0.0f;
    if (np > 1) {
        dp = da[(np - 1) * w + col];
        for (int k = np - 2; k >= 1; k--) dp = dp * v + da[k * w + col];
    }
    if (nq > 0) {
        dq = db[(nq - 1) * w + col];
        for (int k = nq - 2; k >= 0; k--) dq = dq * av + db[k * w + col];
    }
    const float sign = v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f);
    const float rq = 1.0f / q; /* one division: F here only feeds gradients */
    const float gq = gy * rq, f = p * rq;
    store(dx, dxo, gq * (dp - f * sign * dq), dtype);
    float e = gq;
    for (int k = 0; k < np; k++) {
        s[k * ss + si] += e;
        e = e * v;
    }
    float u = -gq * f;
    for (int k = 0; k < nq; k++) {
        u = u * av;
        s[(np + k) * ss + si] += u;
    }
}

/* ---------------------------------------------------------------------------------------------- wide groups */
INLINE void forward_wide(const void *x, void *y, int64_t r0, int64_t r1, int64_t C, int64_t D, int64_t sx,
                         const float *num, const float *den, int np, int nq, int dtype) {
    float store_[4][MAX_COEF];
    Table t = {store_[0], store_[1], store_[2], store_[3], 1};
    for (int64_t g = 0; g < C / D; g++) {
        fill(&t, num, den, g, 0, np, nq);
        for (int64_t r = r0; r < r1; r++) {
            const int64_t xo = r * sx + g * D, yo = r * C + g * D;
#pragma omp simd
            for (int64_t j = 0; j < D; j++) forward_element(x, y, xo + j, yo + j, &t, 1, 0, np, nq, dtype);
        }
    }
}

/* Item (rows [r0, r1), group g): dx, and the group's sums into out[0 .. np + nq) (LANES fp32 lanes, then double). */
INLINE void backward_wide(const void *x, const void *dy, void *dx, int64_t r0, int64_t r1, int64_t g, int64_t C,
                          int64_t D, int64_t sx, int64_t sdy, const float *num, const float *den, int np, int nq,
                          int dtype, double *out) {
    float store_[4][MAX_COEF], s[2 * MAX_COEF * LANES];
    Table t = {store_[0], store_[1], store_[2], store_[3], 1};
    fill(&t, num, den, g, 0, np, nq);
    for (int k = 0; k < (np + nq) * LANES; k++) s[k] = 0.0f;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t xo = r * sx + g * D, go = r * sdy + g * D, dxo = r * C + g * D;
        int64_t j = 0;
        for (; j + LANES <= D; j += LANES) {
#pragma omp simd
            for (int l = 0; l < LANES; l++)
                backward_element(x, dy, dx, xo + j + l, go + j + l, dxo + j + l, &t, 1, 0, np, nq, dtype, s, LANES, l);
        }
        const int rest = (int)(D - j);
#pragma omp simd
        for (int l = 0; l < rest; l++)
            backward_element(x, dy, dx, xo + j + l, go + j + l, dxo + j + l, &t, 1, 0, np, nq, dtype, s, LANES, l);
    }
    for (int k = 0; k < np + nq; k++) {
        double total = 0.0;
        for (int l = 0; l < LANES; l++) total += (double)s[k * LANES + l];
        out[k] = total;
    }
}

/* -------------------------------------------------------------------------------------------- narrow groups */
INLINE void forward_narrow(const void *x, void *y, int64_t r0, int64_t r1, int64_t C, int64_t sx, const Table *t,
                           int np, int nq, int dtype) {
    const int64_t w = t->w;
    for (int64_t c0 = 0; c0 < C; c0 += TILE) {
        const int64_t c1 = c0 + TILE < C ? c0 + TILE : C;
        for (int64_t r = r0; r < r1; r++) {
#pragma omp simd
            for (int64_t c = c0; c < c1; c++) forward_element(x, y, r * sx + c, r * C + c, t, w, c, np, nq, dtype);
        }
    }
}

/* Item (rows [r0, r1), every channel, a tile of channels at a time): dx, per-channel sums in `acc` (np + nq rows of
 * stride t->w), then per group into out[g * (np + nq) + k]. */
INLINE void backward_narrow(const void *x, const void *dy, void *dx, int64_t r0, int64_t r1, int64_t C, int64_t D,
                            int64_t sx, int64_t sdy, const Table *t, int np, int nq, int dtype, float *acc,
                            double *out) {
    const int nc = np + nq;
    const int64_t w = t->w;
    for (int64_t i = 0; i < nc * w; i++) acc[i] = 0.0f;
    for (int64_t c0 = 0; c0 < C; c0 += TILE) {
        const int64_t c1 = c0 + TILE < C ? c0 + TILE : C;
        for (int64_t r = r0; r < r1; r++) {
#pragma omp simd
            for (int64_t c = c0; c < c1; c++)
                backward_element(x, dy, dx, r * sx + c, r * sdy + c, r * C + c, t, w, c, np, nq, dtype, acc, w, c);
        }
    }
    for (int64_t g = 0; g < C / D; g++) {
        for (int k = 0; k < nc; k++) {
            double total = 0.0;
            for (int64_t j = 0; j < D; j++) total += (double)acc[k * w + g * D + j];
            out[g * nc + k] = total;
        }
    }
}

/* ------------------------------------------------------------------------------ specialised call sites */
/* Each (layout, dtype, degrees) call site inlines its own loop; the default degrees (5, 4) as constants the compiler
 * unrolls, other degrees as a generic loop. */
#define SPECIALISE(call6_4, call_any)                          \
    do {                                                       \
        if (np == 6 && nq == 4) {                              \
            if (dtype == KANC_F32) {                           \
                const int dt = KANC_F32, np_ = 6, nq_ = 4;     \
                call6_4;                                       \
            } else if (dtype == KANC_F16) {                    \
                const int dt = KANC_F16, np_ = 6, nq_ = 4;     \
                call6_4;                                       \
            } else {                                           \
                const int dt = KANC_BF16, np_ = 6, nq_ = 4;    \
                call6_4;                                       \
            }                                                  \
        } else {                                               \
            const int np_ = np, nq_ = nq;                      \
            if (dtype == KANC_F32) {                           \
                const int dt = KANC_F32;                       \
                call_any;                                      \
            } else if (dtype == KANC_F16) {                    \
                const int dt = KANC_F16;                       \
                call_any;                                      \
            } else {                                           \
                const int dt = KANC_BF16;                      \
                call_any;                                      \
            }                                                  \
        }                                                      \
    } while (0)

static void forward_wide_block(const void *x, void *y, int64_t r0, int64_t r1, int64_t C, int64_t D, int64_t sx,
                               const float *num, const float *den, int np, int nq, int dtype) {
    SPECIALISE(forward_wide(x, y, r0, r1, C, D, sx, num, den, np_, nq_, dt),
               forward_wide(x, y, r0, r1, C, D, sx, num, den, np_, nq_, dt));
}

static void forward_narrow_block(const void *x, void *y, int64_t r0, int64_t r1, int64_t C, int64_t sx,
                                 const Table *t, int np, int nq, int dtype) {
    SPECIALISE(forward_narrow(x, y, r0, r1, C, sx, t, np_, nq_, dt),
               forward_narrow(x, y, r0, r1, C, sx, t, np_, nq_, dt));
}

static void backward_wide_item(const void *x, const void *dy, void *dx, int64_t r0, int64_t r1, int64_t g, int64_t C,
                               int64_t D, int64_t sx, int64_t sdy, const float *num, const float *den, int np, int nq,
                               int dtype, double *out) {
    SPECIALISE(backward_wide(x, dy, dx, r0, r1, g, C, D, sx, sdy, num, den, np_, nq_, dt, out),
               backward_wide(x, dy, dx, r0, r1, g, C, D, sx, sdy, num, den, np_, nq_, dt, out));
}

static void backward_narrow_item(const void *x, const void *dy, void *dx, int64_t r0, int64_t r1, int64_t C,
                                 int64_t D, int64_t sx, int64_t sdy, const Table *t, int np, int nq, int dtype,
                                 float *acc, double *out) {
    SPECIALISE(backward_narrow(x, dy, dx, r0, r1, C, D, sx, sdy, t, np_, nq_, dt, acc, out),
               backward_narrow(x, dy, dx, r0, r1, C, D, sx, sdy, t, np_, nq_, dt, acc, out));
}

/* A per-channel table of the coefficients (narrow groups), rows of stride C + PAD; 1 when out of memory. Free t->a
 * after. */
static int channel_table(Table *t, const float *num, const float *den, int64_t C, int64_t D, int np, int nq) {
    const int64_t w = C + PAD;
    float *mem = (float *)malloc(sizeof(float) * (size_t)w * (size_t)(2 * (np + nq)));
    if (mem == NULL) return 1;
    *t = (Table){mem, mem + np * w, mem + (np + nq) * w, mem + (2 * np + nq) * w, w};
    for (int64_t c = 0; c < C; c++) fill(t, num, den, c / D, c, np, nq);
    return 0;
}

static int valid(int np, int nq, int64_t C, int64_t D, int dtype) {
    return np >= 1 && np <= MAX_COEF && nq >= 0 && nq <= MAX_COEF && D >= 1 && C % D == 0 && dtype >= KANC_F32 &&
           dtype <= KANC_BF16;
}

/* ------------------------------------------------------------------------------------ entry points (ctypes) */
/* 0 on success, 1 out of memory, 2 bad arguments. */
int kanc_rational_forward(const void *x, void *y, int64_t R, int64_t C, int64_t D, int64_t sx, const float *num,
                          const float *den, int np, int nq, int dtype, int threads) {
    if (!valid(np, nq, C, D, dtype)) return 2;
    const int64_t block = 16; /* rows per parallel iteration */
    const int64_t blocks = (R + block - 1) / block;
    const int parallel = R * C >= PARALLEL_MIN && threads > 1;
    if (D >= NARROW) {
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
        for (int64_t i = 0; i < blocks; i++) {
            const int64_t r0 = i * block, r1 = r0 + block < R ? r0 + block : R;
            forward_wide_block(x, y, r0, r1, C, D, sx, num, den, np, nq, dtype);
        }
        return 0;
    }
    Table t;
    if (channel_table(&t, num, den, C, D, np, nq)) return 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t i = 0; i < blocks; i++) {
        const int64_t r0 = i * block, r1 = r0 + block < R ? r0 + block : R;
        forward_narrow_block(x, y, r0, r1, C, sx, &t, np, nq, dtype);
    }
    free(t.a);
    return 0;
}

/* Items and their partial sums (G x (np + nq) doubles per row chunk), in the same order for any thread count. */
static int backward_items(const void *x, const void *dy, void *dx, int64_t R, int64_t C, int64_t D, int64_t sx,
                          int64_t sdy, const float *num, const float *den, int np, int nq, int dtype, int threads,
                          int64_t rows, double *partial) {
    const int64_t G = C / D, chunks = (R + rows - 1) / rows;
    const int nc = np + nq, parallel = R * C >= PARALLEL_MIN && threads > 1;
    if (D >= NARROW) {
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
        for (int64_t i = 0; i < chunks * G; i++) {
            const int64_t g = i % G, r0 = (i / G) * rows, r1 = r0 + rows < R ? r0 + rows : R;
            backward_wide_item(x, dy, dx, r0, r1, g, C, D, sx, sdy, num, den, np, nq, dtype, partial + i * nc);
        }
        return 0;
    }
    Table t;
    int failed = channel_table(&t, num, den, C, D, np, nq);
    if (failed) return 1;
#pragma omp parallel num_threads(threads) if (parallel)
    {
        float *acc = (float *)malloc(sizeof(float) * (size_t)t.w * (size_t)nc); /* one per thread */
        if (acc == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < chunks; i++) {
            const int64_t r0 = i * rows, r1 = r0 + rows < R ? r0 + rows : R;
            if (acc != NULL)
                backward_narrow_item(x, dy, dx, r0, r1, C, D, sx, sdy, &t, np, nq, dtype, acc, partial + i * G * nc);
        }
        free(acc);
    }
    free(t.a);
    return failed;
}

int kanc_rational_backward(const void *x, const void *dy, void *dx, int64_t R, int64_t C, int64_t D, int64_t sx,
                           int64_t sdy, const float *num, const float *den, int np, int nq, int dtype, float *dnum,
                           float *dden, int threads) {
    if (!valid(np, nq, C, D, dtype)) return 2;
    const int64_t G = C / D, nc = np + nq;
    int64_t rows = D >= NARROW ? CHUNK_ELEMENTS / D : ROW_CHUNK / C;
    rows = rows < 1 ? 1 : rows;
    const int64_t chunks = (R + rows - 1) / rows;
    double *partial = (double *)malloc(sizeof(double) * (size_t)(chunks > 0 ? chunks : 1) * (size_t)(G * nc));
    if (partial == NULL) return 1;
    if (backward_items(x, dy, dx, R, C, D, sx, sdy, num, den, np, nq, dtype, threads, rows, partial)) {
        free(partial);
        return 1;
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
