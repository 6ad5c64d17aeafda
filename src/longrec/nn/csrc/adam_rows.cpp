// Optimiser updates of embedding tables from sparse gradients (ids [N], grad [N, d]), in place:
// rowwise_adam_ (lazy: only the rows in the gradient, train/rowwise_adam.py),
// sparse_grad_adam_ (torch.optim.Adam's semantics over every row, train/table_adam.py) and
// rowwise_adagrad_ (one accumulator per row, train/rowwise_adagrad.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace {

// The order in which rowwise_adam_ visits a sparse gradient's entries: one entry per distinct
// row, in increasing row order (ascending addresses: far fewer TLB misses on a 400 MB table,
// 2x measured with 4 KiB pages), with later duplicates' gradients summed into a copy of the
// first's. A bitmap over the rows gives the order in O(entries + rows / 64) (torch.sort took
// 5-10 ms for 290K ids; kernels.h's IdBitmap, which costs no O(rows) fill per call).
// Ids that already increase strictly (models.towers.dedup's) are taken as they are.
struct RowOrder {
  const int64_t* rows;             // distinct rows, ascending
  const int64_t* entry;            // the entry of `grad` holding each row's (summed) gradient;
                                   // null: entry k holds row k's
  int64_t size;                    // distinct rows
  torch::Tensor grad;              // the gradient entries, duplicates summed into the first
  std::vector<int64_t> rows_store, entry_store;

  int64_t entry_of(int64_t k) const { return entry ? entry[k] : k; }
};

RowOrder order_rows(const int64_t* ids, int64_t n, int64_t vocab, const torch::Tensor& grad) {
  bool increasing = true;
  for (int64_t i = 1; i < n; ++i) increasing &= ids[i - 1] < ids[i];
  if (increasing) return RowOrder{ids, nullptr, n, grad, {}, {}};
  IdBitmap& map = IdBitmap::for_thread(vocab);
  int32_t* slot = map.slots();
  RowOrder out{nullptr, nullptr, 0, grad, {}, {}};
  std::vector<std::pair<int64_t, int64_t>> repeats;  // (entry, first entry of its row)
  for (int64_t i = 0; i < n; ++i) {
    if (map.test_and_set(ids[i]))
      repeats.emplace_back(i, slot[ids[i]]);
    else
      slot[ids[i]] = static_cast<int32_t>(i);
  }
  if (!repeats.empty()) {  // summed in entry order: deterministic
    out.grad = grad.clone();
    const int64_t d = grad.size(1);
    float* G = out.grad.data_ptr<float>();
    for (const auto& [i, first] : repeats)
      for (int64_t j = 0; j < d; ++j) G[first * d + j] += G[i * d + j];
  }
  const int64_t distinct = n - static_cast<int64_t>(repeats.size());
  out.rows_store.reserve(distinct);
  out.entry_store.reserve(distinct);
  map.drain([&](int64_t r) {
    out.rows_store.push_back(r);
    out.entry_store.push_back(slot[r]);
  });
  out.rows = out.rows_store.data();
  out.entry = out.entry_store.data();
  out.size = distinct;
  return out;
}

void check_tables(const torch::Tensor& param, const torch::Tensor& exp_avg,
                  const torch::Tensor& exp_avg_sq, const torch::Tensor& ids,
                  const torch::Tensor& grad, const char* what) {
  for (const auto* t : {&param, &exp_avg, &exp_avg_sq})
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == torch::kFloat && t->is_contiguous() &&
                    t->sizes() == param.sizes(),
                what, ": tables and moments must be contiguous float32 [V, d] alike");
  TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.is_contiguous() && ids.dim() == 1,
              what, ": ids must be a contiguous int64 [N] tensor");
  TORCH_CHECK(grad.dim() == 2 && grad.scalar_type() == torch::kFloat && grad.is_contiguous() &&
                  grad.size(0) == ids.size(0) && grad.size(1) == param.size(1),
              what, ": grad must be a contiguous float32 [N, d] tensor");
  check_ids(ids.data_ptr<int64_t>(), ids.size(0), param.size(0), what);
}

}  // namespace

// Lazy Adam on the rows of a sparse gradient (ids [N], grad [N, d]; ids may repeat and come in
// any order), in place, one pass over the distinct rows in address order: each row's weights
// and both moments are read, updated and written once (train/rowwise_adam.py).
void rowwise_adam_(torch::Tensor& param, torch::Tensor& exp_avg, torch::Tensor& exp_avg_sq,
                   const torch::Tensor& ids, const torch::Tensor& grad, double lr, double beta1,
                   double beta2, double eps, double bias1, double bias2) {
  check_tables(param, exp_avg, exp_avg_sq, ids, grad, "rowwise_adam_");
  const int64_t N = ids.size(0), d = param.size(1), V = param.size(0);
  const RowOrder order = order_rows(ids.data_ptr<int64_t>(), N, V, grad);
  const int64_t U = order.size;
  float* P = param.data_ptr<float>();
  float* M = exp_avg.data_ptr<float>();
  float* S = exp_avg_sq.data_ptr<float>();
  const int64_t* R = order.rows;
  const float* G = order.grad.data_ptr<float>();
  const float b1 = beta1, b2 = beta2, step = lr / bias1, inv_bias2 = 1.0 / bias2, e = eps;
  // Rows are prefetched further ahead than in the gathers, whose work per row is longer (16:
  // 3.2 ms for 90K of 200K rows, 4: 4.1; for 290K of 6.2M rows both take 23-25 ms).
  constexpr int64_t ahead_rows = 16;
  at::parallel_for(0, U, 1024, [&](int64_t u0, int64_t u1) {
    for (int64_t i = u0; i < u1; ++i) {
      if (i + ahead_rows < u1) {
        const int64_t ahead = R[i + ahead_rows] * d;
        __builtin_prefetch(P + ahead, 1);
        __builtin_prefetch(M + ahead, 1);
        __builtin_prefetch(S + ahead, 1);
        __builtin_prefetch(G + order.entry_of(i + ahead_rows) * d);
      }
      const int64_t r = R[i];
      float* p = P + r * d;
      float* m = M + r * d;
      float* s = S + r * d;
      const float* g = G + order.entry_of(i) * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        m[j] = b1 * m[j] + (1.f - b1) * g[j];
        s[j] = b2 * s[j] + (1.f - b2) * g[j] * g[j];
        p[j] -= step * m[j] / (std::sqrt(s[j] * inv_bias2) + e);
      }
    }
  });
}

// torch.optim.Adam's update of every row of a table (amsgrad, weight decay and maximize off),
// given a sparse gradient: rows without an entry take a zero gradient, so their moments decay
// and they keep moving, as with a dense gradient. One pass over the table in address order
// merges the ordered gradient rows in; the dense [V, d] gradient torch.optim.Adam needs is never
// built. (At DARE's Taobao configuration, 200K items, zero-filling and scattering that gradient
// cost about as much as the update itself.) The formulas are those of PyTorch's fused Adam.
// Every row runs the same branch-free update, an untouched row reading a zero gradient row;
// D is the row width when known at compile time (one vector per row for 16), else 0.
template <int64_t D>
void adam_over_rows(float* P, float* M, float* S, const RowOrder& order, int64_t V, int64_t d,
                    float b2, float w1, float w2, float step, float inv_bc2, float e) {
  if constexpr (D > 0) d = D;
  const int64_t U = order.size;
  const int64_t* R = order.rows;
  const float* G = order.grad.data_ptr<float>();
  const std::vector<float> zeros(d, 0.f);
  constexpr int64_t ahead_rows = 16;  // gradient rows are read in entry order: scattered
  at::parallel_for(0, V, 4096, [&](int64_t v0, int64_t v1) {
    int64_t k = std::lower_bound(R, R + U, v0) - R;  // the first gradient row in [v0, v1)
    for (int64_t v = v0; v < v1; ++v) {
      const bool has_grad = k < U && R[k] == v;
      if (k + ahead_rows < U) __builtin_prefetch(G + order.entry_of(k + ahead_rows) * d);
      const float* g = has_grad ? G + order.entry_of(k) * d : zeros.data();
      k += has_grad;
      float* p = P + v * d;
      float* m = M + v * d;
      float* s = S + v * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        m[j] += w1 * (g[j] - m[j]);
        s[j] = s[j] * b2 + w2 * g[j] * g[j];
        p[j] -= step * m[j] / (std::sqrt(s[j]) * inv_bc2 + e);
      }
    }
  });
}

void sparse_grad_adam_(torch::Tensor& param, torch::Tensor& exp_avg, torch::Tensor& exp_avg_sq,
                       const torch::Tensor& ids, const torch::Tensor& grad, double lr,
                       double beta1, double beta2, double eps, double bias1, double bias2) {
  check_tables(param, exp_avg, exp_avg_sq, ids, grad, "sparse_grad_adam_");
  const int64_t N = ids.size(0), d = param.size(1), V = param.size(0);
  const RowOrder order = order_rows(ids.data_ptr<int64_t>(), N, V, grad);
  const float b2 = beta2, w1 = 1.0 - beta1, w2 = 1.0 - beta2, step = lr / bias1;
  const float inv_bc2 = 1.0 / std::sqrt(bias2), e = eps;
  float* P = param.data_ptr<float>();
  float* M = exp_avg.data_ptr<float>();
  float* S = exp_avg_sq.data_ptr<float>();
  if (d == 16)
    adam_over_rows<16>(P, M, S, order, V, d, b2, w1, w2, step, inv_bc2, e);
  else
    adam_over_rows<0>(P, M, S, order, V, d, b2, w1, w2, step, inv_bc2, e);
}

// Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD, no weight decay) on the rows of a sparse
// gradient, in place: per distinct row r (repeats summed first), sum[r] += mean_j g[r, j]^2 and
// row r -= lr g[r] / (sqrt(sum[r]) + eps). One accumulator per row instead of Adam's two moments
// per weight: a row's update reads and writes its 64 bytes of weights and 4 bytes of state
// rather than 192 bytes, which is what bounds Adam's update on a table that is not in cache.
void rowwise_adagrad_(torch::Tensor& param, torch::Tensor& sum, const torch::Tensor& ids,
                      const torch::Tensor& grad, double lr, double eps) {
  TORCH_CHECK(param.dim() == 2 && param.scalar_type() == torch::kFloat && param.is_contiguous(),
              "rowwise_adagrad_: the table must be a contiguous float32 [V, d] tensor");
  TORCH_CHECK(sum.dim() == 1 && sum.scalar_type() == torch::kFloat && sum.is_contiguous() &&
                  sum.size(0) == param.size(0),
              "rowwise_adagrad_: the state must be a contiguous float32 [V] tensor");
  TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.is_contiguous() && ids.dim() == 1,
              "rowwise_adagrad_: ids must be a contiguous int64 [N] tensor");
  TORCH_CHECK(grad.dim() == 2 && grad.scalar_type() == torch::kFloat && grad.is_contiguous() &&
                  grad.size(0) == ids.size(0) && grad.size(1) == param.size(1),
              "rowwise_adagrad_: grad must be a contiguous float32 [N, d] tensor");
  check_ids(ids.data_ptr<int64_t>(), ids.size(0), param.size(0), "rowwise_adagrad_");
  const int64_t N = ids.size(0), d = param.size(1), V = param.size(0);
  const RowOrder order = order_rows(ids.data_ptr<int64_t>(), N, V, grad);
  float* P = param.data_ptr<float>();
  float* S = sum.data_ptr<float>();
  const int64_t* R = order.rows;
  const float* G = order.grad.data_ptr<float>();
  const float rate = lr, e = eps, inv_d = 1.f / std::max<int64_t>(d, 1);
  constexpr int64_t ahead_rows = 16;
  at::parallel_for(0, order.size, 1024, [&](int64_t u0, int64_t u1) {
    for (int64_t i = u0; i < u1; ++i) {
      if (i + ahead_rows < u1) {
        const int64_t ahead = R[i + ahead_rows];
        __builtin_prefetch(P + ahead * d, 1);
        __builtin_prefetch(S + ahead, 1);
        __builtin_prefetch(G + order.entry_of(i + ahead_rows) * d);
      }
      const int64_t r = R[i];
      float* p = P + r * d;
      const float* g = G + order.entry_of(i) * d;
      float square = 0.f;
#pragma omp simd reduction(+ : square)
      for (int64_t j = 0; j < d; ++j) square += g[j] * g[j];
      S[r] += square * inv_d;
      const float step = rate / (std::sqrt(S[r]) + e);
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) p[j] -= step * g[j];
    }
  });
}
