// The soft search and target attention of the two-stage models (DARE, TWIN, TWIN-4E) as one
// pass per user, forward and backward (longrec.nn.search_attention). This file: the forward;
// search_attention_backward.cpp: its gradients; search_fields.h and search_vectors.h: what they
// share.
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
#include "search_vectors.h"

using namespace longrec_search;


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
      for_each_user(fs, L, b0, b1, [&](int64_t b, const UserIds& ids, auto& next_of) {
        const bool* mk = MK + b * L;
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
      });
    });
  });
  return {top, idx, valid, w_top, all, w_all};
}
