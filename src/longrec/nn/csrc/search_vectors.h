// The vector helpers of the search kernels: dot products, poolings and their gradients over
// one user's rows, the softmax's exp, and the top-k selection.
#pragma once

#include "search_fields.h"

namespace longrec_search {

// Lane-wise accumulation: sum_f <x_f, y_f> over several fields is one horizontal sum.
#if defined(__AVX512F__)
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline __mmask16 lanes(int64_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }
inline Vec fma_acc(Vec acc, const float* x, const float* y, int64_t d) {
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 k = lanes(d - j);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, x + j), _mm512_maskz_loadu_ps(k, y + j), acc);
  }
  return acc;
}
inline float hsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline void axpy(float* y, float a, const float* x, int64_t d) {
  const __m512 av = _mm512_set1_ps(a);
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 k = lanes(d - j);
    const __m512 r = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(k, x + j),
                                     _mm512_maskz_loadu_ps(k, y + j));
    _mm512_mask_storeu_ps(y + j, k, r);
  }
}
#else
using Vec = float;
inline Vec vzero() { return 0.f; }
inline Vec fma_acc(Vec acc, const float* x, const float* y, int64_t d) {
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < d; ++j) acc += x[j] * y[j];
  return acc;
}
inline float hsum(Vec v) { return v; }
inline void axpy(float* y, float a, const float* x, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) y[j] += a * x[j];
}
#endif

// Floats as unsigned integers in the same order (sign-magnitude flipped); 0 is below every
// real score's key and marks padding.
inline uint32_t order_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The positions of the k highest scores among the real behaviours, in ascending position
// order (ties at the threshold: the earliest), into `out`; returns how many (min(k, valid)).
// The k-th largest key is found bit by bit, each step a branch-free count over the history
// that the compiler vectorises: a comparison sort or nth_element mispredicts a branch on
// every other element (4 us per user here, against 0.3).
inline int64_t select_top(const float* s, const bool* mk, int64_t L, int64_t k, uint32_t* keys,
                          int64_t* out) {
  int32_t n = 0;
  uint32_t lo = ~0u, hi = 0;  // the real keys' range
  for (int64_t l = 0; l < L; ++l) {
    const uint32_t key = mk[l] ? order_key(s[l]) : 0u;
    keys[l] = key;
    n += mk[l];
    lo = std::min(lo, mk[l] ? key : ~0u);
    hi = std::max(hi, key);
  }
  if (n <= k) {
    for (int64_t l = 0, j = 0; l < L; ++l)
      if (mk[l]) out[j++] = l;
    return n;
  }
  // The bits above the highest one where the real keys differ are every real key's: start
  // below them. Stop as soon as exactly k keys are at or above the candidate (usually ~10
  // bits down): those are the top k.
  const int high = lo == hi ? -1 : 31 - __builtin_clz(lo ^ hi);
  uint32_t t = high < 0 ? hi : high == 31 ? 0u : hi & ~((2u << high) - 1u);
  bool exact = false;
  for (int bit = high; bit >= 0 && !exact; --bit) {
    const uint32_t c = t | (1u << bit);
    int32_t count = 0;  // 32-bit: 16 lanes a vector
    for (int64_t l = 0; l < L; ++l) count += keys[l] >= c;
    if (count >= k) t = c, exact = count == k;
  }
  int64_t j = 0;
  if (exact) {
    for (int64_t l = 0; l < L; ++l)
      if (keys[l] >= t) out[j++] = l;
    return j;
  }
  int64_t above = 0;  // t is the k-th largest key: ties at it are taken earliest first
  for (int64_t l = 0; l < L; ++l) above += keys[l] > t;
  int64_t ties = k - above;
  for (int64_t l = 0; l < L && j < k; ++l)
    if (keys[l] > t || (keys[l] == t && ties-- > 0)) out[j++] = l;
  return j;
}

#if defined(__AVX512F__)
// The sums of 16 vectors, v[i] into lane (i % 4) * 4 + i / 4: a transposed reduction, about
// three instructions a vector against eight for a horizontal sum each.
inline __m512 sum16(const __m512* v) {
  __m512 c[8], e[4], r[2];
  for (int i = 0; i < 8; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    r[i] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * i], e[2 * i + 1], 0x88),
                         _mm512_shuffle_ps(e[2 * i], e[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_ps(r[0], r[1], 0x88), _mm512_shuffle_ps(r[0], r[1], 0xDD));
}
// exp(x) lane-wise (Cephes' expf polynomial, ~1 ulp); -inf and very negative x give 0.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif
#if defined(__AVX512BW__) && defined(__AVX512VL__)
inline __mmask16 real16(const bool* mk, int64_t n) {  // mask bytes as lanes, n <= 16 of them
  const __m128i bytes = _mm_maskz_loadu_epi8(lanes(n), mk);
  return _mm_test_epi8_mask(bytes, bytes);
}
#endif

// out[l] += <q, row(l)> for l in [0, L), prefetching the next user's rows.
template <int64_t W>
inline void add_dots(const float* q, const float* base, int64_t stride, const int64_t* ids,
                     const int64_t* next, int64_t L, int64_t d, float* out) {
  int64_t l = 0;
#if defined(__AVX512F__)
  if constexpr (W == 16) {
    const __m512 qv = _mm512_loadu_ps(q);
    for (; l + 16 <= L; l += 16) {
      __m512 v[16];
      for (int i = 0; i < 16; ++i) {
        prefetch_next(base, stride, next, l + i);
        v[i] = _mm512_mul_ps(qv, _mm512_loadu_ps(base + ids[l + (i % 4) * 4 + i / 4] * stride));
      }
      _mm512_storeu_ps(out + l, _mm512_add_ps(_mm512_loadu_ps(out + l), sum16(v)));
    }
  }
#endif
  for (; l < L; ++l) {
    prefetch_next(base, stride, next, l);
    out[l] += hsum(fma_acc(vzero(), q, base + ids[l] * stride, d));
  }
}

// out += sum_l w[l] row(l), prefetching the next user's rows (w[l] is 0 at padding).
template <int64_t W>
inline void add_pooled(const float* w, const bool* mk, const float* base, int64_t stride,
                       const int64_t* ids, const int64_t* next, int64_t L, int64_t d,
                       float* out) {
#if defined(__AVX512F__)
  if constexpr (W == 16) {
    __m512 acc[2] = {_mm512_loadu_ps(out), _mm512_setzero_ps()};
    for (int64_t l = 0; l < L; ++l) {
      prefetch_next(base, stride, next, l);  // padding weighs 0: no branch
      acc[l & 1] = _mm512_fmadd_ps(_mm512_set1_ps(w[l]), _mm512_loadu_ps(base + ids[l] * stride),
                                   acc[l & 1]);
    }
    _mm512_storeu_ps(out, _mm512_add_ps(acc[0], acc[1]));
    return;
  }
#endif
  for (int64_t l = 0; l < L; ++l) {
    prefetch_next(base, stride, next, l);
    if (mk[l]) axpy(out, w[l], base + ids[l] * stride, d);
  }
}

// w[l] = exp(s[l] - mx) for real behaviours, 0 for padding; returns their sum.
inline float masked_exp(const float* s, const bool* mk, float mx, int64_t L, float* w) {
  int64_t l = 0;
  float total = 0.f;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  __m512 acc = _mm512_setzero_ps();
  const __m512 mxv = _mm512_set1_ps(mx);
  for (; l < L; l += 16) {
    const int64_t n = std::min<int64_t>(16, L - l);
    const __mmask16 real = real16(mk + l, n);
    const __m512 e = _mm512_maskz_mov_ps(
        real, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes(n), s + l), mxv)));
    _mm512_mask_storeu_ps(w + l, lanes(n), e);
    acc = _mm512_add_ps(acc, e);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; l < L; ++l) total += (w[l] = mk[l] ? std::exp(s[l] - mx) : 0.f);
  return total;
}

// grad row(l) += w[l] go over real behaviours (rows of width d, packed), prefetching the
// next user's rows for writing.
template <int64_t W>
inline void add_outer(const float* w, const bool* mk, const float* go, float* grad,
                      const int64_t* ids, const int64_t* next, int64_t L, int64_t d) {
  for (int64_t l = 0; l < L; ++l) {
    prefetch_next(grad, d, next, l, true);
    if (mk[l]) axpy(grad + ids[l] * d, w[l], go, W ? W : d);
  }
}

// The gradients of scores s[l] = scale <q, A row(l)> given d(s) = gs: into the rows'
// gradient (packed, width d, at rows gids[l]; A is read at ids[l]) and into gq, prefetching
// the next user's rows (next, gnext).
template <int64_t W>
inline void score_grads(const float* gs, const bool* mk, float scale, const float* q,
                        const float* A, int64_t sa, const int64_t* ids, const int64_t* next,
                        float* grad, const int64_t* gids, const int64_t* gnext, int64_t L,
                        int64_t d, float* gq) {
#if defined(__AVX512F__)
  if constexpr (W == 16) {
    const __m512 qv = _mm512_loadu_ps(q);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t l = 0; l < L; ++l) {
      prefetch_next(A, sa, next, l);
      prefetch_next(grad, 16, gnext, l, true);
      if (!mk[l]) continue;
      const __m512 c = _mm512_set1_ps(gs[l] * scale);
      float* g = grad + gids[l] * 16;
      _mm512_storeu_ps(g, _mm512_fmadd_ps(c, qv, _mm512_loadu_ps(g)));
      acc = _mm512_fmadd_ps(c, _mm512_loadu_ps(A + ids[l] * sa), acc);
    }
    _mm512_storeu_ps(gq, _mm512_add_ps(_mm512_loadu_ps(gq), acc));
    return;
  }
#endif
  for (int64_t l = 0; l < L; ++l) {
    prefetch_next(A, sa, next, l);
    prefetch_next(grad, d, gnext, l, true);
    if (!mk[l]) continue;
    const float c = gs[l] * scale;
    axpy(grad + gids[l] * d, c, q, d);
    axpy(gq, c, A + ids[l] * sa, d);
  }
}

}  // namespace longrec_search
