/* kernels_cpu.c -- one whole CPU decode step (fp32) and the sampler, for rollout.FastDecoder and rollout.sample.
 *
 * On a CPU with a small decode batch, the GEMMs of a step are bound by reading the weights and everything else by
 * per-op overhead: the ~740 small PyTorch calls of a tiny-shape step cost more than its GEMMs. decode_step()
 * computes the step in one call: the GEMMs through MKL's packed sgemm, the rest as the C loops below; prefill()
 * runs the prompts of an admission the same way (plain sgemm on the model's own matrices: a packed matrix fits one
 * row count only). Built with
 * the system C compiler on first use by kernels_cpu.py; the PyTorch ops they replace (rollout.FastDecoder's torch
 * path, rollout.sample) are the specification, and tests/test_kernels_cpu.py checks them against it.
 *
 * Layouts (all contiguous, row-major, fp32 unless said):
 *   x, h    (B, H)                          residual stream and its normalised copy
 *   qkv     (B, (nh + 2 nkv) D)             the q|k|v GEMM's output, bias included
 *   kc, vc  (slots, nkv, S, D)              one layer's K and V cache
 *   slot    (B,) int64 or NULL              the cache slot of row b's token (NULL: slot b, as in a decode step)
 *   pos     (B,) int64                      position of row b's token; it attends to [0, pos[b]] of its slot
 *   cos,sin (>= max pos + 1, D)             RoPE tables, sin sign-folded: (-sin, sin) (rotate-half layout)
 *   o       (B, nh D)                       attention output
 * `omp simd reduction` lets the compiler vectorise sums: like any SIMD kernel they then add in another order than
 * a sequential loop, so results agree with PyTorch to fp32 rounding, not bit for bit. `omp parallel for` splits
 * attention heads and sampled rows over torch's own OpenMP threads (the same libgomp, already loaded).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif

/* exp(x) in a form the compiler can vectorise (libm's expf is a scalar call; the softmax and SiLU of a
 * tiny-shape step make ~50,000 of them). exp(x) = 2^n * 2^f with n = round(x log2 e), |f| <= 1/2, 2^f from its
 * degree-6 Taylor polynomial in f ln 2 (relative error < 2e-7, about 2 ulp). Above 88 it returns +inf (a little
 * before the float limit, 88.72), below -87 about 2^-126 instead of a smaller value: no softmax weight (x <= 0)
 * or SiLU can tell either apart. */
static inline float exp_f32(float x) {
    const float big = x > 88.0f ? INFINITY : 1.0f;
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    const float n = rintf(x * 1.44269504f);          /* round to nearest: one instruction */
    const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  /* x - n ln 2, ln 2 split in two for accuracy */
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;                /* 2^n as a float's exponent field */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale * big;
}

/* h = x / sqrt(mean(x^2) + eps) * w over one row of n */
static void norm_row(const float *x, const float *w, float *h, int64_t n, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) h[i] = x[i] * r * w[i];
}

/* Rows over threads only where there are many (a prefill's): a decode step's few rows would pay for an OpenMP
 * region per call, even a one-thread one */
#define MANY_ROWS(rows, threads) ((threads) > 1 && (rows) >= 64)

/* h = RMSNorm(x) * w, row by row */
void rms_norm_rows(const float *x, const float *w, float *h, int64_t rows, int64_t n, float eps, int threads) {
    if (MANY_ROWS(rows, threads)) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < rows; b++) norm_row(x + b * n, w, h + b * n, n, eps);
    } else {
        for (int64_t b = 0; b < rows; b++) norm_row(x + b * n, w, h + b * n, n, eps);
    }
}

/* one row of silu_mul: g, u (inter) -> out (inter) */
static void silu_row(const float *g, const float *u, float *out, int64_t inter) {
    #pragma omp simd
    for (int64_t i = 0; i < inter; i++) out[i] = g[i] / (1.0f + exp_f32(-g[i])) * u[i];
}

/* gu (B, 2I) = gate | up  ->  out (B, I) = silu(gate) * up */
void silu_mul(const float *gu, float *out, int64_t rows, int64_t inter, int threads) {
    if (MANY_ROWS(rows, threads)) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < rows; b++)
            silu_row(gu + 2 * b * inter, gu + (2 * b + 1) * inter, out + b * inter, inter);
    } else {
        for (int64_t b = 0; b < rows; b++)
            silu_row(gu + 2 * b * inter, gu + (2 * b + 1) * inter, out + b * inter, inter);
    }
}

/* RoPE of one head in place: x*cos + rotate_half(x)*sin', rotate_half(x) = (x[D/2:], x[:D/2]) */
static void rope_head(float *x, const float *c, const float *s, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * c[i] + b * s[i];
        x[i + half] = b * c[i + half] + a * s[i + half];
    }
}

/* softmax(q k^T * scale) v for one query head over n cached rows: q (D), kb/vb (n, D), out (D); sc: n floats.
 * Always inlined into calls with a constant d, so the compiler unrolls the loops over d and keeps the output
 * accumulator in registers. */
static inline __attribute__((always_inline)) void attend_head(const float *q, const float *kb, const float *vb,
                                                              float *out, float *sc, int64_t n, int64_t d,
                                                              float scale) {
    float m = -INFINITY, sum = 0.0f, acc[256];
    for (int64_t t = 0; t < n; t++) {
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < d; i++) dot += q[i] * kb[t * d + i];
        sc[t] = dot * scale;
        m = sc[t] > m ? sc[t] : m;
    }
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; t++) {
        sc[t] = exp_f32(sc[t] - m);
        sum += sc[t];
    }
    for (int64_t i = 0; i < d; i++) acc[i] = 0.0f;
    for (int64_t t = 0; t < n; t++)
        for (int64_t i = 0; i < d; i++) acc[i] += sc[t] * vb[t * d + i];
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < d; i++) out[i] = acc[i] * inv;
}

/* One layer's attention: optional per-head q/k RMSNorm (Qwen3, qk_norm (nh + nkv, D) or NULL), RoPE of q and k,
 * every row's K and V written into its slot of the cache at pos[b], then softmax(q k^T / sqrt(D)) v over
 * [0, pos[b]] of that slot for every query head, whose kv head is head / (nh / nkv) (GQA). All rows write before
 * any attends, so the rows of a prompt (one slot, positions 0..P-1) attend causally to each other. qkv is
 * modified (q and k roped in place). scores: threads * s_max floats. Head dims up to 256. */
static void attention(float *qkv, const float *qk_norm, float eps, const float *cos_t, const float *sin_t,
                      const int64_t *slot, const int64_t *pos, float *kc, float *vc, float *o, float *scores,
                      int64_t rows, int64_t nh, int64_t nkv, int64_t d, int64_t s_max, int threads) {
    const int64_t width = (nh + 2 * nkv) * d, group = nh / nkv;
    const float scale = 1.0f / sqrtf((float)d);
    for (int64_t b = 0; b < rows; b++) {
        const int64_t sl = slot ? slot[b] : b;
        float *q = qkv + b * width, *k = q + nh * d, *v = k + nkv * d;
        const int64_t p = pos[b];
        const float *c = cos_t + p * d, *s = sin_t + p * d;
        for (int64_t j = 0; j < nh + nkv; j++) {  /* q heads, then k heads: contiguous in qkv */
            float *x = q + j * d;
            if (qk_norm) norm_row(x, qk_norm + j * d, x, d, eps);
            rope_head(x, c, s, d);
        }
        for (int64_t j = 0; j < nkv; j++) {
            memcpy(kc + ((sl * nkv + j) * s_max + p) * d, k + j * d, d * sizeof(float));
            memcpy(vc + ((sl * nkv + j) * s_max + p) * d, v + j * d, d * sizeof(float));
        }
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && rows * nh >= 4 * threads)
    for (int64_t bh = 0; bh < rows * nh; bh++) {
        const int64_t b = bh / nh, hq = bh % nh, n = pos[b] + 1;
        const float *qh = qkv + b * width + hq * d;
        const size_t off = (size_t)((slot ? slot[b] : b) * nkv + hq / group) * s_max * d;
        float *out = o + bh * d, *sc = scores + (int64_t)omp_get_thread_num() * s_max;
        switch (d) {  /* the usual head sizes get loops unrolled for them */
        case 32: attend_head(qh, kc + off, vc + off, out, sc, n, 32, scale); break;
        case 64: attend_head(qh, kc + off, vc + off, out, sc, n, 64, scale); break;
        case 128: attend_head(qh, kc + off, vc + off, out, sc, n, 128, scale); break;
        default: attend_head(qh, kc + off, vc + off, out, sc, n, d, scale);
        }
    }
}

/* Sampling from softmax(logits / T) by inverse CDF, as rollout.sample does without top-k/top-p: z = logits / T,
 * p = exp(z - max) / sum (fp32), cdf = cumsum(p) in fp64, token = the first index whose cdf exceeds
 * u * cdf[V-1] (u in [0, 1) from the caller's seeded generator), logprob = z[token] - logsumexp(z). The cumsum is
 * two-level (blocks of 64 summed with SIMD, then a sequential scan inside the block that holds the target), so
 * it rounds differently from a sequential one; a token of probability 0 is still never drawn, since the running
 * sum only crosses the target where a positive term is added. Rows are split over `threads` OpenMP threads;
 * scratch: threads * sample_scratch_floats(vocab) floats. */
enum { SAMPLE_BLOCK = 64 };

int64_t sample_scratch_floats(int64_t vocab) { return vocab + 2 + 2 * ((vocab + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK); }

void sample_rows(const float *logits, int64_t rows, int64_t vocab, float temperature, const double *u,
                 int64_t *tokens, float *logprobs, float *scratch, int threads) {
    const int64_t nblk = (vocab + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && rows > 1)
    for (int64_t b = 0; b < rows; b++) {
        float *p = scratch + (int64_t)omp_get_thread_num() * sample_scratch_floats(vocab);
        double *block_sum = (double *)(p + vocab + (vocab & 1));       /* 8-byte aligned after p */
        const float *l = logits + b * vocab;
        float m = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : m)
        for (int64_t i = 0; i < vocab; i++) {
            p[i] = l[i] / temperature;
            m = p[i] > m ? p[i] : m;
        }
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < vocab; i++) {
            p[i] = exp_f32(p[i] - m);
            sum += p[i];
        }
        const float inv = 1.0f / sum;
        double total = 0.0;
        for (int64_t k = 0; k < nblk; k++) {
            const int64_t lo = k * SAMPLE_BLOCK, hi = lo + SAMPLE_BLOCK < vocab ? lo + SAMPLE_BLOCK : vocab;
            double bs = 0.0;
#pragma omp simd reduction(+ : bs)
            for (int64_t i = lo; i < hi; i++) {
                p[i] *= inv;
                bs += p[i];
            }
            block_sum[k] = bs;
            total += bs;
        }
        const double target = u[b] * total;
        int64_t tok = vocab - 1;                                       /* no mass at all (NaN logits): the last */
        double cdf = 0.0;
        for (int64_t k = 0; k < nblk; k++) {
            if (cdf + block_sum[k] <= target) {
                cdf += block_sum[k];
                continue;
            }
            const int64_t lo = k * SAMPLE_BLOCK, hi = lo + SAMPLE_BLOCK < vocab ? lo + SAMPLE_BLOCK : vocab;
            tok = -1;
            for (int64_t i = lo; i < hi && tok < 0; i++) {
                cdf += p[i];
                if (cdf > target) tok = i;
            }
            /* the block's SIMD sum crossed the target but the sequential one did not (rounding): its last token
             * of positive probability, which exists because the block's sum is positive */
            for (int64_t i = hi - 1; tok < 0; i--)
                if (p[i] > 0.0f) tok = i;
            break;
        }
        tokens[b] = tok;
        logprobs[b] = l[tok] / temperature - (m + logf(sum));
    }
}

/* ---- a whole decode step, and a prefill ------------------------------------------------------------------ */

/* MKL's cblas_sgemm_compute and Fortran sgemm (LP64; libtorch_cpu exports no cblas_sgemm), taken from the MKL
 * inside libtorch_cpu by kernels_cpu.py. The first: C = A op(B) + beta C with B packed by cblas_sgemm_pack(RowMajor,
 * BMatrix, Trans, M, N, K, 1, W, K, ...) (kernels_cpu.pack_weight). The second is column-major, arguments by
 * reference. */
typedef void (*sgemm_compute_fn)(int layout, int transa, int transb, int m, int n, int k, const float *a, int lda,
                                 const float *b, int ldb, float beta, float *c, int ldc);
typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);
static sgemm_compute_fn sgemm_compute;
static sgemm_fn sgemm;
void set_sgemm(void *compute, void *plain) {
    sgemm_compute = (sgemm_compute_fn)compute;
    sgemm = (sgemm_fn)plain;
}

enum { ROW_MAJOR = 101, NO_TRANS = 111, PACKED = 151 };

/* y (rows, n), rows ldy apart, = x (rows, k) W^T + beta y, W (n, k): packed for `rows` rows (decode_step), or
 * plain (prefill) */
static void matmul(const float *x, const float *w, int packed, float *y, int64_t rows, int64_t n, int64_t k,
                   int64_t ldy, float beta) {
    if (packed) {
        sgemm_compute(ROW_MAJOR, NO_TRANS, PACKED, (int)rows, (int)n, (int)k, x, (int)k, w, (int)k, beta, y,
                      (int)ldy);
    } else {  /* column-major: y^T (n, rows) = W (read as its transpose, (k, n) column-major) x^T */
        const int m_ = (int)n, n_ = (int)rows, k_ = (int)k, ld = (int)ldy;
        const float one = 1.0f;
        sgemm("T", "N", &m_, &n_, &k_, &one, w, &k_, x, &k_, &beta, y, &ld);
    }
}

static void add_bias(float *y, const float *bias, int64_t rows, int64_t n) {
    if (bias)
        for (int64_t b = 0; b < rows; b++)
            for (int64_t i = 0; i < n; i++) y[b * n + i] += bias[i];
}

/* per layer: ln1, w_qkv, b_qkv, qk_norm, w_o, b_o, ln2, w_gu, w_down (NULL where a model has none); the matrices
 * packed for decode_step's row count */
typedef struct { const float *p[9]; } layer_t;
/* per layer, the model's own (out, in) matrices for prefill: q, k, v, o, gate, up, down */
typedef struct { const float *p[7]; } plain_layer_t;

typedef struct {
    int64_t rows, hidden, inter, n_heads, n_kv_heads, head_dim, max_len, vocab, n_layers, slots;
    float eps;
    int threads;
} dims_t;

/* Scratch floats decode_step and prefill need for dm->rows rows */
int64_t scratch_floats(const dims_t *dm) {
    const int64_t width = (dm->n_heads + 2 * dm->n_kv_heads) * dm->head_dim;
    return dm->rows * (2 * dm->hidden + width + dm->n_heads * dm->head_dim + 3 * dm->inter) +
           (int64_t)(dm->threads > 1 ? dm->threads : 1) * dm->max_len;
}

/* Every index a forward follows, checked before any write: 0 when all are in range */
static int check_rows(const dims_t *dm, const int64_t *tokens, const int64_t *slot, const int64_t *pos) {
    for (int64_t b = 0; b < dm->rows; b++)
        if (tokens[b] < 0 || tokens[b] >= dm->vocab || pos[b] < 0 || pos[b] >= dm->max_len ||
            (slot && (slot[b] < 0 || slot[b] >= dm->slots)))
            return -1;
    return 0;
}

/* The layers of a forward over dm->rows tokens, from the embedding to the last layer's output, left in scratch's
 * first rows * hidden floats (x). plain == NULL: the matrices of `layers`, packed; else those of `plain`. */
static void layers_forward(const dims_t *dm, const layer_t *layers, const plain_layer_t *plain, const float *embed,
                           const int64_t *tokens, const int64_t *slot, const int64_t *pos, const float *cos_t,
                           const float *sin_t, float *kv, float *scratch) {
    const int64_t B = dm->rows, H = dm->hidden, I = dm->inter, nh = dm->n_heads, nkv = dm->n_kv_heads;
    const int64_t D = dm->head_dim, S = dm->max_len, width = (nh + 2 * nkv) * D;
    const int packed = plain == NULL, th = dm->threads;
    float *x = scratch, *h = x + B * H, *qkv = h + B * H, *o = qkv + B * width, *gu = o + B * nh * D;
    float *act = gu + B * 2 * I, *scores = act + B * I;
    for (int64_t b = 0; b < B; b++) memcpy(x + b * H, embed + tokens[b] * H, H * sizeof(float));
    const size_t layer_kv = (size_t)dm->slots * nkv * S * D;
    for (int64_t l = 0; l < dm->n_layers; l++) {
        const float *const *w = layers[l].p, *const *pw = packed ? NULL : plain[l].p;
        rms_norm_rows(x, w[0], h, B, H, dm->eps, th);
        if (packed) {
            matmul(h, w[1], 1, qkv, B, width, H, width, 0.0f);
        } else {                                    /* q | k | v side by side in qkv's rows */
            matmul(h, pw[0], 0, qkv, B, nh * D, H, width, 0.0f);
            matmul(h, pw[1], 0, qkv + nh * D, B, nkv * D, H, width, 0.0f);
            matmul(h, pw[2], 0, qkv + (nh + nkv) * D, B, nkv * D, H, width, 0.0f);
        }
        add_bias(qkv, w[2], B, width);
        float *kc = kv + 2 * l * layer_kv, *vc = kc + layer_kv;
        attention(qkv, w[3], dm->eps, cos_t, sin_t, slot, pos, kc, vc, o, scores, B, nh, nkv, D, S, th);
        matmul(o, packed ? w[4] : pw[3], packed, x, B, H, nh * D, H, 1.0f);   /* x += o W_o^T: residual in GEMM */
        add_bias(x, w[5], B, H);
        rms_norm_rows(x, w[6], h, B, H, dm->eps, th);
        if (packed) {
            matmul(h, w[7], 1, gu, B, 2 * I, H, 2 * I, 0.0f);
        } else {
            matmul(h, pw[4], 0, gu, B, I, H, 2 * I, 0.0f);
            matmul(h, pw[5], 0, gu + I, B, I, H, 2 * I, 0.0f);
        }
        silu_mul(gu, act, B, I, th);
        matmul(act, packed ? w[8] : pw[6], packed, x, B, H, I, H, 1.0f);      /* x += act W_down^T */
    }
}

/* One decode step of a Qwen2/Qwen3/Llama decoder, exactly rollout.FastDecoder.__call__ with packed weights:
 * tokens, pos (rows,) -> logits (rows, vocab); row b is slot b, and the K/V of its new token is written into kv
 * (layers, 2, slots, nkv, S, D). Returns -1, having written nothing, if a token is outside the vocabulary or a
 * position outside the cache. scratch: scratch_floats(dm) floats. */
int decode_step(const dims_t *dm, const layer_t *layers, const float *embed, const float *final_norm,
                const float *head, const int64_t *tokens, const int64_t *pos, const float *cos_t,
                const float *sin_t, float *kv, float *logits, float *scratch) {
    if (check_rows(dm, tokens, NULL, pos)) return -1;
    layers_forward(dm, layers, NULL, embed, tokens, NULL, pos, cos_t, sin_t, kv, scratch);
    float *x = scratch, *h = x + dm->rows * dm->hidden;
    rms_norm_rows(x, final_norm, h, dm->rows, dm->hidden, dm->eps, dm->threads);
    matmul(h, head, 1, logits, dm->rows, dm->vocab, dm->hidden, dm->vocab, 0.0f);
    return 0;
}

/* A prefill of packed prompts, model.forward's with the sampler's cache: row b is token tokens[b] at position
 * pos[b] of slot slot[b], a prompt's tokens at positions 0..P-1 of one slot. Writes every row's K/V into its
 * slot and returns the logits (n_last, vocab) of rows last[0..n_last-1] (each prompt's last token). The matrices
 * are `plain`'s (model weights, (out, in)) and head (vocab, hidden); norms, biases and qk norms `layers`'s.
 * Returns -1, having written nothing, if any index is out of range. scratch: scratch_floats(dm) floats. */
int prefill(const dims_t *dm, const layer_t *layers, const plain_layer_t *plain, const float *embed,
            const float *final_norm, const float *head, const int64_t *tokens, const int64_t *slot,
            const int64_t *pos, const int64_t *last, int64_t n_last, const float *cos_t, const float *sin_t,
            float *kv, float *logits, float *scratch) {
    if (check_rows(dm, tokens, slot, pos) || n_last > dm->rows) return -1;
    for (int64_t i = 0; i < n_last; i++)
        if (last[i] < 0 || last[i] >= dm->rows) return -1;
    layers_forward(dm, layers, plain, embed, tokens, slot, pos, cos_t, sin_t, kv, scratch);
    const int64_t H = dm->hidden;
    float *x = scratch, *h = x + dm->rows * H;                         /* h is free after the layers */
    for (int64_t i = 0; i < n_last; i++) memcpy(h + i * H, x + last[i] * H, H * sizeof(float));
    rms_norm_rows(h, final_norm, h, n_last, H, dm->eps, dm->threads);  /* in place: each row's sum comes first */
    matmul(h, head, 0, logits, n_last, dm->vocab, H, dm->vocab, 0.0f);
    return 0;
}
