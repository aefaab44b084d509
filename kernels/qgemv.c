/* Decode-sized matmuls on weight-only quantized weights (see kernels/native.py), and the rest of
 * a quantized span's decode step built on them: a MoE layer's experts, attention over the
 * cache, rotary, softmax routing, RMSNorm.
 *
 * y[m, n] = sum_k x[m, k] * w[n, k] for a few rows m, where w is
 *   int8: codes[n, k] * scale[n]                                  (kernels.quant.Int8Weight)
 *   int4: (q[n, k] - 8) * scale[k / G, n] + zero[k / G, n]        (kernels.quant.Int4Weight)
 *   bf16: w[n, k] itself, widened to fp32                          (kernels.quant.Bf16Weight)
 * with the int4 codes in the byte layout of torch's CPU int4 kernel.
 *
 * Every output element is computed by one thread in one fixed order (int8 and bf16: 64 fp32
 * partial sums along k, lane j taking k = j mod 64, folded pairwise; int4: for bf16 x, per group
 * an exact int32 sum over x as int16 (see group_sums); for fp32 and fp16 x, per group one chain
 * of fmas over the k, each pair odd first). So a row's result does not depend on how many rows are
 * in the call, on the thread count, or on whether the compiler emits 16-wide or 8-wide
 * vectors: the same bits on every x86 build of this file with FMA. The loops are written so
 * that gcc vectorizes them without -ffast-math; the hot ones also have AVX-512 and AVX2
 * versions in intrinsics (gcc's own vectors were 128 bits wide on a Zen 1 AVX2 machine, and its
 * int4 loop read 3.7 GB/s there), each checked to give the portable loops' bits.
 *
 * x, y and the scales share one dtype: 0 = fp32, 1 = bf16, 2 = fp16. Rows are contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define AVX2_PATHS 1 /* 8-lane versions of the portable loops, with their bits */
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 16
#ifndef BLOCK
#define BLOCK 64 /* int4: output channels per block of torch's layout (kernels.native.int4_block: 64 or 32) */
#endif
#define MAX_M 64  /* rows per call at most (kernels.native.MAX_ROWS is less) */
/* Bytes ahead of the read that the int8 and int4 loops prefetch: their codes take more work per
 * byte than bf16's, and without it the cores ran out of loads in flight (AVX-512 with 2 threads:
 * int8 decode 47 -> 62 tok/s, int4 77 -> 93 on the bench model; bf16 gained nothing) */
#ifndef AHEAD
#define AHEAD 4096
#endif

enum { F32 = 0, BF16 = 1, F16 = 2 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load(const void *p, int dtype, int64_t i) {
    switch (dtype) {
    case BF16: return bf16_to_f32(((const uint16_t *)p)[i]);
    case F16: return (float)((const _Float16 *)p)[i];
    default: return ((const float *)p)[i];
    }
}

static inline void store(void *p, int dtype, int64_t i, float v) {
    switch (dtype) {
    case BF16: ((uint16_t *)p)[i] = f32_to_bf16(v); break;
    case F16: ((_Float16 *)p)[i] = (_Float16)v; break;
    default: ((float *)p)[i] = v;
    }
}

static inline float fold(const float *a) { /* pairwise: 16 -> 8 -> 4 -> 2 -> 1 */
    float b[8], c[4];
    for (int j = 0; j < 8; j++) b[j] = a[j] + a[j + 8];
    for (int j = 0; j < 4; j++) c[j] = b[j] + b[j + 4];
    return (c[0] + c[2]) + (c[1] + c[3]);
}

static void row_to_f32(const void *p, int dtype, int64_t n, float *restrict out) { /* one loop per dtype */
    switch (dtype) {
    case BF16:
        for (int64_t i = 0; i < n; i++) out[i] = bf16_to_f32(((const uint16_t *)p)[i]);
        break;
    case F16:
        for (int64_t i = 0; i < n; i++) out[i] = (float)((const _Float16 *)p)[i];
        break;
    default: memcpy(out, p, (size_t)n * sizeof(float));
    }
}

static void row_from_f32(const float *restrict v, int dtype, int64_t n, void *p) {
    switch (dtype) {
    case BF16:
        for (int64_t i = 0; i < n; i++) ((uint16_t *)p)[i] = f32_to_bf16(v[i]);
        break;
    case F16:
        for (int64_t i = 0; i < n; i++) ((_Float16 *)p)[i] = (_Float16)v[i];
        break;
    default: memcpy(p, v, (size_t)n * sizeof(float));
    }
}

/* What an int4 matmul needs of each group of G k's of a row of x, a record of GROUP_REC(G)
 * floats: [0] the fp32 sum of the group (the zeros' term); for the integer path (int4_block_int)
 * [1] the power of two 2^e, [2] the sum of the integers below (an int32), [4 ..] the G int16
 * xi = x / 2^e rounded to nearest even, e putting the group's largest |x| in [2^13, 2^14):
 * a bf16 x within 2^7 of it keeps every bit, smaller ones are off by at most 2^-15 of it. */
#define GROUP_REC(G) (4 + (G) / 2)

static void group_sums(const float *restrict xf, int64_t rows, int64_t G, float *restrict rec) {
    for (int64_t i = 0; i < rows; i++, rec += GROUP_REC(G)) {
        const float *x = xf + i * G;
        float s = 0, top = 0;
        for (int64_t k = 0; k < G; k++) {
            s += x[k];
            const float a = fabsf(x[k]);
            top = a > top ? a : top; /* inline, unlike fmaxf */
        }
        int e = top > 0 ? ilogbf(top) - 13 : 0; /* finite x: e <= 114 */
        e = e < -100 ? -100 : e;
        const float down = ldexpf(1.0f, -e);
        int16_t *xi = (int16_t *)(rec + 4);
        int32_t total = 0;
        for (int64_t k = 0; k < G; k++) total += xi[k] = (int16_t)rintf(x[k] * down); /* to nearest even */
        rec[0] = s;
        rec[1] = ldexpf(1.0f, e);
        memcpy(rec + 2, &total, sizeof total);
    }
}

/* x [M, K] in fp32, then (int4: G > 0) its group records (group_sums), in one allocation:
 * what a matmul's rows need before its loop. */
static float *rows_f32(const void *x, int dtype, int64_t M, int64_t K, int64_t G) {
    const int64_t groups = G ? M * (K / G) : 0;
    float *xf = malloc((size_t)(M * K + groups * (G ? GROUP_REC(G) : 0)) * sizeof(float));
    if (!xf) return NULL;
    row_to_f32(x, dtype, M * K, xf);
    if (G) group_sums(xf, groups, G, xf + M * K);
    return xf;
}

/* ---- int8, per output channel ----------------------------------------------------------
 * One row at a time (one stream of codes per thread: interleaving rows read ~1.5x slower
 * from memory), in 64 partial sums: lane j takes k = j mod 64, in k order. */

static inline float fold64(const float *a) { /* (a0 + a16) + (a32 + a48) per lane of 16, then fold */
    float b[LANES];
    for (int j = 0; j < LANES; j++) b[j] = (a[j] + a[j + 16]) + (a[j + 32] + a[j + 48]);
    return fold(b);
}

#if defined(__AVX512F__)
/* fold64 of four 16-lane accumulators, in registers: the same additions in the same order,
 * ~10 ops against ~60 through memory */
static inline float fold64_512(const __m512 a[4]) {
    const __m512 b = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    const __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1)));
    const __m128 c4 = _mm_add_ps(_mm256_castps256_ps128(b8), _mm256_extractf128_ps(b8, 1));
    const __m128 d = _mm_add_ps(c4, _mm_movehl_ps(c4, c4)); /* c0 + c2, c1 + c3 */
    return _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)));
}
#endif

#ifdef AVX2_PATHS
/* fold64 of eight 8-lane accumulators (register q holds lanes 8q .. 8q + 7): the same
 * additions in the same order, in registers. */
static inline float fold64_256(const __m256 a[8]) {
    const __m256 b8 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[4], a[6])),
                                    _mm256_add_ps(_mm256_add_ps(a[1], a[3]), _mm256_add_ps(a[5], a[7])));
    const __m128 c4 = _mm_add_ps(_mm256_castps256_ps128(b8), _mm256_extractf128_ps(b8, 1));
    const __m128 d = _mm_add_ps(c4, _mm_movehl_ps(c4, c4)); /* c0 + c2, c1 + c3 */
    return _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)));
}

static inline __m256 widen8(int kind, const void *w, int64_t k) { /* weights k .. k + 7 */
    if (kind == 16) {
        const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + k));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    const __m128i codes = _mm_loadl_epi64((const __m128i *)((const int8_t *)w + k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
}
#endif

/* Weight k of a row as fp32: int8 codes (kind 8) or bf16 (kind 16, widened exactly). */
static inline float widen(int kind, const void *w, int64_t k) {
    return kind == 16 ? bf16_to_f32(((const uint16_t *)w)[k]) : (float)((const int8_t *)w)[k];
}

#if defined(__AVX512F__)
static inline __m512 widen16(int kind, const void *w, int64_t k) { /* weights k .. k + 15 */
    if (kind == 16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + k));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    const __m128i codes = _mm_loadu_si128((const __m128i *)((const int8_t *)w + k));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
}
#endif

/* sum_k x[k] * w[k] over one row of int8 or bf16 weights: 64 fp32 partial sums, lane j taking
 * k = j mod 64, folded pairwise (callers pass `kind` as a constant: each kind compiles apart). */
static inline float dense_dot(int kind, const float *restrict x, const void *restrict w, int64_t K) {
    float acc[4 * LANES] = {0};
    const int64_t kv = K - K % (4 * LANES);
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 a[4];
    for (int q = 0; q < 4; q++) a[q] = _mm512_setzero_ps();
    for (; k < kv; k += 4 * LANES) {
        if (kind == 8) _mm_prefetch((const char *)w + k + AHEAD, _MM_HINT_T0);
        for (int q = 0; q < 4; q++)
            a[q] = _mm512_fmadd_ps(widen16(kind, w, k + 16 * q), _mm512_loadu_ps(x + k + 16 * q), a[q]);
    }
    if (kv == K) return fold64_512(a);
    for (int q = 0; q < 4; q++) _mm512_storeu_ps(acc + 16 * q, a[q]);
#elif defined(AVX2_PATHS)
    __m256 a[8];
    for (int q = 0; q < 8; q++) a[q] = _mm256_setzero_ps();
    for (; k < kv; k += 4 * LANES) {
        if (kind == 8) _mm_prefetch((const char *)w + k + AHEAD, _MM_HINT_T0);
        for (int q = 0; q < 8; q++)
            a[q] = _mm256_fmadd_ps(widen8(kind, w, k + 8 * q), _mm256_loadu_ps(x + k + 8 * q), a[q]);
    }
    if (kv == K) return fold64_256(a);
    for (int q = 0; q < 8; q++) _mm256_storeu_ps(acc + 8 * q, a[q]);
#endif
    for (; k < kv; k += 4 * LANES)
        for (int j = 0; j < 4 * LANES; j++) acc[j] = fmaf(widen(kind, w, k + j), x[k + j], acc[j]);
    for (; k < K; k++) acc[k - kv] = fmaf(widen(kind, w, k), x[k], acc[k - kv]);
    return fold64(acc);
}

/* Output channel n of int8 weights (kind 8: codes times the channel's scale) or bf16 weights
 * (kind 16: no scales) for M rows of fp32 x: out[m * ld], in fp32. */
static inline void dense_channel(int kind, const float *restrict xf, int64_t M, int64_t K, const void *w,
                                 const void *scales, int dtype, int64_t n, float *restrict out, int64_t ld) {
    if (kind == 16) {
        const uint16_t *row = (const uint16_t *)w + n * K;
        for (int64_t m = 0; m < M; m++) out[m * ld] = dense_dot(16, xf + m * K, row, K);
        return;
    }
    const float scale = load(scales, dtype, n);
    const int8_t *row = (const int8_t *)w + n * K;
    for (int64_t m = 0; m < M; m++) out[m * ld] = dense_dot(8, xf + m * K, row, K) * scale;
}

/* The channels of one int8 or bf16 matmul, shared among the threads of the enclosing parallel
 * region (orphaned: alone outside one), none waiting for the others at the end. */
static void dense_share(int kind, const float *xf, int dtype, int64_t M, int64_t K, const void *w,
                        const void *scales, int64_t N, void *y) {
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; n++) {
        float out[MAX_M];
        dense_channel(kind, xf, M, K, w, scales, dtype, n, out, 1);
        for (int64_t m = 0; m < M; m++) store(y, dtype, m * N + n, out[m]);
    }
}

static int dense_gemv(int kind, const void *x, int dtype, int64_t M, int64_t K, const void *w, const void *scales,
                      int64_t N, void *y, int threads) {
    if (M > MAX_M) return 3;
    float *xf = rows_f32(x, dtype, M, K, 0);
    if (!xf) return 1;
#pragma omp parallel num_threads(threads) if (N * K >= 65536)
    dense_share(kind, xf, dtype, M, K, w, scales, N, y);
    free(xf);
    return 0;
}

int moemesh_int8_gemv(const void *x, int dtype, int64_t M, int64_t K, const int8_t *w, const void *scales,
                      int64_t N, void *y, int threads) {
    return dense_gemv(8, x, dtype, M, K, w, scales, N, y, threads);
}

/* w: bf16 [N, K], whatever the dtype of x and y */
int moemesh_bf16_gemv(const void *x, int dtype, int64_t M, int64_t K, const uint16_t *w, int64_t N, void *y,
                      int threads) {
    return dense_gemv(16, x, dtype, M, K, w, NULL, N, y, threads);
}

/* ---- int4, groups of G along k, torch's CPU layout ----------------------------------------
 * Channels go in blocks of BLOCK (B): block b is bytes [K, B/2] whose low nibble is channel Bb + j
 * and high nibble channel Bb + B/2 + j. The N % B channels left are bytes [K, r / 2], low nibble
 * channel 2j, high nibble 2j + 1. scale_zeros is [K / G, N, 2]. */

/* One group of G k's for the channels n0 .. n0 + width of one block: per channel, the sum of
 * x[k] * (q - 8) over the group, in one chain of fmas taking each pair of k odd first
 * (k + 1, then k). */
static void int4_group(const float *restrict x, const uint8_t *restrict base, int64_t k0, int64_t G, int width,
                       float acc[BLOCK]) {
    memset(acc, 0, BLOCK * sizeof(float));
    for (int64_t k = k0; k < k0 + G; k += 2)
        for (int p = 1; p >= 0; p--) {
            const float xk = x[k + p];
            const uint8_t *row = base + (k + p) * (width / 2);
            if (width == BLOCK) {
                for (int c = 0; c < BLOCK / 2; c++) {
                    acc[c] = fmaf(xk, (float)(row[c] & 15) - 8.0f, acc[c]);
                    acc[c + BLOCK / 2] = fmaf(xk, (float)(row[c] >> 4) - 8.0f, acc[c + BLOCK / 2]);
                }
            } else {
                for (int c = 0; c < width / 2; c++) {
                    acc[2 * c] = fmaf(xk, (float)(row[c] & 15) - 8.0f, acc[2 * c]);
                    acc[2 * c + 1] = fmaf(xk, (float)(row[c] >> 4) - 8.0f, acc[2 * c + 1]);
                }
            }
        }
}

/* The group's scales and zeros of channels n0 .. n0 + width, as fp32 (scale_zeros [K/G, N, 2]). */
static void int4_scales(const void *sz, int dtype, int64_t first, int width, float *restrict s, float *restrict z) {
    switch (dtype) { /* one loop per dtype, so that each vectorizes */
    case BF16: {
        const uint16_t *p = (const uint16_t *)sz + 2 * first;
        for (int c = 0; c < width; c++) {
            s[c] = bf16_to_f32(p[2 * c]);
            z[c] = bf16_to_f32(p[2 * c + 1]);
        }
        break;
    }
    case F16: {
        const _Float16 *p = (const _Float16 *)sz + 2 * first;
        for (int c = 0; c < width; c++) {
            s[c] = (float)p[2 * c];
            z[c] = (float)p[2 * c + 1];
        }
        break;
    }
    default: {
        const float *p = (const float *)sz + 2 * first;
        for (int c = 0; c < width; c++) {
            s[c] = p[2 * c];
            z[c] = p[2 * c + 1];
        }
    }
    }
}

#if defined(AVX2_PATHS) && BLOCK % 32 == 0
#define INT4_AVX2 1
/* A full block, 8 channels per register: int4_group's chains (per channel, k + 1 then k, one
 * fma each) and int4_block_row's per-group sums, in its order, so the portable loops' bits.
 * Each 16 bytes of a row hold channels c .. c + 15 (low nibbles) and B/2 + c .. (high). */
static void int4_block_avx2(const float *restrict xf, const uint8_t *restrict base, const void *sz, int dtype,
                            int64_t G, int64_t groups, int64_t N, int64_t n0, const float *restrict xsum,
                            float out[BLOCK]) {
    enum { R = BLOCK / 8 }; /* registers per block */
    const __m128i nibble = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    __m256 o[R];
    for (int r = 0; r < R; r++) o[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256 a[R];
        for (int r = 0; r < R; r++) a[r] = _mm256_setzero_ps();
        for (int64_t k = g * G; k < (g + 1) * G; k += 2)
            for (int p = 1; p >= 0; p--) {
                const __m256 xk = _mm256_broadcast_ss(xf + k + p);
                const uint8_t *row = base + (k + p) * (BLOCK / 2);
                for (int c = 0; c < BLOCK / 32; c++) { /* 16 bytes: 32 channels' codes */
                    const __m128i bytes = _mm_loadu_si128((const __m128i *)(row + 16 * c));
                    const __m128i lo = _mm_sub_epi8(_mm_and_si128(bytes, nibble), eight); /* q - 8, exact */
                    const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), eight);
                    const __m128i halves[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
                    for (int h = 0; h < 4; h++) { /* channels 16c, 16c + 8, B/2 + 16c, B/2 + 16c + 8 */
                        const int r = (h < 2 ? 2 * c : R / 2 + 2 * c) + (h & 1);
                        const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(halves[h]));
                        a[r] = _mm256_fmadd_ps(xk, w, a[r]);
                    }
                }
            }
        const __m256 xs = _mm256_set1_ps(xsum[g * GROUP_REC(G)]);
        float s[BLOCK], z[BLOCK];
        int4_scales(sz, dtype, g * N + n0, BLOCK, s, z);
        for (int r = 0; r < R; r++)
            o[r] = _mm256_add_ps(o[r], _mm256_fmadd_ps(_mm256_loadu_ps(s + 8 * r), a[r],
                                                       _mm256_mul_ps(_mm256_loadu_ps(z + 8 * r), xs)));
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(out + 8 * r, o[r]);
}
#endif

/* A full block for bf16 x, on the integers of its group records (group_sums): per channel and
 * group, sum xi (q - 8) exactly in int32 (any order gives these bits), then one rounding each
 * of the steps (float)(sum) * 2^e, fma with the scale, plus zero * the group's fp32 sum. Wide
 * SIMD integer multiply-adds take a pair of codes per op where fp32 needs a conversion of each
 * code: on AVX2 the fp32 loop above was bound by those conversions; on an AVX-512 CPU with BF16
 * the VNNI version below decoded 1.3x as fast as fp32 sums on the BF16 dot product had. */
static void int4_block_int(const uint8_t *restrict base, const void *sz, int dtype, int64_t G, int64_t groups,
                           int64_t N, int64_t n0, const float *restrict rec0, float out[BLOCK]) {
    float s[BLOCK], z[BLOCK];
#if defined(__AVX2__)
    enum { R = BLOCK / 8 }; /* registers per block, in channel order */
    const __m128i nibble = _mm_set1_epi8(15);
    for (int64_t g = 0; g < groups; g++) {
        const float *rec = rec0 + g * GROUP_REC(G);
        const int16_t *xi = (const int16_t *)(rec + 4);
        __m256i a[R];
        for (int r = 0; r < R; r++) a[r] = _mm256_setzero_si256();
        for (int64_t k = 0; k < G; k += 2) {
            int32_t pair;
            memcpy(&pair, xi + k, 4); /* xi[k] in the low word, xi[k + 1] in the high */
            const __m256i xk = _mm256_set1_epi32(pair);
            const uint8_t *row = base + (g * G + k) * (BLOCK / 2);
            _mm_prefetch((const char *)row + AHEAD, _MM_HINT_T0);
            for (int c = 0; c < BLOCK / 32; c++) { /* 16 bytes of rows k and k + 1: 32 channels */
                const __m128i r0 = _mm_loadu_si128((const __m128i *)(row + 16 * c));
                const __m128i r1 = _mm_loadu_si128((const __m128i *)(row + BLOCK / 2 + 16 * c));
                const __m128i pairs[2] = {_mm_unpacklo_epi8(r0, r1), _mm_unpackhi_epi8(r0, r1)}; /* (k, k+1) */
                for (int h = 0; h < 2; h++) { /* channels 16c + 8h .. (low nibbles), B/2 + 16c + 8h .. (high) */
                    const __m128i lo = _mm_and_si128(pairs[h], nibble);
                    const __m128i hi = _mm_and_si128(_mm_srli_epi16(pairs[h], 4), nibble);
                    a[2 * c + h] = _mm256_add_epi32(a[2 * c + h], _mm256_madd_epi16(_mm256_cvtepu8_epi16(lo), xk));
                    a[R / 2 + 2 * c + h] =
                        _mm256_add_epi32(a[R / 2 + 2 * c + h], _mm256_madd_epi16(_mm256_cvtepu8_epi16(hi), xk));
                }
            }
        }
        int32_t total;
        memcpy(&total, rec + 2, sizeof total);
        const __m256i shift = _mm256_set1_epi32(8 * total); /* sum xi q - 8 sum xi = sum xi (q - 8) */
        const __m256 up = _mm256_set1_ps(rec[1]), xs = _mm256_set1_ps(rec[0]);
        int4_scales(sz, dtype, g * N + n0, BLOCK, s, z);
        for (int r = 0; r < R; r++) {
            const __m256 dot = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(a[r], shift)), up);
            const __m256 term = _mm256_fmadd_ps(_mm256_loadu_ps(s + 8 * r), dot, _mm256_mul_ps(_mm256_loadu_ps(z + 8 * r), xs));
            _mm256_storeu_ps(out + 8 * r, _mm256_add_ps(_mm256_loadu_ps(out + 8 * r), term));
        }
    }
#else
    for (int64_t g = 0; g < groups; g++) {
        const float *rec = rec0 + g * GROUP_REC(G);
        const int16_t *xi = (const int16_t *)(rec + 4);
        int32_t acc[BLOCK] = {0}, total;
        for (int64_t k = 0; k < G; k++) {
            const uint8_t *row = base + (g * G + k) * (BLOCK / 2);
            for (int c = 0; c < BLOCK / 2; c++) {
                acc[c] += xi[k] * (row[c] & 15);
                acc[c + BLOCK / 2] += xi[k] * (row[c] >> 4);
            }
        }
        memcpy(&total, rec + 2, sizeof total);
        int4_scales(sz, dtype, g * N + n0, BLOCK, s, z);
        for (int c = 0; c < BLOCK; c++) out[c] += fmaf(s[c], (float)(acc[c] - 8 * total) * rec[1], z[c] * rec[0]);
    }
#endif
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && BLOCK == 64
#define INT4_VNNI 1
/* vpermb's picks for int4_block_vnni: byte b of half h takes byte (b >> 1 & 1 ? 32 : 0) + 16h +
 * (b >> 2) of rows k and k + 1, i.e. word 2c is row k's byte 16h + c, word 2c + 1 row k + 1's */
static const uint8_t VNNI_PICK[2][64] = {
    {
      0,  0, 32, 32,  1,  1, 33, 33,  2,  2, 34, 34,  3,  3, 35, 35,
      4,  4, 36, 36,  5,  5, 37, 37,  6,  6, 38, 38,  7,  7, 39, 39,
      8,  8, 40, 40,  9,  9, 41, 41, 10, 10, 42, 42, 11, 11, 43, 43,
     12, 12, 44, 44, 13, 13, 45, 45, 14, 14, 46, 46, 15, 15, 47, 47,
    },
    {
     16, 16, 48, 48, 17, 17, 49, 49, 18, 18, 50, 50, 19, 19, 51, 51,
     20, 20, 52, 52, 21, 21, 53, 53, 22, 22, 54, 54, 23, 23, 55, 55,
     24, 24, 56, 56, 25, 25, 57, 57, 26, 26, 58, 58, 27, 27, 59, 59,
     28, 28, 60, 60, 29, 29, 61, 61, 30, 30, 62, 62, 31, 31, 63, 63,
    },
};
/* int4_block_int on AVX-512 VNNI: 64 channels in four registers of int32 sums. Rows k and k + 1
 * of the block are 64 adjacent bytes; vpermb lays them out as (row k, row k + 1) byte pairs, one
 * byte per 16-bit word (the other zeroed), so that the low nibble and the high one are each a
 * mask or a shift away from int16 codes, and vpdpwssd adds xi[k] q[k] + xi[k+1] q[k+1] to a
 * lane. The sums are exact, so these are int4_block_int's bits; its per-group steps are the same
 * ops in the same order. */
static void int4_block_vnni(const uint8_t *restrict base, const uint16_t *restrict sz, int64_t G, int64_t groups,
                            int64_t N, int64_t n0, const float *restrict rec0, float out[BLOCK]) {
    const __m512i pick0 = _mm512_loadu_si512(VNNI_PICK[0]), pick1 = _mm512_loadu_si512(VNNI_PICK[1]);
    const __mmask64 low_bytes = 0x5555555555555555ull;
    const __m512i nibble = _mm512_set1_epi16(15), high = _mm512_set1_epi32((int)0xffff0000u);
    __m512 o[4];
    for (int q = 0; q < 4; q++) o[q] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const float *rec = rec0 + g * GROUP_REC(G);
        const int16_t *xi = (const int16_t *)(rec + 4);
        __m512i a[8]; /* two sets of four chains, k = 0 mod 4 and 2 mod 4: int32 sums in any order */
        for (int q = 0; q < 8; q++) a[q] = _mm512_setzero_si512();
        for (int64_t k = 0; k < G; k += 4)
            for (int u = 0; u < 2; u++) {
                const uint8_t *at = base + (g * G + k + 2 * u) * (BLOCK / 2);
                _mm_prefetch((const char *)at + AHEAD, _MM_HINT_T0);
                const __m512i rows = _mm512_loadu_si512((const void *)at);
                int32_t pair;
                memcpy(&pair, xi + k + 2 * u, 4); /* xi[k] in the low word, xi[k + 1] in the high */
                const __m512i xk = _mm512_set1_epi32(pair);
                const __m512i b0 = _mm512_maskz_permutexvar_epi8(low_bytes, pick0, rows); /* bytes 0 .. 15 */
                const __m512i b1 = _mm512_maskz_permutexvar_epi8(low_bytes, pick1, rows); /* 16 .. 31 */
                __m512i *s = a + 4 * u;
                s[0] = _mm512_dpwssd_epi32(s[0], _mm512_and_si512(b0, nibble), xk); /* channels 0 .. 15 */
                s[1] = _mm512_dpwssd_epi32(s[1], _mm512_and_si512(b1, nibble), xk); /* 16 .. 31 */
                s[2] = _mm512_dpwssd_epi32(s[2], _mm512_srli_epi16(b0, 4), xk);     /* 32 .. 47 */
                s[3] = _mm512_dpwssd_epi32(s[3], _mm512_srli_epi16(b1, 4), xk);     /* 48 .. 63 */
            }
        for (int q = 0; q < 4; q++) a[q] = _mm512_add_epi32(a[q], a[4 + q]);
        int32_t total;
        memcpy(&total, rec + 2, sizeof total);
        const __m512i shift = _mm512_set1_epi32(8 * total);
        const __m512 up = _mm512_set1_ps(rec[1]), xs = _mm512_set1_ps(rec[0]);
        for (int q = 0; q < 4; q++) { /* 16 channels' (scale, zero) pairs: one bf16 pair per lane */
            const __m512i pairs = _mm512_loadu_si512((const void *)(sz + 2 * (g * N + n0 + 16 * q)));
            const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
            const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, high));
            const __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[q], shift)), up);
            o[q] = _mm512_add_ps(o[q], _mm512_fmadd_ps(scale, dot, _mm512_mul_ps(zero, xs)));
        }
    }
    for (int q = 0; q < 4; q++) _mm512_storeu_ps(out + 16 * q, o[q]);
}
#endif

/* Block b (channels Bb .. Bb + width) of int4 weights for one row: xf in fp32, xsum its group
 * records (group_sums), dtype that of the scales; out[c] in fp32. */
static int int4_block_row(int dtype, const float *restrict xf, const float *restrict xsum, int64_t K,
                          const uint8_t *packed, const void *scale_zeros, int64_t G, int64_t N, int64_t b,
                          float out[BLOCK]) {
    const int64_t groups = K / G, n0 = b * BLOCK;
    const int width = n0 + BLOCK <= N ? BLOCK : (int)(N - n0);
    const uint8_t *base = packed + n0 * (K / 2);
    memset(out, 0, BLOCK * sizeof(float));
#ifdef INT4_VNNI
    if (dtype == BF16 && width == BLOCK && G % 4 == 0) {
        int4_block_vnni(base, scale_zeros, G, groups, N, n0, xsum, out);
        return width;
    }
#endif
    if (dtype == BF16 && width == BLOCK) {
        int4_block_int(base, scale_zeros, dtype, G, groups, N, n0, xsum, out);
        return width;
    }
#ifdef INT4_AVX2
    if (width == BLOCK) {
        int4_block_avx2(xf, base, scale_zeros, dtype, G, groups, N, n0, xsum, out);
        return width;
    }
#endif
    float acc[BLOCK], s[BLOCK], z[BLOCK];
    for (int64_t g = 0; g < groups; g++) {
        int4_group(xf, base, g * G, G, width, acc);
        int4_scales(scale_zeros, dtype, g * N + n0, width, s, z);
        for (int c = 0; c < width; c++) out[c] += fmaf(s[c], acc[c], z[c] * xsum[g * GROUP_REC(G)]);
    }
    return width;
}

static inline int64_t int4_blocks(int64_t N) { return (N + BLOCK - 1) / BLOCK; }

/* The blocks of one int4 matmul, shared as dense_share's channels; xsum: x's group records. */
static void int4_share(int dtype, const float *xf, const float *xsum, int64_t M, int64_t K, const uint8_t *packed,
                       const void *scale_zeros, int64_t G, int64_t N, void *y) {
    const int64_t groups = K / G;
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < int4_blocks(N); b++)
        for (int64_t m = 0; m < M; m++) {
            float out[BLOCK];
            const int width = int4_block_row(dtype, xf + m * K, xsum + m * groups * GROUP_REC(G), K, packed,
                                             scale_zeros, G, N, b, out);
            for (int c = 0; c < width; c++) store(y, dtype, m * N + b * BLOCK + c, out[c]);
        }
}

int moemesh_int4_gemv(const void *x, int dtype, int64_t M, int64_t K, const uint8_t *packed,
                      const void *scale_zeros, int64_t G, int64_t N, void *y, int threads) {
    if (K % G || G % 2) return 2;
    float *xf = rows_f32(x, dtype, M, K, G);
    if (!xf) return 1;
#pragma omp parallel num_threads(threads) if (N * K >= 65536)
    int4_share(dtype, xf, xf + M * K, M, K, packed, scale_zeros, G, N, y);
    free(xf);
    return 0;
}

/* ---- RMSNorm (kernels.span.RMSNorm) -------------------------------------------------------
 * Per row of H: r = 1 / sqrt(mean(x^2) + eps) in fp32 (the squares summed in 16 lanes, folded
 * pairwise), then w * dtype(x * r) rounded to the dtype, or dtype(w * x * r) with
 * cast_after_weight (GPT-OSS, fp32 weights). w has its own dtype. */

int moemesh_rmsnorm(const void *x, int dtype, int64_t M, int64_t H, const void *w, int wdtype, float eps,
                    int cast_after_weight, void *y) {
    const size_t size = dtype == F32 ? 4 : 2;
    float *buf = malloc(3 * (size_t)H * sizeof(float));
    if (!buf) return 1;
    float *xf = buf, *wf = buf + H, *out = buf + 2 * H;
    row_to_f32(w, wdtype, H, wf);
    for (int64_t m = 0; m < M; m++) {
        row_to_f32((const char *)x + (size_t)(m * H) * size, dtype, H, xf);
        float acc[LANES] = {0};
        const int64_t hv = H - H % LANES;
        for (int64_t h = 0; h < hv; h += LANES)
            for (int j = 0; j < LANES; j++) acc[j] = fmaf(xf[h + j], xf[h + j], acc[j]);
        for (int64_t h = hv; h < H; h++) acc[h - hv] = fmaf(xf[h], xf[h], acc[h - hv]);
        const float r = 1.0f / sqrtf(fold(acc) / (float)H + eps);
        if (cast_after_weight)
            for (int64_t h = 0; h < H; h++) out[h] = wf[h] * (xf[h] * r);
        else {
            for (int64_t h = 0; h < H; h++) out[h] = xf[h] * r;
            row_from_f32(out, dtype, H, (char *)y + (size_t)(m * H) * size); /* dtype(x * r) */
            row_to_f32((const char *)y + (size_t)(m * H) * size, dtype, H, out);
            for (int64_t h = 0; h < H; h++) out[h] = wf[h] * out[h];
        }
        row_from_f32(out, dtype, H, (char *)y + (size_t)(m * H) * size);
    }
    free(buf);
    return 0;
}

/* ---- exp, in plain arithmetic --------------------------------------------------------------
 * exp(x) = 2^n * e^r, n = round(x / ln 2), |r| <= ln 2 / 2, e^r by a degree-6 polynomial
 * (relative error < 3e-7). Written without library calls (not even floorf, which gcc does not
 * inline without -ffast-math), so that gcc vectorizes the loops
 * that use it and every vector width gives the same bits. x is clamped to [-87.3, 88.7]:
 * exp(-inf) comes out as ~1e-38 rather than 0, which no softmax or SiLU below can tell. */
static inline float exp_f32(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.7f ? 88.7f : x;
    const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f; /* rounded to an integer (1.5 * 2^23) */
    float r = x - n * 0.693145752f; /* ln 2 in two parts: the high one exact in n * hi */
    r = r - n * 1.42860677e-6f;
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* ---- one MoE layer of a few tokens on quantized experts ----------------------------------
 * Token m's top-k experts ids[m, :] with routing weights rw[m, :]. Each hit expert runs over
 * the rows that chose it (experts ascending; per expert its rows in (slot, token) order, as
 * kernels.moe.dispatch plans them): gate and up in fp32, h = silu(gate) * up rounded to the
 * dtype, down, times the routing weight, rounded to the dtype; a token's outputs are then
 * added in ascending expert order, each sum rounded to the dtype (kernels.moe's order). A row
 * gets the same bits whatever other rows share the call, as in the matmuls above.
 *
 * Experts are stacked: gate_up [E, 2I, H] (gate rows, then up rows), down [E, H, I], in the
 * int8, int4 or bf16 layout of the matmuls (kind 8, 4 or 16), scales in the dtype of x (bf16:
 * none). */

typedef struct {
    int kind;
    const void *codes, *scales;
    int64_t N, K, G, codes_stride, scales_stride; /* per expert: bytes of codes, elements of scales */
} Experts;

static int64_t units(const Experts *w) { return w->kind == 4 ? int4_blocks(w->N) : w->N; }

/* Unit u (a channel, or a block of BLOCK) of expert e's matmul over `rows` rows: out[r * N + n]. */
static void matmul_unit(const Experts *w, int64_t e, int dtype, const float *xf, const float *xsum,
                        int64_t rows, int64_t u, float *out) {
    const size_t size = dtype == F32 ? 4 : 2;
    const char *codes = (const char *)w->codes + e * w->codes_stride;
    const char *scales = (const char *)w->scales + (size_t)(e * w->scales_stride) * size;
    if (w->kind != 4) {
        dense_channel(w->kind, xf, rows, w->K, codes, scales, dtype, u, out + u, w->N);
        return;
    }
    const int64_t groups = w->K / w->G;
    for (int64_t r = 0; r < rows; r++) {
        float o[BLOCK];
        const int width = int4_block_row(dtype, xf + r * w->K, xsum + r * groups * GROUP_REC(w->G), w->K,
                                         (const uint8_t *)codes, scales, w->G, w->N, u, o);
        memcpy(out + r * w->N + u * BLOCK, o, (size_t)width * sizeof(float));
    }
}

static inline float round_to(int dtype, float v) {
    switch (dtype) {
    case BF16: return bf16_to_f32(f32_to_bf16(v));
    case F16: return (float)(_Float16)v;
    default: return v;
    }
}

int moemesh_moe(int kind, const void *x, int dtype, int64_t M, int64_t H, int64_t top_k, const int64_t *ids,
                const float *rw, int64_t E, int64_t I, int64_t G, const void *gu_codes, const void *gu_scales,
                const void *dn_codes, const void *dn_scales, void *y, int threads) {
    const int64_t P = M * top_k; /* (token, slot) pairs */
    if (M > MAX_M || P > MAX_M * 8 || (kind != 8 && kind != 4 && kind != 16)) return 3;
    if (kind == 4 && (H % G || I % G || G % 2)) return 2;
    const int64_t code_bytes = kind == 16 ? 2 : 1; /* per weight; int4: half a byte */
    const Experts gu = {kind, gu_codes, gu_scales, 2 * I, H, G, kind == 4 ? I * H : 2 * I * H * code_bytes,
                        kind == 4 ? (H / G) * 2 * I * 2 : 2 * I};
    const Experts dn = {kind, dn_codes, dn_scales, H, I, G, kind == 4 ? H * I / 2 : H * I * code_bytes,
                        kind == 4 ? (I / G) * H * 2 : H};
    int64_t order[MAX_M * 8], start[MAX_M * 8 + 1], hit[MAX_M * 8], n_hit = 0;
    for (int64_t p = 0; p < P; p++)
        if (ids[p] < 0 || ids[p] >= E) return 4;
    /* pairs by (expert, slot, token): expert e's rows are order[start[i] .. start[i + 1]) */
    int64_t n = 0;
    for (int64_t e = 0; e < E && n < P; e++) {
        const int64_t first = n;
        for (int64_t slot = 0; slot < top_k; slot++)
            for (int64_t m = 0; m < M; m++)
                if (ids[m * top_k + slot] == e) order[n++] = m * top_k + slot;
        if (n > first) {
            hit[n_hit] = e;
            start[n_hit++] = first;
        }
    }
    start[n_hit] = n;
    const size_t size = dtype == F32 ? 4 : 2;
    const int64_t rec = kind == 4 ? GROUP_REC(G) : 0; /* floats per group record */
    const int64_t hg = kind == 4 ? H / G * rec : 0, ig = kind == 4 ? I / G * rec : 0; /* per row */
    float *buf = malloc((size_t)P * (size_t)(H + hg + 2 * I + I + ig + H) * sizeof(float) + (size_t)P * I * size);
    if (!buf) return 1;
    float *xf = buf, *xsum = xf + P * H, *g = xsum + P * hg, *hf = g + P * 2 * I, *hsum = hf + P * I,
          *out = hsum + P * ig;
    char *hr = (char *)(out + P * H); /* h in its dtype, on the way to its rounded fp32 */
    for (int64_t p = 0; p < P; p++) /* gather each pair's token row, in fp32 */
        row_to_f32((const char *)x + (size_t)(order[p] / top_k * H) * size, dtype, H, xf + p * H);
    if (kind == 4) group_sums(xf, P * (H / G), G, xsum);
#pragma omp parallel num_threads(threads) if (2 * I * H >= 65536)
    {
        for (int64_t i = 0; i < n_hit; i++) {
            const int64_t p0 = start[i], rows = start[i + 1] - p0;
#pragma omp for schedule(static) nowait /* the experts' outputs are apart: no barrier between them */
            for (int64_t u = 0; u < units(&gu); u++)
                matmul_unit(&gu, hit[i], dtype, xf + p0 * H, xsum + p0 * hg, rows, u, g + p0 * 2 * I);
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t p = 0; p < P; p++) { /* h = dtype(silu(gate) * up) */
            const float *gate = g + p * 2 * I, *up = gate + I;
            float *h = hf + p * I;
            for (int64_t j = 0; j < I; j++) h[j] = gate[j] / (1.0f + exp_f32(-gate[j])) * up[j];
            row_from_f32(h, dtype, I, hr + (size_t)(p * I) * size);
            row_to_f32(hr + (size_t)(p * I) * size, dtype, I, h);
            if (kind == 4) group_sums(h, I / G, G, hsum + p * ig);
        }
        for (int64_t i = 0; i < n_hit; i++) {
            const int64_t p0 = start[i], rows = start[i + 1] - p0;
#pragma omp for schedule(static) nowait
            for (int64_t u = 0; u < units(&dn); u++)
                matmul_unit(&dn, hit[i], dtype, hf + p0 * I, hsum + p0 * ig, rows, u, out + p0 * H);
        }
    }
    /* each token: its experts' weighted outputs (rounded), summed in ascending expert order */
    float *acc = xf; /* the gathered rows are no longer needed */
    for (int64_t m = 0; m < M; m++) {
        int first = 1;
        for (int64_t p = 0; p < P; p++) {
            if (order[p] / top_k != m) continue;
            const float w = rw[order[p]];
            const float *o = out + p * H;
            for (int64_t j = 0; j < H; j++) {
                const float v = round_to(dtype, o[j] * w);
                acc[j] = first ? v : round_to(dtype, acc[j] + v);
            }
            first = 0;
        }
        row_from_f32(acc, dtype, H, (char *)y + (size_t)(m * H) * size);
    }
    free(buf);
    return 0;
}

/* 8 lanes as one vector (GCC's vector extension: one AVX register, or two SSE halves, with the
 * same operations per lane); two of them make the 16 lanes of the sums above. */
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

static inline f32x8 load8(const float *p) {
    f32x8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* sum a[d] * b[d]: lane l of 16 adds the products of d = l mod 16 in order (each product
 * rounded, then added: no fma), then the lanes fold pairwise. */
static inline float dot(const float *a, const float *b, int64_t n, int64_t nv) {
    f32x8 lo = {0}, hi = {0};
    for (int64_t d = 0; d < nv; d += LANES) {
        lo += load8(a + d) * load8(b + d);
        hi += load8(a + d + 8) * load8(b + d + 8);
    }
    if (nv < n) {
        float lanes[LANES];
        memcpy(lanes, &lo, sizeof lo);
        memcpy(lanes + 8, &hi, sizeof hi);
        for (int64_t d = nv; d < n; d++) lanes[d - nv] += a[d] * b[d];
        return fold(lanes);
    }
    const f32x8 half = lo + hi; /* fold's steps, in registers */
    f32x4 quarter[2];
    memcpy(quarter, &half, sizeof half);
    const f32x4 c = quarter[0] + quarter[1];
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* out[d] = sum_j p[j] * v[j * n + d] over j in order (each product rounded, then added), for
 * d < n; 32 columns at a time are kept in registers. */
static void weighted_rows(const float *p, const float *v, int64_t rows, int64_t n, float *out) {
    int64_t d0 = 0;
    for (; d0 + 32 <= n; d0 += 32) {
        f32x8 a[4] = {{0}, {0}, {0}, {0}};
        for (int64_t j = 0; j < rows; j++)
            for (int q = 0; q < 4; q++) a[q] += p[j] * load8(v + j * n + d0 + 8 * q);
        memcpy(out + d0, a, sizeof a);
    }
    for (int64_t d = d0; d < n; d++) {
        float acc = 0;
        for (int64_t j = 0; j < rows; j++) acc += p[j] * v[j * n + d];
        out[d] = acc;
    }
}

/* ---- attention of one new token over a session's cache ------------------------------------
 * q [Hq, D] (rows q_stride apart), keys and values of S positions per kv head (heads k_stride
 * / v_stride elements apart, positions D / Dv apart), all in one dtype; every key is visible
 * (a decode step's cache holds only what it may see). Per kv head, its keys and values are
 * read into fp32 once for the Hq / Hkv query heads that share them. Per query head, in fp32:
 * scores q.k * scale (`dot`), a softmax (with GPT-OSS's per-head
 * sink logit in the denominator when sinks is given), the weighted sum of the values in
 * position order; the result rounded once to the dtype, [Hq, Dv]. */
int moemesh_attend(const void *q, int dtype, int64_t Hq, int64_t D, int64_t q_stride, const void *k,
                   int64_t k_stride, const void *v, int64_t v_stride, int64_t Hkv, int64_t S, int64_t Dv, float scale,
                   const float *sinks, void *y, int threads) {
    if (Hq % Hkv || S < 1) return 3;
    const size_t size = dtype == F32 ? 4 : 2;
    const int64_t groups = Hq / Hkv, dv = D - D % LANES;
    const size_t per_thread = (size_t)(S * (D + Dv) + groups * (S + D + Dv));
    float *buf = malloc((size_t)threads * per_thread * sizeof(float));
    if (!buf) return 1;
#pragma omp parallel num_threads(threads) if (Hq * S * (D + Dv) >= 131072)
    {
#ifdef _OPENMP
        float *kf = buf + (size_t)omp_get_thread_num() * per_thread;
#else
        float *kf = buf;
#endif
        float *vf = kf + S * D, *scores = vf + S * Dv, *qf = scores + groups * S, *o = qf + groups * D;
#pragma omp for schedule(static)
        for (int64_t kvh = 0; kvh < Hkv; kvh++) {
            const char *kh = (const char *)k + (size_t)(kvh * k_stride) * size;
            const char *vh = (const char *)v + (size_t)(kvh * v_stride) * size;
            for (int64_t j = 0; j < S; j++) {
                row_to_f32(kh + (size_t)(j * D) * size, dtype, D, kf + j * D);
                row_to_f32(vh + (size_t)(j * Dv) * size, dtype, Dv, vf + j * Dv);
            }
            for (int64_t g = 0; g < groups; g++)
                row_to_f32((const char *)q + (size_t)((kvh * groups + g) * q_stride) * size, dtype, D, qf + g * D);
            for (int64_t j = 0; j < S; j++)
                for (int64_t g = 0; g < groups; g++) scores[g * S + j] = dot(qf + g * D, kf + j * D, D, dv) * scale;
            for (int64_t g = 0; g < groups; g++) {
                const int64_t h = kvh * groups + g;
                float *sc = scores + g * S, *out = o + g * Dv;
                float top = sinks ? sinks[h] : -INFINITY;
                for (int64_t j = 0; j < S; j++) top = sc[j] > top ? sc[j] : top;
                for (int64_t j = 0; j < S; j++) sc[j] = exp_f32(sc[j] - top);
                float total = sinks ? exp_f32(sinks[h] - top) : 0.0f;
                for (int64_t j = 0; j < S; j++) total += sc[j];
                weighted_rows(sc, vf, S, Dv, out);
                for (int64_t d = 0; d < Dv; d++) out[d] = out[d] / total;
                row_from_f32(out, dtype, Dv, (char *)y + (size_t)(h * Dv) * size);
            }
        }
    }
    free(buf);
    return 0;
}

/* ---- rotary embedding, "half" style (kernels.rope.apply_rotary), in place -----------------
 * q [R, Hq, D] and k [R, Hk, D] (R rows of heads), cos and sin [R, D], all in one dtype: per
 * head x[d] * cos[d] + rot(x)[d] * sin[d] with rot(x) = (-x[D/2:], x[:D/2]), in fp32, rounded
 * once. */
static void rope_rows(char *x, int dtype, int64_t H, int64_t D, const float *c, const float *s) {
    const size_t size = dtype == F32 ? 4 : 2;
    const int64_t half = D / 2;
    float v[1024], o[1024];
    for (int64_t h = 0; h < H; h++) {
        char *p = x + (size_t)(h * D) * size;
        row_to_f32(p, dtype, D, v);
        for (int64_t d = 0; d < half; d++) o[d] = v[d] * c[d] - v[d + half] * s[d];
        for (int64_t d = half; d < D; d++) o[d] = v[d] * c[d] + v[d - half] * s[d];
        row_from_f32(o, dtype, D, p);
    }
}

int moemesh_rope(void *q, int64_t Hq, void *k, int64_t Hk, int dtype, int64_t R, int64_t D, const void *cos,
                 const void *sin) {
    if (D % 2 || D > 1024) return 3;
    const size_t size = dtype == F32 ? 4 : 2;
    float c[1024], s[1024];
    for (int64_t r = 0; r < R; r++) {
        row_to_f32((const char *)cos + (size_t)(r * D) * size, dtype, D, c);
        row_to_f32((const char *)sin + (size_t)(r * D) * size, dtype, D, s);
        rope_rows((char *)q + (size_t)(r * Hq * D) * size, dtype, Hq, D, c, s);
        rope_rows((char *)k + (size_t)(r * Hk * D) * size, dtype, Hk, D, c, s);
    }
    return 0;
}

/* ---- softmax routing (kernels.moe.route), for a few tokens ---------------------------------
 * logits = x . w[e] in fp32 (`dot`), softmax in fp32, the top k (the lower expert first on a
 * tie), renormalised over the k when asked, rounded to x's dtype when asked; ids [M, k],
 * weights [M, k] in fp32. */
int moemesh_route(const void *x, int dtype, int64_t M, int64_t H, const void *w, int wdtype, int64_t E, int64_t k,
                  int normalize, int round_weights, int64_t *ids, float *weights) {
    if (k < 1 || k > E) return 3;
    const size_t wsize = wdtype == F32 ? 4 : 2;
    float *buf = malloc((size_t)(M * H + H + M * E) * sizeof(float));
    if (!buf) return 1;
    float *xf = buf, *wf = xf + M * H, *p = wf + H;
    const int64_t hv = H - H % LANES;
    row_to_f32(x, dtype, M * H, xf);
    for (int64_t e = 0; e < E; e++) { /* each router row read once for all M tokens */
        row_to_f32((const char *)w + (size_t)(e * H) * wsize, wdtype, H, wf);
        for (int64_t m = 0; m < M; m++) p[m * E + e] = dot(xf + m * H, wf, H, hv);
    }
    for (int64_t m = 0; m < M; m++) {
        float *pm = p + m * E, top = -INFINITY, total = 0, chosen = 0;
        for (int64_t e = 0; e < E; e++) top = pm[e] > top ? pm[e] : top;
        for (int64_t e = 0; e < E; e++) total += pm[e] = exp_f32(pm[e] - top);
        for (int64_t e = 0; e < E; e++) pm[e] = pm[e] / total;
        for (int64_t j = 0; j < k; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                int taken = 0;
                for (int64_t i = 0; i < j; i++) taken |= ids[m * k + i] == e;
                if (!taken && (best < 0 || pm[e] > pm[best])) best = e;
            }
            ids[m * k + j] = best;
            weights[m * k + j] = pm[best];
            chosen += pm[best];
        }
        for (int64_t j = 0; j < k; j++) {
            const float v = normalize ? weights[m * k + j] / chosen : weights[m * k + j];
            weights[m * k + j] = round_weights ? round_to(dtype, v) : v;
        }
    }
    free(buf);
    return 0;
}

/* ---- a quantized span's decode step, all its layers in one call ------------------------------
 * The layers of kernels.span.DecoderLayer as a quantized span runs them one op at a time, in
 * the same order with the same roundings, each piece the function above: x + attn(norm(x)),
 * then x + moe(norm(x)), per layer, for M rows (one token of M sessions). Attention: q, k, v
 * projected, per-head RMSNorms on q and k where the layer has them, rotary on q and k, the new key and value written into the row's cache at its
 * position, `moemesh_attend` over positions 0 .. position, the o projection. MoE: softmax
 * routing, then `moemesh_moe`. The residual adds round once to the dtype, as torch's do. So
 * this call gives the bits of the op-by-op path (kernels/fused.py checks what it takes). */

typedef struct {
    int64_t kind; /* 8, 4 or 16 (bf16 weights, no scales) */
    const void *codes, *scales;
    int64_t N, K, G;
} QProj;

typedef struct {
    const void *input_norm, *post_norm; /* [H] in the dtype */
    float eps;
    QProj q, k, v, o;
    const void *q_norm, *k_norm; /* [D] per head (Qwen3-MoE), or NULL */
    int64_t Hq, Hkv, D;
    float scale;
    const void *router; /* [E, H] */
    int64_t router_dtype, E, top_k, normalize, round_weights;
    int64_t moe_kind, I, G;
    const void *gu_codes, *gu_scales, *dn_codes, *dn_scales;
} Layer;

static int project(const QProj *p, const void *x, int dtype, int64_t M, void *y, int threads) {
    if (p->kind != 4) return dense_gemv((int)p->kind, x, dtype, M, p->K, p->codes, p->scales, p->N, y, threads);
    return moemesh_int4_gemv(x, dtype, M, p->K, p->codes, p->scales, p->G, p->N, y, threads);
}

/* q, k and v of one input in one parallel region, x converted once (one quantization for the
 * three, as checkpoints have them); else one call each. The same bits either way. */
static int project_qkv(const Layer *L, const void *x, int dtype, int64_t M, void *q, void *k, void *v,
                       int threads) {
    const QProj *p[3] = {&L->q, &L->k, &L->v};
    void *y[3] = {q, k, v};
    const int64_t K = L->q.K, kind = L->q.kind, G = L->q.G;
    int same = 1;
    for (int i = 1; i < 3; i++) same &= p[i]->kind == kind && p[i]->K == K && p[i]->G == G;
    if (!same || (kind == 4 && (K % G || G % 2))) {
        int rc = 0;
        for (int i = 0; i < 3 && !rc; i++) rc = project(p[i], x, dtype, M, y[i], threads);
        return rc;
    }
    float *xf = rows_f32(x, dtype, M, K, kind == 4 ? G : 0);
    if (!xf) return 1;
    const float *xsum = xf + M * K;
#pragma omp parallel num_threads(threads) if ((L->q.N + L->k.N + L->v.N) * K >= 65536)
    for (int i = 0; i < 3; i++) {
        if (kind != 4) dense_share((int)kind, xf, dtype, M, K, p[i]->codes, p[i]->scales, p[i]->N, y[i]);
        else int4_share(dtype, xf, xsum, M, K, p[i]->codes, p[i]->scales, G, p[i]->N, y[i]);
    }
    free(xf);
    return 0;
}

static void add_into(void *x, const void *h, int dtype, int64_t n) { /* x = dtype(x + h) */
    for (int64_t i = 0; i < n; i++) store(x, dtype, i, load(x, dtype, i) + load(h, dtype, i));
}

static int attention_block(const Layer *L, int dtype, int64_t M, const void *xn, char *q, char *k, char *v,
                           char *att, void *const *keys, void *const *values, const int64_t *positions,
                           const int64_t *slots, const void *cos, const void *sin, int threads) {
    const size_t size = dtype == F32 ? 4 : 2;
    const int64_t D = L->D, qw = L->Hq * D, kw = L->Hkv * D;
    int rc = project_qkv(L, xn, dtype, M, q, k, v, threads);
    if (!rc && L->q_norm) rc = moemesh_rmsnorm(q, dtype, M * L->Hq, D, L->q_norm, dtype, L->eps, 0, q); /* in place */
    if (!rc && L->k_norm) rc = moemesh_rmsnorm(k, dtype, M * L->Hkv, D, L->k_norm, dtype, L->eps, 0, k);
    if (!rc) rc = moemesh_rope(q, L->Hq, k, L->Hkv, dtype, M, D, cos, sin);
    for (int64_t m = 0; m < M && !rc; m++) {
        const int64_t pos = positions[m], S = slots[m];
        char *kc = keys[m], *vc = values[m];
        for (int64_t h = 0; h < L->Hkv; h++) {
            memcpy(kc + (size_t)((h * S + pos) * D) * size, k + (size_t)(m * kw + h * D) * size, (size_t)D * size);
            memcpy(vc + (size_t)((h * S + pos) * D) * size, v + (size_t)(m * kw + h * D) * size, (size_t)D * size);
        }
        rc = moemesh_attend(q + (size_t)(m * qw) * size, dtype, L->Hq, D, D, kc, S * D, vc, S * D, L->Hkv, pos + 1,
                            D, L->scale, NULL, att + (size_t)(m * qw) * size, threads);
    }
    return rc;
}

int moemesh_layers(const Layer *layers, int64_t n_layers, int dtype, int64_t M, int64_t H, void *x,
                   void *const *keys, void *const *values, const int64_t *positions, const int64_t *slots,
                   const void *cos, const void *sin, int threads) {
    if (M < 1 || M > MAX_M) return 3;
    const size_t size = dtype == F32 ? 4 : 2;
    int64_t qw = 0, kw = 0, top_k = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        const Layer *L = layers + l;
        qw = L->Hq * L->D > qw ? L->Hq * L->D : qw;
        kw = L->Hkv * L->D > kw ? L->Hkv * L->D : kw;
        top_k = L->top_k > top_k ? L->top_k : top_k;
    }
    char *buf = malloc((size_t)M * ((size_t)(2 * H + 2 * qw + 2 * kw) * size + (size_t)top_k * 12));
    if (!buf) return 1;
    char *xn = buf, *h = xn + (size_t)(M * H) * size, *q = h + (size_t)(M * H) * size;
    char *k = q + (size_t)(M * qw) * size, *v = k + (size_t)(M * kw) * size, *att = v + (size_t)(M * kw) * size;
    int64_t *ids = (int64_t *)(att + (size_t)(M * qw) * size);
    float *rw = (float *)(ids + M * top_k);
    int rc = 0;
    for (int64_t l = 0; l < n_layers && !rc; l++) {
        const Layer *L = layers + l;
        rc = moemesh_rmsnorm(x, dtype, M, H, L->input_norm, dtype, L->eps, 0, xn);
        if (!rc)
            rc = attention_block(L, dtype, M, xn, q, k, v, att, keys + l * M, values + l * M, positions, slots, cos,
                                 sin, threads);
        if (!rc) rc = project(&L->o, att, dtype, M, h, threads);
        if (rc) break;
        add_into(x, h, dtype, M * H);
        rc = moemesh_rmsnorm(x, dtype, M, H, L->post_norm, dtype, L->eps, 0, xn);
        if (!rc)
            rc = moemesh_route(xn, dtype, M, H, L->router, (int)L->router_dtype, L->E, L->top_k, (int)L->normalize,
                               (int)L->round_weights, ids, rw);
        if (!rc)
            rc = moemesh_moe((int)L->moe_kind, xn, dtype, M, H, L->top_k, ids, rw, L->E, L->I, L->G, L->gu_codes,
                             L->gu_scales, L->dn_codes, L->dn_scales, h, threads);
        if (!rc) add_into(x, h, dtype, M * H);
    }
    free(buf);
    return rc;
}

/* ---- dequantizing, for prefill-sized matmuls ----------------------------------------------
 * The weight that int8 or int4 codes stand for, in `dtype`, each value computed in fp32 and
 * rounded once, as kernels.quant.dequantize (with -ffp-contract=off: a multiply, then an add).
 * A prefill then multiplies it on torch's matmul for that dtype: on a CPU with AMX or AVX-512
 * BF16 oneDNN's bf16 matmul is ~8x faster for 128 rows than torch's packed int8 and int4
 * kernels, and writing the weight out costs less than the difference.
 *   int8: codes [N, K], scales [N]              -> out [N, K]
 *   int4: torch's layout (above), scale_zeros   -> out [K, N] (transposed: a block's codes for
 *         one k are 64 channels side by side, so both sides of the loop are contiguous) */
static void dequant_int4_block(const uint8_t *restrict base, int width, int64_t K, int64_t G, const void *sz,
                               int dtype, int64_t N, int64_t n0, char *out, size_t size) {
    float s[BLOCK], z[BLOCK], v[BLOCK];
    const int half = width / 2;
    for (int64_t k = 0; k < K; k++) {
        if (k % G == 0) int4_scales(sz, dtype, (k / G) * N + n0, width, s, z);
        const uint8_t *row = base + k * half;
        if (width == BLOCK) { /* low nibbles: channels n0 .. n0 + B/2, high: the rest of the block */
            for (int c = 0; c < BLOCK / 2; c++) {
                v[c] = ((float)(row[c] & 15) - 8.0f) * s[c] + z[c];
                v[c + BLOCK / 2] = ((float)(row[c] >> 4) - 8.0f) * s[c + BLOCK / 2] + z[c + BLOCK / 2];
            }
        } else { /* the channels after the last block: low nibble 2j, high 2j + 1 */
            for (int c = 0; c < half; c++) {
                v[2 * c] = ((float)(row[c] & 15) - 8.0f) * s[2 * c] + z[2 * c];
                v[2 * c + 1] = ((float)(row[c] >> 4) - 8.0f) * s[2 * c + 1] + z[2 * c + 1];
            }
        }
        row_from_f32(v, dtype, width, out + (size_t)(k * N + n0) * size);
    }
}

int moemesh_dequantize(int kind, const void *data, const void *scales, int dtype, int64_t N, int64_t K, int64_t G,
                       void *out, int threads) {
    const size_t size = dtype == F32 ? 4 : 2;
    if (kind == 8) {
#pragma omp parallel for schedule(static) num_threads(threads) if (N * K >= 65536)
        for (int64_t n = 0; n < N; n++) {
            const int8_t *codes = (const int8_t *)data + n * K;
            const float scale = load(scales, dtype, n);
            float v[256];
            for (int64_t k0 = 0; k0 < K; k0 += 256) {
                const int64_t width = K - k0 < 256 ? K - k0 : 256;
                for (int64_t j = 0; j < width; j++) v[j] = (float)codes[k0 + j] * scale;
                row_from_f32(v, dtype, width, (char *)out + (size_t)(n * K + k0) * size);
            }
        }
        return 0;
    }
    if (kind != 4 || G < 1 || K % G || N % 2) return 2;
    const int64_t full = N - N % BLOCK, blocks = int4_blocks(N);
    const uint8_t *packed = (const uint8_t *)data;
#pragma omp parallel for schedule(static) num_threads(threads) if (N * K >= 65536)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * BLOCK;
        const int width = n0 < full ? BLOCK : (int)(N - full);
        dequant_int4_block(packed + n0 * (K / 2), width, K, G, scales, dtype, N, n0, (char *)out, size);
    }
    return 0;
}
