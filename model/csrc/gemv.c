/* One-row kernels for CPU decode, fp32: a matrix product y = W x (+ b), and a whole forward of
 * one decode token built on it.
 *
 * A decode step of one sequence multiplies one activation row by every weight matrix: it is bound
 * by reading the weights (GPT-2-small: 494 MB a token), and the arithmetic is one multiply-add
 * per weight. Each output is the dot product of one contiguous weight row with x, so the product
 * streams the matrix once, front to back, four rows at a time (x is loaded once per four rows and
 * stays in L1), with two accumulators per row to hide the FMA latency. The rows are split into
 * contiguous parts (static schedule) over the OpenMP threads of the process: built with
 * -fopenmp, this library needs libgomp.so.1, which the dynamic loader resolves to the copy torch
 * already loaded, so the kernels run on torch's own thread pool (model/cpu_gemv.py checks that).
 *
 * gptserve_forward1_f32 runs the network for one token (embedding, every block, the final
 * LayerNorm and the tied LM head) in one parallel region: PyTorch's eager forward pays ~15 calls
 * a block (LayerNorms, attention, GELU, residual adds, cache writes: ~4 ms of a ~22 ms
 * GPT-2-small step here), this pays a barrier between phases. The GELU and the residual add are
 * applied to each product's outputs as they are made; attention is split over heads.
 *
 * Built at run time by model/cpu_gemv.py with -O3 -mavx2 -mfma (loaded only on a CPU with both).
 * Measured against oneDNN's and MKL's one-row products in docs/BENCHMARKS.md ("One-row kernel and
 * huge pages").
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

static inline float dot_tail(const float *w, const float *x, int64_t from, int64_t cols) {
    float s = 0.0f;
    for (int64_t k = from; k < cols; k++) s += w[k] * x[k];
    return s;
}

enum epilogue { STORE, ADD, GELU_ERF, GELU_TANH };

/* y[r] from the dot product d of weight row r: plus the bias, then stored, added to y[r] (a
 * residual), or through GELU (exact, or GPT-2's tanh form) */
static inline void finish(float *y, const float *b, int64_t r, float d, enum epilogue e) {
    const float v = b ? d + b[r] : d;
    switch (e) {
    case STORE: y[r] = v; break;
    case ADD: y[r] += v; break;
    case GELU_ERF: y[r] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); break;
    case GELU_TANH:
        y[r] = 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
        break;
    }
}

/* The rows of y = W x (+ b) shared over the threads of the enclosing parallel region (an
 * orphaned work-sharing loop: every thread of the team must call it); ends with a barrier. */
static void gemv_part(const float *W, const float *x, const float *b, float *y, int64_t rows,
                      int64_t cols, enum epilogue e) {
    const int64_t blocks = rows / 4, vec = cols / 16 * 16, vec8 = cols / 8 * 8;
#pragma omp for schedule(static) nowait
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t r = blk * 4;
        const float *w0 = W + r * cols, *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        __m256 c0 = a0, c1 = a0, c2 = a0, c3 = a0;
        int64_t k = 0;
        for (; k < vec; k += 16) {
            const __m256 xa = _mm256_loadu_ps(x + k), xb = _mm256_loadu_ps(x + k + 8);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xa, a0);
            c0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k + 8), xb, c0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xa, a1);
            c1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k + 8), xb, c1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xa, a2);
            c2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k + 8), xb, c2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xa, a3);
            c3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k + 8), xb, c3);
        }
        for (; k < vec8; k += 8) {
            const __m256 xa = _mm256_loadu_ps(x + k);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xa, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xa, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xa, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xa, a3);
        }
        finish(y, b, r, hsum(_mm256_add_ps(a0, c0)) + dot_tail(w0, x, vec8, cols), e);
        finish(y, b, r + 1, hsum(_mm256_add_ps(a1, c1)) + dot_tail(w1, x, vec8, cols), e);
        finish(y, b, r + 2, hsum(_mm256_add_ps(a2, c2)) + dot_tail(w2, x, vec8, cols), e);
        finish(y, b, r + 3, hsum(_mm256_add_ps(a3, c3)) + dot_tail(w3, x, vec8, cols), e);
    }
#pragma omp single
    for (int64_t r = blocks * 4; r < rows; r++)  /* the last rows % 4 rows */
        finish(y, b, r, dot_tail(W + r * cols, x, 0, cols), e);
}

void gptserve_gemv_f32(const float *W, const float *x, const float *b, float *y,
                       int64_t rows, int64_t cols, int threads) {
#pragma omp parallel num_threads(threads)
    gemv_part(W, x, b, y, rows, cols, STORE);
}

/* LayerNorm of one row (biased variance, eps 1e-5, as torch), sums in double */
static void layer_norm(const float *x, const float *g, const float *b, float *out, int64_t n) {
    double sum = 0.0, sq = 0.0;
    for (int64_t i = 0; i < n; i++) sum += x[i];
    const double mean = sum / (double)n;
    for (int64_t i = 0; i < n; i++) sq += ((double)x[i] - mean) * ((double)x[i] - mean);
    const float m = (float)mean, inv = (float)(1.0 / sqrt(sq / (double)n + 1e-5));
    for (int64_t i = 0; i < n; i++) out[i] = (x[i] - m) * inv * g[i] + (b ? b[i] : 0.0f);
}

static inline float dot(const float *a, const float *b, int64_t n) {
    const int64_t vec8 = n / 8 * 8;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < vec8; k += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
    return hsum(acc) + dot_tail(a, b, vec8, n);
}

/* exp of eight floats (Cephes' single-precision polynomial, ~1 ulp), for softmax weights: x <= 0 */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)),
                      _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                                     _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* One query's attention over ``n`` keys of one head: softmax(q K^T / sqrt(hs)) V into o. The
 * keys and values are ``hs`` floats at ``keys + t * row`` and ``values + t * row``. ``s``: n
 * floats of scratch. Scores four keys at a time (four independent accumulators), exponentials
 * eight at a time, and the weighted sum of values 32 outputs at a time held in registers while
 * the keys stream past. */
static void attend_keys(const float *q, const float *keys, const float *values, int64_t row,
                        int64_t n, int64_t hs, float *s, float *o) {
    const int64_t hv = hs / 8 * 8;
    const float scale = 1.0f / sqrtf((float)hs);
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
        const float *k0 = keys + t * row, *k1 = k0 + row, *k2 = k1 + row, *k3 = k2 + row;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < hv; d += 8) {
            const __m256 qd = _mm256_loadu_ps(q + d);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(k0 + d), qd, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(k1 + d), qd, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(k2 + d), qd, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(k3 + d), qd, a3);
        }
        s[t] = (hsum(a0) + dot_tail(k0, q, hv, hs)) * scale;
        s[t + 1] = (hsum(a1) + dot_tail(k1, q, hv, hs)) * scale;
        s[t + 2] = (hsum(a2) + dot_tail(k2, q, hv, hs)) * scale;
        s[t + 3] = (hsum(a3) + dot_tail(k3, q, hv, hs)) * scale;
    }
    for (; t < n; t++) s[t] = dot(q, keys + t * row, hs) * scale;
    float top = s[0], sum = 0.0f;
    for (t = 1; t < n; t++) top = s[t] > top ? s[t] : top;
    __m256 sums = _mm256_setzero_ps();
    const __m256 tops = _mm256_set1_ps(top);
    for (t = 0; t + 8 <= n; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), tops));
        _mm256_storeu_ps(s + t, e);
        sums = _mm256_add_ps(sums, e);
    }
    sum = hsum(sums);
    for (; t < n; t++) {
        s[t] = expf(s[t] - top);
        sum += s[t];
    }
    const float inv = 1.0f / sum;
    int64_t d = 0;
    for (; d + 32 <= hv; d += 32) {
        __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
        for (t = 0; t < n; t++) {
            const float *v = values + t * row + d;
            const __m256 p = _mm256_set1_ps(s[t]);
            o0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v), o0);
            o1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8), o1);
            o2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 16), o2);
            o3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 24), o3);
        }
        const __m256 k = _mm256_set1_ps(inv);
        _mm256_storeu_ps(o + d, _mm256_mul_ps(o0, k));
        _mm256_storeu_ps(o + d + 8, _mm256_mul_ps(o1, k));
        _mm256_storeu_ps(o + d + 16, _mm256_mul_ps(o2, k));
        _mm256_storeu_ps(o + d + 24, _mm256_mul_ps(o3, k));
    }
    for (; d + 8 <= hv; d += 8) {
        __m256 o0 = _mm256_setzero_ps();
        for (t = 0; t < n; t++)
            o0 = _mm256_fmadd_ps(_mm256_set1_ps(s[t]), _mm256_loadu_ps(values + t * row + d), o0);
        _mm256_storeu_ps(o + d, _mm256_mul_ps(o0, _mm256_set1_ps(inv)));
    }
    for (; d < hs; d++) {
        float acc = 0.0f;
        for (t = 0; t < n; t++) acc += s[t] * values[t * row + d];
        o[d] = acc * inv;
    }
}

/* One head's attention for the token at ``pos``: its key and value (from qkv) written into the
 * slot's cache rows (``cache``: (max_len, 2, C), keys then values), then attend_keys over keys
 * 0..pos into att. ``s``: pos + 1 floats of scratch. */
static void attend(int64_t hd, int64_t hs, int64_t C, int64_t pos, const float *qkv,
                   float *cache, float *s, float *att) {
    const int64_t off = hd * hs, row = 2 * C;
    float *mine = cache + pos * row;
    memcpy(mine + off, qkv + C + off, hs * sizeof(float));
    memcpy(mine + C + off, qkv + 2 * C + off, hs * sizeof(float));
    attend_keys(qkv + off, cache + off, cache + C + off, row, pos + 1, hs, s, att + off);
}

/* Decode attention of ``rows`` queries (row r at q + r * q_stride, C floats) over one layer of
 * the cache (``kv``: (slots, max_len, 2, C)), row r reading slot ``slots[r]`` (NULL: slot r) and
 * its first ``lengths[slot]`` keys (NULL: ``length`` keys each), into out (rows, C). The
 * (row, head) pairs are split over the threads; ``scratch``: threads * max_len floats. */
void gptserve_attend_rows_f32(const float *q, int64_t q_stride, const float *kv, int64_t max_len,
                              const int64_t *slots, const int64_t *lengths, int64_t length,
                              int64_t rows, int64_t C, int64_t n_head, float *out,
                              float *scratch, int threads) {
    const int64_t hs = C / n_head, row = 2 * C;
#pragma omp parallel num_threads(threads)
    {
        float *s = scratch + (int64_t)omp_get_thread_num() * max_len;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows * n_head; i++) {
            const int64_t r = i / n_head, hd = i % n_head, slot = slots ? slots[r] : r;
            const float *base = kv + slot * max_len * row + hd * hs;
            attend_keys(q + r * q_stride + hd * hs, base, base + C, row,
                        lengths ? lengths[slot] : length, hs, s, out + r * C + hd * hs);
        }
    }
}

/* The logits (V) of one token at position ``pos`` of a sequence whose cache rows start at ``kv``
 * (layer l's at kv + l * layer_stride: (max_len, 2, C)); its keys and values are written there.
 * ``w``: wte (V, C), wpe, ln_f weight, ln_f bias, then per layer ln_1 weight, ln_1 bias, c_attn
 * weight, bias, attn c_proj weight, bias, ln_2 weight, bias, c_fc weight, bias, mlp c_proj
 * weight, bias (a bias may be NULL). ``scratch``: 10 C + n_head * (pos + 1) floats. */
void gptserve_forward1_f32(const float *const *w, int64_t n_layer, int64_t C, int64_t n_head,
                           int64_t V, int gelu_tanh, float *kv, int64_t layer_stride,
                           int64_t token, int64_t pos, float *scratch, float *logits,
                           int threads) {
    const int64_t hs = C / n_head;
    float *x = scratch, *xn = x + C, *qkv = xn + C, *att = qkv + 3 * C, *h = att + C;
    float *scores = h + 4 * C;  /* n_head * (pos + 1); h's 4 C end where it starts */
    const enum epilogue act = gelu_tanh ? GELU_TANH : GELU_ERF;
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
        for (int64_t c = 0; c < C; c++) x[c] = w[0][token * C + c] + w[1][pos * C + c];
        for (int64_t l = 0; l < n_layer; l++) {
            const float *const *p = w + 4 + 12 * l;
            float *cache = kv + l * layer_stride;
#pragma omp single
            layer_norm(x, p[0], p[1], xn, C);
            gemv_part(p[2], xn, p[3], qkv, 3 * C, C, STORE);
#pragma omp for schedule(static)
            for (int64_t hd = 0; hd < n_head; hd++)
                attend(hd, hs, C, pos, qkv, cache, scores + hd * (pos + 1), att);
            gemv_part(p[4], att, p[5], x, C, C, ADD);
#pragma omp single
            layer_norm(x, p[6], p[7], xn, C);
            gemv_part(p[8], xn, p[9], h, 4 * C, C, act);
            gemv_part(p[10], h, p[11], x, C, 4 * C, ADD);
        }
#pragma omp single
        layer_norm(x, w[2], w[3], xn, C);
        gemv_part(w[0], xn, NULL, logits, V, C, STORE);
    }
}
