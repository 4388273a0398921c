/* Hot loops of png_pq.c, included twice: SFX(name) = name_base (SSE2 on x86-64, scalar elsewhere) and,
 * with GCC on x86-64, name_avx2 inside `#pragma GCC target("avx2")`; png_pq.c picks one set at run
 * time (__builtin_cpu_supports), so one library runs on any x86-64 and uses AVX2 where it exists.
 *
 * Vector helpers: V_LANES16 uint16 lanes per register; V_MASK(v) = one bit per byte (movemask);
 * V_FULL = all bytes set. Without SSE2 (or with -DPQ_NO_SIMD, which the tests use) every loop has a
 * plain C version with the same results.
 */

#if PQ_AVX2
#define PQ_VEC 1
typedef __m256i SFX(vec);
#define VEC SFX(vec)
#define V_BYTES 32
#define V_FULL 0xFFFFFFFFu
#define V_LOAD(p) _mm256_loadu_si256((const __m256i *)(const void *)(p))
#define V_STORE(p, v) _mm256_storeu_si256((__m256i *)(void *)(p), (v))
#define V_SET16(x) _mm256_set1_epi16((short)(x))
#define V_SET32(x) _mm256_set1_epi32((int)(x))
#define V_ZERO() _mm256_setzero_si256()
#define V_EQ8(a, b) _mm256_cmpeq_epi8((a), (b))
#define V_EQ16(a, b) _mm256_cmpeq_epi16((a), (b))
#define V_EQ32(a, b) _mm256_cmpeq_epi32((a), (b))
#define V_GT16(a, b) _mm256_cmpgt_epi16((a), (b))
#define V_AND(a, b) _mm256_and_si256((a), (b))
#define V_OR(a, b) _mm256_or_si256((a), (b))
#define V_ANDNOT(a, b) _mm256_andnot_si256((a), (b)) /* ~a & b */
#define V_SUB16(a, b) _mm256_sub_epi16((a), (b))
#define V_MASK(v) ((uint32_t)_mm256_movemask_epi8(v))
#elif defined(__SSE2__) && !defined(PQ_NO_SIMD)
#define PQ_VEC 1
typedef __m128i SFX(vec);
#define VEC SFX(vec)
#define V_BYTES 16
#define V_FULL 0xFFFFu
#define V_LOAD(p) _mm_loadu_si128((const __m128i *)(const void *)(p))
#define V_STORE(p, v) _mm_storeu_si128((__m128i *)(void *)(p), (v))
#define V_SET16(x) _mm_set1_epi16((short)(x))
#define V_SET32(x) _mm_set1_epi32((int)(x))
#define V_ZERO() _mm_setzero_si128()
#define V_EQ8(a, b) _mm_cmpeq_epi8((a), (b))
#define V_EQ16(a, b) _mm_cmpeq_epi16((a), (b))
#define V_EQ32(a, b) _mm_cmpeq_epi32((a), (b))
#define V_GT16(a, b) _mm_cmpgt_epi16((a), (b))
#define V_AND(a, b) _mm_and_si128((a), (b))
#define V_OR(a, b) _mm_or_si128((a), (b))
#define V_ANDNOT(a, b) _mm_andnot_si128((a), (b))
#define V_SUB16(a, b) _mm_sub_epi16((a), (b))
#define V_MASK(v) ((uint32_t)_mm_movemask_epi8(v))
#else
#define PQ_VEC 0
#endif
#define V_LANES16 (V_BYTES / 2)
#define V_LANES32 (V_BYTES / 4)

/* ------------------------------------------------------------------ scans */

/* First i' >= i with q[i'] != 0, or n. */
static inline int64_t SFX(next_nonzero)(const uint8_t *q, int64_t i, int64_t n) {
#if PQ_VEC
    const VEC zero = V_ZERO();
    for (; i + V_BYTES <= n; i += V_BYTES) {
        uint32_t m = V_MASK(V_EQ8(V_LOAD(q + i), zero));
        if (m != V_FULL) return i + __builtin_ctz(~m);
    }
#endif
    while (i < n && !q[i]) i++;
    return i;
}

/* First x' >= x with v[x'] != v[x' - 1] (v[-1] readable), or n. */
static inline int64_t SFX(next_change_u32)(const uint32_t *v, int64_t x, int64_t n) {
#if PQ_VEC
    for (; x + V_LANES32 <= n; x += V_LANES32) {
        uint32_t m = V_MASK(V_EQ32(V_LOAD(v + x), V_LOAD(v + x - 1)));
        if (m != V_FULL) return x + (__builtin_ctz(~m) >> 2);
    }
#endif
    while (x < n && v[x] == v[x - 1]) x++;
    return x;
}

/* First j' >= j with (g[j'], p[j']) != (gi, pi), or w. */
static inline int64_t SFX(run_end_u32)(const uint32_t *g, const uint32_t *p, int64_t j, int64_t w, uint32_t gi,
                                       uint32_t pi) {
#if PQ_VEC
    const VEC vg = V_SET32(gi), vp = V_SET32(pi);
    for (; j + 2 * V_LANES32 <= w; j += 2 * V_LANES32) {
        uint32_t m0 = V_MASK(V_AND(V_EQ32(V_LOAD(g + j), vg), V_EQ32(V_LOAD(p + j), vp)));
        if (m0 != V_FULL) return j + (__builtin_ctz(~m0) >> 2);
        uint32_t m1 = V_MASK(V_AND(V_EQ32(V_LOAD(g + j + V_LANES32), vg), V_EQ32(V_LOAD(p + j + V_LANES32), vp)));
        if (m1 != V_FULL) return j + V_LANES32 + (__builtin_ctz(~m1) >> 2);
    }
#endif
    while (j < w && g[j] == gi && p[j] == pi) j++;
    return j;
}

/* v into row[a..b); vector stores may write up to one register past b: buffers keep PAD spare
   elements after each row, and what follows in the row is written later. */
static inline void SFX(fill_u32)(uint32_t *row, int64_t a, int64_t b, uint32_t v) {
#if PQ_VEC
    const VEC vv = V_SET32(v);
    for (int64_t k = a; k < b; k += V_LANES32) V_STORE(row + k, vv);
#else
    for (int64_t k = a; k < b; k++) row[k] = v;
#endif
}

static inline void SFX(fill_u16)(uint16_t *c, int64_t a, int64_t b, uint16_t v) {
#if PQ_VEC
    const VEC vv = V_SET16(v);
    for (int64_t k = a; k < b; k += V_LANES16) V_STORE(c + k, vv);
#else
    for (int64_t k = a; k < b; k++) c[k] = v;
#endif
}

/* ------------------------------------------------------------------ PNG row filters -> ids */

/* Undo one row's filter. q: w * bpp filtered bytes; up[-1 .. w-1] the ids of the row above (all 0
   above the first row, up[-1] == 0); row has PAD spare elements after w. Filters act bytewise on
   the same channel of neighbouring pixels, so the colour bytes are independent of alpha, which is
   skipped. Panoptic maps are flat: most filtered bytes are zero, so a row is handled as stretches of
   all-zero pixels (found a register at a time) between "dirty" pixels. Returns 0, or -1 for an
   invalid filter type. */
static int SFX(unfilter_row)(int ft, const uint8_t *q, int64_t w, int bpp, const uint32_t *up, uint32_t *row) {
    const int64_t n = w * bpp;
    int64_t x = 0, xd;
    uint32_t left = 0;
    switch (ft) {
    case 0:
        for (; x < w; x++) row[x] = pack3(q + x * bpp);
        return 0;
    case 1: /* Sub: a zero pixel repeats the left one */
        for (; x < w; x = xd + 1) {
            xd = SFX(next_nonzero)(q, x * bpp, n) / bpp;
            SFX(fill_u32)(row, x, xd, left);
            if (xd >= w) break;
            left = add3(left, pack3(q + xd * bpp));
            row[xd] = left;
        }
        return 0;
    case 2: /* Up: the row above, fixed at the dirty pixels */
        memcpy(row, up, (size_t)w * sizeof(uint32_t));
        for (xd = SFX(next_nonzero)(q, 0, n) / bpp; xd < w; xd = SFX(next_nonzero)(q, (xd + 1) * bpp, n) / bpp)
            row[xd] = add3(up[xd], pack3(q + xd * bpp));
        return 0;
    case 3: /* Average */
        for (; x < w; x++) {
            uint32_t v = pack3(q + x * bpp);
            uint32_t pred = (v == 0 && left == up[x]) ? left : avg3(left, up[x]);
            left = add3(pred, v);
            row[x] = left;
        }
        return 0;
    case 4: /* Paeth, per channel paeth(a = left, b = up, c = upper left). b == c gives a; a == c gives
               b. So in a zero stretch, once left equals the upper left the row copies the row above;
               where the row above is flat it repeats the left pixel. */
        for (; x < w; x = xd + 1) {
            xd = SFX(next_nonzero)(q, x * bpp, n) / bpp;
            while (x < xd) {
                if (left == up[x - 1]) {
                    memcpy(row + x, up + x, (size_t)(xd - x) * sizeof(uint32_t));
                    left = up[xd - 1];
                    x = xd;
                    break;
                }
                int64_t e = SFX(next_change_u32)(up, x, xd);
                SFX(fill_u32)(row, x, e, left);
                x = e;
                if (x < xd) {
                    left = paeth3(left, up[x], up[x - 1]);
                    row[x++] = left;
                }
            }
            if (xd >= w) break;
            uint32_t v = pack3(q + xd * bpp), b = up[xd], c = up[xd - 1];
            uint32_t pred = b == c ? left : (left == c ? b : paeth3(left, b, c));
            left = add3(pred, v);
            row[xd] = left;
        }
        return 0;
    default:
        return -1;
    }
}

/* ------------------------------------------------------------------ Mask PQ histogram */

/* hist[cg * cols + cp] += run length over runs of equal (g, p) ids in one row. For Boundary PQ
   (code_g != NULL) it also writes each pixel's codes (PAD spare elements after the row) and appends
   the positions where a code changes along the row to chg_g / chg_p. memo: the last ids looked up
   and their codes (neighbouring runs usually share one side). */
static void SFX(hist_row_ids)(const uint32_t *g, const uint32_t *p, int64_t w, const idmap_t *mg,
                              const idmap_t *mp, int64_t cols, int64_t *hist, uint16_t *code_g, uint16_t *code_p,
                              uint32_t *memo, int32_t *chg_g, int64_t *ng_chg, int32_t *chg_p, int64_t *np_chg) {
    int64_t x = 0;
    uint32_t last_g = 0xFFFFFFFFu, last_p = 0xFFFFFFFFu;
    while (x < w) {
        uint32_t gi = g[x], pi = p[x];
        int64_t j = SFX(run_end_u32)(g, p, x + 1, w, gi, pi);
        if (gi != memo[0]) {
            memo[0] = gi;
            memo[1] = idmap_get(mg, gi);
        }
        if (pi != memo[2]) {
            memo[2] = pi;
            memo[3] = idmap_get(mp, pi);
        }
        uint16_t cg = (uint16_t)memo[1], cp = (uint16_t)memo[3];
        hist[(int64_t)cg * cols + cp] += j - x;
        if (code_g) {
            SFX(fill_u16)(code_g, x, j, cg);
            SFX(fill_u16)(code_p, x, j, cp);
            if (x && cg != last_g) chg_g[(*ng_chg)++] = (int32_t)x;
            if (x && cp != last_p) chg_p[(*np_chg)++] = (int32_t)x;
            last_g = cg;
            last_p = cp;
        }
        x = j;
    }
}

/* ------------------------------------------------------------------ boundaries (see band_t) */

/* R of row y into r as 0 / 0xFFFF: the row's window [x-d, x+d] leaves the image or holds a change. */
static void SFX(row_flags)(const band_t *s, int64_t y, uint16_t *r) {
    const int64_t w = s->w, d = s->d;
    if (2 * d >= w) {
        memset(r, 0xFF, (size_t)w * 2);
        return;
    }
    memset(r, 0xFF, (size_t)d * 2);
    memset(r + d, 0, (size_t)(w - 2 * d) * 2);
    memset(r + w - d, 0xFF, (size_t)d * 2);
    /* a change between x-1 and x makes every window holding both columns non-constant: windows
       centred in [x-d, x+d-1]; `done` skips what overlapping intervals already set */
    int64_t done = d, x = 0;
    const int32_t *pos = NULL, *end = NULL;
    const uint16_t *c = s->codes + y * w;
    if (s->chg) {
        pos = s->chg->pos + s->chg->start[y];
        end = s->chg->pos + s->chg->start[y + 1];
    }
#if PQ_VEC
    const VEC ones = V_SET16(0xFFFF);
#endif
    for (;;) {
        if (pos) {
            if (pos >= end) break;
            x = *pos++;
        } else {
            while (++x < w && c[x] == c[x - 1]) {
            }
            if (x >= w) break;
        }
        int64_t a = x - d > done ? x - d : done, b = x + d - 1 > w - 1 ? w - 1 : x + d - 1;
        if (a > b) continue;
        done = b + 1;
#if PQ_VEC
        if (b - a + 1 >= V_LANES16) { /* whole registers, the last one flush with b */
            for (; a + V_LANES16 <= b + 1; a += V_LANES16) V_STORE(r + a, ones);
            if (a <= b) V_STORE(r + b + 1 - V_LANES16, ones);
            continue;
        }
#endif
        for (; a <= b; a++) r[a] = 0xFFFF;
    }
}

/* dist := 0 where F = r | (a != b), else dist + 1 saturating at DIST_MAX. */
#if PQ_VEC
#define DIST_STEP(dist, a, b, r)                                              \
    do {                                                                      \
        VEC f_ = V_OR((r), V_ANDNOT(V_EQ16((a), (b)), V_SET16(-1)));          \
        VEC inc_ = V_SUB16((dist), V_GT16(V_SET16(DIST_MAX), (dist)));        \
        (dist) = V_ANDNOT(f_, inc_);                                          \
    } while (0)
#endif

/* Enter row e (0 <= e <= h - 2) into the F window: r_prev must hold R(e). */
static void SFX(band_enter)(band_t *s, int64_t e) {
    const uint16_t *a = s->codes + e * s->w, *b = a + s->w;
    const uint16_t *r = s->r_prev;
    uint16_t *dist = s->dist;
    int64_t x = 0;
#if PQ_VEC
    for (; x + V_LANES16 <= s->w; x += V_LANES16) {
        VEC dv = V_LOAD(dist + x);
        DIST_STEP(dv, V_LOAD(a + x), V_LOAD(b + x), V_LOAD(r + x));
        V_STORE(dist + x, dv);
    }
#endif
    for (; x < s->w; x++) {
        int f = r[x] | (a[x] != b[x]);
        dist[x] = f ? 0 : (uint16_t)(dist[x] + (dist[x] < DIST_MAX));
    }
}

/* Prepare for rows y >= d (needs h >= 2d + 1): enters rows 0 .. 2d - 2. */
static void SFX(band_begin)(band_t *s) {
    for (int64_t x = 0; x < s->w; x++) s->dist[x] = DIST_MAX;
    SFX(row_flags)(s, 0, s->r_prev);
    for (int64_t e = 0; e <= 2 * s->d - 2; e++) {
        SFX(row_flags)(s, e + 1, s->r_next);
        SFX(band_enter)(s, e);
        band_swap(s);
    }
}

/* Rows y < d or y > h-1-d: the window leaves the image, all band. Else enter row y + d - 1, R(y+d)
   into r_next; the caller tests dist > 2d - 1 and r_next == 0 ("off the band"), then band_swap. */
static inline int SFX(band_advance)(band_t *s, int64_t y) {
    if (y < s->d || y + s->d > s->h - 1) return 0;
    if (y == s->d) SFX(band_begin)(s);
    SFX(row_flags)(s, y + s->d, s->r_next);
    return 1;
}

/* The band (0/1 bytes) of a whole code map (pq_band). */
static void SFX(band_map)(band_t *s, uint8_t *out) {
    const int64_t w = s->w, d = s->d;
    const uint16_t reach = (uint16_t)(2 * d - 1);
    for (int64_t y = 0; y < s->h; y++) {
        uint8_t *o = out + y * w;
        if (!SFX(band_advance)(s, y)) {
            memset(o, 1, (size_t)w);
            continue;
        }
        SFX(band_enter)(s, y + d - 1);
        for (int64_t x = 0; x < w; x++) o[x] = (uint8_t)((s->dist[x] <= reach) | (s->r_next[x] != 0));
        band_swap(s);
    }
}

/* Boundary PQ joint histogram bh ((ng + 3) x bcols) of the two code maps, row by row: a segment
   pixel (codes 1..n) off its band counts as the interior code n + 2. Per row and register of
   columns: the F window of both maps advances, the boundary codes are formed, and runs of equal
   (GT, prediction) boundary codes are counted (movemask + ctz to find where a run ends). */
static void SFX(boundary_hist)(band_t *sg, band_t *sp, int64_t ng, int64_t np, int64_t bcols, int64_t *bh) {
    const int64_t w = sg->w, h = sg->h, d = sg->d;
    const uint16_t reach = (uint16_t)(2 * d - 1);
    const uint16_t gi_code = (uint16_t)(ng + 2), pi_code = (uint16_t)(np + 2);
    const uint16_t gv_code = (uint16_t)(ng + 1), pv_code = (uint16_t)(np + 1);
    for (int64_t y = 0; y < h; y++) {
        const uint16_t *cg = sg->codes + y * w, *cp = sp->codes + y * w;
        int inner = SFX(band_advance)(sg, y);
        SFX(band_advance)(sp, y);
        const uint16_t *ag = sg->codes + (y + d - 1) * w, *ap = sp->codes + (y + d - 1) * w;
        uint16_t cur_g = 0xFFFF, cur_p = 0xFFFF;
        int64_t start = 0, x = 0;
#define BOUNDARY_CODE(c, dist, rn, interior, void_code) \
    ((dist) > reach && (rn) == 0 && (c) != 0 && (c) != (void_code) ? (interior) : (c))
#if PQ_VEC
        VEC vcg = V_SET16(cur_g), vcp = V_SET16(cur_p);
        const VEC vreach = V_SET16(reach), zero = V_ZERO();
        const VEC vgi = V_SET16(gi_code), vpi = V_SET16(pi_code), vgv = V_SET16(gv_code), vpv = V_SET16(pv_code);
        for (; x + V_LANES16 <= w; x += V_LANES16) {
            VEC bg = V_LOAD(cg + x), bp = V_LOAD(cp + x);
            if (inner) {
                VEC dg = V_LOAD(sg->dist + x), dp = V_LOAD(sp->dist + x);
                DIST_STEP(dg, V_LOAD(ag + x), V_LOAD(ag + w + x), V_LOAD(sg->r_prev + x));
                DIST_STEP(dp, V_LOAD(ap + x), V_LOAD(ap + w + x), V_LOAD(sp->r_prev + x));
                V_STORE(sg->dist + x, dg);
                V_STORE(sp->dist + x, dp);
                /* off the band, and a segment (not 0 = unlisted, not VOID): the interior code */
                VEC og = V_AND(V_GT16(dg, vreach), V_EQ16(V_LOAD(sg->r_next + x), zero));
                VEC op = V_AND(V_GT16(dp, vreach), V_EQ16(V_LOAD(sp->r_next + x), zero));
                og = V_ANDNOT(V_OR(V_EQ16(bg, zero), V_EQ16(bg, vgv)), og);
                op = V_ANDNOT(V_OR(V_EQ16(bp, zero), V_EQ16(bp, vpv)), op);
                bg = V_OR(V_AND(og, vgi), V_ANDNOT(og, bg));
                bp = V_OR(V_AND(op, vpi), V_ANDNOT(op, bp));
            }
            uint32_t diff = ~V_MASK(V_AND(V_EQ16(bg, vcg), V_EQ16(bp, vcp))) & V_FULL;
            if (!diff) continue;
            uint16_t lg[V_LANES16], lp[V_LANES16];
            V_STORE(lg, bg);
            V_STORE(lp, bp);
            while (diff) {
                int k = __builtin_ctz(diff) >> 1;
                if (cur_g != 0xFFFF || cur_p != 0xFFFF || x + k > 0) bh[(int64_t)cur_g * bcols + cur_p] += x + k - start;
                start = x + k;
                cur_g = lg[k];
                cur_p = lp[k];
                vcg = V_SET16(cur_g);
                vcp = V_SET16(cur_p);
                diff = ~V_MASK(V_AND(V_EQ16(bg, vcg), V_EQ16(bp, vcp))) & V_FULL & (uint32_t)(~0ull << (2 * k + 2));
            }
        }
#endif
        for (; x < w; x++) {
            uint16_t bg = cg[x], bp = cp[x];
            if (inner) {
                uint16_t *dg = &sg->dist[x], *dp = &sp->dist[x];
                int fg = sg->r_prev[x] | (ag[x] != ag[x + w]), fp = sp->r_prev[x] | (ap[x] != ap[x + w]);
                *dg = fg ? 0 : (uint16_t)(*dg + (*dg < DIST_MAX));
                *dp = fp ? 0 : (uint16_t)(*dp + (*dp < DIST_MAX));
                bg = BOUNDARY_CODE(bg, *dg, sg->r_next[x], gi_code, gv_code);
                bp = BOUNDARY_CODE(bp, *dp, sp->r_next[x], pi_code, pv_code);
            }
            if (bg != cur_g || bp != cur_p) {
                if (x > 0) bh[(int64_t)cur_g * bcols + cur_p] += x - start;
                start = x;
                cur_g = bg;
                cur_p = bp;
            }
        }
#undef BOUNDARY_CODE
        bh[(int64_t)cur_g * bcols + cur_p] += w - start;
        if (inner) {
            band_swap(sg);
            band_swap(sp);
        }
    }
}

#undef VEC
#undef V_BYTES
#undef V_FULL
#undef V_LOAD
#undef V_STORE
#undef V_SET16
#undef V_SET32
#undef V_ZERO
#undef V_EQ8
#undef V_EQ16
#undef V_EQ32
#undef V_GT16
#undef V_AND
#undef V_OR
#undef V_ANDNOT
#undef V_SUB16
#undef V_MASK
#undef V_LANES16
#undef V_LANES32
#undef PQ_VEC
#undef DIST_STEP
