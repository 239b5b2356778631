/* Native CPU kernels for the sampling engine's decode step (float32).
 *
 * Built on first use by tao_core/engine/native.py (cc -O3 -march=native -fopenmp, see there) and
 * called through ctypes with the data pointers of contiguous torch tensors. The OpenMP runtime is
 * the one torch already loaded (same soname), so these loops share torch's thread pool.
 *
 * tao_decode_attention_f32: one new query token per sequence attends over that sequence's cached
 * keys and values, read in place from the block KV cache (no gathered copy). Online softmax per
 * block (flash-decoding style): all query heads of a sequence are processed together, so each
 * cached block is streamed from memory once. Sequences that share prompt blocks (the n samples
 * of one request) are adjacent in the batch, so a thread reads the shared blocks from its own
 * cache for all of them.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#define TAO_MAX_GROUP 16   /* query heads per KV head */
#define TAO_MAX_DIM 256    /* head dimension */
#define TAO_MAX_BLOCK 64   /* tokens per cache block */
#define TAO_MAX_HEADS 64   /* query heads */
#define TAO_MAX_CHUNKS 8192 /* vocabulary chunks of the sampler's two-level draw */


#if defined(__AVX512F__)
#include <immintrin.h>
#define TAO_AVX512 1

/* Lane j of the result is the sum of the 16 lanes of v[j] (a transpose-and-add tree: 45 ops for
 * 16 dot products instead of 16 separate horizontal reductions). */
static inline __m512 tao_hsum16(const __m512 *v) {
    __m512 w[8], x[4];
    for (int i = 0; i < 8; i++)
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
        x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
    const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xDD));
}

/* out[j] = dot(qrow, k_j) for the cnt <= 16 keys k_j = kb + j * tok (lanes past cnt: 0);
 * nd = D / 16 vectors per row. */
static inline void tao_scores16(const float *qrow, const float *kb, int64_t tok, int64_t cnt, int64_t nd, float *out) {
    __m512 acc[16];
    for (int64_t j = 0; j < 16; j++) {
        if (j < cnt) {
            const float *kj = kb + j * tok;
            __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qrow), _mm512_loadu_ps(kj));
            for (int64_t c = 1; c < nd; c++) a = _mm512_fmadd_ps(_mm512_loadu_ps(qrow + 16 * c), _mm512_loadu_ps(kj + 16 * c), a);
            acc[j] = a;
        } else {
            acc[j] = _mm512_setzero_ps();
        }
    }
    _mm512_storeu_ps(out, tao_hsum16(acc));
}

/* acc += sum_j p[j] * v_j over cnt values v_j = vb + j * tok, with the ND accumulators in registers */
#define TAO_PV(ND)                                                                                   \
    static inline void tao_pv##ND(float *acc, const float *p, const float *vb, int64_t tok, int64_t cnt) { \
        __m512 a[ND];                                                                                \
        for (int c = 0; c < ND; c++) a[c] = _mm512_loadu_ps(acc + 16 * c);                           \
        for (int64_t j = 0; j < cnt; j++) {                                                          \
            const __m512 pj = _mm512_set1_ps(p[j]);                                                  \
            const float *vj = vb + j * tok;                                                          \
            for (int c = 0; c < ND; c++) a[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vj + 16 * c), a[c]); \
        }                                                                                            \
        for (int c = 0; c < ND; c++) _mm512_storeu_ps(acc + 16 * c, a[c]);                           \
    }
TAO_PV(4)
TAO_PV(8)
#endif

int tao_limits(int64_t *out) {
    out[0] = TAO_MAX_GROUP;
    out[1] = TAO_MAX_DIM;
    out[2] = TAO_MAX_BLOCK;
    out[3] = TAO_MAX_HEADS;
    return 0;
}

/* q:     [B, H, D]                 the new tokens' queries (H = KVH * G)
 * kc,vc: [num_blocks, bs, KVH, D]  one layer of the cache
 * table: [B, max_blocks]           block ids of each sequence, in order
 * lens:  [B]                       context length of each sequence (new token included), >= 1
 * out:   [B, H, D]
 * Returns 0, or -1 when a shape is beyond the compiled limits (nothing is written then). */
int tao_decode_attention_f32(const float *q, const float *kc, const float *vc, const int64_t *table,
                             const int64_t *lens, float *out, int64_t B, int64_t H, int64_t KVH,
                             int64_t D, int64_t bs, int64_t max_blocks, float scale) {
    if (KVH <= 0 || H % KVH != 0) return -1;
    const int64_t G = H / KVH;
    if (G > TAO_MAX_GROUP || H > TAO_MAX_HEADS || D > TAO_MAX_DIM || bs > TAO_MAX_BLOCK) return -1;
    const int64_t tok = KVH * D;     /* floats from one token to the next inside a block */
    const int64_t blk = bs * tok;    /* floats per block */

    /* one sequence per iteration, all its heads together: each cached block (all KV heads of
     * bs tokens, contiguous) is streamed from memory once, front to back */
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        float qs[TAO_MAX_HEADS][TAO_MAX_DIM];
        float acc[TAO_MAX_HEADS][TAO_MAX_DIM];
        float s[TAO_MAX_HEADS][TAO_MAX_BLOCK];
        float m[TAO_MAX_HEADS], l[TAO_MAX_HEADS];
        const float *qb = q + b * H * D;
        for (int64_t r = 0; r < H; r++) {
            for (int64_t d = 0; d < D; d++) {
                qs[r][d] = qb[r * D + d] * scale;
                acc[r][d] = 0.0f;
            }
            m[r] = -FLT_MAX;
            l[r] = 0.0f;
        }
        const int64_t n = lens[b];
        const int64_t *row = table + b * max_blocks;
        for (int64_t start = 0, i = 0; start < n; start += bs, i++) {
            const int64_t cnt = n - start < bs ? n - start : bs;
            const float *kb = kc + row[i] * blk;
            const float *vb = vc + row[i] * blk;
            if (start + bs < n) { /* the next block is elsewhere in memory: fetch it during this one */
                const int64_t next = n - start - bs < bs ? n - start - bs : bs;
                const char *kn = (const char *)(kc + row[i + 1] * blk);
                const char *vn = (const char *)(vc + row[i + 1] * blk);
                for (int64_t off = 0; off < next * tok * 4; off += 64) {
                    __builtin_prefetch(kn + off);
                    __builtin_prefetch(vn + off);
                }
            }
#ifdef TAO_AVX512
            if (D % 16 == 0) {
                for (int64_t j0 = 0; j0 < cnt; j0 += 16)
                    for (int64_t r = 0; r < H; r++)
                        tao_scores16(qs[r], kb + j0 * tok + (r / G) * D, tok, cnt - j0 < 16 ? cnt - j0 : 16, D / 16, &s[r][j0]);
            } else
#endif
            for (int64_t j = 0; j < cnt; j++) /* query head r reads KV head r / G */
                for (int64_t r = 0; r < H; r++) {
                    const float *kj = kb + j * tok + (r / G) * D;
                    float dot = 0.0f;
                    for (int64_t d = 0; d < D; d++) dot += qs[r][d] * kj[d];
                    s[r][j] = dot;
                }
            for (int64_t r = 0; r < H; r++) {
                float mx = m[r];
                for (int64_t j = 0; j < cnt; j++) mx = s[r][j] > mx ? s[r][j] : mx;
                const float corr = expf(m[r] - mx);
                float sum = 0.0f;
                for (int64_t j = 0; j < cnt; j++) {
                    const float p = expf(s[r][j] - mx);
                    s[r][j] = p;
                    sum += p;
                }
                l[r] = l[r] * corr + sum;
                m[r] = mx;
                if (corr != 1.0f)
                    for (int64_t d = 0; d < D; d++) acc[r][d] *= corr;
            }
#ifdef TAO_AVX512
            if (D == 64 || D == 128) {
                for (int64_t r = 0; r < H; r++) {
                    if (D == 64) tao_pv4(acc[r], s[r], vb + (r / G) * D, tok, cnt);
                    else tao_pv8(acc[r], s[r], vb + (r / G) * D, tok, cnt);
                }
            } else
#endif
            for (int64_t r = 0; r < H; r++)
                for (int64_t j = 0; j < cnt; j++) {
                    const float *vj = vb + j * tok + (r / G) * D;
                    for (int64_t d = 0; d < D; d++) acc[r][d] += s[r][j] * vj[d];
                }
        }
        float *ob = out + b * H * D;
        for (int64_t r = 0; r < H; r++) {
            const float inv = 1.0f / l[r];
            for (int64_t d = 0; d < D; d++) ob[r * D + d] = acc[r][d] * inv;
        }
    }
    return 0;
}

/* h += delta (when delta is not NULL), then out = weight * h / sqrt(mean(h^2) + eps), per row of N.
 * The RMSNorm of Llama-family models, with the residual add before it fused in. */
int tao_add_rmsnorm_f32(float *h, const float *delta, const float *weight, float *out, int64_t T,
                        int64_t N, float eps) {
#pragma omp parallel for schedule(static) if (T * N >= 65536)
    for (int64_t t = 0; t < T; t++) {
        float *x = h + t * N;
        if (delta) {
            const float *dx = delta + t * N;
            for (int64_t i = 0; i < N; i++) x[i] += dx[i];
        }
        float ss = 0.0f;
        for (int64_t i = 0; i < N; i++) ss += x[i] * x[i];
        const float r = (float)(1.0 / sqrt((double)ss / (double)N + (double)eps));
        float *o = out + t * N;
        for (int64_t i = 0; i < N; i++) o[i] = weight[i] * (x[i] * r);
    }
    return 0;
}

/* Rotary embedding of q [T, H, D] and k [T, KVH, D] in place (x * cos + rotate_half(x) * sin with
 * cos, sin [T, D]), then k and v [T, KVH, D] written to the cache rows slots[t] of one layer's
 * kc, vc [slots, KVH, D]. */
int tao_rope_store_f32(float *q, float *k, const float *v, const float *cos_, const float *sin_,
                       const int64_t *slots, float *kc, float *vc, int64_t T, int64_t H, int64_t KVH,
                       int64_t D) {
    if (D % 2 != 0 || D > TAO_MAX_DIM) return -1;
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) if (T * (H + KVH) * D >= 65536)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_ + t * D, *s = sin_ + t * D;
        for (int64_t which = 0; which < 2; which++) {
            const int64_t heads = which == 0 ? H : KVH;
            float *base = (which == 0 ? q + t * H * D : k + t * KVH * D);
            for (int64_t hh = 0; hh < heads; hh++) {
                float *x = base + hh * D;
                float y[TAO_MAX_DIM];
                for (int64_t i = 0; i < half; i++) {
                    y[i] = x[i] * c[i] - x[i + half] * s[i];
                    y[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
                }
                for (int64_t i = 0; i < D; i++) x[i] = y[i];
            }
        }
        float *kd = kc + slots[t] * KVH * D, *vd = vc + slots[t] * KVH * D;
        const float *ks = k + t * KVH * D, *vs = v + t * KVH * D;
        for (int64_t i = 0; i < KVH * D; i++) {
            kd[i] = ks[i];
            vd[i] = vs[i];
        }
    }
    return 0;
}

/* gate = silu(gate) * up, elementwise over n values (the gated MLP of Llama-family models). */
int tao_silu_mul_f32(float *gate, const float *up, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= 131072)
    for (int64_t i = 0; i < n; i++) {
        const float x = gate[i];
        const float e = expf(-x < 88.0f ? -x : 88.0f);
        gate[i] = x / (1.0f + e) * up[i];
    }
    return 0;
}

/* Sample one token per row of logits z [B, V] at temperature 1 with no truncation, by inverse CDF
 * over softmax(z) in token-id order with the row's uniform u[b] (the engine's definition, see
 * sampler.py), without writing a [B, V] intermediate: pass 1 finds the row's max, pass 2 sums
 * exp(z - max) per chunk of `chunk` tokens, pass 3 walks the one chunk the draw falls in.
 * tokens[b] gets the token, logprobs[b] its log-probability z - max - log(sum). */
int tao_sample_f32(const float *z, const float *u, int64_t *tokens, float *logprobs, int64_t B,
                   int64_t V, int64_t chunk) {
    if (chunk <= 0 || V % chunk != 0 || V / chunk > TAO_MAX_CHUNKS) return -1;
    const int64_t nchunks = V / chunk;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        const float *x = z + b * V;
        float mx = -FLT_MAX;
        for (int64_t i = 0; i < V; i++) mx = x[i] > mx ? x[i] : mx;
        float sums[TAO_MAX_CHUNKS];
        double total = 0.0;
        for (int64_t c = 0; c < nchunks; c++) {
            float s = 0.0f;
            const float *xc = x + c * chunk;
            for (int64_t i = 0; i < chunk; i++) s += expf(xc[i] - mx);
            sums[c] = s;
            total += s;
        }
        /* the first chunk whose cumulative mass exceeds the target, never one of mass 0 */
        double target = (double)u[b] * total, before = 0.0;
        int64_t c = 0, last = 0;
        for (; c < nchunks; c++) {
            if (sums[c] > 0.0f) last = c;
            if (before + sums[c] > target && sums[c] > 0.0f) break;
            before += sums[c];
        }
        if (c == nchunks) { /* rounding left the target at the very end: the last chunk of mass */
            c = last;
            before = 0.0;
            for (int64_t k = 0; k < c; k++) before += sums[k];
            target = before + sums[c];
        }
        const float *xc = x + c * chunk;
        double run = before;
        int64_t tok = -1, lastpos = c * chunk;
        for (int64_t i = 0; i < chunk; i++) {
            const float p = expf(xc[i] - mx);
            if (p > 0.0f) {
                lastpos = c * chunk + i;
                run += p;
                if (run > target) {
                    tok = lastpos;
                    break;
                }
            }
        }
        if (tok < 0) tok = lastpos;
        tokens[b] = tok;
        logprobs[b] = (x[tok] - mx) - (float)log(total);
    }
    return 0;
}
