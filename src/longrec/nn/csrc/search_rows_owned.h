// The backward pass's second phase for fields with many distinct rows
// (search_attention_backward.cpp): each thread owns a range of a field's rows and adds every
// behaviour on them, in (user, position) order, from coefficients that the first phase kept.
#pragma once

#include "search_vectors.h"

namespace longrec_search {

// d(score)[l] = gs[l] into the query's gradient only: sum_l scale gs[l] A row(l), over real
// behaviours, prefetching the next user's rows (the row-owned fields' attention rows are
// read here and written in the second phase).
template <int64_t W>
inline void query_grad(const float* gs, const bool* mk, float scale, const float* A, int64_t sa,
                       const int64_t* ids, const int64_t* next, int64_t L, int64_t d, float* gq) {
#if defined(__AVX512F__)
  if constexpr (W == 16) {
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t l = 0; l < L; ++l) {
      prefetch_next(A, sa, next, l);  // padding has gs 0: no branch
      acc[l & 1] =
          _mm512_fmadd_ps(_mm512_set1_ps(gs[l]), _mm512_loadu_ps(A + ids[l] * sa), acc[l & 1]);
    }
    const __m512 sum = _mm512_mul_ps(_mm512_set1_ps(scale), _mm512_add_ps(acc[0], acc[1]));
    _mm512_storeu_ps(gq, _mm512_add_ps(_mm512_loadu_ps(gq), sum));
    return;
  }
#endif
  for (int64_t l = 0; l < L; ++l) {
    prefetch_next(A, sa, next, l);
    if (mk[l]) axpy(gq, gs[l] * scale, A + ids[l] * sa, d);
  }
}

// One per-target coefficient array and the vectors it multiplies: behaviour (b, l) adds
// scale * coef[b, m, l] * vec[b, m, off : off + d] for each target m.
struct Term {
  const float* coef;  // [B, M, L]
  const float* vec;   // [B, M, stride]
  int64_t stride, off;
  float scale;
};

// row += the terms of behaviour (b, l), over targets m.
template <int64_t W>
inline void add_terms(float* row, const Term* terms, int64_t n_terms, int64_t b, int64_t l,
                      int64_t M, int64_t L, int64_t d) {
  for (int64_t t = 0; t < n_terms; ++t)
    for (int64_t m = 0; m < M; ++m) {
      const int64_t bm = b * M + m;
      axpy(row, terms[t].scale * terms[t].coef[bm * L + l],
           terms[t].vec + bm * terms[t].stride + terms[t].off, W ? W : d);
    }
}

// One user's behaviours l = own[0..n) on the rows u[l] of gradient g (width d): the targets'
// vectors stay in registers, and each row is loaded and stored once per target.
template <int64_t W>
inline void add_user_terms(float* g, const int64_t* u, const int64_t* own, int64_t n,
                           const Term* terms, int64_t n_terms, int64_t b, int64_t M, int64_t L,
                           int64_t d) {
#if defined(__AVX512F__)
  if constexpr (W == 16) {
    if (n_terms <= 2) {
      for (int64_t m = 0; m < M; ++m) {
        const int64_t bm = b * M + m;
        __m512 v[2];
        const float* c[2];
        for (int64_t t = 0; t < n_terms; ++t) {
          v[t] = _mm512_mul_ps(_mm512_set1_ps(terms[t].scale),
                               _mm512_loadu_ps(terms[t].vec + bm * terms[t].stride + terms[t].off));
          c[t] = terms[t].coef + bm * L;
        }
        if (n_terms == 1)
          for (int64_t i = 0; i < n; ++i) {
            float* row = g + u[own[i]] * 16;
            _mm512_storeu_ps(row, _mm512_fmadd_ps(_mm512_set1_ps(c[0][own[i]]), v[0],
                                                  _mm512_loadu_ps(row)));
          }
        else
          for (int64_t i = 0; i < n; ++i) {
            const int64_t l = own[i];
            float* row = g + u[l] * 16;
            const __m512 add = _mm512_fmadd_ps(_mm512_set1_ps(c[0][l]), v[0],
                                               _mm512_mul_ps(_mm512_set1_ps(c[1][l]), v[1]));
            _mm512_storeu_ps(row, _mm512_add_ps(_mm512_loadu_ps(row), add));
          }
      }
      return;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) add_terms<W>(g + u[own[i]] * d, terms, n_terms, b, own[i], M, L, d);
}

// Zeroes rows [lo, hi) of gradients ga (width da) and gr (width dr) of field f and adds into
// them every real behaviour on those rows, user by user: the attention term into ga, the
// representation terms into gr. Each user's behaviours on the
// range are listed without branches, and the next user's rows are prefetched meanwhile.
template <int64_t W>
void add_owned_rows(const std::vector<Field>& fs, int64_t f, const bool* MK, int64_t B,
                    int64_t L, int64_t M, int64_t lo, int64_t hi, float* ga, float* gr,
                    const Term& ta, const Term* tr, int64_t n_tr) {
  const int64_t da = da_of<W>(fs[f]), dr = dr_of<W>(fs[f]);
  std::memset(ga + lo * da, 0, sizeof(float) * (hi - lo) * da);
  std::memset(gr + lo * dr, 0, sizeof(float) * (hi - lo) * dr);
  std::vector<int64_t> own(L), own_next(L);
  UserIds ids(fs, L), next_ids(fs, L);
  const bool own_index = fs[f].gindex != nullptr;  // the rows read are not needed then
  auto load = [&](UserIds& at, int64_t b) {
    if (!own_index) at.load(b);
  };
  // (with a gindex `at` is never loaded: its rows are a placeholder that grad_ids passes over)
  auto rows_of = [&](const UserIds& at, int64_t b) { return grad_ids(fs[f], at[f], b, L); };
  auto list_owned = [&](const UserIds& at, int64_t b, int64_t* out) {
    const int64_t* u = rows_of(at, b);
    const bool* mk = MK + b * L;
    int64_t n = 0;
    for (int64_t l = 0; l < L; ++l) {
      out[n] = l;
      n += mk[l] & (static_cast<uint64_t>(u[l] - lo) < static_cast<uint64_t>(hi - lo));
    }
    return n;
  };
  load(ids, 0);
  int64_t n = list_owned(ids, 0, own.data());
  for (int64_t b = 0; b < B; ++b) {
    int64_t n_next = 0;
    if (b + 1 < B) {
      load(next_ids, b + 1);
      n_next = list_owned(next_ids, b + 1, own_next.data());
      const int64_t* u_next = rows_of(next_ids, b + 1);
      for (int64_t i = 0; i < n_next; ++i) {
        prefetch(ga, u_next[own_next[i]], da, true);
        prefetch(gr, u_next[own_next[i]], dr, true);
      }
    }
    const int64_t* u = rows_of(ids, b);
    add_user_terms<W>(ga, u, own.data(), n, &ta, 1, b, M, L, da);
    add_user_terms<W>(gr, u, own.data(), n, tr, n_tr, b, M, L, dr);
    std::swap(ids, next_ids);
    std::swap(own, own_next);
    n = n_next;
  }
}

}  // namespace longrec_search
