/* Decode attention for AVX-512 CPUs, called from models/native.py (which compiles this file on first use).
 *
 * Why our own: a decode step attends one query per (row, head) over the whole KV cache, which should stream
 * the cache at the memory bandwidth. torch's CPU attention kernels (SDPA's flash and math kernels, matmul +
 * softmax) read an fp32 cache at a third to a half of it for one query, a bf16 one slower still
 * (bench/RESULTS.md, "Decode attention"); this loop reads each key and value row once (fp32 or bf16) and
 * keeps scores, softmax and weighted sum in fp32.
 *
 * Threads: OpenMP, the runtime torch uses (libgomp.so.1 is loaded once per process), with the thread count
 * passed in from torch.get_num_threads().
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__)
#define COGVLM_NATIVE 1
#else
#define COGVLM_NATIVE 0
#endif

/* 1 when this build has the kernel below (the CPU has AVX-512), else 0 and nothing else. */
int cogvlm_native_kernels(void) { return COGVLM_NATIVE; }

#if COGVLM_NATIVE

#define MAX_HEAD_DIM 256

/* exp(x) for x <= 0 (softmax after subtracting the maximum): Cody-Waite reduction to [-ln2/2, ln2/2] and
 * Cephes' degree-6 polynomial, about 1 ulp; exp(x) < 2^-126 (and -inf) gives 0. */
static inline __m512 exp_nonpositive(__m512 x) {
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

/* 16 cache elements from element `index` of `base` as floats: fp32, or bf16 (the high half of an fp32). */
static inline __attribute__((always_inline)) __m512 load16(const void *base, int64_t index, int bf16) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index))), 16));
    return _mm512_loadu_ps((const float *)base + index);
}

/* One (row, head): softmax(q . k_t * scale) over t < length with mask[t] != 0 (all if mask is NULL), then
 * the weighted sum of v_t. k/v rows are head_dim elements (fp32, or bf16 if `bf16`), `row_stride` elements
 * apart; scores: room for length floats. */
static inline __attribute__((always_inline)) void attend_one(const float *q, const void *k, const void *v,
                                                             int64_t row_stride, const uint8_t *mask, int64_t length,
                                                             int head_dim, float scale, float *scores, float *out,
                                                             int bf16) {
    const int chunks = head_dim / 16;
    __m512 query[MAX_HEAD_DIM / 16], acc[MAX_HEAD_DIM / 16];
    for (int c = 0; c < chunks; c++) {
        query[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), _mm512_set1_ps(scale));
        acc[c] = _mm512_setzero_ps();
    }
    float maximum = -INFINITY;
    for (int64_t t = 0; t < length; t++) {
        if (mask && !mask[t]) {
            scores[t] = -INFINITY;
            continue;
        }
        __m512 dot = _mm512_mul_ps(query[0], load16(k, t * row_stride, bf16));
        for (int c = 1; c < chunks; c++) dot = _mm512_fmadd_ps(query[c], load16(k, t * row_stride + 16 * c, bf16), dot);
        const float s = _mm512_reduce_add_ps(dot);
        scores[t] = s;
        maximum = s > maximum ? s : maximum;
    }
    if (maximum == -INFINITY) { /* no key to attend to: zeros */
        for (int c = 0; c < chunks; c++) _mm512_storeu_ps(out + 16 * c, acc[c]);
        return;
    }
    const __m512 shift = _mm512_set1_ps(maximum);
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < length; t += 16) {
        const __mmask16 part = length - t >= 16 ? 0xFFFF : (__mmask16)((1u << (length - t)) - 1);
        const __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(part, scores + t), shift));
        _mm512_mask_storeu_ps(scores + t, part, p);
        total = _mm512_add_ps(total, _mm512_maskz_mov_ps(part, p));
    }
    for (int64_t t = 0; t < length; t++) {
        if (scores[t] == 0.0f) continue; /* masked (or negligible) */
        const __m512 weight = _mm512_set1_ps(scores[t]);
        for (int c = 0; c < chunks; c++)
            acc[c] = _mm512_fmadd_ps(weight, load16(v, t * row_stride + 16 * c, bf16), acc[c]);
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int c = 0; c < chunks; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], inverse));
}

/* Attention of one query per (row, head) over an fp32 or (bf16 != 0) bf16 cache, in fp32.
 * q: (batch, heads, head_dim) fp32 at q_strides[0..1] elements; k, v: (batch, heads, length, head_dim) at
 * kv_strides[0..2] elements (last dimension contiguous); mask: NULL or (batch, length) bytes at mask_stride,
 * 0 = masked; out: (batch, heads, head_dim) fp32, contiguous. head_dim: a multiple of 16 up to MAX_HEAD_DIM. */
void cogvlm_decode_attention(const float *q, const int64_t *q_strides, const void *k, const void *v,
                             const int64_t *kv_strides, int bf16, const uint8_t *mask, int64_t mask_stride,
                             float *out, int64_t batch, int64_t heads, int64_t length, int head_dim, float scale,
                             int threads) {
    const int64_t element = bf16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    {
        float *scores = aligned_alloc(64, ((length + 15) / 16) * 64);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < batch * heads; i++) {
            const int64_t b = i / heads, h = i % heads, offset = (b * kv_strides[0] + h * kv_strides[1]) * element;
            const float *query = q + b * q_strides[0] + h * q_strides[1];
            const uint8_t *row_mask = mask ? mask + b * mask_stride : NULL;
            if (bf16)
                attend_one(query, (const char *)k + offset, (const char *)v + offset, kv_strides[2], row_mask, length,
                           head_dim, scale, scores, out + i * head_dim, 1);
            else
                attend_one(query, (const char *)k + offset, (const char *)v + offset, kv_strides[2], row_mask, length,
                           head_dim, scale, scores, out + i * head_dim, 0);
        }
        free(scores);
    }
}

#endif
