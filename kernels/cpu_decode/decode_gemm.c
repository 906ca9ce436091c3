/* Decode-sized fp32 GEMM for the CPU: y = c + alpha * x @ w^T for a few rows of x.
 *
 * x [M, K] (row stride ldx), w [N, K] (a Linear weight, output-major: row stride ldw, unit column stride),
 * c [M, N] (row stride ldc; ldc = 0 broadcasts one row, e.g. a bias) or none, y [M, N] (row stride ldy;
 * y may be c). Built at run time with -march=native by kernels/cpu_decode/native.py and called through
 * ctypes with the GIL released.
 *
 * Why: at 1-8 rows a decode GEMM is a read of the weight, and torch's CPU kernels (MKL, oneDNN) read
 * small weights (1-3 MB, the experts and attention projections of a MoE model) well below the memory
 * bandwidth. Here each thread streams whole weight rows: a tile of 4 weight rows is loaded once per
 * K-vector and multiplied with up to 4 rows of x (16 vector accumulators, all in registers); more rows
 * of x reuse the tile from L1. The OpenMP threads split N into tiles. The library links libgomp, which
 * resolves to the copy torch has already loaded, so the two share one thread pool.
 *
 * The grouped form runs a MoE layer's experts in one call: group g's rows of x (offsets[g] to
 * offsets[g + 1], sorted by expert) times its own weight w + g * group_stride. Each thread takes the same
 * share of weight tiles of every group, so the work stays balanced however the rows fall.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#if defined(__AVX512F__)
#define ENGRAM_ISA 512
#define VW 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vload_part(const float *p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define ENGRAM_ISA 256
#define VW 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vload_part(const float *p, int n) {
    __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
#else
#define ENGRAM_ISA 0
#endif

/* The vector width this build uses (512 or 256 bits), or 0: no kernel on this CPU (callers use torch). */
int engram_decode_gemm_isa(void) { return ENGRAM_ISA; }

#if ENGRAM_ISA

#define TILE_ROWS 4 /* weight rows per tile */
#define TILE_X 4    /* rows of x per pass over a tile */

/* MM rows of x (<= TILE_X) against RR weight rows (<= TILE_ROWS); both are constants after inlining, so
 * the accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile(
    const float *x, int64_t ldx, const float *w, int64_t ldw, const float *c, int64_t ldc, float *y,
    int64_t ldy, int64_t K, float alpha, int MM, int RR) {
    vec acc[TILE_X][TILE_ROWS];
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < RR; r++) acc[i][r] = vzero();
    int64_t k = 0;
    for (; k + VW <= K; k += VW) {
        vec wv[TILE_ROWS];
        for (int r = 0; r < RR; r++) wv[r] = vload(w + r * ldw + k);
        for (int i = 0; i < MM; i++) {
            vec xv = vload(x + i * ldx + k);
            for (int r = 0; r < RR; r++) acc[i][r] = vfma(xv, wv[r], acc[i][r]);
        }
    }
    if (k < K) { /* the last K % VW columns, masked loads */
        int rest = (int)(K - k);
        vec wv[TILE_ROWS];
        for (int r = 0; r < RR; r++) wv[r] = vload_part(w + r * ldw + k, rest);
        for (int i = 0; i < MM; i++) {
            vec xv = vload_part(x + i * ldx + k, rest);
            for (int r = 0; r < RR; r++) acc[i][r] = vfma(xv, wv[r], acc[i][r]);
        }
    }
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < RR; r++) {
            float dot = alpha * vsum(acc[i][r]);
            y[i * ldy + r] = c ? c[i * ldc + r] + dot : dot;
        }
}

/* All M rows of x against RR weight rows starting at w (output columns starting at y / c). */
static inline __attribute__((always_inline)) void weight_tile(
    const float *x, int64_t ldx, const float *w, int64_t ldw, const float *c, int64_t ldc, float *y,
    int64_t ldy, int64_t M, int64_t K, float alpha, int RR) {
    int64_t m = 0;
    for (; m + TILE_X <= M; m += TILE_X)
        tile(x + m * ldx, ldx, w, ldw, c ? c + m * ldc : c, ldc, y + m * ldy, ldy, K, alpha, TILE_X, RR);
    switch (M - m) {
    case 3: tile(x + m * ldx, ldx, w, ldw, c ? c + m * ldc : c, ldc, y + m * ldy, ldy, K, alpha, 3, RR); break;
    case 2: tile(x + m * ldx, ldx, w, ldw, c ? c + m * ldc : c, ldc, y + m * ldy, ldy, K, alpha, 2, RR); break;
    case 1: tile(x + m * ldx, ldx, w, ldw, c ? c + m * ldc : c, ldc, y + m * ldy, ldy, K, alpha, 1, RR); break;
    default: break;
    }
}

void engram_decode_gemm(const float *x, int64_t ldx, const float *w, int64_t ldw, const float *c, int64_t ldc,
                        float *y, int64_t ldy, int64_t M, int64_t N, int64_t K, float alpha, int nthreads) {
    int64_t tiles = N / TILE_ROWS;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && tiles > 1)
    {
#pragma omp for schedule(static) nowait
        for (int64_t t = 0; t < tiles; t++) {
            int64_t n = t * TILE_ROWS;
            weight_tile(x, ldx, w + n * ldw, ldw, c ? c + n : c, ldc, y + n, ldy, M, K, alpha, TILE_ROWS);
        }
#pragma omp single nowait
        for (int64_t n = tiles * TILE_ROWS; n < N; n++) /* the last N % 4 weight rows, one at a time */
            weight_tile(x, ldx, w + n * ldw, ldw, c ? c + n : c, ldc, y + n, ldy, M, K, alpha, 1);
    }
}

void engram_grouped_decode_gemm(const float *x, int64_t ldx, const int64_t *offsets, int64_t groups, const float *w,
                                int64_t group_stride, int64_t ldw, float *y, int64_t ldy, int64_t N, int64_t K,
                                int nthreads) {
    int64_t tiles = (N + TILE_ROWS - 1) / TILE_ROWS;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && tiles > 1)
    {
        int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        int64_t first = tiles * me / team, last = tiles * (me + 1) / team;
        for (int64_t g = 0; g < groups; g++) {
            int64_t m0 = offsets[g], M = offsets[g + 1] - offsets[g];
            if (M <= 0) continue;
            const float *xg = x + m0 * ldx, *wg = w + g * group_stride;
            float *yg = y + m0 * ldy;
            for (int64_t t = first; t < last; t++) {
                int64_t n = t * TILE_ROWS;
                if (n + TILE_ROWS <= N) {
                    weight_tile(xg, ldx, wg + n * ldw, ldw, 0, 0, yg + n, ldy, M, K, 1.0f, TILE_ROWS);
                } else {
                    for (; n < N; n++) weight_tile(xg, ldx, wg + n * ldw, ldw, 0, 0, yg + n, ldy, M, K, 1.0f, 1);
                }
            }
        }
    }
}

#else

void engram_grouped_decode_gemm(const float *x, int64_t ldx, const int64_t *offsets, int64_t groups, const float *w,
                                int64_t group_stride, int64_t ldw, float *y, int64_t ldy, int64_t N, int64_t K,
                                int nthreads) {
    (void)x; (void)ldx; (void)offsets; (void)groups; (void)w; (void)group_stride; (void)ldw; (void)y; (void)ldy;
    (void)N; (void)K; (void)nthreads;
}

void engram_decode_gemm(const float *x, int64_t ldx, const float *w, int64_t ldw, const float *c, int64_t ldc,
                        float *y, int64_t ldy, int64_t M, int64_t N, int64_t K, float alpha, int nthreads) {
    (void)x; (void)ldx; (void)w; (void)ldw; (void)c; (void)ldc; (void)y; (void)ldy;
    (void)M; (void)N; (void)K; (void)alpha; (void)nthreads;
}

#endif
