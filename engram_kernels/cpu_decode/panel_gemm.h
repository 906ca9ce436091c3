/* The panel GEMM (fp32), included by decode_gemm.c after its vector helpers.
 *
 * The weight is read from a panel-packed copy: [ceil(N / PW)][K][PW] with PW = PANEL_WIDTH output columns
 * (2 vectors: 32 with AVX-512, 16 with AVX2), zero-padded to a whole last panel. A panel is one sequential
 * stream of K * PW values, so each thread reads its share of panels front to back, which the hardware
 * prefetcher follows (an output-major weight read 4 rows at a time is 4 short streams; see decode_gemm.c).
 * For each k a tile of up to PANEL_TILE rows of x broadcasts x[m, k] against the panel's 2 vectors of
 * column k, accumulating a [rows, PW] block of y in registers: no horizontal sums, and the panel's
 * values are reused by every row of the tile (from L1/L2 for the tiles after the first), so the same
 * code reads at memory speed for a few rows and runs near the FMA peak for many:
 *     y[m, n] = (c ? c[m, n] : 0) + alpha * sum_k x[m, k] * w[n, k]     (c's row stride may be 0: a bias)
 * Rows are taken in blocks of PANEL_ROW_BLOCK (x's block stays in L2 while every panel passes over it).
 */
#define PANEL_VECS 2
#define PANEL_WIDTH (PANEL_VECS * VW)
#if ENGRAM_ISA == 512
#define PANEL_TILE 12 /* 24 accumulators of 32 registers */
#else
#define PANEL_TILE 6 /* 12 accumulators of 16 registers */
#endif
#define PANEL_ROW_BLOCK 96
#define PANEL_PREFETCH (16 * PANEL_WIDTH) /* prefetch this many values (16 columns) ahead in the panel */

/* Output columns per panel of this build (the packed layout's PW). */
int engram_panel_width(void) { return PANEL_WIDTH; }

/* MM (<= PANEL_TILE, a constant after inlining) rows of x against one panel; cols <= PANEL_WIDTH valid columns. */
static inline __attribute__((always_inline)) void panel_tile(const float *x, int64_t ldx, const float *panel,
        const float *c, int64_t ldc, float *y, int64_t ldy, int64_t K, float alpha, int MM, int cols) {
    vec acc[PANEL_TILE][PANEL_VECS];
    for (int i = 0; i < MM; i++)
        for (int v = 0; v < PANEL_VECS; v++) acc[i][v] = vzero();
    for (int64_t k = 0; k < K; k++) {
        const float *wk = panel + k * PANEL_WIDTH;
        _mm_prefetch((const char *)(wk + PANEL_PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(wk + PANEL_PREFETCH + PANEL_WIDTH / 2), _MM_HINT_T0);
        vec w[PANEL_VECS];
        for (int v = 0; v < PANEL_VECS; v++) w[v] = vload(wk + v * VW);
        for (int i = 0; i < MM; i++) {
            vec xb = vset1(x[i * ldx + k]);
            for (int v = 0; v < PANEL_VECS; v++) acc[i][v] = vfma(xb, w[v], acc[i][v]);
        }
    }
    vec scale = vset1(alpha);
    for (int i = 0; i < MM; i++)
        for (int v = 0; v < PANEL_VECS; v++) {
            int n = cols - v * VW;
            if (n <= 0) break;
            if (n > VW) n = VW;
            vec out = vmul(acc[i][v], scale);
            if (c) out = vadd(out, n == VW ? vload(c + i * ldc + v * VW) : vload_part(c + i * ldc + v * VW, n));
            if (n == VW) vstore(y + i * ldy + v * VW, out);
            else vstore_part(y + i * ldy + v * VW, out, n);
        }
}

/* All M rows of x against one panel, in tiles of at most PANEL_TILE rows of near-equal size. */
static void panel_rows(const float *x, int64_t ldx, const float *panel, const float *c, int64_t ldc, float *y,
                       int64_t ldy, int64_t M, int64_t K, float alpha, int cols) {
    int64_t tiles = (M + PANEL_TILE - 1) / PANEL_TILE, m = 0;
    for (int64_t t = 0; t < tiles; t++) {
        int64_t left = M - m, rows = (left + (tiles - t) - 1) / (tiles - t);
        const float *xm = x + m * ldx, *cm = c ? c + m * ldc : c;
        float *ym = y + m * ldy;
        switch (rows) {
#define PANEL_CASE(n) case n: panel_tile(xm, ldx, panel, cm, ldc, ym, ldy, K, alpha, n, cols); break;
        PANEL_CASE(1) PANEL_CASE(2) PANEL_CASE(3) PANEL_CASE(4) PANEL_CASE(5) PANEL_CASE(6)
#if PANEL_TILE > 6
        PANEL_CASE(7) PANEL_CASE(8) PANEL_CASE(9) PANEL_CASE(10) PANEL_CASE(11) PANEL_CASE(12)
#endif
#undef PANEL_CASE
        default: break;
        }
        m += rows;
    }
}

/* Panels [first, last) of one weight against all M rows of x, a block of PANEL_ROW_BLOCK rows at a time. */
static void panel_range(const float *x, int64_t ldx, const float *wp, const float *c, int64_t ldc, float *y,
                        int64_t ldy, int64_t M, int64_t N, int64_t K, float alpha, int64_t first, int64_t last) {
    for (int64_t m = 0; m < M; m += PANEL_ROW_BLOCK) {
        int64_t rows = M - m < PANEL_ROW_BLOCK ? M - m : PANEL_ROW_BLOCK;
        for (int64_t p = first; p < last; p++) {
            int64_t n = p * PANEL_WIDTH;
            int cols = (int)(N - n < PANEL_WIDTH ? N - n : PANEL_WIDTH);
            panel_rows(x + m * ldx, ldx, wp + p * K * PANEL_WIDTH, c ? c + m * ldc + n : c, ldc, y + m * ldy + n,
                       ldy, rows, K, alpha, cols);
        }
    }
}

/* y [M, N] (row stride ldy) = c + alpha * x [M, K] @ w^T, w panel-packed as above; threads split the panels. */
void engram_panel_gemm_f32(const float *x, int64_t ldx, const float *wp, const float *c, int64_t ldc, float *y,
                           int64_t ldy, int64_t M, int64_t N, int64_t K, float alpha, int nthreads) {
    int64_t panels = (N + PANEL_WIDTH - 1) / PANEL_WIDTH;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && panels > 1)
    {
        int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        panel_range(x, ldx, wp, c, ldc, y, ldy, M, N, K, alpha, panels * me / team, panels * (me + 1) / team);
    }
}

/* Grouped form (a MoE layer's experts): group g's rows of x (offsets[g] to offsets[g + 1]) against its own
 * panel-packed weight wp + g * group_stride; each thread takes the same share of panels of every group. */
void engram_grouped_panel_gemm_f32(const float *x, int64_t ldx, const int64_t *offsets, int64_t groups,
                                   const float *wp, int64_t group_stride, float *y, int64_t ldy, int64_t N,
                                   int64_t K, int nthreads) {
    int64_t panels = (N + PANEL_WIDTH - 1) / PANEL_WIDTH;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && panels > 1)
    {
        int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        int64_t first = panels * me / team, last = panels * (me + 1) / team;
        for (int64_t g = 0; g < groups; g++) {
            int64_t m0 = offsets[g], M = offsets[g + 1] - m0;
            if (M > 0)
                panel_range(x + m0 * ldx, ldx, wp + g * group_stride, 0, 0, y + m0 * ldy, ldy, M, N, K, 1.0f,
                            first, last);
        }
    }
}
