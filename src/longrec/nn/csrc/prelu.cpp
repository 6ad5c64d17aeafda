// The backward pass of a PReLU with one weight, y = x > 0 ? x : w x (longrec.nn.prelu).
//
// Why: PyTorch's CPU kernel took 1.2 ms for DARE's [2048, 200] hidden layer, more than the
// layer's matrix product; this is one vectorised pass over x and the incoming gradient.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kernels.h"

#include <vector>

// {grad_x, grad_weight}: grad_x = x > 0 ? g : w g and grad_weight = sum over x <= 0 of x g.
// The weight's gradient is summed in fixed chunks added in order: deterministic.
std::vector<torch::Tensor> prelu_backward(const torch::Tensor& x, const torch::Tensor& grad,
                                          const torch::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && grad.scalar_type() == torch::kFloat &&
                  weight.scalar_type() == torch::kFloat && x.is_contiguous() &&
                  grad.is_contiguous() && x.numel() == grad.numel() && weight.numel() == 1,
              "prelu_backward: contiguous float32 x and gradient of one size, one weight");
  const int64_t n = x.numel();
  constexpr int64_t chunk = 1 << 14;
  const int64_t chunks = (n + chunk - 1) / chunk;
  auto grad_x = torch::empty_like(x);
  std::vector<float> partial(chunks, 0.f);
  const float* X = x.data_ptr<float>();
  const float* G = grad.data_ptr<float>();
  float* GX = grad_x.data_ptr<float>();
  const float w = weight.item<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    // local copies: through the lambda's references GCC reloaded w after every store (a float
    // store may alias it) and vectorised with gathers, 15x slower than a plain pass
    const float slope = w;
    const float* __restrict x = X;
    const float* __restrict g = G;
    float* __restrict gx = GX;
    for (int64_t c = c0; c < c1; ++c) {
      float acc = 0.f;
      const int64_t end = std::min(n, (c + 1) * chunk);
#pragma omp simd reduction(+ : acc)
      for (int64_t i = c * chunk; i < end; ++i) {
        const bool pos = x[i] > 0.f;
        gx[i] = g[i] * (pos ? 1.f : slope);
        acc += (pos ? 0.f : x[i]) * g[i];
      }
      partial[c] = acc;
    }
  });
  float total = 0.f;
  for (float p : partial) total += p;
  return {grad_x, torch::full_like(weight, total)};
}
