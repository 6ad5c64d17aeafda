// The soft search and target attention of the two-stage models (DARE, TWIN, TWIN-4E) as one
// pass per user, forward and backward (longrec.nn.search_attention).
//
// Why: with the row kernels alone, a DARE step at B=2048, L=200 spent a fifth of its time in
// the PyTorch operations between them (masking, top-k, two softmaxes, gathering and pooling the
// top K, and their backward), each a full pass over [B, M, L] tensors. Here, per user, the
// scores stay in a thread-local buffer while the top K are selected, both softmaxes taken and
// both poolings (top K and, for DARE's auxiliary head, the whole history) summed.
//
// Within a user the passes go field by field over that user's row ids, so the inner loops
// are a row load and a few vector instructions per behaviour; while one user is computed, the
// next one's rows are prefetched. (Looping over the fields' structs per behaviour made the
// kernel instruction-bound: rows resident in L1 timed 22.5 ms forward against 28 for the real
// ones, and 6 against 7.5 after this layout; BENCHMARKS.md.) The by-row order instead (each
// distinct row's behaviours from a counting sort, no per-thread gradient copies) was tried
// for the backward and ran 2.2x slower: the per-behaviour coefficients then miss instead.
//
// A history is F fields, each distinct rows plus an index [B, L] into them (or no index: row l
// is position l, the target-relative position tables). Field f has attention rows A_f [U, da]
// and representation rows R_f [U, dr] at the same index, a per-target query Q_f [B, M, da] and
// a scale: score[b, m, l] = sum_f scale_f <Q_f[b, m], A_f[row]>. Outputs are concatenated over
// fields in order: pooled [B, M, sum dr].
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

struct Field {
  const float* A;
  const float* R;
  const void* index;  // [B, L] int64 or int32 (index32); nullptr: row = position
  const float* Q;
  int64_t da, dr, sa, sr, rows, off;
  float scale;
  bool shared;  // one query [1, 1, da] for every target (position fields): see `shared_bias`
  bool index32;  // int32 ids: inference indexes the tables with the batch's ids as they come
};

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

std::vector<Field> fields_of(const std::vector<torch::Tensor>& attn,
                             const std::vector<torch::Tensor>& repr,
                             const std::vector<torch::Tensor>& index,
                             const std::vector<torch::Tensor>& query,
                             const std::vector<double>& scale, const torch::Tensor& mask,
                             bool check_index) {
  const size_t F = attn.size();
  TORCH_CHECK(F > 0 && repr.size() == F && index.size() == F && query.size() == F &&
                  scale.size() == F,
              "search_attend: attn, repr, index, query and scale need one entry per field");
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == torch::kBool && mask.is_contiguous(),
              "search_attend: mask must be a contiguous bool [B, L] tensor");
  const int64_t B = mask.size(0), L = mask.size(1);
  std::vector<Field> out;
  int64_t off = 0;
  for (size_t f = 0; f < F; ++f) {
    const auto &a = attn[f], &r = repr[f], &i = index[f], &q = query[f];
    for (const auto* t : {&a, &r})
      TORCH_CHECK(t->dim() == 2 && t->scalar_type() == torch::kFloat && t->stride(1) == 1,
                  "search_attend: field ", f, ": rows must be float32 [U, d], unit column stride");
    TORCH_CHECK(a.size(0) == r.size(0), "search_attend: field ", f,
                ": attention and representation rows differ in number");
    const bool identity = i.numel() == 0;
    if (identity) {
      TORCH_CHECK(a.size(0) >= L, "search_attend: field ", f, ": ", a.size(0),
                  " position rows for a history of ", L);
    } else {
      const bool id32 = i.scalar_type() == torch::kInt;
      TORCH_CHECK(i.dim() == 2 && (id32 || i.scalar_type() == torch::kLong) &&
                      i.is_contiguous() && i.size(0) == B && i.size(1) == L,
                  "search_attend: field ", f,
                  ": index must be a contiguous int64 or int32 [B, L] tensor");
      const std::string what = "search_attend: field " + std::to_string(f);
      if (check_index && id32) check_ids(i.data_ptr<int32_t>(), B * L, a.size(0), what);
      if (check_index && !id32) check_ids(i.data_ptr<int64_t>(), B * L, a.size(0), what);
    }
    const bool shared = identity && q.dim() == 3 && q.size(0) == 1 && q.size(1) == 1 &&
                        query[0].size(0) == B;
    TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat && q.is_contiguous() &&
                    (q.size(0) == B || shared) && q.size(2) == a.size(1) &&
                    (f == 0 || shared || q.size(1) == query[0].size(1)),
                "search_attend: field ", f, ": query must be a contiguous float32 [B, M, da]",
                " (or [1, 1, da] for a field without index)");
    out.push_back(Field{a.data_ptr<float>(), r.data_ptr<float>(),
                        identity ? nullptr : i.data_ptr(), q.data_ptr<float>(), a.size(1),
                        r.size(1), a.stride(0), r.stride(0), a.size(0), off,
                        static_cast<float>(scale[f]), shared,
                        !identity && i.scalar_type() == torch::kInt});
    off += r.size(1);
  }
  return out;
}

int64_t pooled_width(const std::vector<Field>& fs) { return fs.back().off + fs.back().dr; }

// The score part of the shared-query fields, the same for every user: bias[l].
std::vector<float> shared_bias(const std::vector<Field>& fs, int64_t L) {
  std::vector<float> bias(L, 0.f);
  for (const auto& f : fs)
    if (f.shared)
      for (int64_t l = 0; l < L; ++l) {
        float acc = 0.f;
        for (int64_t j = 0; j < f.da; ++j) acc += f.Q[j] * f.A[l * f.sa + j];
        bias[l] += f.scale * acc;
      }
  return bias;
}

// Row u of `base` (row stride `stride`) into the cache, for reading or writing. An asm
// statement: GCC 12 dropped __builtin_prefetch and _mm_prefetch from this file's loops.
inline void prefetch(const float* base, int64_t u, int64_t stride, bool write = false) {
  const float* row = base + u * stride;
  if (write)
    asm volatile("prefetchw %0" : : "m"(*row));
  else
    asm volatile("prefetcht0 %0" : : "m"(*row));
}

// Row widths: W = 0 reads them from the field, W > 0 is every field's width as a constant,
// which lets the compiler unroll the vector helpers (DARE's widths are all 16).
template <int64_t W>
inline int64_t da_of(const Field& f) {
  return W ? W : f.da;
}
template <int64_t W>
inline int64_t dr_of(const Field& f) {
  return W ? W : f.dr;
}

// Calls body(std::integral_constant<int64_t, W>) with W = 16 if every field is 16 wide.
template <typename Body>
void with_width(const std::vector<Field>& fs, Body&& body) {
  bool all16 = true;
  for (const auto& f : fs) all16 = all16 && f.da == 16 && f.dr == 16;
  if (all16)
    body(std::integral_constant<int64_t, 16>{});
  else
    body(std::integral_constant<int64_t, 0>{});
}

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
int64_t select_top(const float* s, const bool* mk, int64_t L, int64_t k, uint32_t* keys,
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

// Every field's row for each behaviour of one user, ids[f][l]: int64 indices are read in
// place, int32 ones converted into a buffer, and a field without index has row l.
class UserIds {
 public:
  UserIds(const std::vector<Field>& fs, int64_t L)
      : fs_(&fs), L_(L), buffer_(fs.size() * L), rows_(fs.size()) {
    for (size_t f = 0; f < fs.size(); ++f) {
      rows_[f] = buffer_.data() + f * L;
      if (!fs[f].index)
        for (int64_t l = 0; l < L; ++l) buffer_[f * L + l] = l;
    }
  }
  void load(int64_t b) {
    for (size_t f = 0; f < fs_->size(); ++f) {
      const Field& fd = (*fs_)[f];
      if (!fd.index) continue;
      if (!fd.index32) {
        rows_[f] = static_cast<const int64_t*>(fd.index) + b * L_;
        continue;
      }
      const int32_t* I = static_cast<const int32_t*>(fd.index) + b * L_;
      int64_t* out = buffer_.data() + f * L_;
      for (int64_t l = 0; l < L_; ++l) out[l] = I[l];
    }
  }
  const int64_t* operator[](int64_t f) const { return rows_[f]; }

 private:
  const std::vector<Field>* fs_;
  int64_t L_;
  std::vector<int64_t> buffer_;
  std::vector<const int64_t*> rows_;
};

// The rows of the next user, one per behaviour of the current one: a whole user's work ahead
// of their use (a distance of a few behaviours left many row loads waiting on memory).
inline void prefetch_next(const float* base, int64_t stride, const int64_t* next, int64_t l,
                          bool write = false) {
  if (next) prefetch(base, next[l], stride, write);
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
#if defined(__AVX512F__)
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
// gradient (packed, width d) and into gq, prefetching the next user's rows.
template <int64_t W>
inline void score_grads(const float* gs, const bool* mk, float scale, const float* q,
                        const float* A, int64_t sa, float* grad, const int64_t* ids,
                        const int64_t* next, int64_t L, int64_t d, float* gq) {
#if defined(__AVX512F__)
  if constexpr (W == 16) {
    const __m512 qv = _mm512_loadu_ps(q);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t l = 0; l < L; ++l) {
      prefetch_next(A, sa, next, l);
      prefetch_next(grad, 16, next, l, true);
      if (!mk[l]) continue;
      const __m512 c = _mm512_set1_ps(gs[l] * scale);
      float* g = grad + ids[l] * 16;
      _mm512_storeu_ps(g, _mm512_fmadd_ps(c, qv, _mm512_loadu_ps(g)));
      acc = _mm512_fmadd_ps(c, _mm512_loadu_ps(A + ids[l] * sa), acc);
    }
    _mm512_storeu_ps(gq, _mm512_add_ps(_mm512_loadu_ps(gq), acc));
    return;
  }
#endif
  for (int64_t l = 0; l < L; ++l) {
    prefetch_next(A, sa, next, l);
    prefetch_next(grad, d, next, l, true);
    if (!mk[l]) continue;
    const float c = gs[l] * scale;
    axpy(grad + ids[l] * d, c, q, d);
    axpy(gq, c, A + ids[l] * sa, d);
  }
}

}  // namespace

// Returns {pooled_top [B, M, D], idx [B, M, K] int64, valid [B, M, K] bool, w_top [B, M, K],
//          pooled_all [B, M, D] and w_all [B, M, L] (empty unless `full`)}.
// K = min(k, L). The top K are in ascending position order. Slots past a history's real
// behaviours are invalid, weigh 0 and point at padding positions. An all-padding history
// pools to zeros.
std::vector<torch::Tensor> search_attend(const std::vector<torch::Tensor>& attn,
                                         const std::vector<torch::Tensor>& repr,
                                         const std::vector<torch::Tensor>& index,
                                         const std::vector<torch::Tensor>& query,
                                         const std::vector<double>& scale,
                                         const torch::Tensor& mask, int64_t k, bool full) {
  const auto fs = fields_of(attn, repr, index, query, scale, mask, true);
  const int64_t B = mask.size(0), L = mask.size(1), M = query[0].size(1);
  const int64_t K = std::min(k, L), D = pooled_width(fs), F = fs.size();
  int64_t qw = 0;  // width of one target's scaled queries, all per-target fields
  for (const auto& f : fs) qw += f.shared ? 0 : f.da;
  const std::vector<float> bias = shared_bias(fs, L);
  const auto fopt = query[0].options();
  auto top = torch::zeros({B, M, D}, fopt);
  auto idx = torch::empty({B, M, K}, mask.options().dtype(torch::kLong));
  auto valid = torch::empty({B, M, K}, mask.options());
  auto w_top = torch::empty({B, M, K}, fopt);
  auto all = full ? torch::zeros({B, M, D}, fopt) : torch::empty({0}, fopt);
  auto w_all = full ? torch::empty({B, M, L}, fopt) : torch::empty({0}, fopt);
  const bool* MK = mask.data_ptr<bool>();
  float* TOP = top.data_ptr<float>();
  int64_t* IDX = idx.data_ptr<int64_t>();
  bool* VAL = valid.data_ptr<bool>();
  float* WT = w_top.data_ptr<float>();
  float* ALL = full ? all.data_ptr<float>() : nullptr;
  float* WA = full ? w_all.data_ptr<float>() : nullptr;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  with_width(fs, [&](auto width) {
    constexpr int64_t W = decltype(width)::value;
    at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
      std::vector<float> s(M * L), qs(M * qw);
      std::vector<uint32_t> keys(L);
      UserIds ids(fs, L), next_ids(fs, L);  // this user's rows and the next's
      ids.load(b0);
      for (int64_t b = b0; b < b1; ++b) {
        const bool* mk = MK + b * L;
        const bool ahead = b + 1 < b1;
        if (ahead) next_ids.load(b + 1);
        auto next_of = [&](int64_t f, int64_t m) -> const int64_t* {
          return ahead && m == 0 && fs[f].index ? next_ids[f] : nullptr;
        };
        for (int64_t m = 0, o = 0; m < M; ++m)  // scaled queries, fields side by side
          for (const auto& f : fs)
            if (!f.shared)
              for (int64_t j = 0; j < da_of<W>(f); ++j)
                qs[o++] = f.scale * f.Q[(b * M + m) * da_of<W>(f) + j];
        for (int64_t m = 0; m < M; ++m)
          for (int64_t l = 0; l < L; ++l) s[m * L + l] = mk[l] ? bias[l] : neg_inf;
        for (int64_t f = 0, qo = 0; f < F; ++f) {  // scores, field by field
          const Field& fd = fs[f];
          if (fd.shared) continue;
          for (int64_t m = 0; m < M; ++m)
            add_dots<W>(qs.data() + m * qw + qo, fd.A, fd.sa, ids[f],
                        next_of(f, m), L, da_of<W>(fd), s.data() + m * L);
          qo += da_of<W>(fd);
        }
        for (int64_t m = 0; m < M; ++m) {
          const float* sm = s.data() + m * L;
          const int64_t bm = b * M + m;
          int64_t* id = IDX + bm * K;
          bool* va = VAL + bm * K;
          float* wt = WT + bm * K;
          const int64_t n = select_top(sm, mk, L, K, keys.data(), id);
          for (int64_t f = 0; f < F; ++f)  // the selected rows, while the softmax is computed
            if (fs[f].index)
              for (int64_t j = 0; j < n; ++j) prefetch(fs[f].R, ids[f][id[j]], fs[f].sr);
          float mx = neg_inf;
          for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sm[id[j]]);
          float total = 0.f;
          for (int64_t j = 0; j < n; ++j) total += (wt[j] = std::exp(sm[id[j]] - mx));
          for (int64_t j = 0; j < n; ++j) wt[j] /= total, va[j] = true;
          for (int64_t l = 0, j = n; j < K; ++l)  // padding positions as invalid filler
            if (!mk[l]) id[j] = l, va[j] = false, wt[j++] = 0.f;
          float* out = TOP + bm * D;
          for (int64_t f = 0; f < F; ++f) {
            const Field& fd = fs[f];
            for (int64_t j = 0; j < n; ++j)
              axpy(out + fd.off, wt[j], fd.R + ids[f][id[j]] * fd.sr, dr_of<W>(fd));
          }
          if (!full) continue;
          float* wa = WA + bm * L;
          if (n == 0) {
            std::fill(wa, wa + L, 0.f);
            continue;
          }
          const float inv = 1.f / masked_exp(sm, mk, mx, L, wa);
          for (int64_t l = 0; l < L; ++l) wa[l] *= inv;
        }
        if (full)  // the auxiliary head's pooling over the whole history
          for (int64_t f = 0; f < F; ++f)
            for (int64_t m = 0; m < M; ++m) {
              const Field& fd = fs[f];
              const int64_t bm = b * M + m;
              add_pooled<W>(WA + bm * L, mk, fd.R, fd.sr, ids[f], next_of(f, m), L,
                            dr_of<W>(fd), ALL + bm * D + fd.off);
            }
        std::swap(ids, next_ids);
      }
    });
  });
  return {top, idx, valid, w_top, all, w_all};
}

// Gradients of search_attend with respect to every field's attention rows, representation
// rows and query: {dA_0.., dR_0.., dQ_0..}. `grad_all` may be empty (no auxiliary head).
// Each thread takes a fixed share of the batch and adds into its own copy of the rows'
// gradients, zeroed by that thread; the copies are summed in thread order, so results are
// deterministic.
std::vector<torch::Tensor> search_attend_backward(
    const std::vector<torch::Tensor>& attn, const std::vector<torch::Tensor>& repr,
    const std::vector<torch::Tensor>& index, const std::vector<torch::Tensor>& query,
    const std::vector<double>& scale, const torch::Tensor& mask, const torch::Tensor& idx,
    const torch::Tensor& w_top, const torch::Tensor& w_all, const torch::Tensor& grad_top,
    const torch::Tensor& grad_all) {
  const auto fs = fields_of(attn, repr, index, query, scale, mask, false);
  const int64_t B = mask.size(0), L = mask.size(1), M = query[0].size(1), K = idx.size(2);
  const int64_t D = pooled_width(fs), F = fs.size();
  const bool full = grad_all.numel() > 0;
  TORCH_CHECK(grad_top.is_contiguous() && grad_top.numel() == B * M * D &&
                  (!full || (grad_all.is_contiguous() && grad_all.numel() == B * M * D &&
                             w_all.numel() == B * M * L)),
              "search_attend_backward: gradients must be contiguous [B, M, D]");
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B));
  // Part 0 adds straight into the returned gradients; parts 1.. into a scratch buffer that
  // persists per calling thread and is folded in afterwards. Allocating the copies per call
  // (~37 MB a table at 6.2M items) and summing them into another fresh tensor cost a zero-fill
  // plus a sum per table: 6-8 ms each at 6.2M items under the profiler.
  std::vector<torch::Tensor> grad_a, grad_r, grad_q;
  std::vector<std::vector<float*>> PA(parts, std::vector<float*>(F)), PR = PA;
  std::vector<float*> GQ(F);
  int64_t per_part = 0;  // floats of one part's copies of every field's gradients
  for (int64_t f = 0; f < F; ++f) per_part += fs[f].rows * (fs[f].da + fs[f].dr);
  // A tensor, not a std::vector: PyTorch's allocator gives it huge pages (longrec/malloc.py);
  // with 4 KiB pages the random row updates miss the TLB (the backward took 1.5x longer).
  // Never freed: destroying a tensor at thread exit could run after PyTorch's teardown.
  // The fold below leaves it zeroed for the next call (one pass over it instead of two);
  // `scratch_zero` is false from here until then, so a call cut short leaves it to be zeroed.
  static thread_local auto* scratch_buffer = new torch::Tensor();
  static thread_local bool scratch_zero = false;
  if (!scratch_buffer->defined() || scratch_buffer->numel() < (parts - 1) * per_part) {
    *scratch_buffer = torch::zeros({std::max<int64_t>(1, (parts - 1) * per_part)},
                                   query[0].options());
    scratch_zero = true;
  }
  float* scratch = scratch_buffer->data_ptr<float>();
  const bool zero_parts = !scratch_zero;  // whether parts 1.. must be zeroed first
  scratch_zero = false;
  for (int64_t f = 0, offset = 0; f < F; ++f) {
    grad_a.push_back(torch::empty({fs[f].rows, fs[f].da}, query[f].options()));
    grad_r.push_back(torch::empty({fs[f].rows, fs[f].dr}, query[f].options()));
    grad_q.push_back(torch::zeros_like(query[f]));
    PA[0][f] = grad_a[f].data_ptr<float>();
    PR[0][f] = grad_r[f].data_ptr<float>();
    GQ[f] = grad_q[f].data_ptr<float>();
    for (int64_t part = 1; part < parts; ++part) {
      PA[part][f] = scratch + (part - 1) * per_part + offset;
      PR[part][f] = PA[part][f] + fs[f].rows * fs[f].da;
    }
    offset += fs[f].rows * (fs[f].da + fs[f].dr);
  }
  const bool* MK = mask.data_ptr<bool>();
  const int64_t* IDX = idx.data_ptr<int64_t>();
  const float* WT = w_top.data_ptr<float>();
  const float* WA = full ? w_all.data_ptr<float>() : nullptr;
  const float* GT = grad_top.data_ptr<float>();
  const float* GA = full ? grad_all.data_ptr<float>() : nullptr;
  std::vector<float> shared_gs(parts * L, 0.f);  // sum over users of d(score)[l], per part
  const bool any_shared =
      std::any_of(fs.begin(), fs.end(), [](const Field& f) { return f.shared; });
  with_width(fs, [&](auto width) {
    constexpr int64_t W = decltype(width)::value;
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> gs(M * L), gw(M * L), gwt(K);
      UserIds ids(fs, L), next_ids(fs, L);  // this user's rows and the next's
      std::vector<float*> ga(F), gr(F);
      for (int64_t part = p0; part < p1; ++part) {
        for (int64_t f = 0; f < F; ++f) {
          ga[f] = PA[part][f];
          gr[f] = PR[part][f];
          if (part > 0 && !zero_parts) continue;
          std::memset(ga[f], 0, sizeof(float) * fs[f].rows * da_of<W>(fs[f]));
          std::memset(gr[f], 0, sizeof(float) * fs[f].rows * dr_of<W>(fs[f]));
        }
        const int64_t b0 = B * part / parts, b1 = B * (part + 1) / parts;
        if (b0 < b1) ids.load(b0);
        for (int64_t b = b0; b < b1; ++b) {
          const bool* mk = MK + b * L;
          const bool ahead = b + 1 < b1;
          if (ahead) next_ids.load(b + 1);
          auto next_of = [&](int64_t f, int64_t m) -> const int64_t* {
            return ahead && m == 0 && fs[f].index ? next_ids[f] : nullptr;
          };
          std::fill(gs.begin(), gs.end(), 0.f);
          if (full) {  // the whole-history pooling: representation gradients and d(weights)
            std::fill(gw.begin(), gw.end(), 0.f);
            for (int64_t f = 0; f < F; ++f)
              for (int64_t m = 0; m < M; ++m) {
                const Field& fd = fs[f];
                const int64_t bm = b * M + m;
                const float* go = GA + bm * D + fd.off;
                const int64_t* u = ids[f];
                add_dots<W>(go, fd.R, fd.sr, u, next_of(f, m), L, dr_of<W>(fd), gw.data() + m * L);
                add_outer<W>(WA + bm * L, mk, go, gr[f], u, next_of(f, m), L, dr_of<W>(fd));
              }
            for (int64_t m = 0; m < M; ++m) {  // softmax backward
              const float* wa = WA + (b * M + m) * L;
              float c = 0.f;
              for (int64_t l = 0; l < L; ++l)
                if (mk[l]) c += wa[l] * gw[m * L + l];
              for (int64_t l = 0; l < L; ++l)
                if (mk[l]) gs[m * L + l] = wa[l] * (gw[m * L + l] - c);
            }
          }
          for (int64_t m = 0; m < M; ++m) {  // the top-K pooling
            const int64_t bm = b * M + m;
            const int64_t* id = IDX + bm * K;
            const float* wt = WT + bm * K;
            const float* go = GT + bm * D;
            for (int64_t f = 0; f < F; ++f) {  // the selected rows and their gradient rows
              if (!fs[f].index) continue;
              for (int64_t j = 0; j < K; ++j) {
                const int64_t u = ids[f][id[j]];
                prefetch(fs[f].R, u, fs[f].sr);
                prefetch(gr[f], u, dr_of<W>(fs[f]), true);
              }
            }
            float c = 0.f;
            for (int64_t j = 0; j < K; ++j) {
              gwt[j] = 0.f;
              if (wt[j] == 0.f) continue;  // invalid slots, and underflowed weights
              Vec acc = vzero();
              for (int64_t f = 0; f < F; ++f) {
                const Field& fd = fs[f];
                const int64_t u = ids[f][id[j]];
                acc = fma_acc(acc, go + fd.off, fd.R + u * fd.sr, dr_of<W>(fd));
                axpy(gr[f] + u * dr_of<W>(fd), wt[j], go + fd.off, dr_of<W>(fd));
              }
              gwt[j] = hsum(acc);
              c += wt[j] * gwt[j];
            }
            for (int64_t j = 0; j < K; ++j)
              if (wt[j] != 0.f) gs[m * L + id[j]] += wt[j] * (gwt[j] - c);
          }
          // scores: attention rows and queries
          if (any_shared) {
            float* sg = shared_gs.data() + part * L;
            for (int64_t m = 0; m < M; ++m)
              for (int64_t l = 0; l < L; ++l)
                if (mk[l]) sg[l] += gs[m * L + l];
          }
          for (int64_t f = 0; f < F; ++f) {
            const Field& fd = fs[f];
            if (fd.shared) continue;
            for (int64_t m = 0; m < M; ++m) {
              const int64_t bm = b * M + m;
              score_grads<W>(gs.data() + m * L, mk, fd.scale, fd.Q + bm * da_of<W>(fd), fd.A,
                             fd.sa, ga[f], ids[f], next_of(f, m), L, da_of<W>(fd),
                             GQ[f] + bm * da_of<W>(fd));
            }
          }
          std::swap(ids, next_ids);
        }
      }
    });
  });
  // shared-query fields: every user's d(score)[l] times the one query, and back
  for (int64_t p = 1; p < parts; ++p)
    for (int64_t l = 0; l < L; ++l) shared_gs[l] += shared_gs[p * L + l];
  for (int64_t f = 0; f < F; ++f) {
    const Field& fd = fs[f];
    if (!fd.shared) continue;
    float* g = PA[0][f];  // the other parts stay zero
    for (int64_t l = 0; l < L; ++l)
      for (int64_t j = 0; j < fd.da; ++j) {
        g[l * fd.da + j] = fd.scale * shared_gs[l] * fd.Q[j];
        GQ[f][j] += fd.scale * shared_gs[l] * fd.A[l * fd.sa + j];
      }
  }
  std::vector<torch::Tensor> out;
  // fold parts 1.. into part 0 in part order (deterministic), zeroing them for the next call
  for (int64_t f = 0; f < F; ++f)
    for (auto* P : {&PA, &PR}) {
      const int64_t n = fs[f].rows * (P == &PA ? fs[f].da : fs[f].dr);
      at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
        float* dst = (*P)[0][f];
        for (int64_t part = 1; part < parts; ++part) {
          float* src = (*P)[part][f];
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) dst[i] += src[i], src[i] = 0.f;
        }
      });
    }
  scratch_zero = true;
  for (int64_t f = 0; f < F; ++f) out.push_back(grad_a[f]);
  for (int64_t f = 0; f < F; ++f) out.push_back(grad_r[f]);
  for (int64_t f = 0; f < F; ++f) out.push_back(grad_q[f]);
  return out;
}
