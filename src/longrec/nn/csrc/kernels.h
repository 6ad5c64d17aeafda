// What the extension's sources share (longrec.nn.row_kernels): the prefetch distance, the id
// range check, and the other sources' entry points for row_kernels.cpp's module.
#pragma once

#include <torch/extension.h>

#include <functional>
#include <string>
#include <vector>

constexpr int64_t kAhead = 4;  // behaviours prefetched ahead (4 beat 8, 16 and 32)

// Rows are read and written unchecked by the kernels: every id must lie in [0, rows).
template <typename Id>
inline void check_ids(const Id* ids, int64_t n, int64_t rows, const std::string& what) {
  const int64_t bad = at::parallel_reduce(
      0, n, int64_t{1} << 16, int64_t{0},
      [&](int64_t p0, int64_t p1, int64_t count) {
        for (int64_t p = p0; p < p1; ++p) count += (ids[p] < 0) | (ids[p] >= rows);
        return count;
      },
      std::plus<int64_t>());
  TORCH_CHECK(bad == 0, what, ": ", bad, " ids outside [0, ", rows, ")");
}

// A bitmap and a slot table over ids [0, vocab) that persist per thread, so that a call costs
// O(ids + vocab / 64) rather than an O(vocab) allocation and fill (25 MB at 6.2M items).
// Callers set bits, then drain(): the set ids in increasing order, the bitmap left clear.
// Ids must be checked first (check_ids): a call that stops half-way would leave bits set.
class IdBitmap {
 public:
  static IdBitmap& for_thread(int64_t vocab, bool with_slots = true) {
    static thread_local IdBitmap map;
    map.words_ = (vocab + 63) / 64;
    if (static_cast<int64_t>(map.bits_.size()) < map.words_) map.bits_.resize(map.words_, 0);
    if (with_slots && static_cast<int64_t>(map.slot_.size()) < vocab) map.slot_.resize(vocab);
    return map;
  }
  int64_t words() const { return words_; }
  // Words [w0, w1) of `other` (same vocabulary) ORed into this one's and cleared there: the
  // bitmaps that several threads filled, merged range by range.
  void absorb(IdBitmap& other, int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) bits_[w] |= other.bits_[w], other.bits_[w] = 0;
  }
  void set(int64_t id) { bits_[id >> 6] |= uint64_t{1} << (id & 63); }
  bool test_and_set(int64_t id) {  // whether id was set already
    uint64_t& word = bits_[id >> 6];
    const uint64_t bit = uint64_t{1} << (id & 63);
    const bool was = word & bit;
    word |= bit;
    return was;
  }
  int32_t* slots() { return slot_.data(); }  // one int32 per id, for the caller's use
  // Numbers the set ids in increasing order, keeping them set: rank(id) is then the number of
  // set ids below id, from this bitmap (vocab / 8 bytes) and a count per word (vocab / 16),
  // both small enough for L2 at 6.2M ids where the slot table (vocab * 4) is not. Returns how
  // many are set. Callers clear() afterwards.
  int64_t number() {
    if (static_cast<int64_t>(before_.size()) < words_) before_.resize(words_);
    int64_t total = 0;
    for (int64_t w = 0; w < words_; ++w) {
      before_[w] = static_cast<int32_t>(total);
      total += __builtin_popcountll(bits_[w]);
    }
    return total;
  }
  int64_t rank(int64_t id) const {
    const uint64_t below = (uint64_t{1} << (id & 63)) - 1;
    return before_[id >> 6] + __builtin_popcountll(bits_[id >> 6] & below);
  }
  template <typename Visit>
  void visit(Visit&& visit) const {  // the set ids in increasing order, left set
    visit_words(0, words_, visit);
  }
  template <typename Visit>
  void visit_words(int64_t w0, int64_t w1, Visit&& visit) const {  // those of words [w0, w1)
    for (int64_t w = w0; w < w1; ++w)
      for (uint64_t word = bits_[w]; word; word &= word - 1) visit(w * 64 + __builtin_ctzll(word));
  }
  int64_t before(int64_t w) const { return before_[w]; }  // set ids below word w (number())
  void clear() { std::fill(bits_.begin(), bits_.begin() + words_, 0); }
  template <typename Visit>
  void drain(Visit&& visit) {
    for (int64_t w = 0; w < words_; ++w) {
      uint64_t word = bits_[w];
      if (!word) continue;
      bits_[w] = 0;
      for (; word; word &= word - 1) visit(w * 64 + __builtin_ctzll(word));
    }
  }

 private:
  std::vector<uint64_t> bits_;
  std::vector<int32_t> slot_, before_;
  int64_t words_ = 0;
};

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
    const torch::Tensor& grad_all, int64_t row_owned_bytes,
    const std::vector<torch::Tensor>& grad_index, const std::vector<int64_t>& grad_rows);
std::vector<torch::Tensor> prelu_backward(const torch::Tensor& x, const torch::Tensor& grad,
                                          const torch::Tensor& weight);
void rowwise_adam_(torch::Tensor& param, torch::Tensor& exp_avg, torch::Tensor& exp_avg_sq,
                   const torch::Tensor& ids, const torch::Tensor& grad, double lr, double beta1,
                   double beta2, double eps, double bias1, double bias2);
void rowwise_adagrad_(torch::Tensor& param, torch::Tensor& sum, const torch::Tensor& ids,
                      const torch::Tensor& grad, double lr, double eps);
void sparse_grad_adam_(torch::Tensor& param, torch::Tensor& exp_avg, torch::Tensor& exp_avg_sq,
                       const torch::Tensor& ids, const torch::Tensor& grad, double lr,
                       double beta1, double beta2, double eps, double bias1, double bias2);
