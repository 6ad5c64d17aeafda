// Fused gather kernels for histories held as distinct rows [U, d] plus an index [B, L] into
// them (longrec.nn.row_kernels).
//
// The attention scores and the full-sequence pooling of the two-stage towers read each
// behaviour's row once, straight from the rows, instead of writing the gathered [B, L, d]
// history and reading it back in batched matrix-vector products; the backward pass adds into
// each row's gradient directly instead of materialising [B, L, d] gradients for index_add_.
//
// The row loads are random (the index is a user's history) and the rows rarely fit in L2, so
// every loop prefetches the row a few behaviours ahead; without it the kernels wait on the
// cache most of the time. Ordering the work by row instead (a counting sort of the index) was
// measured 2x slower: the random writes into the [B, M, L] scores then miss instead.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace {

void check(const torch::Tensor& rows, const torch::Tensor& index, const torch::Tensor& x,
           const char* what) {
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == torch::kFloat && rows.stride(1) == 1,
              what, ": rows must be a float32 [U, d] tensor with unit column stride");
  TORCH_CHECK(index.dim() == 2 && index.scalar_type() == torch::kLong && index.is_contiguous(),
              what, ": index must be a contiguous int64 [B, L] tensor");
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat && x.is_contiguous() &&
                  x.size(0) == index.size(0),
              what, ": expected a contiguous float32 [B, M, *] tensor with B = ", index.size(0));
}

// Calls visit(b, l, row) for every behaviour, batch rows split across threads, prefetching
// each row kAhead behaviours before it is visited.
template <typename Visit>
void over_history(const torch::Tensor& rows, const torch::Tensor& index, Visit&& visit) {
  const int64_t B = index.size(0), L = index.size(1), stride = rows.stride(0);
  const float* R = rows.data_ptr<float>();
  const int64_t* I = index.data_ptr<int64_t>();
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* ib = I + b * L;
      for (int64_t l = 0; l < L; ++l) {
        if (l + kAhead < L) __builtin_prefetch(R + ib[l + kAhead] * stride);
        visit(b, l, R + ib[l] * stride);
      }
    }
  });
}

}  // namespace

// out[b, m, l] = <query[b, m, :], rows[index[b, l], :]>
torch::Tensor gather_dot(const torch::Tensor& rows, const torch::Tensor& index,
                         const torch::Tensor& query) {
  check(rows, index, query, "gather_dot");
  const int64_t L = index.size(1), M = query.size(1), d = rows.size(1);
  TORCH_CHECK(query.size(2) == d, "gather_dot: query width ", query.size(2), " != rows width ", d);
  auto out = torch::empty({index.size(0), M, L}, query.options());
  const float* Q = query.data_ptr<float>();
  float* S = out.data_ptr<float>();
  over_history(rows, index, [&](int64_t b, int64_t l, const float* r) {
    for (int64_t m = 0; m < M; ++m) {
      const float* q = Q + (b * M + m) * d;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < d; ++j) acc += q[j] * r[j];
      S[(b * M + m) * L + l] = acc;
    }
  });
  return out;
}

// out[b, m, :] = sum_l weight[b, m, l] * rows[index[b, l], :]
torch::Tensor gather_pool(const torch::Tensor& rows, const torch::Tensor& index,
                          const torch::Tensor& weight) {
  check(rows, index, weight, "gather_pool");
  const int64_t L = index.size(1), M = weight.size(1), d = rows.size(1);
  TORCH_CHECK(weight.size(2) == L, "gather_pool: weight length ", weight.size(2), " != ", L);
  auto out = torch::zeros({index.size(0), M, d}, weight.options());
  const float* W = weight.data_ptr<float>();
  float* P = out.data_ptr<float>();
  over_history(rows, index, [&](int64_t b, int64_t l, const float* r) {
    for (int64_t m = 0; m < M; ++m) {
      float* p = P + (b * M + m) * d;
      const float w = W[(b * M + m) * L + l];
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) p[j] += w * r[j];
    }
  });
  return out;
}

// The backward of both kernels: the rows' gradient and the per-target one in one pass over the
// index, the row and its gradient row loaded once for the two.
//   pooling   (x = weight [B, M, L]):  grad_rows[u] += sum_m x[b, m, l] * grad[b, m, :]
//                                      grad_x[b, m, l] = <grad[b, m, :], rows[u, :]>
//   scores    (x = query [B, M, d]):   grad_rows[u] += sum_m grad[b, m, l] * x[b, m, :]
//                                      grad_x[b, m, :] = sum_l grad[b, m, l] * rows[u, :]
// Each thread takes a fixed share of the batch rows and adds into its own copy of the rows'
// gradient; the copies are summed in thread order, so results are deterministic. (Giving each
// thread a range of rows instead makes every thread scan the whole index through an
// unpredictable branch: measured slower, most of all when the rows fit in cache.)
std::vector<torch::Tensor> gather_backward(const torch::Tensor& rows, const torch::Tensor& index,
                                         const torch::Tensor& x, const torch::Tensor& grad,
                                         bool pooling) {
  check(rows, index, grad, pooling ? "gather_pool backward" : "gather_dot backward");
  check(rows, index, x, pooling ? "gather_pool backward" : "gather_dot backward");
  const int64_t B = index.size(0), L = index.size(1), M = x.size(1), d = rows.size(1);
  const int64_t U = rows.size(0), stride = rows.stride(0);
  const torch::Tensor& per_pos = pooling ? x : grad;     // [B, M, L]
  const torch::Tensor& per_target = pooling ? grad : x;  // [B, M, d]
  TORCH_CHECK(per_pos.size(2) == L && per_target.size(2) == d && grad.size(1) == M,
              "backward: expected [B, M, L] and [B, M, d] tensors");
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B));
  auto partial = torch::zeros({parts, U, d}, rows.options());
  torch::Tensor grad_x = pooling ? torch::empty({B, M, L}, x.options())
                                 : torch::zeros({B, M, d}, x.options());
  const float* R = rows.data_ptr<float>();
  const int64_t* I = index.data_ptr<int64_t>();
  const float* C = per_pos.data_ptr<float>();
  const float* T = per_target.data_ptr<float>();
  float* P = partial.data_ptr<float>();
  float* GX = grad_x.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t part = p0; part < p1; ++part) {
      float* G = P + part * U * d;
      for (int64_t b = B * part / parts; b < B * (part + 1) / parts; ++b) {
        const int64_t* ib = I + b * L;
        for (int64_t l = 0; l < L; ++l) {
          if (l + kAhead < L) {
            __builtin_prefetch(R + ib[l + kAhead] * stride);
            __builtin_prefetch(G + ib[l + kAhead] * d, 1);
          }
          const int64_t u = ib[l];
          const float* r = R + u * stride;
          float* g = G + u * d;
          for (int64_t m = 0; m < M; ++m) {
            const int64_t bm = b * M + m;
            const float c = C[bm * L + l];
            const float* t = T + bm * d;
            if (pooling) {
              float acc = 0.f;
#pragma omp simd reduction(+ : acc)
              for (int64_t j = 0; j < d; ++j) {
                g[j] += c * t[j];
                acc += t[j] * r[j];
              }
              GX[bm * L + l] = acc;
            } else {
              float* q = GX + bm * d;
#pragma omp simd
              for (int64_t j = 0; j < d; ++j) {
                g[j] += c * t[j];
                q[j] += c * r[j];
              }
            }
          }
        }
      }
    }
  });
  return {parts == 1 ? partial[0] : partial.sum(0), grad_x};
}

// The dense gradient [V, d] of a lookup of distinct ids: zeros except grad[i] at row ids[i].
// The ids being distinct, rows are written in parallel, each once, with no accumulation
// (index_add_ runs a scatter_add over an expanded index, single-threaded here: 3-4 ms for
// 90K of 200K rows).
torch::Tensor scatter_distinct_rows(const torch::Tensor& ids, const torch::Tensor& grad,
                                    int64_t vocab) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == torch::kLong && ids.is_contiguous(),
              "scatter_distinct_rows: ids must be a contiguous int64 [N] tensor");
  TORCH_CHECK(grad.dim() == 2 && grad.scalar_type() == torch::kFloat && grad.is_contiguous() &&
                  grad.size(0) == ids.size(0),
              "scatter_distinct_rows: grad must be a contiguous float32 [N, d] tensor");
  const int64_t n = ids.size(0), d = grad.size(1);
  auto out = torch::empty({vocab, d}, grad.options());
  float* O = out.data_ptr<float>();
  const float* G = grad.data_ptr<float>();
  const int64_t* I = ids.data_ptr<int64_t>();
  check_ids(I, n, vocab, "scatter_distinct_rows");
  at::parallel_for(0, vocab, 16384, [&](int64_t v0, int64_t v1) {
    std::memset(O + v0 * d, 0, sizeof(float) * (v1 - v0) * d);
  });
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (i + kAhead < i1) __builtin_prefetch(O + I[i + kAhead] * d, 1);
      std::memcpy(O + I[i] * d, G + i * d, sizeof(float) * d);
    }
  });
  return out;
}

// (distinct ids [U] in increasing order, inverse with the shape of ids) without sorting: a
// bitmap over the vocabulary marks the ids, a scan of its words counts them per word, and a
// parallel pass writes each id's rank as its inverse (torch.unique sorts; the PyTorch version of
// models.towers.dedup makes four passes; a slot table written per distinct id and read per id
// took 4.9-7.1 ms at 6.2M items, its 25 MB missing the caches). Increasing order makes every
// later pass over a table's rows run in address order: the lookups' index_select, the
// gradient's scatter and the optimiser's update (measured
// 5% of a DARE step at 200K items and 8% at 6.2M against order of first appearance, which kept a
// user's rows together for the gathers but sent every table pass to random addresses).
// `include` >= 0 is among the distinct ids whether or not it occurs (padding, 0: it then leads,
// and a sparse gradient drops its entry by slicing).
template <typename Id>
std::vector<torch::Tensor> dedup_ids_of(const std::vector<torch::Tensor>& parts, int64_t vocab,
                                        int64_t include) {
  for (const auto& ids : parts)  // first: the bitmaps must be left clear
    check_ids(ids.data_ptr<Id>(), ids.numel(), vocab, "dedup_ids");
  TORCH_CHECK(include < vocab, "dedup_ids: id ", include, " outside [0, ", vocab, ")");
  IdBitmap& map = IdBitmap::for_thread(vocab, false);
  struct Clear {  // the bitmap is left clear even if an allocation below throws
    IdBitmap& map;
    ~Clear() { map.clear(); }
  } clear{map};
  if (include >= 0) map.set(include);
  // Each thread marks a share of the ids in its own bitmap; the others are then ORed into this
  // thread's, word range by word range (one thread marking every id took half of a call).
  std::vector<int64_t> ends;  // the parts' ends in one flat range of ids
  for (const auto& ids : parts) ends.push_back((ends.empty() ? 0 : ends.back()) + ids.numel());
  std::vector<IdBitmap*> maps(at::get_num_threads(), nullptr);
  at::parallel_for(0, ends.back(), int64_t{1} << 16, [&](int64_t p0, int64_t p1) {
    IdBitmap& mine = IdBitmap::for_thread(vocab, false);
    maps[at::get_thread_num()] = &mine;
    for (size_t k = 0; k < parts.size(); ++k) {
      const int64_t start = k ? ends[k - 1] : 0;
      const Id* I = parts[k].data_ptr<Id>();
      for (int64_t p = std::max(p0, start), e = std::min(p1, ends[k]); p < e; ++p)
        mine.set(I[p - start]);
    }
  });
  std::vector<IdBitmap*> others;
  for (IdBitmap* m : maps)
    if (m && m != &map && std::find(others.begin(), others.end(), m) == others.end())
      others.push_back(m);
  const int64_t words = map.words();
  at::parallel_for(0, words, int64_t{1} << 12, [&](int64_t w0, int64_t w1) {
    for (IdBitmap* m : others) map.absorb(*m, w0, w1);
  });
  const int64_t distinct_n = map.number();
  auto options = parts[0].options().dtype(torch::kLong);
  auto distinct = torch::empty({distinct_n}, options);
  int64_t* D = distinct.data_ptr<int64_t>();
  at::parallel_for(0, words, int64_t{1} << 12, [&](int64_t w0, int64_t w1) {
    int64_t* out = D + map.before(w0);
    map.visit_words(w0, w1, [&](int64_t id) { *out++ = id; });
  });
  std::vector<torch::Tensor> out{distinct};
  const IdBitmap& ranks = map;  // this thread's bitmap, read by the pool's threads
  for (const auto& ids : parts) {
    auto inverse = torch::empty(ids.sizes(), options);
    int64_t* inv = inverse.data_ptr<int64_t>();
    const Id* I = ids.data_ptr<Id>();
    at::parallel_for(0, ids.numel(), 1 << 14, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) inv[p] = ranks.rank(I[p]);
    });
    out.push_back(inverse);
  }
  return out;
}

// {distinct ids of all parts, then each part's inverse}: the history and the targets of a
// batch share their rows without being concatenated first. int64 or int32 ids (the batches'
// own width: no conversion pass), all parts alike; int64 results.
std::vector<torch::Tensor> dedup_ids(const std::vector<torch::Tensor>& parts, int64_t vocab,
                                     int64_t include) {
  TORCH_CHECK(!parts.empty(), "dedup_ids: no ids");
  const auto type = parts[0].scalar_type();
  for (const auto& ids : parts)
    TORCH_CHECK((type == torch::kLong || type == torch::kInt) && ids.scalar_type() == type &&
                    ids.is_contiguous(),
                "dedup_ids: ids must be contiguous int64 or int32 tensors, all alike");
  if (type == torch::kInt) return dedup_ids_of<int32_t>(parts, vocab, include);
  return dedup_ids_of<int64_t>(parts, vocab, include);
}

// weight[ids] for a table's rows [V, d] (float32, contiguous) at int64 ids [N]: index_select,
// with the rows prefetched ahead. The ids of a batch's distinct rows are sparse in a large
// table (290K of 6.2M), so the hardware prefetcher cannot follow them and index_select waited
// on memory row by row: 4-6 ms a lookup at 6.2M items (BENCHMARKS.md).
torch::Tensor lookup_rows(const torch::Tensor& weight, const torch::Tensor& ids) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat &&
                  weight.is_contiguous(),
              "lookup_rows: weight must be a contiguous float32 [V, d] tensor");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == torch::kLong && ids.is_contiguous(),
              "lookup_rows: ids must be a contiguous int64 [N] tensor");
  const int64_t n = ids.size(0), d = weight.size(1);
  const int64_t* I = ids.data_ptr<int64_t>();
  check_ids(I, n, weight.size(0), "lookup_rows");
  auto out = torch::empty({n, d}, weight.options());
  const float* W = weight.data_ptr<float>();
  float* O = out.data_ptr<float>();
  constexpr int64_t ahead_rows = 16;  // 64: no faster
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (i + ahead_rows < i1) __builtin_prefetch(W + I[i + ahead_rows] * d);
      std::memcpy(O + i * d, W + I[i] * d, sizeof(float) * d);
    }
  });
  return out;
}

// Left-padded histories: out[b] holds rows [lo[b], end[b]) of `values` ([N] or [N, W], any
// dtype, contiguous) in its last end[b] - lo[b] of `length` slots and zeros before them. One
// memcpy per history: the loader's index-matrix gathers took 10 ms a DARE batch (2048 x 200,
// two fields and the timestamps). Single-threaded on purpose: it runs in the loader's prefetch
// thread beside the training step's threads, where a parallel region of its own would
// oversubscribe the cores (BENCHMARKS.md).
torch::Tensor gather_ranges(const torch::Tensor& values, const torch::Tensor& lo,
                            const torch::Tensor& end, int64_t length) {
  TORCH_CHECK(values.dim() >= 1 && values.is_contiguous(),
              "gather_ranges: values must be a contiguous [N, ...] tensor");
  TORCH_CHECK(lo.dim() == 1 && end.dim() == 1 && lo.size(0) == end.size(0) &&
                  lo.scalar_type() == torch::kLong && end.scalar_type() == torch::kLong &&
                  lo.is_contiguous() && end.is_contiguous(),
              "gather_ranges: lo and end must be contiguous int64 [B] tensors");
  TORCH_CHECK(length >= 0, "gather_ranges: length must be >= 0");
  const int64_t B = lo.size(0), N = values.size(0);
  const int64_t* LO = lo.data_ptr<int64_t>();
  const int64_t* END = end.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(0 <= LO[b] && LO[b] <= END[b] && END[b] <= N && END[b] - LO[b] <= length,
                "gather_ranges: history ", b, " is rows [", LO[b], ", ", END[b], ") of ", N,
                ", longer than ", length, " or outside them");
  std::vector<int64_t> shape{B, length};
  for (int64_t d = 1; d < values.dim(); ++d) shape.push_back(values.size(d));
  auto out = torch::empty(shape, values.options());
  const int64_t row = values.numel() / std::max<int64_t>(N, 1) * values.element_size();
  const char* src = static_cast<const char*>(values.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = END[b] - LO[b];
    char* o = dst + b * length * row;
    std::memset(o, 0, (length - n) * row);
    std::memcpy(o + (length - n) * row, src + LO[b] * row, n * row);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("search_attend", &search_attend, "soft top-k search and attention, one pass per user");
  m.def("search_attend_backward", &search_attend_backward, "its gradients");
  m.def("prelu_backward", &prelu_backward, "one-weight PReLU's gradients in one pass");
  m.def("rowwise_adam_", &rowwise_adam_, "lazy Adam on a sparse gradient's rows, in place");
  m.def("sparse_grad_adam_", &sparse_grad_adam_, "Adam on every row from a sparse gradient");
  m.def("rowwise_adagrad_", &rowwise_adagrad_, "row-wise Adagrad on a sparse gradient's rows");
  m.def("scatter_distinct_rows", &scatter_distinct_rows, "dense gradient of distinct rows");
  m.def("lookup_rows", &lookup_rows, "weight[ids] with the rows prefetched ahead");
  m.def("dedup_ids", &dedup_ids, "distinct ids in increasing order, and the inverse");
  m.def("gather_backward", &gather_backward, "rows' and per-target gradients in one pass");
  m.def("gather_dot", &gather_dot, "scores of per-target queries against indexed rows");
  m.def("gather_pool", &gather_pool, "per-target weighted sums of indexed rows");
  m.def("gather_ranges", &gather_ranges, "left-padded histories, one copy per history");
}
