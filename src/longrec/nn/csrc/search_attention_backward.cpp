// The backward pass of the fused soft search (search_attention.cpp): per user, the gradients
// of both poolings, both softmaxes and the scores, added into per-thread copies of the rows'
// gradients (longrec.nn.search_attention). Fields with many distinct rows instead keep each
// behaviour's coefficients and add them into their rows in a second phase, each thread owning a
// range of rows (search_rows_owned.h).
#include "search_rows_owned.h"

using namespace longrec_search;


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
    const torch::Tensor& grad_all, int64_t row_owned_bytes,
    const std::vector<torch::Tensor>& grad_index, const std::vector<int64_t>& grad_rows) {
  const auto fs = fields_of(attn, repr, index, query, scale, mask, false, grad_index, grad_rows);
  const int64_t B = mask.size(0), L = mask.size(1), M = query[0].size(1), K = idx.size(2);
  const int64_t D = pooled_width(fs), F = fs.size();
  const bool full = grad_all.numel() > 0;
  TORCH_CHECK(grad_top.is_contiguous() && grad_top.numel() == B * M * D &&
                  (!full || (grad_all.is_contiguous() && grad_all.numel() == B * M * D &&
                             w_all.numel() == B * M * L)),
              "search_attend_backward: gradients must be contiguous [B, M, D]");
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B));
  std::vector<bool> owned(F);
  bool any_owned = false;
  for (int64_t f = 0; f < F; ++f) {
    owned[f] = fs[f].index &&
               fs[f].grows * (fs[f].da + fs[f].dr) * int64_t{sizeof(float)} >= row_owned_bytes;
    any_owned = any_owned || owned[f];
  }
  // Part 0 adds straight into the returned gradients; parts 1.. into a scratch buffer that
  // persists per calling thread and is folded in afterwards. Allocating the copies per call
  // (~37 MB a table at 6.2M items) and summing them into another fresh tensor cost a zero-fill
  // plus a sum per table: 6-8 ms each at 6.2M items under the profiler.
  std::vector<torch::Tensor> grad_a, grad_r, grad_q;
  std::vector<std::vector<float*>> PA(parts, std::vector<float*>(F)), PR = PA;
  std::vector<float*> GQ(F);
  int64_t per_part = 0;  // floats of one part's copies of every field's gradients
  for (int64_t f = 0; f < F; ++f)
    if (!owned[f]) per_part += fs[f].grows * (fs[f].da + fs[f].dr);
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
    grad_a.push_back(torch::empty({fs[f].grows, fs[f].da}, query[f].options()));
    grad_r.push_back(torch::empty({fs[f].grows, fs[f].dr}, query[f].options()));
    grad_q.push_back(torch::zeros_like(query[f]));
    PA[0][f] = grad_a[f].data_ptr<float>();
    PR[0][f] = grad_r[f].data_ptr<float>();
    GQ[f] = grad_q[f].data_ptr<float>();
    if (owned[f]) continue;  // PA[part > 0][f] stay null
    for (int64_t part = 1; part < parts; ++part) {
      PA[part][f] = scratch + (part - 1) * per_part + offset;
      PR[part][f] = PA[part][f] + fs[f].grows * fs[f].da;
    }
    offset += fs[f].grows * (fs[f].da + fs[f].dr);
  }
  const bool* MK = mask.data_ptr<bool>();
  const int64_t* IDX = idx.data_ptr<int64_t>();
  const float* WT = w_top.data_ptr<float>();
  const float* WA = full ? w_all.data_ptr<float>() : nullptr;
  const float* GT = grad_top.data_ptr<float>();
  const float* GA = full ? grad_all.data_ptr<float>() : nullptr;
  std::vector<float> shared_gs(parts * L, 0.f);  // sum over users of d(score)[l], per part
  // for row-owned fields: per behaviour and target, d(score) (the attention rows' coefficient
  // of the queries) and the top-K weight (the representation rows' coefficient of grad_top)
  const auto fopt = query[0].options();
  auto score_grad = any_owned ? torch::empty({B, M, L}, fopt) : torch::empty({0}, fopt);
  auto top_weight = any_owned ? torch::empty({B, M, L}, fopt) : torch::empty({0}, fopt);
  float* GS = any_owned ? score_grad.data_ptr<float>() : nullptr;
  float* CT = any_owned ? top_weight.data_ptr<float>() : nullptr;
  const bool any_shared =
      std::any_of(fs.begin(), fs.end(), [](const Field& f) { return f.shared; });
  with_width(fs, [&](auto width) {
    constexpr int64_t W = decltype(width)::value;
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> gs(M * L), gw(M * L), gwt(K);
      std::vector<float*> ga(F), gr(F);
      for (int64_t part = p0; part < p1; ++part) {
        for (int64_t f = 0; f < F; ++f) {
          ga[f] = PA[part][f];
          gr[f] = PR[part][f];
          if (owned[f] || (part > 0 && !zero_parts)) continue;
          std::memset(ga[f], 0, sizeof(float) * fs[f].grows * da_of<W>(fs[f]));
          std::memset(gr[f], 0, sizeof(float) * fs[f].grows * dr_of<W>(fs[f]));
        }
        const int64_t b0 = B * part / parts, b1 = B * (part + 1) / parts;
        for_each_user(fs, L, b0, b1, [&](int64_t b, const UserIds& ids, auto& next_of) {
          const bool* mk = MK + b * L;
          // field f's gradient rows of this user's behaviours, and the next user's
          auto gids = [&](int64_t f) { return grad_ids(fs[f], ids[f], b, L); };
          auto gnext = [&](int64_t f, int64_t m) { return grad_ids(fs[f], next_of(f, m), b + 1, L); };
          std::fill(gs.begin(), gs.end(), 0.f);
          float* ct = any_owned ? CT + b * M * L : nullptr;
          if (ct) std::fill(ct, ct + M * L, 0.f);
          if (full) {  // the whole-history pooling: representation gradients and d(weights)
            std::fill(gw.begin(), gw.end(), 0.f);
            for (int64_t f = 0; f < F; ++f)
              for (int64_t m = 0; m < M; ++m) {
                const Field& fd = fs[f];
                const int64_t bm = b * M + m;
                const float* go = GA + bm * D + fd.off;
                const int64_t* u = ids[f];
                add_dots<W>(go, fd.R, fd.sr, u, next_of(f, m), L, dr_of<W>(fd), gw.data() + m * L);
                if (!owned[f])
                  add_outer<W>(WA + bm * L, mk, go, gr[f], gids(f), gnext(f, m), L,
                               dr_of<W>(fd));
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
                prefetch(fs[f].R, ids[f][id[j]], fs[f].sr);
                if (!owned[f]) prefetch(gr[f], gids(f)[id[j]], dr_of<W>(fs[f]), true);
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
                if (!owned[f])
                  axpy(gr[f] + gids(f)[id[j]] * dr_of<W>(fd), wt[j], go + fd.off, dr_of<W>(fd));
              }
              if (ct) ct[m * L + id[j]] = wt[j];
              gwt[j] = hsum(acc);
              c += wt[j] * gwt[j];
            }
            for (int64_t j = 0; j < K; ++j)
              if (wt[j] != 0.f) gs[m * L + id[j]] += wt[j] * (gwt[j] - c);
          }
          if (any_owned) std::copy(gs.begin(), gs.end(), GS + b * M * L);
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
              if (owned[f])
                query_grad<W>(gs.data() + m * L, mk, fd.scale, fd.A, fd.sa, ids[f],
                              next_of(f, m), L, da_of<W>(fd), GQ[f] + bm * da_of<W>(fd));
              else
                score_grads<W>(gs.data() + m * L, mk, fd.scale, fd.Q + bm * da_of<W>(fd), fd.A,
                               fd.sa, ids[f], next_of(f, m), ga[f], gids(f), gnext(f, m), L,
                               da_of<W>(fd), GQ[f] + bm * da_of<W>(fd));
            }
          }
        });
      }
    });
    if (!any_owned) return;
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {  // the row-owned fields
      for (int64_t part = p0; part < p1; ++part)
        for (int64_t f = 0; f < F; ++f) {
          if (!owned[f]) continue;
          const Field& fd = fs[f];
          const Term ta{GS, fd.Q, da_of<W>(fd), 0, fd.scale};
          const Term tr[2] = {{CT, GT, D, fd.off, 1.f}, {WA, GA, D, fd.off, 1.f}};
          add_owned_rows<W>(fs, f, MK, B, L, M, fd.grows * part / parts,
                            fd.grows * (part + 1) / parts, PA[0][f], PR[0][f], ta, tr,
                            full ? 2 : 1);
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
      if (owned[f]) continue;
      const int64_t n = fs[f].grows * (P == &PA ? fs[f].da : fs[f].dr);
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
