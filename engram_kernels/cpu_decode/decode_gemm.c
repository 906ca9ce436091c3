/* Decode-sized GEMM for the CPU: y = c + alpha * x @ w^T for a few rows of x, fp32 or bf16 operands.
 *
 * x [M, K] (row stride ldx), w [N, K] (a Linear weight, output-major: row stride ldw, unit column stride),
 * both fp32 (engram_decode_gemm_f32) or both bf16 (engram_decode_gemm_bf16, fp32 accumulation); y and c fp32:
 * c [M, N] (row stride ldc; ldc = 0 broadcasts one row, e.g. a bias) or none, y [M, N] (row stride ldy;
 * y may be c). Built at run time with -march=native by engram_kernels/cpu_decode/native.py and called through
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
 *
 * panel_gemm.h adds the same products from a panel-packed copy of the weight (one sequential stream per
 * thread), which reads faster still and also serves many rows (prefill); the worker packs fp32 weights for it.
 * moe_router.h adds the DeepSeek-V3 expert selection, the other per-layer cost of a decode step's MoE.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "moe_router.h" /* scalar C: any x86-64 */

#if defined(__AVX512F__)
#define ENGRAM_ISA 512
#define VW 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vload_part(const float *p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
static inline vec vset1(float a) { return _mm512_set1_ps(a); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline void vstore(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline void vstore_part(float *p, vec v, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define ENGRAM_ISA 256
#define VW 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256i lanes_below(int n) { /* mask of the first n of 8 lanes */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vec vload_part(const float *p, int n) { return _mm256_maskload_ps(p, lanes_below(n)); }
static inline vec vset1(float a) { return _mm256_set1_ps(a); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline void vstore(float *p, vec v) { _mm256_storeu_ps(p, v); }
static inline void vstore_part(float *p, vec v, int n) { _mm256_maskstore_ps(p, lanes_below(n), v); }
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

/* fp32: one vector of x and of each weight row per step. */
#define SFX f32
#define ELEM float
#define STEP VW
#define OPND vec
#define OLOAD(p) vload(p)
#define OLOAD_PART(p, n) vload_part(p, n)
#define OMAC(a, b, acc) vfma(a, b, acc)
#include "decode_gemm_tile.h"

/* bf16 (raw uint16 bits): with AVX512_BF16, 32 elements per step as pairwise dot products into fp32
 * (vdpbf16ps); else 16 or 8 elements widened to fp32 (a bf16 is the top half of an fp32) and FMA'd. */
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && ENGRAM_ISA == 512
#define BF16_STEP 32
typedef __m512i bf16_operand;
static inline bf16_operand bf16_load(const uint16_t *p) { return _mm512_loadu_si512((const void *)p); }
static inline vec bf16_mac(bf16_operand a, bf16_operand b, vec acc) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
#elif ENGRAM_ISA == 512
#define BF16_STEP 16
typedef vec bf16_operand;
static inline bf16_operand bf16_load(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline vec bf16_mac(bf16_operand a, bf16_operand b, vec acc) { return vfma(a, b, acc); }
#else
#define BF16_STEP 8
typedef vec bf16_operand;
static inline bf16_operand bf16_load(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline vec bf16_mac(bf16_operand a, bf16_operand b, vec acc) { return vfma(a, b, acc); }
#endif
static inline bf16_operand bf16_load_part(const uint16_t *p, int n) { /* n < BF16_STEP elements, zero-padded */
    uint16_t padded[BF16_STEP] = {0};
    memcpy(padded, p, (size_t)n * sizeof(uint16_t));
    return bf16_load(padded);
}

#define SFX bf16
#define ELEM uint16_t
#define STEP BF16_STEP
#define OPND bf16_operand
#define OLOAD(p) bf16_load(p)
#define OLOAD_PART(p, n) bf16_load_part(p, n)
#define OMAC(a, b, acc) bf16_mac(a, b, acc)
#include "decode_gemm_tile.h"

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
                    weight_tile_f32(xg, ldx, wg + n * ldw, ldw, 0, 0, yg + n, ldy, M, K, 1.0f, TILE_ROWS);
                } else {
                    for (; n < N; n++) weight_tile_f32(xg, ldx, wg + n * ldw, ldw, 0, 0, yg + n, ldy, M, K, 1.0f, 1);
                }
            }
        }
    }
}

#include "panel_gemm.h"

#else

/* No kernel on this CPU: engram_decode_gemm_isa() returns 0 and callers never reach these. */
void engram_grouped_decode_gemm(void) {}
void engram_decode_gemm_f32(void) {}
void engram_decode_gemm_bf16(void) {}
int engram_panel_width(void) { return 0; }
void engram_panel_gemm_f32(void) {}
void engram_grouped_panel_gemm_f32(void) {}

#endif
