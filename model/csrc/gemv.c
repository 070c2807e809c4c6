/* One-row matrix product for CPU decode: y = W x (+ b), fp32, W row-major (rows, cols).
 *
 * A decode step of one sequence multiplies one activation row by every weight matrix: it is bound
 * by reading the weights (GPT-2-small: 494 MB a token), and the arithmetic is one multiply-add
 * per weight. Each output is the dot product of one contiguous weight row with x, so the kernel
 * streams the matrix once, front to back, four rows at a time (x is loaded once per four rows and
 * stays in L1), with two accumulators per row to hide the FMA latency. The rows are split into
 * contiguous halves (static schedule) over the OpenMP threads of the process: built with
 * -fopenmp, this library needs libgomp.so.1, which the dynamic loader resolves to the copy torch
 * already loaded, so the kernel runs on torch's own thread pool (model/cpu_gemv.py checks that).
 *
 * Built at run time by model/cpu_gemv.py with -O3 -mavx2 -mfma (loaded only on a CPU with both).
 * Measured against oneDNN's and MKL's one-row products in docs/BENCHMARKS.md ("One-row kernel and huge pages").
 */
#include <immintrin.h>
#include <stdint.h>

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

void gptserve_gemv_f32(const float *W, const float *x, const float *b, float *y,
                       int64_t rows, int64_t cols, int threads) {
    const int64_t blocks = rows / 4, vec = cols / 16 * 16, vec8 = cols / 8 * 8;
#pragma omp parallel for schedule(static) num_threads(threads)
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
        y[r] = hsum(_mm256_add_ps(a0, c0)) + dot_tail(w0, x, vec8, cols);
        y[r + 1] = hsum(_mm256_add_ps(a1, c1)) + dot_tail(w1, x, vec8, cols);
        y[r + 2] = hsum(_mm256_add_ps(a2, c2)) + dot_tail(w2, x, vec8, cols);
        y[r + 3] = hsum(_mm256_add_ps(a3, c3)) + dot_tail(w3, x, vec8, cols);
        if (b) {
            y[r] += b[r]; y[r + 1] += b[r + 1]; y[r + 2] += b[r + 2]; y[r + 3] += b[r + 3];
        }
    }
    for (int64_t r = blocks * 4; r < rows; r++)  /* the last rows % 4 rows */
        y[r] = dot_tail(W + r * cols, x, 0, cols) + (b ? b[r] : 0.0f);
}
