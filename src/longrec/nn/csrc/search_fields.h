// The fields of a history as the search kernels see them (search_attention.cpp and
// search_attention_backward.cpp): their tensors checked and unpacked, each user's row ids, and
// the row prefetches.
#pragma once

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

namespace longrec_search {

struct Field {
  const float* A;
  const float* R;
  const void* index;  // [B, L] int64 or int32 (index32); nullptr: row = position
  const float* Q;
  int64_t da, dr, sa, sr, rows, off;
  float scale;
  bool shared;  // one query [1, 1, da] for every target (position fields): see `shared_bias`
  bool index32;  // int32 ids: the tables indexed with the batch's ids as they come
  // The backward's row of each behaviour's gradient, [B, L] int64 into `grows` rows, where it
  // is not the row read: training reads the tables at the batch's ids and adds the gradients
  // into the batch's distinct rows (nn.search_attention). nullptr: the row read, grows = rows.
  const int64_t* gindex;
  int64_t grows;
};

inline std::vector<Field> fields_of(const std::vector<torch::Tensor>& attn,
                                    const std::vector<torch::Tensor>& repr,
                                    const std::vector<torch::Tensor>& index,
                                    const std::vector<torch::Tensor>& query,
                                    const std::vector<double>& scale, const torch::Tensor& mask,
                                    bool check_index,
                                    const std::vector<torch::Tensor>& grad_index = {},
                                    const std::vector<int64_t>& grad_rows = {}) {
  const size_t F = attn.size();
  TORCH_CHECK(F > 0 && repr.size() == F && index.size() == F && query.size() == F &&
                  scale.size() == F,
              "search_attend: attn, repr, index, query and scale need one entry per field");
  TORCH_CHECK(grad_index.size() == grad_rows.size() && (grad_index.empty() || grad_index.size() == F),
              "search_attend: grad_index and grad_rows need one entry per field, or none");
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
    const int64_t* gindex = nullptr;
    int64_t grows = a.size(0);
    if (!grad_index.empty() && grad_index[f].numel() > 0) {
      const auto& g = grad_index[f];
      TORCH_CHECK(!identity && g.dim() == 2 && g.scalar_type() == torch::kLong &&
                      g.is_contiguous() && g.size(0) == B && g.size(1) == L && grad_rows[f] > 0,
                  "search_attend: field ", f,
                  ": grad_index must be a contiguous int64 [B, L] tensor beside an index,",
                  " into grad_rows > 0 rows");
      gindex = g.data_ptr<int64_t>();
      grows = grad_rows[f];
      check_ids(gindex, B * L, grows, "search_attend: field " + std::to_string(f) + " grad_index");
    }
    out.push_back(Field{a.data_ptr<float>(), r.data_ptr<float>(),
                        identity ? nullptr : i.data_ptr(), q.data_ptr<float>(), a.size(1),
                        r.size(1), a.stride(0), r.stride(0), a.size(0), off,
                        static_cast<float>(scale[f]), shared,
                        !identity && i.scalar_type() == torch::kInt, gindex, grows});
    off += r.size(1);
  }
  return out;
}

inline int64_t pooled_width(const std::vector<Field>& fs) {
  return fs.back().off + fs.back().dr;
}

// The score part of the shared-query fields, the same for every user: bias[l].
inline std::vector<float> shared_bias(const std::vector<Field>& fs, int64_t L) {
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

// Field f's gradient rows of user b's behaviours, given the rows read (`read`, may be null:
// then null too, as for a next user that does not exist).
inline const int64_t* grad_ids(const Field& f, const int64_t* read, int64_t b, int64_t L) {
  return read && f.gindex ? f.gindex + b * L : read;
}

// The rows of the next user, one per behaviour of the current one: a whole user's work ahead
// of their use (a distance of a few behaviours left many row loads waiting on memory).
inline void prefetch_next(const float* base, int64_t stride, const int64_t* next, int64_t l,
                          bool write = false) {
  if (next) prefetch(base, next[l], stride, write);
}

// Calls body(b, ids, next_of) for the users b of [b0, b1) in order: ids[f] are user b's rows
// of field f, and next_of(f, m) the next user's, to prefetch during the pass of field f and
// target m (null when there is no next user, for a field without index, and for m > 0: the
// first target's pass prefetches them).
template <typename Body>
void for_each_user(const std::vector<Field>& fs, int64_t L, int64_t b0, int64_t b1, Body&& body) {
  if (b0 >= b1) return;
  UserIds ids(fs, L), next_ids(fs, L);
  ids.load(b0);
  for (int64_t b = b0; b < b1; ++b) {
    const bool ahead = b + 1 < b1;
    if (ahead) next_ids.load(b + 1);
    auto next_of = [&](int64_t f, int64_t m) -> const int64_t* {
      return ahead && m == 0 && fs[f].index ? next_ids[f] : nullptr;
    };
    body(b, static_cast<const UserIds&>(ids), next_of);
    std::swap(ids, next_ids);
  }
}

}  // namespace longrec_search
