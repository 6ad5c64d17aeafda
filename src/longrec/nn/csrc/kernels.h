// What the extension's sources share (longrec.nn.row_kernels): the prefetch distance, the id
// range check, and the other sources' entry points for row_kernels.cpp's module.
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

constexpr int64_t kAhead = 4;  // behaviours prefetched ahead (4 beat 8, 16 and 32)

// Rows are read and written unchecked by the kernels: every id must lie in [0, rows).
template <typename Id>
inline void check_ids(const Id* ids, int64_t n, int64_t rows, const std::string& what) {
  int64_t bad = 0;
  for (int64_t p = 0; p < n; ++p) bad += (ids[p] < 0) | (ids[p] >= rows);
  TORCH_CHECK(bad == 0, what, ": ", bad, " ids outside [0, ", rows, ")");
}

std::vector<torch::Tensor> search_attend(const std::vector<torch::Tensor>& attn,
                                         const std::vector<torch::Tensor>& repr,
                                         const std::vector<torch::Tensor>& index,
                                         const std::vector<torch::Tensor>& query,
                                         const std::vector<double>& scale,
                                         const torch::Tensor& mask, int64_t k, bool full);
std::vector<torch::Tensor> search_attend_backward(
    const std::vector<torch::Tensor>& attn, const std::vector<torch::Tensor>& repr,
    const std::vector<torch::Tensor>& index, const std::vector<torch::Tensor>& query,
    const std::vector<double>& scale, const torch::Tensor& mask, const torch::Tensor& idx,
    const torch::Tensor& w_top, const torch::Tensor& w_all, const torch::Tensor& grad_top,
    const torch::Tensor& grad_all);
void rowwise_adam_(torch::Tensor& param, torch::Tensor& exp_avg, torch::Tensor& exp_avg_sq,
                   const torch::Tensor& ids, const torch::Tensor& grad, double lr, double beta1,
                   double beta2, double eps, double bias1, double bias2);
void sparse_grad_adam_(torch::Tensor& param, torch::Tensor& exp_avg, torch::Tensor& exp_avg_sq,
                       const torch::Tensor& ids, const torch::Tensor& grad, double lr,
                       double beta1, double beta2, double eps, double bias1, double bias2);
