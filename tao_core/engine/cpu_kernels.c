/* Native CPU kernels for the sampling engine's decode step (float32).
 *
 * Built on first use by tao_core/engine/native.py (cc -O3 -march=native -fopenmp, see there) and
 * called through ctypes with the data pointers of contiguous torch tensors. The OpenMP runtime is
 * the one torch already loaded (same soname), so these loops share torch's thread pool.
 *
 * tao_decode_attention_f32: one new query token per sequence attends over that sequence's cached
 * keys and values, read in place from the block KV cache (no gathered copy). Online softmax per
 * block (flash-decoding style): per (sequence, KV head) the G query heads that share the KV head
 * are processed together, so each cached block is read once per KV head. Sequences that share
 * prompt blocks (the n samples of one request) are adjacent in the batch, so a thread reads the
 * shared blocks from its own cache for all of them.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#define TAO_MAX_GROUP 16   /* query heads per KV head */
#define TAO_MAX_DIM 256    /* head dimension */
#define TAO_MAX_BLOCK 64   /* tokens per cache block */

int tao_limits(int64_t *out) {
    out[0] = TAO_MAX_GROUP;
    out[1] = TAO_MAX_DIM;
    out[2] = TAO_MAX_BLOCK;
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
    if (G > TAO_MAX_GROUP || D > TAO_MAX_DIM || bs > TAO_MAX_BLOCK) return -1;
    const int64_t tok = KVH * D;     /* floats from one token to the next inside a block */
    const int64_t blk = bs * tok;    /* floats per block */

#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < KVH; h++) {
            float qs[TAO_MAX_GROUP][TAO_MAX_DIM];
            float acc[TAO_MAX_GROUP][TAO_MAX_DIM];
            float s[TAO_MAX_GROUP][TAO_MAX_BLOCK];
            float m[TAO_MAX_GROUP], l[TAO_MAX_GROUP];
            const float *qb = q + (b * H + h * G) * D;
            for (int64_t g = 0; g < G; g++) {
                for (int64_t d = 0; d < D; d++) {
                    qs[g][d] = qb[g * D + d] * scale;
                    acc[g][d] = 0.0f;
                }
                m[g] = -FLT_MAX;
                l[g] = 0.0f;
            }
            const int64_t n = lens[b];
            const int64_t *row = table + b * max_blocks;
            for (int64_t start = 0, i = 0; start < n; start += bs, i++) {
                const int64_t cnt = n - start < bs ? n - start : bs;
                const float *kb = kc + row[i] * blk + h * D;
                const float *vb = vc + row[i] * blk + h * D;
                for (int64_t j = 0; j < cnt; j++) {
                    const float *kj = kb + j * tok;
                    for (int64_t g = 0; g < G; g++) {
                        float dot = 0.0f;
                        for (int64_t d = 0; d < D; d++) dot += qs[g][d] * kj[d];
                        s[g][j] = dot;
                    }
                }
                for (int64_t g = 0; g < G; g++) {
                    float mx = m[g];
                    for (int64_t j = 0; j < cnt; j++) mx = s[g][j] > mx ? s[g][j] : mx;
                    const float corr = expf(m[g] - mx);
                    float sum = 0.0f;
                    for (int64_t j = 0; j < cnt; j++) {
                        const float p = expf(s[g][j] - mx);
                        s[g][j] = p;
                        sum += p;
                    }
                    l[g] = l[g] * corr + sum;
                    m[g] = mx;
                    for (int64_t d = 0; d < D; d++) acc[g][d] *= corr;
                }
                for (int64_t j = 0; j < cnt; j++) {
                    const float *vj = vb + j * tok;
                    for (int64_t g = 0; g < G; g++) {
                        const float p = s[g][j];
                        for (int64_t d = 0; d < D; d++) acc[g][d] += p * vj[d];
                    }
                }
            }
            float *ob = out + (b * H + h * G) * D;
            for (int64_t g = 0; g < G; g++) {
                const float inv = 1.0f / l[g];
                for (int64_t d = 0; d < D; d++) ob[g * D + d] = acc[g][d] * inv;
            }
        }
    }
    return 0;
}
