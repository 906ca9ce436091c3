/* The decode GEMM for one element type, included by decode_gemm.c once per type (a C template).
 *
 * Before including, define: SFX (name suffix), ELEM (element type of x and w), STEP (elements of K per
 * step), OPND (the operand type a step loads), OLOAD(p) and OLOAD_PART(p, n) (a step's operand from STEP or
 * the last n < STEP elements), OMAC(a, b, acc) (acc += a * b over the step, fp32 accumulation into vec).
 * Defines tile_SFX, weight_tile_SFX and the exported engram_decode_gemm_SFX, then undefines the parameters:
 *     y[m, n] = (c ? c[m, n] : 0) + alpha * sum_k x[m, k] * w[n, k]   (y and c fp32)
 */
#define ENGRAM_CAT2(a, b) a##_##b
#define ENGRAM_CAT(a, b) ENGRAM_CAT2(a, b)
#define NAMED(f) ENGRAM_CAT(f, SFX)

/* MM rows of x (<= TILE_X) against RR weight rows (<= TILE_ROWS); both are constants after inlining, so
 * the accumulators stay in registers. */
static inline __attribute__((always_inline)) void NAMED(tile)(
    const ELEM *x, int64_t ldx, const ELEM *w, int64_t ldw, const float *c, int64_t ldc, float *y,
    int64_t ldy, int64_t K, float alpha, int MM, int RR) {
    vec acc[TILE_X][TILE_ROWS];
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < RR; r++) acc[i][r] = vzero();
    int64_t k = 0;
    for (; k + STEP <= K; k += STEP) {
        OPND wv[TILE_ROWS];
        for (int r = 0; r < RR; r++) wv[r] = OLOAD(w + r * ldw + k);
        for (int i = 0; i < MM; i++) {
            OPND xv = OLOAD(x + i * ldx + k);
            for (int r = 0; r < RR; r++) acc[i][r] = OMAC(xv, wv[r], acc[i][r]);
        }
    }
    if (k < K) { /* the last K % STEP columns */
        int rest = (int)(K - k);
        OPND wv[TILE_ROWS];
        for (int r = 0; r < RR; r++) wv[r] = OLOAD_PART(w + r * ldw + k, rest);
        for (int i = 0; i < MM; i++) {
            OPND xv = OLOAD_PART(x + i * ldx + k, rest);
            for (int r = 0; r < RR; r++) acc[i][r] = OMAC(xv, wv[r], acc[i][r]);
        }
    }
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < RR; r++) {
            float dot = alpha * vsum(acc[i][r]);
            y[i * ldy + r] = c ? c[i * ldc + r] + dot : dot;
        }
}

/* All M rows of x against RR weight rows starting at w (output columns starting at y / c). */
static inline __attribute__((always_inline)) void NAMED(weight_tile)(
    const ELEM *x, int64_t ldx, const ELEM *w, int64_t ldw, const float *c, int64_t ldc, float *y,
    int64_t ldy, int64_t M, int64_t K, float alpha, int RR) {
    int64_t m = 0;
    for (; m + TILE_X <= M; m += TILE_X)
        NAMED(tile)(x + m * ldx, ldx, w, ldw, c ? c + m * ldc : c, ldc, y + m * ldy, ldy, K, alpha, TILE_X, RR);
    switch (M - m) {
    case 3: NAMED(tile)(x + m * ldx, ldx, w, ldw, c ? c + m * ldc : c, ldc, y + m * ldy, ldy, K, alpha, 3, RR); break;
    case 2: NAMED(tile)(x + m * ldx, ldx, w, ldw, c ? c + m * ldc : c, ldc, y + m * ldy, ldy, K, alpha, 2, RR); break;
    case 1: NAMED(tile)(x + m * ldx, ldx, w, ldw, c ? c + m * ldc : c, ldc, y + m * ldy, ldy, K, alpha, 1, RR); break;
    default: break;
    }
}

void NAMED(engram_decode_gemm)(const ELEM *x, int64_t ldx, const ELEM *w, int64_t ldw, const float *c,
                               int64_t ldc, float *y, int64_t ldy, int64_t M, int64_t N, int64_t K, float alpha,
                               int nthreads) {
    int64_t tiles = N / TILE_ROWS;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && tiles > 1)
    {
#pragma omp for schedule(static) nowait
        for (int64_t t = 0; t < tiles; t++) {
            int64_t n = t * TILE_ROWS;
            NAMED(weight_tile)(x, ldx, w + n * ldw, ldw, c ? c + n : c, ldc, y + n, ldy, M, K, alpha, TILE_ROWS);
        }
#pragma omp single nowait
        for (int64_t n = tiles * TILE_ROWS; n < N; n++) /* the last N % 4 weight rows, one at a time */
            NAMED(weight_tile)(x, ldx, w + n * ldw, ldw, c ? c + n : c, ldc, y + n, ldy, M, K, alpha, 1);
    }
}

#undef NAMED
#undef ENGRAM_CAT
#undef ENGRAM_CAT2
/* The parameters too, so that the next inclusion defines its own. */
#undef SFX
#undef ELEM
#undef STEP
#undef OPND
#undef OLOAD
#undef OLOAD_PART
#undef OMAC
