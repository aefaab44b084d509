/* Decode-sized matmuls on weight-only quantized weights (see kernels/native.py).
 *
 * y[m, n] = sum_k x[m, k] * w[n, k] for a few rows m, where w is
 *   int8: codes[n, k] * scale[n]                                  (kernels.quant.Int8Weight)
 *   int4: (q[n, k] - 8) * scale[k / G, n] + zero[k / G, n]        (kernels.quant.Int4Weight)
 * with the int4 codes in the byte layout of torch's CPU int4 kernel.
 *
 * Every output element is computed by one thread in one fixed order (int8: 64 fp32 partial
 * sums along k, lane j taking k = j mod 64, folded pairwise; int4: per group, one chain of
 * fmas over the k, each pair odd first). So a row's result does not depend on how many rows are
 * in the call, on the thread count, or on whether the compiler emits 16-wide or 8-wide
 * vectors: the same bits on every x86 build of this file with FMA. The loops are written so
 * that gcc vectorizes them without -ffast-math.
 *
 * x, y and the scales share one dtype: 0 = fp32, 1 = bf16, 2 = fp16. Rows are contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define LANES 16
#define BLOCK 64 /* int4: output channels per block of torch's layout */

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

static float *as_f32(const void *x, int dtype, int64_t count) {
    float *xf = malloc((size_t)count * sizeof(float));
    if (xf) row_to_f32(x, dtype, count, xf);
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

static inline float int8_dot(const float *restrict x, const int8_t *restrict w, int64_t K) {
    float acc[4 * LANES] = {0};
    const int64_t kv = K - K % (4 * LANES);
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 a[4];
    for (int q = 0; q < 4; q++) a[q] = _mm512_setzero_ps();
    for (; k < kv; k += 4 * LANES)
        for (int q = 0; q < 4; q++) {
            const __m128i codes = _mm_loadu_si128((const __m128i *)(w + k + 16 * q));
            a[q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)), _mm512_loadu_ps(x + k + 16 * q), a[q]);
        }
    for (int q = 0; q < 4; q++) _mm512_storeu_ps(acc + 16 * q, a[q]);
#endif
    for (; k < kv; k += 4 * LANES)
        for (int j = 0; j < 4 * LANES; j++) acc[j] = fmaf((float)w[k + j], x[k + j], acc[j]);
    for (; k < K; k++) acc[k - kv] = fmaf((float)w[k], x[k], acc[k - kv]);
    return fold64(acc);
}

int moemesh_int8_gemv(const void *x, int dtype, int64_t M, int64_t K, const int8_t *w, const void *scales,
                      int64_t N, void *y, int threads) {
    float *xf = as_f32(x, dtype, M * K);
    if (!xf) return 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= 65536)
    for (int64_t n = 0; n < N; n++) {
        const float scale = load(scales, dtype, n);
        for (int64_t m = 0; m < M; m++) store(y, dtype, m * N + n, int8_dot(xf + m * K, w + n * K, K) * scale);
    }
    free(xf);
    return 0;
}

/* ---- int4, groups of G along k, torch's CPU layout ----------------------------------------
 * Channels go in blocks of 64: block b is bytes [K, 32] whose low nibble is channel 64b + j and
 * high nibble channel 64b + 32 + j. The N % 64 channels left are bytes [K, r / 2], low nibble
 * channel 2j, high nibble 2j + 1. scale_zeros is [K / G, N, 2]. */

/* One group of G k's for the channels n0 .. n0 + width of one block: per channel, the sum of
 * x[k] * (q - 8) over the group, in one chain of fmas taking each pair of k odd first
 * (k + 1, then k), the order of the AVX-512 BF16 dot product below. */
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

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#define INT4_BF16_DOT 1
/* A full block with bf16 activations and scales, in registers, on the BF16 dot product: each
 * vdpbf16ps adds x[k+1] * w[k+1], then x[k] * w[k], to a lane (exact bf16 products, fp32
 * sums: int4_group's operations, in its order; unlike it, it flushes subnormals to zero).
 * Rows k and k+1 of the block are 64 adjacent bytes; vpermb lays them out as (row k, row
 * k+1) byte pairs per 32-bit lane, and vpermw maps each nibble to the bf16 of q - 8. */
static void int4_block_bf16(const uint16_t *restrict xb, const uint8_t *restrict base, const uint16_t *restrict sz,
                            int64_t G, int64_t groups, int64_t N, int64_t n0, const float *restrict xsum,
                            float out[BLOCK]) {
    uint8_t index[2][64];
    for (int half = 0; half < 2; half++)
        for (int b = 0; b < 64; b++) index[half][b] = (uint8_t)((b >> 1 & 1 ? 32 : 0) + 16 * half + (b >> 2));
    uint16_t table[32];
    for (int i = 0; i < 32; i++) {
        const float v = (float)((i & 15) - 8);
        uint32_t u;
        memcpy(&u, &v, 4);
        table[i] = (uint16_t)(u >> 16); /* small integers are exact in bf16 */
    }
    const __m512i pick0 = _mm512_loadu_si512(index[0]), pick1 = _mm512_loadu_si512(index[1]);
    const __m512i lut32 = _mm512_loadu_si512(table);
    const __mmask64 low_bytes = 0x5555555555555555ull; /* bytes 0 and 2 of each lane: its two words' low bytes */
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    __m512 o[4];
    for (int q = 0; q < 4; q++) o[q] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 a[4];
        for (int q = 0; q < 4; q++) a[q] = _mm512_setzero_ps();
        for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
            const __m512i rows = _mm512_loadu_si512((const void *)(base + k * (BLOCK / 2)));
            int32_t pair;
            memcpy(&pair, xb + k, 4); /* x[k] in the low word, x[k + 1] in the high */
            const __m512bh xk = (__m512bh)_mm512_set1_epi32(pair);
            for (int half = 0; half < 2; half++) { /* bytes 0..15, then 16..31 of each row */
                const __m512i bytes = _mm512_maskz_permutexvar_epi8(low_bytes, half ? pick1 : pick0, rows);
                const __m512i lo = _mm512_permutexvar_epi16(bytes, lut32); /* index: the low 5 bits */
                const __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), lut32);
                a[half] = _mm512_dpbf16_ps(a[half], (__m512bh)lo, xk);         /* channels 16h .. 16h + 15 */
                a[2 + half] = _mm512_dpbf16_ps(a[2 + half], (__m512bh)hi, xk); /* 32 + 16h .. */
            }
        }
        const __m512 xs = _mm512_set1_ps(xsum[g]);
        for (int q = 0; q < 4; q++) { /* 16 channels' (scale, zero) pairs: one bf16 pair per lane */
            const __m512i pairs = _mm512_loadu_si512((const void *)(sz + 2 * (g * N + n0 + 16 * q)));
            const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
            const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, high));
            o[q] = _mm512_add_ps(o[q], _mm512_fmadd_ps(scale, a[q], _mm512_mul_ps(zero, xs)));
        }
    }
    for (int q = 0; q < 4; q++) _mm512_storeu_ps(out + 16 * q, o[q]);
}
#endif

int moemesh_int4_gemv(const void *x, int dtype, int64_t M, int64_t K, const uint8_t *packed,
                      const void *scale_zeros, int64_t G, int64_t N, void *y, int threads) {
    if (K % G || G % 2) return 2;
    float *xf = as_f32(x, dtype, M * K);
    if (!xf) return 1;
    const int64_t groups = K / G, full = N - N % BLOCK, blocks = full / BLOCK, tail = N - full;
    float *xsum = malloc((size_t)(M * groups) * sizeof(float)); /* sum of x over each group */
    if (!xsum) {
        free(xf);
        return 1;
    }
    for (int64_t i = 0; i < M * groups; i++) {
        float s = 0;
        for (int64_t k = 0; k < G; k++) s += xf[i * G + k];
        xsum[i] = s;
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= 65536)
    for (int64_t b = 0; b < blocks + (tail > 0); b++) {
        const int64_t n0 = b * BLOCK;
        const int width = b < blocks ? BLOCK : (int)tail;
        const uint8_t *base = packed + n0 * (K / 2);
        for (int64_t m = 0; m < M; m++) {
            float out[BLOCK] = {0}, acc[BLOCK], s[BLOCK], z[BLOCK];
#ifdef INT4_BF16_DOT
            if (dtype == BF16 && width == BLOCK) {
                int4_block_bf16((const uint16_t *)x + m * K, base, scale_zeros, G, groups, N, n0, xsum + m * groups, out);
                for (int c = 0; c < width; c++) store(y, dtype, m * N + n0 + c, out[c]);
                continue;
            }
#endif
            for (int64_t g = 0; g < groups; g++) {
                int4_group(xf + m * K, base, g * G, G, width, acc);
                int4_scales(scale_zeros, dtype, g * N + n0, width, s, z);
                const float xs = xsum[m * groups + g];
                for (int c = 0; c < width; c++) out[c] += fmaf(s[c], acc[c], z[c] * xs);
            }
            for (int c = 0; c < width; c++) store(y, dtype, m * N + n0 + c, out[c]);
        }
    }
    free(xsum);
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
