/* Hot loops of png_pq.c, included twice: SFX(name) = name_base (SSE2 on x86-64, scalar elsewhere) and,
 * with GCC on x86-64, name_avx2 inside `#pragma GCC target("avx2")`; png_pq.c picks one set at run
 * time (__builtin_cpu_supports), so one library runs on any x86-64 and uses AVX2 where it exists.
 *
 * Vector helpers: V_LANES32 uint32 lanes per register; V_MASK(v) = one bit per byte (movemask);
 * V_FULL = all bytes set. The boundary part is plain C on 64-bit words (popcnt in the AVX2 build).
 * Without SSE2 (or with -DPQ_NO_SIMD, which the tests use) every loop has a
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
#define V_SET32(x) _mm256_set1_epi32((int)(x))
#define V_ZERO() _mm256_setzero_si256()
#define V_EQ8(a, b) _mm256_cmpeq_epi8((a), (b))
#define V_EQ32(a, b) _mm256_cmpeq_epi32((a), (b))
#define V_AND(a, b) _mm256_and_si256((a), (b))
#define V_MASK(v) ((uint32_t)_mm256_movemask_epi8(v))
#elif defined(__SSE2__) && !defined(PQ_NO_SIMD)
#define PQ_VEC 1
typedef __m128i SFX(vec);
#define VEC SFX(vec)
#define V_BYTES 16
#define V_FULL 0xFFFFu
#define V_LOAD(p) _mm_loadu_si128((const __m128i *)(const void *)(p))
#define V_STORE(p, v) _mm_storeu_si128((__m128i *)(void *)(p), (v))
#define V_SET32(x) _mm_set1_epi32((int)(x))
#define V_ZERO() _mm_setzero_si128()
#define V_EQ8(a, b) _mm_cmpeq_epi8((a), (b))
#define V_EQ32(a, b) _mm_cmpeq_epi32((a), (b))
#define V_AND(a, b) _mm_and_si128((a), (b))
#define V_MASK(v) ((uint32_t)_mm_movemask_epi8(v))
#else
#define PQ_VEC 0
#endif
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
   (rg != NULL) it also appends the row's runs of equal GT codes to rg and of predicted codes to rp
   (each row ending with a sentinel run at w), and of (GT, predicted) code pairs to rgp (code = GT
   code, code2 = predicted code); at most w + 1 each.
   memo: the last ids looked up and their codes (neighbouring runs usually share one side). */
static void SFX(hist_row_ids)(const uint32_t *g, const uint32_t *p, int64_t w, const idmap_t *mg,
                              const idmap_t *mp, int64_t cols, int64_t *hist, uint32_t *memo, runs_t *rg,
                              runs_t *rp, runs_t *rgp) {
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
        if (rg) {
            if (cg != last_g) runs_push(rg, x, cg);
            if (cp != last_p) runs_push(rp, x, cp);
            if (!x || rgp->code[rgp->n - 1] != cg || rgp->code2[rgp->n - 1] != cp) { /* else: other unlisted ids */
                rgp->pos[rgp->n] = (int32_t)x;
                rgp->code2[rgp->n] = cp;
                rgp->code[rgp->n++] = cg;
            }
            last_g = cg;
            last_p = cp;
        }
        x = j;
    }
    if (rg) { /* sentinels: the next run "starts" at w */
        runs_push(rg, w, 0xFFFF);
        runs_push(rp, w, 0xFFFF);
    }
}

/* ------------------------------------------------------------------ boundaries (see band_t in png_pq.c) */

#if PQ_AVX2
#define POPCNT64(x) __builtin_popcountll(x) /* the popcnt instruction in this target */
#else
static inline int SFX(popcnt64)(uint64_t x) { /* SWAR: no library call without -mpopcnt */
    x = x - ((x >> 1) & 0x5555555555555555ull);
    x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0Full;
    return (int)((x * 0x0101010101010101ull) >> 56);
}
#define POPCNT64(x) SFX(popcnt64)(x)
#endif

/* Bits a..b (inclusive) of a bit row. */
static inline void SFX(set_bits)(uint64_t *row, int64_t a, int64_t b) {
    int64_t wa = a >> 6, wb = b >> 6;
    uint64_t ma = ~0ull << (a & 63), mb = ~0ull >> (63 - (b & 63));
    if (wa == wb) {
        row[wa] |= ma & mb;
        return;
    }
    row[wa] |= ma;
    for (int64_t k = wa + 1; k < wb; k++) row[k] = ~0ull;
    row[wb] |= mb;
}

/* R(y) as a bit row, and the runs of row y longer than 2d (their indices into `longs`; returns how
   many). Each row's runs end with a sentinel run start at w (see runs_t), which also sets the right
   edge columns [w - d, w - 1]. */
static int64_t SFX(r_bits)(const runs_t *r, int64_t y, int64_t w, int64_t d, int64_t nw, uint64_t *row,
                           int64_t *longs) {
    const int32_t *pos = r->pos;
    int64_t n = 0;
    memset(row, 0, (size_t)nw * sizeof(uint64_t));
    if (2 * d >= w) {
        SFX(set_bits)(row, 0, w - 1);
        return 0; /* every column is within d of an edge: D never matters */
    }
    SFX(set_bits)(row, 0, d - 1);
    for (int64_t i = r->start[y], e = r->start[y + 1] - 1; i < e; i++) {
        int64_t x = pos[i + 1];
        SFX(set_bits)(row, x - d > 0 ? x - d : 0, x + d - 1 < w - 1 ? x + d - 1 : w - 1);
        longs[n] = i;
        n += x - pos[i] > 2 * d;
    }
    return n;
}

/* OR D(e) into a bit row where R(e) | R(e + 1) does not already cover it. Columns where rows e and
   e + 1 differ lie in intersections [lo, hi) of a run of row e with a run of row e + 1 of another
   code; lo and hi are run starts (or the image edges), whose R intervals cover d columns on each
   side, so only [lo + d, hi - d - 1] is needed, and only when both runs are longer than 2d: the
   merge runs over the long runs of the two rows (ga, gb: their indices) only. */
static void SFX(d_bits)(const runs_t *r, const int64_t *ga, int64_t na, const int64_t *gb, int64_t nb, int64_t d,
                        uint64_t *row) {
    const int32_t *pos = r->pos;
    const uint16_t *code = r->code;
    int64_t i = 0, j = 0;
    while (i < na && j < nb) {
        int64_t a = ga[i], b = gb[j];
        int64_t lo = pos[a] > pos[b] ? pos[a] : pos[b], ta = pos[a + 1], tb = pos[b + 1];
        int64_t hi = ta < tb ? ta : tb;
        if (hi - lo > 2 * d && code[a] != code[b]) SFX(set_bits)(row, lo + d, hi - d - 1);
        if (ta <= tb)
            i++;
        else
            j++;
    }
}

/* Build the prefix / suffix ORs of G for one map (needs h >= 2d + 1). */
static void SFX(band_build)(band_t *b, const runs_t *r) {
    const int64_t h = b->h, w = b->w, d = b->d, nw = b->nw, L = 2 * d;
    uint64_t *rc = b->tmp, *rn = b->tmp + nw;
    int64_t *lc = b->longs, *ln = b->longs + (w + 2);
    int64_t nc = SFX(r_bits)(r, 0, w, d, nw, rc, lc);
    for (int64_t y = 0; y <= h - 2; y++) { /* G(y) into pre[y] */
        uint64_t *gy = b->pre + y * nw;
        int64_t nn = SFX(r_bits)(r, y + 1, w, d, nw, rn, ln);
        for (int64_t k = 0; k < nw; k++) gy[k] = rc[k] | rn[k];
        SFX(d_bits)(r, lc, nc, ln, nn, d, gy);
        uint64_t *t = rc;
        rc = rn;
        rn = t;
        int64_t *tl = lc;
        lc = ln;
        ln = tl;
        nc = nn;
    }
    for (int64_t y = h - 2; y >= 0; y--) { /* suffix ORs within blocks of L rows */
        const uint64_t *gy = b->pre + y * nw;
        uint64_t *sy = b->suf + y * nw;
        if (y % L == L - 1 || y == h - 2)
            memcpy(sy, gy, (size_t)nw * sizeof(uint64_t));
        else
            for (int64_t k = 0; k < nw; k++) sy[k] = gy[k] | sy[nw + k];
    }
    for (int64_t y = 0; y <= h - 2; y++) { /* prefix ORs within blocks, in place */
        if (y % L == 0) continue;
        uint64_t *py = b->pre + y * nw;
        for (int64_t k = 0; k < nw; k++) py[k] |= py[k - nw];
    }
}

/* Band bits of row y (d <= y <= h-1-d) into out (nw words; bits past w are 0). */
static void SFX(band_row)(const band_t *b, int64_t y, uint64_t *out) {
    const uint64_t *s = b->suf + (y - b->d) * b->nw, *p = b->pre + (y + b->d - 1) * b->nw;
    for (int64_t k = 0; k < b->nw; k++) out[k] = s[k] | p[k];
    if (b->w & 63) out[b->nw - 1] &= ~0ull >> (64 - (b->w & 63));
}

/* Prefix counts of set bits per word: pre[k] = bits in words < k (m2: of m & m2). */
static inline void SFX(bit_prefix)(const uint64_t *m, const uint64_t *m2, int64_t nw, int32_t *pre) {
    int32_t n = 0;
    for (int64_t k = 0; k < nw; k++) {
        pre[k] = n;
        n += POPCNT64(m2 ? m[k] & m2[k] : m[k]);
    }
    pre[nw] = n;
}

/* Set bits in [0, x) (x <= w; the words hold one spare word past the row). */
static inline int64_t SFX(bits_upto)(const uint64_t *m, const uint64_t *m2, const int32_t *pre, int64_t x) {
    int64_t k = x >> 6;
    uint64_t word = m2 ? m[k] & m2[k] : m[k];
    return pre[k] + POPCNT64(word & ((1ull << (x & 63)) - 1));
}

/* Boundary PQ joint histogram bh ((ng + 3) x bcols): a run of one (GT code, predicted code) pair
   splits into four boundary pairs (both on their band, only one, neither; a segment off its band
   takes the interior code n + 2, codes that are not segments are always "on the band"), counted
   from prefix popcounts of the band bits. bg, bp: the maps' band states (NULL when h < 2d + 1:
   every row is band); work: 2 * (nw + 1) words + 3 * (nw + 1) int32. */
static void SFX(boundary_hist)(const band_t *bg, const band_t *bp, const runs_t *pairs, int64_t h, int64_t w,
                          int64_t d, int64_t ng, int64_t np, int64_t bcols, int64_t *bh, uint64_t *mg, uint64_t *mp,
                          int32_t *cnt) {
    const int64_t nw = (w + 63) >> 6;
    const uint16_t gi = (uint16_t)(ng + 2), pi = (uint16_t)(np + 2), gv = (uint16_t)(ng + 1), pv = (uint16_t)(np + 1);
    int32_t *cg_pre = cnt, *cp_pre = cnt + nw + 1, *cb_pre = cnt + 2 * (nw + 1);
    mg[nw] = mp[nw] = 0;
    for (int64_t y = 0; y < h; y++) {
        const int inner = bg && y >= d && y + d <= h - 1;
        if (inner) {
            SFX(band_row)(bg, y, mg);
            SFX(band_row)(bp, y, mp);
            SFX(bit_prefix)(mg, NULL, nw, cg_pre);
            SFX(bit_prefix)(mp, NULL, nw, cp_pre);
            SFX(bit_prefix)(mg, mp, nw, cb_pre);
        }
        const int64_t r0 = pairs->start[y], r1 = pairs->start[y + 1];
        int64_t g0 = 0, p0 = 0, b0 = 0; /* band counts before the current run */
        for (int64_t i = r0; i < r1; i++) {
            const int64_t x = pairs->pos[i], t = i + 1 < r1 ? pairs->pos[i + 1] : w, len = t - x;
            const uint16_t cg = pairs->code[i], cp = pairs->code2[i];
            if (!inner) {
                bh[(int64_t)cg * bcols + cp] += len;
                continue;
            }
            const int64_t g1 = SFX(bits_upto)(mg, NULL, cg_pre, t), p1 = SFX(bits_upto)(mp, NULL, cp_pre, t);
            const int64_t b1 = SFX(bits_upto)(mg, mp, cb_pre, t);
            const int sg = cg != 0 && cg != gv, sp = cp != 0 && cp != pv;
            const int64_t nb_g = sg ? g1 - g0 : len, nb_p = sp ? p1 - p0 : len;
            const int64_t both = sg && sp ? b1 - b0 : (sg ? nb_g : nb_p);
            bh[(int64_t)cg * bcols + cp] += both;
            bh[(int64_t)cg * bcols + pi] += nb_g - both;
            bh[(int64_t)gi * bcols + cp] += nb_p - both;
            bh[(int64_t)gi * bcols + pi] += len - nb_g - nb_p + both;
            g0 = g1;
            p0 = p1;
            b0 = b1;
        }
    }
}

#undef VEC
#undef V_BYTES
#undef V_FULL
#undef V_LOAD
#undef V_STORE
#undef V_SET32
#undef V_ZERO
#undef V_EQ8
#undef V_EQ32
#undef V_AND
#undef V_MASK
#undef V_LANES32
#undef PQ_VEC
#undef POPCNT64
