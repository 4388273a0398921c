/* Panoptic quality from PNG files: PNG decoding, joint histograms, boundaries and matching in C.
 *
 * Used by harness/metrics (loaded with ctypes, no Python headers, no link-time dependencies; built by
 * `make setup` through `python -m harness.metrics.native`). Inflate is libdeflate's, reached through
 * function pointers that the loader takes from the `deflate` package (or a system libdeflate), so this
 * file only needs a C compiler.
 *
 * Exactness: every rule mirrors harness/metrics/pq.py (itself panopticapi's and boundary-iou-api's
 * rules); anything this kernel does not handle (an unusual PNG, a bad file, segments the numpy path
 * must name in an error, the BOUNDARY_ID collision of boundary-iou-api) stops the batch at that image
 * with a reason code, before any of its counts are added, and Python scores that image instead.
 *
 * Speed: panoptic PNGs are piecewise constant. Rows are unfiltered as stretches of zero filtered
 * bytes between a few "dirty" pixels (a whole Up row is a copy of the row above plus fixes), and the
 * joint histogram counts runs of equal (GT, prediction) pixel pairs; one decoded row of each image is
 * live at a time. Boundary PQ works on those runs too: bit rows of "events" per row, a van Herk
 * sliding OR over 2d rows for the band, and popcounts per run instead of (2d+1)^2 erosions. The hot
 * loops (png_pq_simd.h) are compiled for SSE2 and, with GCC on x86-64, for AVX2 + popcnt, chosen at
 * run time.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(PQ_NO_AVX2)
#define PQ_HAVE_AVX2 1
#include <immintrin.h>
#else
#define PQ_HAVE_AVX2 0
#endif

#define PQ_ABI_VERSION 1
#ifndef PQ_SOURCE_HASH
#define PQ_SOURCE_HASH "unknown"
#endif

/* Reasons a batch stops at an image (returned in status[0]); Python then scores that image. */
enum {
    PQ_OK = 0,
    PQ_STOP_READ = 1,        /* cannot open or read a file */
    PQ_STOP_PNG = 2,         /* not a PNG this kernel decodes (or corrupt): Python decodes or names it */
    PQ_STOP_SIZE = 3,        /* GT and prediction sizes differ */
    PQ_STOP_SEGMENTS = 4,    /* id outside 0..2^24-1, duplicate id, too many segments or bins */
    PQ_STOP_UNLISTED = 5,    /* predicted id in the PNG but not in the JSON */
    PQ_STOP_ABSENT = 6,      /* predicted JSON segment not in the PNG */
    PQ_STOP_BOUNDARY_ID = 7, /* a segment id equals BOUNDARY_ID: reference painting order needed */
    PQ_STOP_MEMORY = 8,
    PQ_STOP_NO_INFLATE = 9,
};

#define MAX_SEGMENTS 65530
#define MAX_BINS (1LL << 27)
#define ID_LIMIT (1LL << 24)

/* ------------------------------------------------------------------ libdeflate through pointers */

typedef void *(*alloc_decompressor_fn)(void);
typedef int (*zlib_decompress_fn)(void *, const void *, size_t, void *, size_t, size_t *);
typedef void (*free_decompressor_fn)(void *);

static alloc_decompressor_fn g_alloc;
static zlib_decompress_fn g_inflate;
static free_decompressor_fn g_free;

int pq_abi_version(void) { return PQ_ABI_VERSION; }
const char *pq_source_hash(void) { return PQ_SOURCE_HASH; }

static const struct kernels *kern(void);

/* Set once per process, before any context is created (and before any thread uses the kernels:
   the instruction set is chosen here). */
void pq_set_inflate(void *alloc, void *inflate, void *free_fn) {
    g_alloc = (alloc_decompressor_fn)alloc;
    g_inflate = (zlib_decompress_fn)inflate;
    g_free = (free_decompressor_fn)free_fn;
    (void)kern();
}

/* ------------------------------------------------------------------ per-thread context */

typedef struct {
    uint8_t *p;
    size_t cap;
} buf_t;

static int reserve(buf_t *b, size_t n) {
    if (n <= b->cap) return 1;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < n) cap *= 2;
    void *p = realloc(b->p, cap);
    if (!p) return 0;
    b->p = (uint8_t *)p;
    b->cap = cap;
    return 1;
}

/* id -> code table: open addressing over the listed ids of one image (a few dozen), with a one-entry
   memo in the callers; a 2^24 direct table would page-fault on every new random id. */
typedef struct {
    uint32_t *keys; /* EMPTY_KEY = free */
    uint16_t *vals;
    uint32_t mask;
    uint32_t cap;
    uint16_t zero_code; /* code of id 0 when it is not listed */
    uint32_t nseg;      /* listed segments: codes 1..nseg */
} idmap_t;

#define EMPTY_KEY 0xFFFFFFFFu

static inline uint32_t hash_id(uint32_t id, uint32_t mask) { return (id * 2654435761u >> 7) & mask; }

static int idmap_build(idmap_t *m, const int64_t *ids, int64_t n, uint16_t zero_code) {
    uint32_t size = 16;
    while (size < 4 * (uint64_t)n) size *= 2;
    if (size > m->cap) {
        free(m->keys);
        free(m->vals);
        m->keys = (uint32_t *)malloc(size * sizeof(uint32_t));
        m->vals = (uint16_t *)malloc(size * sizeof(uint16_t));
        if (!m->keys || !m->vals) {
            m->cap = 0;
            return PQ_STOP_MEMORY;
        }
        m->cap = size;
    }
    m->mask = size - 1;
    memset(m->keys, 0xFF, size * sizeof(uint32_t));
    m->zero_code = zero_code;
    m->nseg = (uint32_t)n;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= ID_LIMIT) return PQ_STOP_SEGMENTS;
        uint32_t id = (uint32_t)ids[i];
        uint32_t h = hash_id(id, m->mask);
        while (m->keys[h] != EMPTY_KEY) {
            if (m->keys[h] == id) return PQ_STOP_SEGMENTS; /* duplicate: Python names it */
            h = (h + 1) & m->mask;
        }
        m->keys[h] = id;
        m->vals[h] = (uint16_t)(i + 1);
        if (id == 0) m->zero_code = (uint16_t)(i + 1);
    }
    return PQ_OK;
}

static inline uint16_t idmap_get(const idmap_t *m, uint32_t id) {
    uint32_t h = hash_id(id, m->mask);
    for (;;) {
        uint32_t k = m->keys[h];
        if (k == id) return m->vals[h];
        if (k == EMPTY_KEY) return id == 0 ? m->zero_code : 0;
        h = (h + 1) & m->mask;
    }
}

typedef struct {
    int64_t h, w;
    int bpp;
    const uint8_t *raw; /* h rows of 1 filter byte + w * bpp bytes */
} png_t;

typedef struct {
    void *dec;
    buf_t file[2], idat[2], raw[2];
    buf_t rows[2]; /* per image: 2 rows of (w + 1) uint32 ids, element 0 of each row = 0 (left of x = 0) */
    buf_t zero_row;
    buf_t run_pos[3], run_code[3], run_start[3], run_code2; /* runs of GT, predicted codes and pairs */
    buf_t band[2], bwork;                                   /* per image: band state (see band_t) */
    buf_t hist, bhist;
    buf_t work; /* per-image matching scratch */
    idmap_t map[2];
} pq_ctx;

void pq_ctx_free(pq_ctx *c) {
    if (!c) return;
    if (c->dec && g_free) g_free(c->dec);
    buf_t *bufs[] = {&c->file[0], &c->file[1], &c->idat[0], &c->idat[1], &c->raw[0], &c->raw[1], &c->rows[0],
                     &c->rows[1], &c->zero_row, &c->run_pos[0], &c->run_pos[1], &c->run_pos[2], &c->run_code[0],
                     &c->run_code[1], &c->run_code[2], &c->run_start[0], &c->run_start[1], &c->run_start[2],
                     &c->run_code2, &c->band[0], &c->band[1], &c->bwork, &c->hist, &c->bhist,
                     &c->work};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) free(bufs[i]->p);
    for (int i = 0; i < 2; i++) {
        free(c->map[i].keys);
        free(c->map[i].vals);
    }
    free(c);
}

pq_ctx *pq_ctx_new(void) {
    pq_ctx *c = (pq_ctx *)calloc(1, sizeof(pq_ctx));
    if (!c) return NULL;
    if (g_alloc) {
        c->dec = g_alloc();
        if (!c->dec) {
            free(c);
            return NULL;
        }
    }
    return c;
}

/* ------------------------------------------------------------------ files and PNG container */

static int read_file(const char *path, buf_t *b, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return PQ_STOP_READ;
    size_t n = 0;
    if (fseek(f, 0, SEEK_END) == 0) {
        long end = ftell(f);
        if (end > 0 && !reserve(b, (size_t)end + 1)) {
            fclose(f);
            return PQ_STOP_MEMORY;
        }
        rewind(f);
    }
    for (;;) {
        if (!reserve(b, n + 65536)) {
            fclose(f);
            return PQ_STOP_MEMORY;
        }
        size_t got = fread(b->p + n, 1, b->cap - n, f);
        n += got;
        if (got == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) return PQ_STOP_READ;
    *len = n;
    return PQ_OK;
}

static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Parse an 8-bit RGB/RGBA non-interlaced PNG and inflate its image data into raw. Anything else
   (palette, grey, 16-bit, interlaced, corrupt) is PQ_STOP_PNG: Python decodes it or names it. */
static int decode_container(pq_ctx *c, const uint8_t *data, size_t n, buf_t *idat, buf_t *raw, png_t *out) {
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (n < 8 || memcmp(data, sig, 8) != 0) return PQ_STOP_PNG;
    size_t pos = 8, ilen = 0;
    const uint8_t *first = NULL; /* a single IDAT chunk (the usual case) is inflated in place */
    int64_t w = 0, h = 0;
    int bpp = 0, chunks = 0;
    while (pos + 8 <= n) {
        uint32_t len = be32(data + pos);
        const uint8_t *type = data + pos + 4;
        size_t body = pos + 8;
        if (len > n - body) return PQ_STOP_PNG; /* truncated chunk */
        if (!memcmp(type, "IHDR", 4)) {
            if (len < 13) return PQ_STOP_PNG;
            w = be32(data + body);
            h = be32(data + body + 4);
            int depth = data[body + 8], color = data[body + 9], interlace = data[body + 12];
            if (depth != 8 || (color != 2 && color != 6) || interlace != 0) return PQ_STOP_PNG;
            bpp = color == 2 ? 3 : 4;
        } else if (!memcmp(type, "IDAT", 4)) {
            if (chunks++ == 0) {
                first = data + body;
            } else {
                if (chunks == 2) { /* more than one: concatenate */
                    if (!reserve(idat, ilen + len + 1)) return PQ_STOP_MEMORY;
                    memcpy(idat->p, first, ilen);
                    first = idat->p;
                }
                if (!reserve(idat, ilen + len + 1)) return PQ_STOP_MEMORY;
                memcpy(idat->p + ilen, data + body, len);
                first = idat->p;
            }
            ilen += len;
        } else if (!memcmp(type, "IEND", 4)) {
            break;
        }
        pos = body + len + 4; /* CRC not checked: the zlib stream has its own Adler-32 */
    }
    if (!bpp || !ilen || w <= 0 || h <= 0) return PQ_STOP_PNG;
    if ((double)h * (double)(w * bpp + 1) > (double)(1LL << 34)) return PQ_STOP_PNG;
    size_t expected = (size_t)h * (size_t)(w * bpp + 1);
    if (!reserve(raw, expected + 64)) return PQ_STOP_MEMORY;
    if (!g_inflate || !c->dec) return PQ_STOP_NO_INFLATE;
    size_t actual = 0;
    int r = g_inflate(c->dec, first, ilen, raw->p, expected, &actual);
    if (r != 0 || actual != expected) return PQ_STOP_PNG;
    out->w = w;
    out->h = h;
    out->bpp = bpp;
    out->raw = raw->p;
    return PQ_OK;
}

/* ------------------------------------------------------------------ PNG row filters -> ids */

static inline uint32_t pack3(const uint8_t *q) {
    return (uint32_t)q[0] | ((uint32_t)q[1] << 8) | ((uint32_t)q[2] << 16);
}

/* Bytewise a + b mod 256 on three packed bytes (no carries between channels). */
static inline uint32_t add3(uint32_t a, uint32_t b) {
    return (((a & 0x7f7f7fu) + (b & 0x7f7f7fu)) ^ ((a ^ b) & 0x808080u)) & 0xffffffu;
}

static inline uint8_t paeth(int a, int b, int c) {
    int p = a + b - c;
    int pa = abs(p - a), pb = abs(p - b), pc = abs(p - c);
    if (pa <= pb && pa <= pc) return (uint8_t)a;
    if (pb <= pc) return (uint8_t)b;
    return (uint8_t)c;
}

static inline uint32_t paeth3(uint32_t a, uint32_t b, uint32_t c) {
    return (uint32_t)paeth(a & 255, b & 255, c & 255) |
           ((uint32_t)paeth((a >> 8) & 255, (b >> 8) & 255, (c >> 8) & 255) << 8) |
           ((uint32_t)paeth(a >> 16, b >> 16, c >> 16) << 16);
}

static inline uint32_t avg3(uint32_t a, uint32_t b) {
    return (((a & 255) + (b & 255)) >> 1) | (((((a >> 8) & 255) + ((b >> 8) & 255)) >> 1) << 8) |
           ((((a >> 16) + (b >> 16)) >> 1) << 16);
}

/* ------------------------------------------------------------------ runs */

/* Runs of one code map, row after row: row y has runs start[y] .. start[y + 1] - 1 of (pos, code),
   the last one a sentinel at pos = w (code 0xFFFF); runs of code pairs have no sentinel and code2
   holds the predicted code. */
typedef struct {
    int32_t *pos;
    uint16_t *code;
    int64_t *start; /* h + 2 (start[h + 1] == start[h]) */
    int64_t n;
    uint16_t *code2;
} runs_t;

static inline void runs_push(runs_t *r, int64_t x, uint16_t code) {
    r->pos[r->n] = (int32_t)x;
    r->code[r->n++] = code;
}

/* ------------------------------------------------------------------ boundaries */

/* boundary-iou-api: a pixel of segment s is on s's boundary iff its (2d+1)^2 window (d erosions by 3x3
   after 1-px zero padding) holds another segment, VOID, or reaches outside the image. The window is
   constant iff each of its rows is constant and vertically adjacent pixels of its column agree.
   With R(y, x) = "row window [x-d, x+d] of row y not constant or outside the image" and
   D(y, x) = "c(y + 1, x) != c(y, x)":

       band(y, x) = y < d or y > h-1-d or any R(y', x), y' in [y-d, y+d], or any D(y', x), y' in [y-d, y+d-1]
                  = y < d or y > h-1-d or any G(y', x), y' in [y-d, y+d-1],  G(y) = R(y) | R(y + 1) | D(y).

   All of it on runs and bit rows (one bit per column): R(y) is the columns within d of the edges and
   [x-d, x+d-1] around each run start x > 0; D(y) comes from merging the runs of rows y and y + 1.
   The OR of G over a sliding window of 2d rows is van Herk / Gil-Werman: within blocks of 2d rows,
   prefix and suffix ORs, and window [a, a + 2d - 1] = suffix(a) | prefix(a + 2d - 1). So the band
   costs a few word operations per row and run, for any d. */

typedef struct {
    int64_t h, w, d, nw;  /* nw: 64-bit words per bit row */
    uint64_t *pre, *suf;  /* (h - 1) x nw: block prefix / suffix ORs of G */
    uint64_t *tmp;        /* 2 x nw: R of two consecutive rows */
    int64_t *longs;       /* 2 x (w + 2): the runs longer than 2d of two consecutive rows */
} band_t;

/* ------------------------------------------------------------------ hot loops, two instruction sets */

/* Spare elements after every decoded row that vector fills may overrun (see fill_u32). */
#define PAD 32

#define SFX(name) name##_base
#define PQ_AVX2 0
#include "png_pq_simd.h"
#undef SFX
#undef PQ_AVX2

#if PQ_HAVE_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,popcnt")
#define SFX(name) name##_avx2
#define PQ_AVX2 1
#include "png_pq_simd.h"
#undef SFX
#undef PQ_AVX2
#pragma GCC pop_options
#endif

typedef struct kernels {
    int (*unfilter_row)(int, const uint8_t *, int64_t, int, const uint32_t *, uint32_t *);
    void (*hist_row_ids)(const uint32_t *, const uint32_t *, int64_t, const idmap_t *, const idmap_t *, int64_t,
                         int64_t *, uint32_t *, runs_t *, runs_t *, runs_t *);
    void (*band_build)(band_t *, const runs_t *);
    void (*boundary_hist)(const band_t *, const band_t *, const runs_t *, int64_t, int64_t, int64_t, int64_t,
                          int64_t, int64_t, int64_t *, uint64_t *, uint64_t *, int32_t *);
    void (*band_row)(const band_t *, int64_t, uint64_t *);
    const char *name;
} kernels_t;

static const kernels_t k_base = {unfilter_row_base, hist_row_ids_base, band_build_base, boundary_hist_base,
                                 band_row_base, "sse2"};
#if PQ_HAVE_AVX2
static const kernels_t k_avx2 = {unfilter_row_avx2, hist_row_ids_avx2, band_build_avx2, boundary_hist_avx2,
                                 band_row_avx2, "avx2"};
#endif

static const kernels_t *kern(void) {
#if PQ_HAVE_AVX2
    static const kernels_t *chosen;
    if (!chosen) {
        __builtin_cpu_init();
        chosen = (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") && !getenv("PQ_NO_AVX2"))
                     ? &k_avx2
                     : &k_base;
    }
    return chosen;
#else
    return &k_base;
#endif
}

/* Instruction set the hot loops use ("avx2" or "sse2"; "sse2" also names the plain C build). */
const char *pq_simd(void) { return kern()->name; }

/* Public: the band (uint8 0/1) of an (h, w) uint16 code map (the numpy path uses it when built). */
int pq_band(const uint16_t *codes, int64_t h, int64_t w, int64_t d, uint8_t *out) {
    if (h < 2 * d + 1) {
        memset(out, 1, (size_t)(h * w));
        return PQ_OK;
    }
    const int64_t nw = (w + 63) >> 6;
    runs_t r = {(int32_t *)malloc((size_t)(h * (w + 1)) * sizeof(int32_t)),
                (uint16_t *)malloc((size_t)(h * (w + 1)) * sizeof(uint16_t)),
                (int64_t *)malloc((size_t)(h + 2) * sizeof(int64_t)), 0, NULL};
    uint64_t *words = (uint64_t *)malloc((size_t)(2 * (h - 1) * nw + 3 * nw + 2 * (w + 2)) * sizeof(uint64_t));
    int rc = PQ_STOP_MEMORY;
    if (r.pos && r.code && r.start && words) {
        for (int64_t y = 0; y < h; y++) {
            const uint16_t *c = codes + y * w;
            r.start[y] = r.n;
            for (int64_t x = 0; x < w; x++)
                if (!x || c[x] != c[x - 1]) runs_push(&r, x, c[x]);
            runs_push(&r, w, 0xFFFF);
        }
        r.start[h] = r.start[h + 1] = r.n;
        band_t b = {h, w, d, nw, words, words + (h - 1) * nw, words + 2 * (h - 1) * nw,
                    (int64_t *)(words + 2 * (h - 1) * nw + 3 * nw)};
        kern()->band_build(&b, &r);
        uint64_t *row = b.tmp + 2 * nw;
        for (int64_t y = 0; y < h; y++) {
            uint8_t *o = out + y * w;
            if (y < d || y + d > h - 1) {
                memset(o, 1, (size_t)w);
                continue;
            }
            kern()->band_row(&b, y, row);
            for (int64_t x = 0; x < w; x++) o[x] = (uint8_t)((row[x >> 6] >> (x & 63)) & 1);
        }
        rc = PQ_OK;
    }
    free(r.pos);
    free(r.code);
    free(r.start);
    free(words);
    return rc;
}

/* Erosion iterations: max(1, round(ratio * sqrt(h^2 + w^2))) with round-half-to-even (Python's round;
   nearbyint under the default rounding mode). */
int64_t pq_dilation_pixels(int64_t h, int64_t w, double ratio) {
    double diag = sqrt((double)(h * h + w * w));
    double d = nearbyint(ratio * diag);
    return d < 1 ? 1 : (int64_t)d;
}

/* ------------------------------------------------------------------ histograms for the numpy path */

/* hist[lut_g[g[i]] * cols + lut_p[p[i]]] += 1 for i < n (every id < the table length). */
void pq_joint_histogram(const uint32_t *g, const uint32_t *p, int64_t n, const uint16_t *lut_g,
                        const uint16_t *lut_p, int64_t cols, int64_t *hist) {
    for (int64_t i = 0, j; i < n; i = j) {
        j = run_end_u32_base(g, p, i + 1, n, g[i], p[i]);
        hist[(int64_t)lut_g[g[i]] * cols + lut_p[p[i]]] += j - i;
    }
}

/* Joint histogram of two boundary code maps built on the fly: a segment pixel (code 1..n) off the
   band takes the interior code n + 2; n = 0 means the map already is a boundary code map. */
void pq_boundary_histogram(const uint16_t *gc, const uint8_t *gb, int64_t gn, const uint16_t *pc, const uint8_t *pb,
                           int64_t pn, int64_t npx, int64_t cols, int64_t *hist) {
    for (int64_t i = 0; i < npx; i++) {
        int64_t g = gc[i], p = pc[i];
        if (!gb[i] && g >= 1 && g <= gn) g = gn + 2;
        if (!pb[i] && p >= 1 && p <= pn) p = pn + 2;
        hist[g * cols + p]++;
    }
}

/* ------------------------------------------------------------------ single PNG decode */

/* (h, w, bpp, supported) of a PNG in memory; supported = 1 for 8-bit RGB/RGBA non-interlaced. */
int pq_png_info(const uint8_t *data, int64_t n, int64_t *info) {
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    info[0] = info[1] = info[2] = info[3] = 0;
    if (n < 33 || memcmp(data, sig, 8) != 0 || memcmp(data + 12, "IHDR", 4) != 0) return PQ_STOP_PNG;
    info[1] = be32(data + 16);
    info[0] = be32(data + 20);
    int depth = data[24], color = data[25], interlace = data[28];
    info[2] = color == 2 ? 3 : (color == 6 ? 4 : 0);
    info[3] = depth == 8 && info[2] && interlace == 0;
    return PQ_OK;
}


/* Row-by-row decoder state of one image: two rows of ids, each with a 0 before it (row[-1], up[-1]:
   the left neighbours of x = 0 read 0 as the PNG filters require) and PAD spare elements after it. */
typedef struct {
    png_t png;
    uint32_t *base;  /* 2 * (1 + w + PAD) ids */
    uint32_t *zero;  /* 1 + w + PAD zeros: the row above the first row */
    int64_t stride, n;
    int (*unfilter)(int, const uint8_t *, int64_t, int, const uint32_t *, uint32_t *);
} rowdec_t;

static int rowdec_init(pq_ctx *c, int k, const png_t *png, rowdec_t *d) {
    d->png = *png;
    d->stride = png->w * png->bpp + 1;
    d->n = png->w + 1 + PAD;
    d->unfilter = kern()->unfilter_row;
    size_t n = (size_t)d->n;
    if (!reserve(&c->rows[k], 2 * n * sizeof(uint32_t)) || !reserve(&c->zero_row, n * sizeof(uint32_t)))
        return PQ_STOP_MEMORY;
    d->base = (uint32_t *)c->rows[k].p;
    d->zero = (uint32_t *)c->zero_row.p;
    memset(d->zero, 0, n * sizeof(uint32_t));
    d->base[0] = d->base[n] = 0;
    return PQ_OK;
}

/* Decode row y (rows must be decoded in order); returns the ids of the row or NULL (bad filter). */
static const uint32_t *rowdec_next(rowdec_t *d, int64_t y) {
    uint32_t *cur = d->base + (y & 1) * d->n + 1;
    const uint32_t *up = y ? d->base + ((y + 1) & 1) * d->n + 1 : d->zero + 1;
    const uint8_t *q = d->png.raw + y * d->stride;
    if (d->unfilter(q[0], q + 1, d->png.w, d->png.bpp, up, cur)) return NULL;
    return cur;
}

/* Decode an 8-bit RGB/RGBA PNG into out (h * w uint32 ids = R + 256 G + 65536 B). Returns PQ_OK, or
   PQ_STOP_PNG with detail[0] = 1 + the first row with an invalid filter type (0 otherwise). */
int pq_decode_ids(pq_ctx *c, const uint8_t *data, int64_t n, uint32_t *out, int64_t *detail) {
    png_t png;
    rowdec_t d;
    detail[0] = 0;
    int r = decode_container(c, data, (size_t)n, &c->idat[0], &c->raw[0], &png);
    if (r) return r;
    if ((r = rowdec_init(c, 0, &png, &d))) return r;
    for (int64_t y = 0; y < png.h; y++) {
        const uint32_t *row = rowdec_next(&d, y);
        if (!row) {
            detail[0] = y + 1;
            return PQ_STOP_PNG;
        }
        memcpy(out + y * png.w, row, (size_t)png.w * sizeof(uint32_t));
    }
    return PQ_OK;
}

/* ------------------------------------------------------------------ matching (pq.py: _accumulate) */

typedef struct {
    int64_t g, p;   /* 0-based segment indices */
    double iou;     /* mask IoU */
    double biou;    /* min(mask IoU, boundary IoU) */
} cand_t;

typedef struct {
    int64_t gid, pid;
    int64_t g, p;
    double iou;
} match_t;

static int cmp_match(const void *a, const void *b) {
    const match_t *x = (const match_t *)a, *y = (const match_t *)b;
    if (x->gid != y->gid) return x->gid < y->gid ? -1 : 1;
    if (x->pid != y->pid) return x->pid < y->pid ? -1 : 1;
    return 0;
}

typedef struct {
    int64_t ng, np;
    const int64_t *gid, *pid;
    const int32_t *gcat, *pcat;
    const uint8_t *gcrowd;
    const int64_t *hist; /* (ng + 2) x (np + 2) */
    int64_t cols;
    const int64_t *pred_area, *pred_void; /* (np,) */
    int all_crowd;
} image_t;

static inline int64_t inter_at(const image_t *im, int64_t g, int64_t p) { return im->hist[(g + 1) * im->cols + p + 1]; }

/* TP/FN/FP counting of one image given the candidates' IoU (which = 0: mask, 1: boundary).
   Mirrors _accumulate: matched pairs add their IoU in (GT id, predicted id) order. */
static int accumulate(const image_t *im, const cand_t *cand, int64_t ncand, int which, match_t *mbuf, uint8_t *gflag,
                      uint8_t *pflag, int64_t *tp, int64_t *fp, int64_t *fn, double *iou_sum) {
    int64_t nm = 0;
    for (int64_t k = 0; k < ncand; k++) {
        double v = which ? cand[k].biou : cand[k].iou;
        if (v > 0.5) {
            match_t *m = &mbuf[nm++];
            m->g = cand[k].g;
            m->p = cand[k].p;
            m->gid = im->gid[m->g];
            m->pid = im->pid[m->p];
            m->iou = v;
        }
    }
    if (nm > 1) qsort(mbuf, (size_t)nm, sizeof(match_t), cmp_match);
    memset(gflag, 0, (size_t)im->ng);
    memset(pflag, 0, (size_t)im->np);
    for (int64_t k = 0; k < nm; k++) {
        int32_t cat = im->gcat[mbuf[k].g];
        tp[cat] += 1;
        iou_sum[cat] += mbuf[k].iou;
        gflag[mbuf[k].g] = 1;
        pflag[mbuf[k].p] = 1;
    }
    for (int64_t g = 0; g < im->ng; g++)
        if (!gflag[g] && !im->gcrowd[g]) fn[im->gcat[g]] += 1;
    for (int64_t p = 0; p < im->np; p++) {
        if (pflag[p]) continue;
        int64_t ignored = im->pred_void[p];
        if (im->all_crowd) {
            for (int64_t g = 0; g < im->ng; g++)
                if (im->gcrowd[g] && im->gcat[g] == im->pcat[p]) ignored += inter_at(im, g, p);
        } else {
            /* one crowd region per category: the last in JSON order (dict overwrite upstream) */
            int64_t last = -1;
            for (int64_t g = 0; g < im->ng; g++)
                if (im->gcrowd[g] && im->gcat[g] == im->pcat[p]) last = g;
            if (last >= 0) ignored += inter_at(im, last, p);
        }
        if (!((double)ignored / (double)im->pred_area[p] > 0.5)) fp[im->pcat[p]] += 1;
    }
    return PQ_OK;
}

static inline double nan_min(double a, double b) {
    if (a != a || b != b) return NAN; /* np.minimum propagates NaN */
    return a < b ? a : b;
}

/* ------------------------------------------------------------------ batch scoring of files */

/* Score images i0..n-1 of a batch; stops before the first image it cannot score exactly.
 *
 * paths: 2n NUL-terminated paths (GT, prediction, GT, ...) at offsets path_off[2k], path_off[2k+1].
 * gt segments of image k: indices gstart[k]..gstart[k+1]-1 of gid, gcat (category index), gcrowd,
 * garea (JSON area, < 0: take the PNG count); predicted: pstart, pid, pcat.
 * opts: [boundary, all_crowd_regions, separate_boundary_label, boundary_id]; ratio: dilation ratio.
 * Counts are added into tp/fp/fn/iou (mask) and btp/bfp/bfn/biou (boundary) per category index.
 * Returns the index of the first image not scored (n when all were); status[0] = reason,
 * status[1] = detail. */
int64_t pq_score_files(pq_ctx *c, int64_t i0, int64_t n, const char *paths, const int64_t *path_off,
                       const int64_t *gstart, const int64_t *gid, const int32_t *gcat, const uint8_t *gcrowd,
                       const int64_t *garea, const int64_t *pstart, const int64_t *pid, const int32_t *pcat,
                       const int64_t *opts, double ratio, int64_t *tp, int64_t *fp, int64_t *fn, double *iou,
                       int64_t *btp, int64_t *bfp, int64_t *bfn, double *biou, int64_t *status) {
    const int boundary = (int)opts[0], all_crowd = (int)opts[1], separate = (int)opts[2];
    const int64_t boundary_id = opts[3];
    status[0] = status[1] = 0;
    for (int64_t k = i0; k < n; k++) {
        int r;
#define STOP(code)           \
    do {                     \
        status[0] = (code);  \
        return k;            \
    } while (0)
        const int64_t g0 = gstart[k], ng = gstart[k + 1] - g0, p0 = pstart[k], np = pstart[k + 1] - p0;
        const int64_t rows = ng + 2, cols = np + 2;
        if (ng > MAX_SEGMENTS || np > MAX_SEGMENTS || rows * cols > MAX_BINS) STOP(PQ_STOP_SEGMENTS);
        if (boundary && !separate) {
            for (int64_t i = 0; i < ng; i++)
                if (gid[g0 + i] == boundary_id) STOP(PQ_STOP_BOUNDARY_ID);
            for (int64_t i = 0; i < np; i++)
                if (pid[p0 + i] == boundary_id) STOP(PQ_STOP_BOUNDARY_ID);
        }
        if ((r = idmap_build(&c->map[0], gid + g0, ng, (uint16_t)(ng + 1)))) STOP(r);
        if ((r = idmap_build(&c->map[1], pid + p0, np, (uint16_t)(np + 1)))) STOP(r);

        png_t png[2];
        for (int s = 0; s < 2; s++) {
            size_t len = 0;
            if ((r = read_file(paths + path_off[2 * k + s], &c->file[s], &len))) STOP(r);
            if ((r = decode_container(c, c->file[s].p, len, &c->idat[s], &c->raw[s], &png[s]))) STOP(r);
        }
        if (png[0].h != png[1].h || png[0].w != png[1].w) STOP(PQ_STOP_SIZE);
        const int64_t h = png[0].h, w = png[0].w;

        if (!reserve(&c->hist, (size_t)(rows * cols) * sizeof(int64_t))) STOP(PQ_STOP_MEMORY);
        int64_t *hist = (int64_t *)c->hist.p;
        memset(hist, 0, (size_t)(rows * cols) * sizeof(int64_t));
        const kernels_t *K = kern();
        rowdec_t dec[2];
        for (int s = 0; s < 2; s++)
            if ((r = rowdec_init(c, s, &png[s], &dec[s]))) STOP(r);
        uint32_t memo[4] = {0xFFFFFFFFu, 0, 0xFFFFFFFFu, 0};
        runs_t runs[3] = {{NULL, NULL, NULL, 0, NULL}, {NULL, NULL, NULL, 0, NULL}, {NULL, NULL, NULL, 0, NULL}};
        if (boundary) {
            for (int s = 0; s < 3; s++)
                if (!reserve(&c->run_start[s], (size_t)(h + 2) * sizeof(int64_t))) STOP(PQ_STOP_MEMORY);
        }
        for (int64_t y = 0; y < h; y++) {
            const uint32_t *gr = rowdec_next(&dec[0], y);
            const uint32_t *pr = rowdec_next(&dec[1], y);
            if (!gr || !pr) STOP(PQ_STOP_PNG);
            if (boundary) {
                for (int s = 0; s < 3; s++) {
                    if (!reserve(&c->run_pos[s], (size_t)(runs[s].n + w + 1) * sizeof(int32_t)) ||
                        !reserve(&c->run_code[s], (size_t)(runs[s].n + w + 1) * sizeof(uint16_t)))
                        STOP(PQ_STOP_MEMORY);
                    runs[s].pos = (int32_t *)c->run_pos[s].p;
                    runs[s].code = (uint16_t *)c->run_code[s].p;
                    runs[s].start = (int64_t *)c->run_start[s].p;
                    runs[s].start[y] = runs[s].n;
                }
                if (!reserve(&c->run_code2, (size_t)(runs[2].n + w + 1) * sizeof(uint16_t))) STOP(PQ_STOP_MEMORY);
                runs[2].code2 = (uint16_t *)c->run_code2.p;
                K->hist_row_ids(gr, pr, w, &c->map[0], &c->map[1], cols, hist, memo, &runs[0], &runs[1], &runs[2]);
            } else {
                K->hist_row_ids(gr, pr, w, &c->map[0], &c->map[1], cols, hist, memo, NULL, NULL, NULL);
            }
        }
        if (boundary)
            for (int s = 0; s < 3; s++) runs[s].start[h] = runs[s].start[h + 1] = runs[s].n;

        /* prediction checks (panopticapi raises KeyError for both) */
        for (int64_t i = 0; i < rows; i++)
            if (hist[i * cols]) STOP(PQ_STOP_UNLISTED);
        /* scratch: pred_area, pred_void (np), gt_area (ng), boundary areas (ng + np), flags, then the
           candidates and matches: at most one per non-zero histogram cell, so <= min(ng np, h w) */
        int64_t maxc = ng * np < h * w ? ng * np : h * w;
        size_t need = (size_t)(3 * np + 2 * ng) * sizeof(int64_t) + (size_t)(ng + np) + 16 +
                      (size_t)maxc * (sizeof(cand_t) + sizeof(match_t));
        if (!reserve(&c->work, need)) STOP(PQ_STOP_MEMORY);
        int64_t *pred_area = (int64_t *)c->work.p, *pred_void = pred_area + np, *gt_area = pred_void + np;
        int64_t *barea = gt_area + ng;
        uint8_t *gflag = (uint8_t *)(barea + ng + np), *pflag = gflag + ng;
        cand_t *cand = (cand_t *)(((uintptr_t)(pflag + np) + 15) & ~(uintptr_t)15);
        match_t *mbuf = (match_t *)(cand + maxc);
        for (int64_t p = 0; p < np; p++) {
            int64_t s = 0;
            for (int64_t i = 0; i < rows; i++) s += hist[i * cols + p + 1];
            if (s == 0) STOP(PQ_STOP_ABSENT);
            pred_area[p] = s;
        }
        int64_t void_row = ng + 1;
        for (int64_t g = 0; g < ng; g++)
            if (gid[g0 + g] == 0) {
                void_row = g + 1;
                break;
            }
        for (int64_t p = 0; p < np; p++) pred_void[p] = hist[void_row * cols + p + 1];
        for (int64_t g = 0; g < ng; g++) {
            int64_t a = garea[g0 + g];
            if (a < 0) {
                a = 0;
                for (int64_t j = 0; j < cols; j++) a += hist[(g + 1) * cols + j];
            }
            gt_area[g] = a;
        }

        /* candidates in np.nonzero order (row-major over GT x prediction) */
        int64_t ncand = 0;
        for (int64_t g = 0; g < ng; g++) {
            if (gcrowd[g0 + g]) continue;
            for (int64_t p = 0; p < np; p++) {
                int64_t inter = hist[(g + 1) * cols + p + 1];
                if (!inter || gcat[g0 + g] != pcat[p0 + p]) continue;
                cand_t *cd = &cand[ncand++];
                cd->g = g;
                cd->p = p;
                cd->iou = (double)inter / (double)(pred_area[p] + gt_area[g] - inter - pred_void[p]);
                cd->biou = cd->iou;
            }
        }

        if (boundary) {
            const int64_t brows = ng + 3, bcols = np + 3;
            const int64_t d = pq_dilation_pixels(h, w, ratio);
            if (!reserve(&c->bhist, (size_t)(brows * bcols) * sizeof(int64_t))) STOP(PQ_STOP_MEMORY);
            int64_t *bh = (int64_t *)c->bhist.p;
            memset(bh, 0, (size_t)(brows * bcols) * sizeof(int64_t));
            const int64_t nw = (w + 63) >> 6;
            band_t band[2];
            const band_t *bands[2] = {NULL, NULL};
            if (h >= 2 * d + 1) {
                for (int s = 0; s < 2; s++) {
                    /* pre, suf: 2 (h - 1) nw words; tmp: 2 nw (+ nw spare); longs: 2 (w + 2) int64 */
                    if (!reserve(&c->band[s], (size_t)(2 * (h - 1) * nw + 3 * nw + 2 * (w + 2)) * sizeof(uint64_t)))
                        STOP(PQ_STOP_MEMORY);
                    uint64_t *words = (uint64_t *)c->band[s].p;
                    band_t b = {h, w, d, nw, words, words + (h - 1) * nw, words + 2 * (h - 1) * nw,
                    (int64_t *)(words + 2 * (h - 1) * nw + 3 * nw)};
                    band[s] = b;
                    K->band_build(&band[s], &runs[s]);
                    bands[s] = &band[s];
                }
            }
            size_t work = (size_t)(2 * (nw + 1)) * sizeof(uint64_t) + (size_t)(3 * (nw + 1)) * sizeof(int32_t);
            if (!reserve(&c->bwork, work)) STOP(PQ_STOP_MEMORY);
            uint64_t *mg = (uint64_t *)c->bwork.p, *mp = mg + nw + 1;
            K->boundary_hist(bands[0], bands[1], &runs[2], h, w, d, ng, np, bcols, bh, mg, mp,
                             (int32_t *)(mp + nw + 1));
            /* boundary areas: row / column sums of the boundary histogram */
            int64_t *g_barea = barea, *p_barea = barea + ng;
            for (int64_t g = 0; g < ng; g++) {
                int64_t s = 0;
                for (int64_t j = 0; j < bcols; j++) s += bh[(g + 1) * bcols + j];
                g_barea[g] = s;
            }
            for (int64_t p = 0; p < np; p++) {
                int64_t s = 0;
                for (int64_t i = 0; i < brows; i++) s += bh[i * bcols + p + 1];
                p_barea[p] = s;
            }
            for (int64_t k2 = 0; k2 < ncand; k2++) {
                int64_t g = cand[k2].g, p = cand[k2].p;
                int64_t b_inter = bh[(g + 1) * bcols + p + 1], b_void = bh[void_row * bcols + p + 1];
                double bi = (double)b_inter / (double)(p_barea[p] + g_barea[g] - b_inter - b_void);
                cand[k2].biou = nan_min(cand[k2].iou, bi);
            }
        }

        image_t im = {ng, np, gid + g0, pid + p0, gcat + g0, pcat + p0, gcrowd + g0, hist, cols, pred_area, pred_void,
                      all_crowd};
        accumulate(&im, cand, ncand, 0, mbuf, gflag, pflag, tp, fp, fn, iou);
        if (boundary) accumulate(&im, cand, ncand, 1, mbuf, gflag, pflag, btp, bfp, bfn, biou);
#undef STOP
    }
    return n;
}
