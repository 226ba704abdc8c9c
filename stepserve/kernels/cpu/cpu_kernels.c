/* stepserve's CPU kernels: 4-bit and 8-bit block matmuls on 8-bit activations, and a whole
 * decode step of the plain Llama-style decoder in one call.
 *
 * Built once per machine by stepserve/models/cpu_native.py (-O3 -march=native -fopenmp) and
 * loaded through ctypes; every entry point takes raw pointers to tensors that PyTorch owns.
 * The OpenMP runtime is the one PyTorch already loaded (same soname), so the two never run
 * two thread pools side by side.
 *
 * Formats (GROUP = 32 weights per block along the input dimension K):
 *   Q4_1 weight [N][K]: qs [N][K/2] bytes, byte j of a block holds weight j (low nibble) and
 *     j + 16 (high nibble), GGUF's own order; dm [N][K/32][2] floats (d, m): w = d * q + m.
 *   Q8_0 weight [N][K]: qs [N][K] int8, d [N][K/32]: w = d * q.
 *   Q8 activation row [K]: q [K] int8, d [K/32], s [K/32] = d * sum(q) (llama.cpp's Q8_1), so
 *     a Q4_1 block dot is d_w * d_a * sum(q_w q_a) + m_w * s_a.
 */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define QK 32
#define TILE 8     /* activation rows sharing one unpacked weight block */
#define NCHUNK 16  /* weight rows per work item: a chunk stays in L1 across the row tiles */

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;
    return c.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN kept NaN */
    union { float f; uint32_t u; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40);
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* Q8 blocks of one row. A block holding a NaN or an infinity gets a NaN scale, so that the
 * non-finite value reaches the output as it would through a float matmul. */
static void quant_row(const float *x, int K, int8_t *q, float *d, float *s) {
    for (int b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        int bad = 0;
#pragma omp simd reduction(max : amax) reduction(| : bad)
        for (int j = 0; j < QK; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
            bad |= !(a <= 3.4e38f);
        }
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < QK; j++) {
            int v = bad ? 0 : (int)lrintf(xb[j] * id);
            q[b * QK + j] = (int8_t)v;
            sum += v;
        }
        float dd = bad ? NAN : amax / 127.0f;
        d[b] = dd;
        s[b] = dd * (float)sum;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
static inline __m256i dot_u8s8(__m256i u, __m256i s) { /* 8 int32 sums of 4 u8*s8 products */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HAVE_512 1
/* Two blocks per instruction. ed / es: the activation rows' block scales and sums, each
 * repeated over the 8 lanes of its block (see expand), so that a pair's scales are one load. */
static inline __attribute__((always_inline)) void q4_tile512(
    int R, const uint8_t *wq, const float *wdm, int nb, const int8_t *aq, const float *ed, const float *es, int K,
    float *res) {
    __m512 acc[TILE], macc[TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps(), macc[r] = _mm512_setzero_ps();
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
    const __m512i pick_d = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i pick_m = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int b = 0; b < nb; b += 2) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)(wq + 16 * b));
        __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(raw), raw, 1);
        z = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(1, 1, 0, 0)); /* block b, b, b + 1, b + 1 */
        __m512i w = _mm512_and_si512(_mm512_srlv_epi64(z, shift), low4); /* low nibbles, then high, per block */
        __m512 dm = _mm512_castps128_ps512(_mm_loadu_ps(wdm + 2 * b));
        __m512 d = _mm512_permutexvar_ps(pick_d, dm), m = _mm512_permutexvar_ps(pick_m, dm);
        for (int r = 0; r < R; r++) {
            __m512i a = _mm512_loadu_si512((const void *)(aq + (size_t)r * K + QK * b));
            __m512 p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, a));
            acc[r] = _mm512_fmadd_ps(p, _mm512_mul_ps(d, _mm512_loadu_ps(ed + ((size_t)r * nb + b) * 8)), acc[r]);
            macc[r] = _mm512_fmadd_ps(m, _mm512_loadu_ps(es + ((size_t)r * nb + b) * 8), macc[r]);
        }
    }
    for (int r = 0; r < R; r++) res[r] = _mm512_reduce_add_ps(_mm512_fmadd_ps(macc[r], _mm512_set1_ps(0.125f), acc[r]));
}

static inline __attribute__((always_inline)) void q8_tile512(
    int R, const int8_t *wq, const float *wd, int nb, const int8_t *aq, const float *ed, int K, float *res) {
    __m512 acc[TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i pick = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int b = 0; b < nb; b += 2) {
        __m512i w = _mm512_loadu_si512((const void *)(wq + QK * b));
        __mmask64 neg = _mm512_movepi8_mask(w);
        __m512i wabs = _mm512_abs_epi8(w);
        __m512 d = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(wd + b)))));
        for (int r = 0; r < R; r++) {
            __m512i a = _mm512_loadu_si512((const void *)(aq + (size_t)r * K + QK * b));
            a = _mm512_mask_sub_epi8(a, neg, _mm512_setzero_si512(), a); /* a * sign(w) */
            __m512 p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wabs, a));
            acc[r] = _mm512_fmadd_ps(p, _mm512_mul_ps(d, _mm512_loadu_ps(ed + ((size_t)r * nb + b) * 8)), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) res[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

#ifdef HAVE_512
/* Interleaved layouts (x16): 16 weight rows per group, so that one dpbusd lane is one weight
 * row and the block's float work (scale, min) is done on 16 outputs at once.
 *   Q4_1 x16: qs [N/16][nb][4][16 rows][4 bytes] (bytes 4k..4k+3 of each row's block: weights
 *     4k..4k+3 in the low nibbles, 16+4k.. in the high ones); dm [N/16][nb][2][16]: d, then m.
 *   Q8_0 x16: qs [N/16][nb][8][16][4]; dm [N/16][nb][2][16]: d, then c = 128 * d * sum(q),
 *     the correction for feeding the activations to dpbusd as unsigned (a + 128). */
static inline __attribute__((always_inline)) void q4x16_tile(
    int R, const uint8_t *wq, const float *wdm, int nb, const int8_t *aq, const float *ad, const float *as, int K,
    __m512 *acc) {
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        const uint8_t *wb = wq + (size_t)b * 256;
        __m512i w[8];
        for (int k = 0; k < 4; k++) {
            __m512i v = _mm512_loadu_si512((const void *)(wb + 64 * k));
            w[k] = _mm512_and_si512(v, low4);
            w[k + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
        __m512 d = _mm512_loadu_ps(wdm + (size_t)b * 32), m = _mm512_loadu_ps(wdm + (size_t)b * 32 + 16);
        for (int r = 0; r < R; r++) {
            const int32_t *a = (const int32_t *)(aq + (size_t)r * K + QK * b);
            __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(a[0]));
            for (int k = 1; k < 8; k++) sum = _mm512_dpbusd_epi32(sum, w[k], _mm512_set1_epi32(a[k]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, _mm512_set1_ps(ad[r * nb + b])), acc[r]);
            acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(as[r * nb + b]), acc[r]);
        }
    }
}

static inline __attribute__((always_inline)) void q8x16_tile(
    int R, const int8_t *wq, const float *wdm, int nb, const int8_t *aq, const float *ad, int K, __m512 *acc) {
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i flip = _mm512_set1_epi32((int)0x80808080u);
    for (int b = 0; b < nb; b++) {
        const int8_t *wb = wq + (size_t)b * 512;
        __m512i w[8];
        for (int k = 0; k < 8; k++) w[k] = _mm512_loadu_si512((const void *)(wb + 64 * k));
        __m512 d = _mm512_loadu_ps(wdm + (size_t)b * 32), c = _mm512_loadu_ps(wdm + (size_t)b * 32 + 16);
        for (int r = 0; r < R; r++) {
            const int32_t *a = (const int32_t *)(aq + (size_t)r * K + QK * b);
            __m512i sum = _mm512_setzero_si512();
            for (int k = 0; k < 8; k++) sum = _mm512_dpbusd_epi32(sum, _mm512_xor_si512(_mm512_set1_epi32(a[k]), flip), w[k]);
            __m512 da = _mm512_set1_ps(ad[r * nb + b]);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, da), acc[r]);
            acc[r] = _mm512_fnmadd_ps(c, da, acc[r]);
        }
    }
}
#endif

int ss_has_x16(void) {
#ifdef HAVE_512
    return 1;
#else
    return 0;
#endif
}

/* One Q4_1 weight row against R (<= TILE) Q8 activation rows: res[r]. */
static inline __attribute__((always_inline)) void q4_tile(
    int R, const uint8_t *wq, const float *wdm, int nb, const int8_t *aq, const float *ad, const float *as, int K,
    float *res) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[TILE];
    float macc[TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), macc[r] = 0.0f;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(wq + 16 * b));
        __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1);
        __m256i w = _mm256_and_si256(both, low4); /* weights 0..15, then 16..31 */
        float d = wdm[2 * b], m = wdm[2 * b + 1];
        for (int r = 0; r < R; r++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(aq + (size_t)r * K + QK * b));
            __m256 p = _mm256_cvtepi32_ps(dot_u8s8(w, a));
            acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * ad[r * nb + b]), acc[r]);
            macc[r] += m * as[r * nb + b];
        }
    }
    for (int r = 0; r < R; r++) res[r] = hsum8(acc[r]) + macc[r];
#else
    for (int r = 0; r < R; r++) {
        float total = 0.0f;
        for (int b = 0; b < nb; b++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) {
                uint8_t byte = wq[16 * b + j];
                sum += (byte & 15) * aq[(size_t)r * K + QK * b + j] + (byte >> 4) * aq[(size_t)r * K + QK * b + j + 16];
            }
            total += wdm[2 * b] * ad[r * nb + b] * (float)sum + wdm[2 * b + 1] * as[r * nb + b];
        }
        res[r] = total;
    }
#endif
}

/* One Q8_0 weight row against R Q8 activation rows. */
static inline __attribute__((always_inline)) void q8_tile(
    int R, const int8_t *wq, const float *wd, int nb, const int8_t *aq, const float *ad, int K, float *res) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(wq + QK * b));
        __m256i wabs = _mm256_sign_epi8(w, w);
        float d = wd[b];
        for (int r = 0; r < R; r++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(aq + (size_t)r * K + QK * b));
            __m256 p = _mm256_cvtepi32_ps(dot_u8s8(wabs, _mm256_sign_epi8(a, w)));
            acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * ad[r * nb + b]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) res[r] = hsum8(acc[r]);
#else
    for (int r = 0; r < R; r++) {
        float total = 0.0f;
        for (int b = 0; b < nb; b++) {
            int sum = 0;
            for (int j = 0; j < QK; j++) sum += wq[QK * b + j] * aq[(size_t)r * K + QK * b + j];
            total += wd[b] * ad[r * nb + b] * (float)sum;
        }
        res[r] = total;
    }
#endif
}

enum { OUT_STORE = 0, OUT_ADD = 1, OUT_BF16 = 2 };

static inline void put(void *out, size_t i, float v, int mode) {
    if (mode == OUT_STORE) ((float *)out)[i] = v;
    else if (mode == OUT_ADD) ((float *)out)[i] += v;
    else ((uint16_t *)out)[i] = f32_to_bf16(v);
}

/* Each activation row's block scales and sums repeated over 8 lanes (ex: [2][M][nb][8]). */
static void expand(const float *ad, const float *as, int M, int nb, float *ex) {
#pragma omp for schedule(static)
    for (int r = 0; r < M; r++)
        for (int b = 0; b < nb; b++)
            for (int j = 0; j < 8; j++) {
                ex[((size_t)r * nb + b) * 8 + j] = ad[(size_t)r * nb + b];
                ex[((size_t)(M + r) * nb + b) * 8 + j] = as[(size_t)r * nb + b];
            }
}

#define TILES(CALL) \
    switch (R) { \
    case 8: CALL(8); break; case 7: CALL(7); break; case 6: CALL(6); break; case 5: CALL(5); break; \
    case 4: CALL(4); break; case 3: CALL(3); break; case 2: CALL(2); break; default: CALL(1); \
    }

/* out[M][ldo] (=, += or bf16) = A[M][K] . W[N][K]^T, split over the threads of the enclosing
 * parallel region by chunks of weight rows. q8w selects Q8_0 weights (wdm then holds d only).
 * ex: scratch of 2 * M * K / 4 floats for the 512-bit kernels. */
static void gemm_x16(int q8w, const void *wq, const float *wdm, int N, int K, const int8_t *aq, const float *ad,
                     const float *as, int M, void *out, int ldo, int mode);

static void gemm(int q8w, const void *wq, const float *wdm, int N, int K, const int8_t *aq, const float *ad,
                 const float *as, int M, void *out, int ldo, int mode, float *ex, int x16) {
    const int nb = K / QK;
    const int chunks = (N + NCHUNK - 1) / NCHUNK;
    if (x16) {
        gemm_x16(q8w, wq, wdm, N, K, aq, ad, as, M, out, ldo, mode);
        return;
    }
#ifdef HAVE_512
    const int wide = nb % 2 == 0;
    if (wide) expand(ad, as, M, nb, ex);
#endif
#pragma omp for schedule(static)
    for (int c = 0; c < chunks; c++) {
        int n1 = (c + 1) * NCHUNK < N ? (c + 1) * NCHUNK : N;
        for (int r0 = 0; r0 < M; r0 += TILE) {
            int R = M - r0 < TILE ? M - r0 : TILE;
            const int8_t *a = aq + (size_t)r0 * K;
            const float *d = ad + (size_t)r0 * nb, *s = as + (size_t)r0 * nb;
            for (int n = c * NCHUNK; n < n1; n++) {
                float res[TILE] = {0};
                const float *wd = wdm + (size_t)n * nb * (q8w ? 1 : 2);
                const void *w = (const int8_t *)wq + (size_t)n * (q8w ? K : K / 2);
#ifdef HAVE_512
                const float *ed = ex + (size_t)r0 * nb * 8, *es = ex + (size_t)(M + r0) * nb * 8;
#define Q8W(T) q8_tile512(T, w, wd, nb, a, ed, K, res)
#define Q4W(T) q4_tile512(T, w, wd, nb, a, ed, es, K, res)
                if (wide && q8w) TILES(Q8W) else if (wide) TILES(Q4W) else
#endif
#define Q8(T) q8_tile(T, w, wd, nb, a, d, K, res)
#define Q4(T) q4_tile(T, w, wd, nb, a, d, s, K, res)
                if (q8w) TILES(Q8) else TILES(Q4)
                for (int r = 0; r < R; r++) put(out, (size_t)(r0 + r) * ldo + n, res[r], mode);
            }
        }
    }
}

/* gemm over x16 weights (N a multiple of 16; only built where HAVE_512). */
static void gemm_x16(int q8w, const void *wq, const float *wdm, int N, int K, const int8_t *aq, const float *ad,
                     const float *as, int M, void *out, int ldo, int mode) {
#ifdef HAVE_512
    const int nb = K / QK;
#pragma omp for schedule(static)
    for (int g = 0; g < N / 16; g++) {
        const void *w = (const int8_t *)wq + (size_t)g * nb * (q8w ? 512 : 256);
        const float *wd = wdm + (size_t)g * nb * 32;
        for (int r0 = 0; r0 < M; r0 += TILE) {
            int R = M - r0 < TILE ? M - r0 : TILE;
            const int8_t *a = aq + (size_t)r0 * K;
            const float *d = ad + (size_t)r0 * nb, *s = as + (size_t)r0 * nb;
            __m512 acc[TILE];
#define X8(T) q8x16_tile(T, w, wd, nb, a, d, K, acc)
#define X4(T) q4x16_tile(T, w, wd, nb, a, d, s, K, acc)
            if (q8w) TILES(X8) else TILES(X4)
            for (int r = 0; r < R; r++) {
                size_t at = (size_t)(r0 + r) * ldo + (size_t)g * 16;
                if (mode == OUT_STORE) _mm512_storeu_ps((float *)out + at, acc[r]);
                else if (mode == OUT_ADD) _mm512_storeu_ps((float *)out + at, _mm512_add_ps(_mm512_loadu_ps((float *)out + at), acc[r]));
                else {
                    float tmp[16];
                    _mm512_storeu_ps(tmp, acc[r]);
                    for (int j = 0; j < 16; j++) ((uint16_t *)out)[at + j] = f32_to_bf16(tmp[j]);
                }
            }
        }
    }
#else
    (void)q8w, (void)wq, (void)wdm, (void)N, (void)K, (void)aq, (void)ad, (void)as, (void)M, (void)out, (void)ldo, (void)mode;
#endif
}

/* A linear layer on its own: x [M][K] (bf16 or f32) -> out [M][N] (bf16 or f32). */
void ss_linear(int q8w, int x16, const void *x, int x_bf16, int M, int K, const void *wq, const float *wdm, int N,
               void *out, int out_bf16, int nthreads) {
    int nb = K / QK;
    int8_t *aq = malloc((size_t)M * K);
    float *ad = malloc(sizeof(float) * (size_t)M * nb * 2), *as = ad + (size_t)M * nb;
    float *ex = malloc(sizeof(float) * (size_t)M * nb * 16);
#pragma omp parallel num_threads(nthreads)
    {
        float *row = malloc(sizeof(float) * K);
#pragma omp for schedule(static)
        for (int i = 0; i < M; i++) {
            const float *src = (const float *)x + (size_t)i * K;
            if (x_bf16) {
                for (int j = 0; j < K; j++) row[j] = bf16_to_f32(((const uint16_t *)x)[(size_t)i * K + j]);
                src = row;
            }
            quant_row(src, K, aq + (size_t)i * K, ad + (size_t)i * nb, as + (size_t)i * nb);
        }
        free(row);
        gemm(q8w, wq, wdm, N, K, aq, ad, as, M, out, N, out_bf16 ? OUT_BF16 : OUT_STORE, ex, x16);
    }
    free(aq);
    free(ad);
    free(ex);
}

/* Q8_0 weights (plain layout) against float32 activations kept as they are: out[M][N] (float32)
 * = x[M][K] . (d * q)[N][K]^T, each weight dequantized as BlockWeight.dequantized does (q * d in
 * float32), so the result is the float32 matmul of the dequantized weights up to summation order.
 * For a head whose 8-bit activations would move near-tied logits (cpu_linear, decoder.py). */
void ss_linear_q8_f32(const float *x, int M, int K, const int8_t *wq, const float *wd, int N, float *out,
                      int nthreads) {
    const int nb = K / QK;
    const int chunks = (N + NCHUNK - 1) / NCHUNK;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int c = 0; c < chunks; c++) {
        int n1 = (c + 1) * NCHUNK < N ? (c + 1) * NCHUNK : N;
        for (int r0 = 0; r0 < M; r0 += TILE) {
            int R = M - r0 < TILE ? M - r0 : TILE;
            const float *a = x + (size_t)r0 * K;
            for (int n = c * NCHUNK; n < n1; n++) {
                const int8_t *w = wq + (size_t)n * K;
                const float *d = wd + (size_t)n * nb;
#if defined(__AVX2__) && defined(__FMA__)
                __m256 acc[TILE];
                for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
                for (int b = 0; b < nb; b++) {
                    __m256 scale = _mm256_set1_ps(d[b]);
                    __m256 wf[4];
                    for (int j = 0; j < 4; j++) {
                        __m128i eight = _mm_loadl_epi64((const __m128i *)(w + QK * b + 8 * j));
                        wf[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)), scale);
                    }
                    for (int r = 0; r < R; r++) {
                        const float *xr = a + (size_t)r * K + QK * b;
                        for (int j = 0; j < 4; j++) acc[r] = _mm256_fmadd_ps(wf[j], _mm256_loadu_ps(xr + 8 * j), acc[r]);
                    }
                }
                for (int r = 0; r < R; r++) out[(size_t)(r0 + r) * N + n] = hsum8(acc[r]);
#else
                for (int r = 0; r < R; r++) {
                    float total = 0.0f;
                    for (int b = 0; b < nb; b++)
                        for (int j = 0; j < QK; j++) total += (float)w[QK * b + j] * d[b] * a[(size_t)r * K + QK * b + j];
                    out[(size_t)(r0 + r) * N + n] = total;
                }
#endif
            }
        }
    }
}

/* ---- the decode step ---------------------------------------------------------------------- */

typedef struct { /* every field 8 bytes wide: ctypes lays it out without padding rules */
    int64_t n_layers, hidden, n_heads, n_kv, head_dim, inter, block_size, num_blocks, nthreads, x16, embed_f32;
    double eps, scale;
    const void *embed;               /* [vocab][hidden], float32 if embed_f32 else bf16 */
    const float *cos_sin;            /* [max_positions][head_dim]: cos on the first half, sin on the second */
    const float *final_norm;         /* [hidden] */
    const int64_t *windows;          /* [n_layers]: keys a query sees, itself included; 0 = all */
    const float *const *in_norm;     /* [n_layers] -> [hidden] */
    const float *const *post_norm;
    const uint8_t *const *qkv_qs; const float *const *qkv_dm;
    const uint8_t *const *o_qs; const float *const *o_dm;
    const uint8_t *const *gu_qs; const float *const *gu_dm;
    const uint8_t *const *down_qs; const float *const *down_dm;
    float *const *kv;                /* [n_layers] -> [2][num_blocks][block_size][n_kv][head_dim] float32 */
} Model;

typedef struct {
    int64_t M, width; /* rows (one new token each), block-table width */
    const int64_t *input_ids, *positions, *slots;
    const int32_t *seq_lens, *tables; /* [M], [M][width] */
} Step;

static void norm_quant(const float *x, const float *w, int K, double eps, float *tmp, int8_t *q, float *d, float *s) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int j = 0; j < K; j++) ss += x[j] * x[j];
    float inv = 1.0f / sqrtf(ss / (float)K + (float)eps);
    for (int j = 0; j < K; j++) tmp[j] = x[j] * inv * w[j];
    quant_row(tmp, K, q, d, s);
}

/* Rotary for one head (rotate_half pairing), from the position's cos/sin row. */
static inline void rope(const float *x, const float *cs, int D, float *out) {
    int half = D / 2;
    for (int i = 0; i < half; i++) {
        float c = cs[i], s = cs[half + i];
        out[i] = x[i] * c - x[half + i] * s;
        out[half + i] = x[half + i] * c + x[i] * s;
    }
}

/* Row b, KV head g: rotate its key and store key and value at the row's slot. Every row's are
 * stored before any row attends: rows of one sequence (the positions of a verify pass, each a
 * row of its own) read the keys of the rows before them. */
static void store_kv(const Model *m, const Step *st, int layer, int b, int g, const float *qkv) {
    const int H = (int)m->n_heads, G = (int)m->n_kv, D = (int)m->head_dim, bs = (int)m->block_size;
    const size_t row = (size_t)(H + 2 * G) * D;
    const float *cs = m->cos_sin + st->positions[b] * D;
    float *kc = m->kv[layer], *vc = kc + (size_t)m->num_blocks * bs * G * D;
    size_t at = ((size_t)st->slots[b] * G + g) * D;
    rope(qkv + b * row + (size_t)(H + g) * D, cs, D, kc + at);
    memcpy(vc + at, qkv + b * row + (size_t)(H + G + g) * D, sizeof(float) * D);
}

/* Row b, KV head g: rotate its queries and attend over the row's pages in place (no gather).
 * scores: [group][context] scratch. */
static void attend(const Model *m, const Step *st, int layer, int b, int g, const float *qkv, float *out, float *scores) {
    const int H = (int)m->n_heads, G = (int)m->n_kv, D = (int)m->head_dim, bs = (int)m->block_size;
    const int group = H / G;
    const size_t row = (size_t)(H + 2 * G) * D;
    const float *cs = m->cos_sin + st->positions[b] * D;
    float *kc = m->kv[layer], *vc = kc + (size_t)m->num_blocks * bs * G * D;
    float q[8][256];
    for (int h = 0; h < group; h++) rope(qkv + b * row + (size_t)(g * group + h) * D, cs, D, q[h]);
    const int L = st->seq_lens[b];
    const int start = m->windows[layer] > 0 && L > m->windows[layer] ? L - (int)m->windows[layer] : 0;
    const int32_t *table = st->tables + (size_t)b * st->width;
    const float scale = (float)m->scale;
    for (int t = start; t < L; t++) {
        const float *k = kc + (((size_t)table[t / bs] * bs + t % bs) * G + g) * D;
        for (int h = 0; h < group; h++) {
            float dot = 0.0f; /* omp simd: lets the compiler split the sum into vector lanes */
#pragma omp simd reduction(+ : dot)
            for (int j = 0; j < D; j++) dot += q[h][j] * k[j];
            scores[h * L + t] = dot * scale;
        }
    }
    for (int h = 0; h < group; h++) {
        float *sc = scores + h * L, top = -INFINITY, sum = 0.0f;
        for (int t = start; t < L; t++) top = sc[t] > top ? sc[t] : top;
        for (int t = start; t < L; t++) sum += (sc[t] = expf(sc[t] - top));
        float inv = 1.0f / sum, *o = out + (size_t)b * H * D + (size_t)(g * group + h) * D;
        for (int j = 0; j < D; j++) o[j] = 0.0f;
        for (int t = start; t < L; t++) {
            const float *v = vc + (((size_t)table[t / bs] * bs + t % bs) * G + g) * D;
            float p = sc[t] * inv;
            for (int j = 0; j < D; j++) o[j] += p * v[j];
        }
    }
}

/* Every layer of one decode step (one new token per row; several rows may be positions of one
 * sequence, each with its own context length); writes the final-normed hidden
 * states [M][hidden] (float32). Returns 0, or -1 when the shapes are outside what it handles. */
int ss_decode(const Model *m, const Step *st, float *hidden_out) {
    const int M = (int)st->M, Hd = (int)m->hidden, H = (int)m->n_heads, G = (int)m->n_kv, D = (int)m->head_dim;
    const int I = (int)m->inter, QD = H * D, NQKV = (H + 2 * G) * D;
    if (H / G > 8 || D > 256 || D % 2 || Hd % QK || I % QK || QD % QK) return -1;
    int maxk = Hd > I ? Hd : I;
    maxk = maxk > QD ? maxk : QD;
    int ctx = (int)(st->width * m->block_size);
    float *x = malloc(sizeof(float) * (size_t)M * Hd);
    float *qkv = malloc(sizeof(float) * (size_t)M * NQKV);
    float *attn = malloc(sizeof(float) * (size_t)M * QD);
    float *gu = malloc(sizeof(float) * (size_t)M * 2 * I);
    int8_t *aq = malloc((size_t)M * maxk);
    float *ad = malloc(sizeof(float) * (size_t)M * (maxk / QK) * 2), *as = ad + (size_t)M * (maxk / QK);
    float *ex = malloc(sizeof(float) * (size_t)M * (maxk / QK) * 16);
#pragma omp parallel num_threads((int)m->nthreads)
    {
        float *tmp = malloc(sizeof(float) * maxk);
        float *scores = malloc(sizeof(float) * (size_t)(H / G) * ctx);
#pragma omp for schedule(static)
        for (int i = 0; i < M; i++) {
            size_t row = (size_t)st->input_ids[i] * Hd;
            for (int j = 0; j < Hd; j++)
                x[(size_t)i * Hd + j] =
                    m->embed_f32 ? ((const float *)m->embed)[row + j] : bf16_to_f32(((const uint16_t *)m->embed)[row + j]);
        }
        for (int l = 0; l < m->n_layers; l++) {
#pragma omp for schedule(static)
            for (int i = 0; i < M; i++)
                norm_quant(x + (size_t)i * Hd, m->in_norm[l], Hd, m->eps, tmp, aq + (size_t)i * Hd, ad + (size_t)i * (Hd / QK), as + (size_t)i * (Hd / QK));
            gemm(0, m->qkv_qs[l], m->qkv_dm[l], NQKV, Hd, aq, ad, as, M, qkv, NQKV, OUT_STORE, ex, (int)m->x16);
#pragma omp for schedule(static)
            for (int p = 0; p < M * G; p++) store_kv(m, st, l, p / G, p % G, qkv);
#pragma omp for schedule(dynamic, 1)
            for (int p = 0; p < M * G; p++) attend(m, st, l, p / G, p % G, qkv, attn, scores);
#pragma omp for schedule(static)
            for (int i = 0; i < M; i++)
                quant_row(attn + (size_t)i * QD, QD, aq + (size_t)i * QD, ad + (size_t)i * (QD / QK), as + (size_t)i * (QD / QK));
            gemm(0, m->o_qs[l], m->o_dm[l], Hd, QD, aq, ad, as, M, x, Hd, OUT_ADD, ex, (int)m->x16);
#pragma omp for schedule(static)
            for (int i = 0; i < M; i++)
                norm_quant(x + (size_t)i * Hd, m->post_norm[l], Hd, m->eps, tmp, aq + (size_t)i * Hd, ad + (size_t)i * (Hd / QK), as + (size_t)i * (Hd / QK));
            gemm(0, m->gu_qs[l], m->gu_dm[l], 2 * I, Hd, aq, ad, as, M, gu, 2 * I, OUT_STORE, ex, (int)m->x16);
#pragma omp for schedule(static)
            for (int i = 0; i < M; i++) {
                float *g_ = gu + (size_t)i * 2 * I, *u = g_ + I;
                for (int j = 0; j < I; j++) tmp[j] = g_[j] / (1.0f + expf(-g_[j])) * u[j];
                quant_row(tmp, I, aq + (size_t)i * I, ad + (size_t)i * (I / QK), as + (size_t)i * (I / QK));
            }
            gemm(0, m->down_qs[l], m->down_dm[l], Hd, I, aq, ad, as, M, x, Hd, OUT_ADD, ex, (int)m->x16);
        }
#pragma omp for schedule(static)
        for (int i = 0; i < M; i++) {
            const float *xi = x + (size_t)i * Hd;
            float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
            for (int j = 0; j < Hd; j++) ss += xi[j] * xi[j];
            float inv = 1.0f / sqrtf(ss / (float)Hd + (float)m->eps);
            for (int j = 0; j < Hd; j++) hidden_out[(size_t)i * Hd + j] = xi[j] * inv * m->final_norm[j];
        }
        free(tmp);
        free(scores);
    }
    free(x);
    free(qkv);
    free(attn);
    free(gu);
    free(aq);
    free(ad);
    free(ex);
    return 0;
}
