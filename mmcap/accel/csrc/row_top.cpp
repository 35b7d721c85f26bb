// The k best log-probs of each row of logits and their tokens, without writing the log-probs out:
// beam search keeps 2 x beams tokens of each row's vocabulary, where torch's log_softmax writes a
// [rows, vocab] tensor (10 MB at 48 rows of GPT-2's 50,257) that the top-k then reads again. Here
// each row is read twice from cache: its maximum and top k, then its sum of exponentials.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "vec.h"

using namespace mmcap_vec;

// logits [N, V] fp32 with contiguous rows -> (log-probs [N, k] best first, tokens [N, k] int64):
// log_softmax's values x - max - log(sum(exp(x - max))) at each row's k largest logits
std::tuple<at::Tensor, at::Tensor> log_softmax_top(at::Tensor logits, int64_t k) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "log_softmax_top: want fp32 logits [rows, vocab] with contiguous rows");
  const int64_t n = logits.size(0), v = logits.size(1), ld = logits.stride(0);
  TORCH_CHECK(k >= 1 && k <= v && k <= kMaxTop, "log_softmax_top: k = ", k, " outside 1..min(vocab ", v, ", ",
              kMaxTop, ")");
  auto values = at::empty({n, k}, logits.options());
  auto tokens = at::empty({n, k}, logits.options().dtype(at::kLong));
  const float* xp = logits.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    for (int64_t r = begin; r < end; ++r) {
      const float* x = xp + r * ld;
      Top top(k);
      vf mv = (vf){} - INFINITY;
      int64_t j = 0;
      for (; j + 4 * L <= v; j += 4 * L) {  // blocks of 4 vectors: most hold nothing for the top k
        const vf a = load(x + j), b = load(x + j + L), c = load(x + j + 2 * L), d = load(x + j + 3 * L);
        vf m = a > b ? a : b;
        const vf e = c > d ? c : d;
        m = m > e ? m : e;
        mv = m > mv ? m : mv;
        if (hmax(m) > top.floor || top.filled < k)
          for (int64_t i = j; i < j + 4 * L; ++i) top.offer(x[i], i);
      }
      float mx = hmax(mv);
      for (int64_t i = j; i < v; ++i) {
        mx = std::max(mx, x[i]);
        top.offer(x[i], i);
      }
      vf sv = (vf){};
      j = 0;
      for (; j + L <= v; j += L) sv += vexp(load(x + j) - mx);
      float sum = hsum(sv);
      for (; j < v; ++j) sum += std::exp(x[j] - mx);
      top.write(mx + std::log(sum), vp + r * k, tp + r * k);
    }
  });
  return {values, tokens};
}

TORCH_LIBRARY_FRAGMENT(mmcap, m) {
  m.def("log_softmax_top(Tensor logits, int k) -> (Tensor, Tensor)", &log_softmax_top);
}
