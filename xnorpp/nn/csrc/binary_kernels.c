/* Element-wise kernels of xnorpp's fused binary convolution on CPU (see xnorpp/nn/native.py).
 *
 * Each loop does in one pass what PyTorch does in two to four (an int8 operand of a float op is
 * first copied to a float tensor on CPU). Same arithmetic as the PyTorch ops they replace, one
 * fp32 multiply per element and no contraction (built with -ffp-contract=off): bit-identical.
 * Tensors are flat arrays in memory order; nt is the number of OpenMP threads.
 */
#include <math.h>
#include <stdint.h>

/* The layout-changing kernels work on tiles of TILE positions of one sample (all channels). */
#define TILE 16

/* Tile t of n samples x ptiles tiles of hw positions: sample *s, positions [*p0, *p1). */
static inline void tile_bounds(int64_t t, int64_t ptiles, int64_t hw, int64_t *s, int64_t *p0,
                               int64_t *p1) {
    *s = t / ptiles;
    *p0 = (t % ptiles) * TILE;
    *p1 = *p0 + TILE < hw ? *p0 + TILE : hw;
}

/* out = clamp(float(code), -1, 1): the +-1 value an int8 code (-2, -1, +1, +2) holds. */
void xnorpp_code_sign_f32(const int8_t *restrict code, float *restrict out, int64_t n, int nt) {
#pragma omp parallel for simd num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        int c = code[i];
        out[i] = (float)((c > 0) - (c < 0));
    }
}

/* grad *= float(|code| >> 1): keeps the gradient where the code's STE window is 1 (|code| = 2). */
void xnorpp_masked_grad_f32(float *restrict grad, const int8_t *restrict code, int64_t n, int nt) {
#pragma omp parallel for simd num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        int c = code[i];
        grad[i] = grad[i] * (float)((c < 0 ? -c : c) >> 1);
    }
}

/* For rows of m elements (one sample each): prod = float(y) * grad (summed over the batch to give
 * dGamma) and scaled = grad * g, g being Gamma laid out as one row. */
void xnorpp_gamma_backward_f32(const float *restrict grad, const int16_t *restrict y,
                               const float *restrict g, float *restrict prod,
                               float *restrict scaled, int64_t rows, int64_t m, int nt) {
    const int64_t block = 4096;
    const int64_t blocks = (m + block - 1) / block;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < rows * blocks; t++) {
        const int64_t r = t / blocks, j0 = (t % blocks) * block;
        const int64_t j1 = j0 + block < m ? j0 + block : m;
        const float *gr = grad + r * m;
        const int16_t *yr = y + r * m;
        float *pr = prod + r * m, *sr = scaled + r * m;
#pragma omp simd
        for (int64_t j = j0; j < j1; j++) {
            const float v = gr[j];
            pr[j] = (float)yr[j] * v;
            sr[j] = v * g[j];
        }
    }
}

#if defined(__AVX2__)
#include <immintrin.h>

/* Transposes the 8x8 block r[0..7] (rows) in place: r[j] then holds column j. */
static inline void transpose8(__m256 r[8]) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* 8 floats holding small integers -> 8 int8 (truncation, as a C cast). */
static inline void store_int8x8(int8_t *dst, __m256 v) {
    __m256i i = _mm256_cvttps_epi32(v);
    __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64((__m128i *)dst, _mm_packs_epi16(w, w));
}

/* 8 floats holding integers in int16 range -> 8 int16 (truncation, as a C cast). */
static inline void store_int16x8(int16_t *dst, __m256 v) {
    __m256i i = _mm256_cvttps_epi32(v);
    __m128i packed = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storeu_si128((__m128i *)dst, packed);
}
#endif

/* The int8 conv's channels-last result y (n, hw, c) to out = y * Gamma and y as int16 (exact
 * integer sums), both in NCHW (n, c, hw), g being Gamma as (c, hw): one pass instead of a layout
 * copy, a cast and a multiply. 8x8 blocks are transposed in AVX2 registers where available. */
void xnorpp_gamma_forward_nhwc_to_nchw_f32(const float *restrict y, const float *restrict g,
                                           float *restrict out, int16_t *restrict y16, int64_t n,
                                           int64_t c, int64_t hw, int nt) {
    const int64_t ptiles = (hw + TILE - 1) / TILE;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < n * ptiles; t++) {
        int64_t s, p0, p1;
        tile_bounds(t, ptiles, hw, &s, &p0, &p1);
        const float *ys = y + s * hw * c;
        float *os = out + s * c * hw;
        int16_t *qs = y16 + s * c * hw;
        int64_t k0 = 0;
#if defined(__AVX2__)
        if (p1 - p0 == TILE) {
            for (; k0 + 8 <= c; k0 += 8) {
                for (int64_t pb = p0; pb < p1; pb += 8) {
                    __m256 r[8];
                    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(ys + (pb + i) * c + k0);
                    transpose8(r);
                    for (int j = 0; j < 8; j++) {
                        const int64_t o = (k0 + j) * hw + pb;
                        _mm256_storeu_ps(os + o, _mm256_mul_ps(r[j], _mm256_loadu_ps(g + o)));
                        store_int16x8(qs + o, r[j]);
                    }
                }
            }
        }
#endif
        for (int64_t c0 = k0; c0 < c; c0 += TILE) {
            const int64_t c1 = c0 + TILE < c ? c0 + TILE : c;
            for (int64_t k = c0; k < c1; k++) {
                for (int64_t p = p0; p < p1; p++) {
                    const float v = ys[p * c + k];
                    os[k * hw + p] = v * g[k * hw + p];
                    qs[k * hw + p] = (int16_t)v;
                }
            }
        }
    }
}

/* The same without a layout change (y, out, y16 and g all in one memory order, g one sample); out
 * may be y (each element is read, then written). */
void xnorpp_gamma_forward_f32(const float *y, const float *restrict g, float *out,
                              int16_t *restrict y16, int64_t rows, int64_t m, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
#pragma omp simd
        for (int64_t j = 0; j < m; j++) {
            const float v = y[r * m + j];
            out[r * m + j] = v * g[j];
            y16[r * m + j] = (int16_t)v;
        }
    }
}

/* The int8 conv's operands from an NCHW fp32 input x (n, c, hw): u = sign(x) + 1 (0 or 2, uint8) in
 * channels-last order (n, hw, c), as oneDNN reads it, and the int8 code sign * (1 + [|x| <= 1]) in
 * x's order; sign(x) = +1 where x >= 0 (-0.0 too) or x is NaN (as binary_sign on CPU, where
 * torch.sign(NaN) = 0), else -1; the window is 0 for NaN. */
static inline int8_t code_of(float v, uint8_t *u) {
    const int pos = !(v < 0.0f), win = fabsf(v) <= 1.0f;
    *u = pos ? 2 : 0;
    return (int8_t)((pos ? 1 : -1) * (1 + win));
}

void xnorpp_sign_code_u8_nchw_to_nhwc(const float *restrict x, uint8_t *restrict u,
                                      int8_t *restrict code, int64_t n, int64_t c, int64_t hw,
                                      int nt) {
    const int64_t ptiles = (hw + TILE - 1) / TILE;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < n * ptiles; t++) {
        int64_t s, p0, p1;
        tile_bounds(t, ptiles, hw, &s, &p0, &p1);
        const float *xs = x + s * c * hw;
        int8_t *cs = code + s * c * hw;
        uint8_t *us = u + s * hw * c;
        int64_t k0 = 0;
#if defined(__AVX2__)
        if (p1 - p0 == TILE) {
            const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
            const __m256 two = _mm256_set1_ps(2.0f);
            const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
            for (; k0 + 8 <= c; k0 += 8) {
                for (int64_t pb = p0; pb < p1; pb += 8) {
                    __m256 r[8];
                    for (int j = 0; j < 8; j++) {
                        const int64_t o = (k0 + j) * hw + pb;
                        const __m256 v = _mm256_loadu_ps(xs + o);
                        const __m256 pos = _mm256_cmp_ps(v, zero, _CMP_NLT_UQ);  // NaN: +1
                        const __m256 win = _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), one, _CMP_LE_OQ);
                        const __m256 mag = _mm256_add_ps(one, _mm256_and_ps(win, one));
                        store_int8x8(cs + o, _mm256_blendv_ps(_mm256_sub_ps(zero, mag), mag, pos));
                        r[j] = _mm256_and_ps(pos, two);
                    }
                    transpose8(r);
                    for (int i = 0; i < 8; i++) store_int8x8((int8_t *)us + (pb + i) * c + k0, r[i]);
                }
            }
        }
#endif
        for (int64_t k = k0; k < c; k++) {
            for (int64_t p = p0; p < p1; p++) cs[k * hw + p] = code_of(xs[k * hw + p], us + p * c + k);
        }
    }
}
