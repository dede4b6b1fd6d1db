/* Decode attention for x86 CPUs with AVX-512 or AVX2 + FMA, called from models/kernels/native.py (which compiles this
 * file on first use for the CPU it runs on).
 *
 * Why our own: a decode step attends one query per (row, head) over the whole KV cache, which should stream
 * the cache at the memory bandwidth. torch's CPU attention kernels (SDPA's flash and math kernels, matmul +
 * softmax) read an fp32 cache at a third to a half of it for one query, a bf16 one slower still
 * (bench/RESULTS.md, "Native decode attention"); this loop reads each key and value row once (fp32 or bf16)
 * and keeps scores, softmax and weighted sum in fp32.
 *
 * The kernel is written once over a few vector helpers (`vec`: 16 floats with AVX-512, 8 with AVX2).
 * Threads: OpenMP, the runtime torch uses (libgomp.so.1 is loaded once per process), with the thread count
 * passed in from torch.get_num_threads().
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vset1(float x) { return _mm512_set1_ps(x); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vload_bf16(const uint16_t *p) { /* bf16 is the high half of an fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline void vstore(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec vfmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vfnmadd(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }
static inline vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vpow2(vec n) { /* 2^n for whole n in [-126, 127] */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
static inline vec vzero_below(vec x, vec limit, vec value) { /* value where x >= limit, else 0 */
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, limit, _CMP_GE_OQ), value);
}
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vset1(float x) { return _mm256_set1_ps(x); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline void vstore(float *p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec vfmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vfnmadd(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }
static inline vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vpow2(vec n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline vec vzero_below(vec x, vec limit, vec value) {
    return _mm256_and_ps(_mm256_cmp_ps(x, limit, _CMP_GE_OQ), value);
}
static inline float vsum(vec v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_hadd_ps(half, half);
    return _mm_cvtss_f32(_mm_hadd_ps(half, half));
}
#endif

/* The vector width this build's kernel uses (16 or 8 floats), or 0 where the CPU has neither AVX-512 nor AVX2
 * with FMA (then nothing else is defined). */
#ifdef LANES
int cogvlm_native_kernels(void) { return LANES; }
#else
int cogvlm_native_kernels(void) { return 0; }
#endif

#ifdef LANES

#define MAX_HEAD_DIM 256

/* The largest head size the kernel takes (its registers hold one query). */
int cogvlm_max_head_dim(void) { return MAX_HEAD_DIM; }

/* exp(x) for x <= 0 (softmax after subtracting the maximum): Cody-Waite reduction to [-ln2/2, ln2/2] and
 * Cephes' degree-6 polynomial, about 1 ulp; exp(x) < 2^-125 (and -inf) gives 0. */
static inline vec exp_nonpositive(vec x) {
    const vec limit = vset1(-87.0f), clamped = vmax(x, limit);
    const vec n = vround(vmul(clamped, vset1(1.44269504088896341f)));
    vec f = vfnmadd(n, vset1(0.693359375f), clamped);
    f = vfnmadd(n, vset1(-2.12194440e-4f), f);
    vec p = vset1(1.9875691500e-4f);
    p = vfmadd(p, f, vset1(1.3981999507e-3f));
    p = vfmadd(p, f, vset1(8.3334519073e-3f));
    p = vfmadd(p, f, vset1(4.1665795894e-2f));
    p = vfmadd(p, f, vset1(1.6666665459e-1f));
    p = vfmadd(p, f, vset1(5.0000001201e-1f));
    p = vfmadd(p, vmul(f, f), vadd(f, vset1(1.0f)));
    return vzero_below(x, limit, vmul(p, vpow2(n)));
}

/* 16 or 8 cache elements at element `index` of `base` as floats: fp32, or bf16 if `bf16`. */
static inline __attribute__((always_inline)) vec load_cache(const void *base, int64_t index, int bf16) {
    return bf16 ? vload_bf16((const uint16_t *)base + index) : vload((const float *)base + index);
}

/* One (row, head): softmax(q . k_t * scale) over t < length with mask[t] != 0 (all if mask is NULL), then
 * the weighted sum of v_t. k/v rows are head_dim elements (fp32, or bf16 if `bf16`), `row_stride` elements
 * apart; scores: room for length floats rounded up to whole vectors. */
static inline __attribute__((always_inline)) void attend_one(const float *q, const void *k, const void *v,
                                                             int64_t row_stride, const uint8_t *mask, int64_t length,
                                                             int head_dim, float scale, float *scores, float *out,
                                                             int bf16) {
    const int chunks = head_dim / LANES;
    vec query[MAX_HEAD_DIM / LANES], acc[MAX_HEAD_DIM / LANES];
    for (int c = 0; c < chunks; c++) {
        query[c] = vmul(vload(q + LANES * c), vset1(scale));
        acc[c] = vzero();
    }
    float maximum = -INFINITY;
    for (int64_t t = 0; t < length; t++) {
        if (mask && !mask[t]) {
            scores[t] = -INFINITY;
            continue;
        }
        vec dot = vmul(query[0], load_cache(k, t * row_stride, bf16));
        for (int c = 1; c < chunks; c++) dot = vfmadd(query[c], load_cache(k, t * row_stride + LANES * c, bf16), dot);
        const float s = vsum(dot);
        scores[t] = s;
        maximum = s > maximum ? s : maximum;
    }
    if (maximum == -INFINITY) { /* no key to attend to: zeros */
        for (int c = 0; c < chunks; c++) vstore(out + LANES * c, acc[c]);
        return;
    }
    const int64_t padded = (length + LANES - 1) / LANES * LANES;
    for (int64_t t = length; t < padded; t++) scores[t] = -INFINITY; /* exp gives 0 */
    const vec shift = vset1(maximum);
    vec total = vzero();
    for (int64_t t = 0; t < padded; t += LANES) {
        const vec p = exp_nonpositive(vsub(vload(scores + t), shift));
        vstore(scores + t, p);
        total = vadd(total, p);
    }
    for (int64_t t = 0; t < length; t++) {
        if (scores[t] == 0.0f) continue; /* masked (or negligible) */
        const vec weight = vset1(scores[t]);
        for (int c = 0; c < chunks; c++) acc[c] = vfmadd(weight, load_cache(v, t * row_stride + LANES * c, bf16), acc[c]);
    }
    const vec inverse = vset1(1.0f / vsum(total));
    for (int c = 0; c < chunks; c++) vstore(out + LANES * c, vmul(acc[c], inverse));
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

/* float -> bf16 bits, rounded to nearest even (torch's conversion, for finite values). */
static inline uint16_t bf16_bits(float x) {
    uint32_t bits;
    __builtin_memcpy(&bits, &x, 4);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

/* The transposed weight of an int4 layer in bf16, for a prompt's GEMM: out (in_features, out_features) =
 * (q - 8) * scale + zero, computed in fp32 and rounded once, the numbers torch's int4 kernel multiplies by.
 * packed: torch's CPU int4 packing of the (out_features, in_features) codes: per block of `block` rows,
 * for each input k, block / 2 bytes holding row j's code in the low nibble and row j + block / 2's in the
 * high one. scales_and_zeros: (in_features / group_size, out_features, 2) bf16. The loops over a block's
 * rows are plain C for the compiler to vectorize (one store of `block` contiguous outputs per input). */
void cogvlm_int4_dequantize_t(const uint8_t *packed, const uint16_t *scales_and_zeros, uint16_t *out,
                              int64_t out_features, int64_t in_features, int64_t group_size, int64_t block,
                              int threads) {
    const int64_t half = block / 2, blocks = out_features / block, groups = in_features / group_size;
#pragma omp parallel num_threads(threads)
    {
        float *scale = aligned_alloc(64, block * sizeof(float) < 64 ? 64 : block * sizeof(float));
        float *zero = aligned_alloc(64, block * sizeof(float) < 64 ? 64 : block * sizeof(float));
#pragma omp for schedule(static) collapse(2)
        for (int64_t b = 0; b < blocks; b++) {
            for (int64_t g = 0; g < groups; g++) {
                const uint16_t *sz = scales_and_zeros + (g * out_features + b * block) * 2;
                for (int64_t j = 0; j < block; j++) {
                    uint32_t s_bits = (uint32_t)sz[2 * j] << 16, z_bits = (uint32_t)sz[2 * j + 1] << 16;
                    __builtin_memcpy(&scale[j], &s_bits, 4);
                    __builtin_memcpy(&zero[j], &z_bits, 4);
                }
                for (int64_t k = g * group_size; k < (g + 1) * group_size; k++) {
                    const uint8_t *codes = packed + (b * in_features + k) * half;
                    uint16_t *row = out + k * out_features + b * block;
                    for (int64_t j = 0; j < half; j++) {
                        row[j] = bf16_bits((float)((codes[j] & 15) - 8) * scale[j] + zero[j]);
                        row[j + half] = bf16_bits((float)((codes[j] >> 4) - 8) * scale[j + half] + zero[j + half]);
                    }
                }
            }
        }
        free(scale);
        free(zero);
    }
}

#endif
