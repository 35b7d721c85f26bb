// One-query attention for cached decoding on CPUs: each (row, head) attends with one query, in
// one kernel call per layer instead of torch's chain (cast, gather, cat, matmul, softmax, matmul).
// Built at first use by mmcap.attention_kernel (torch.utils.cpp_extension, -O3 -march=native) as
// the operators torch.ops.mmcap.self_attend and torch.ops.mmcap.cross_attend.
//
// Queries and caches are fp32 or bf16 (the caller's mode); arithmetic and results are fp32, in
// vectors as wide as the compiling CPU's registers (`vec.h`).
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using namespace mmcap_vec;

// Self-attention at position len-1 of rows [0, N): qkv [N, >= 3W] fp32 or bf16 (this step's query,
// key and value, heads of D values); caches K, V [R, H, P, D]. Row n's position p lives in cache row
// anc[n, p], so a beam reorder only permutes `anc`. This step's key and value are written first,
// at row n, position len-1 (the caller sets anc[n, len-1] = n).
template <int D, typename T, typename Q>
void self_attend_impl(const at::Tensor& qkv, at::Tensor& K, at::Tensor& V, const at::Tensor& anc,
                      int64_t len_all, const int64_t* lens, float scale, at::Tensor& out) {
  constexpr int DC = D / L;
  const int64_t N = qkv.size(0), H = K.size(1), P = K.size(2), W = H * D;
  const Q* base = qkv.data_ptr<Q>();
  T* kp = K.data_ptr<T>();
  T* vp = V.data_ptr<T>();
  const int64_t* ap = anc.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t qs = qkv.stride(0), as = anc.stride(0);
  at::parallel_for(0, N * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> s(P);
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      const int64_t len = lens ? lens[n] : len_all;
      const Q* q = base + n * qs + h * D;
      T* kd = kp + ((n * H + h) * P + (len - 1)) * D;
      T* vd = vp + ((n * H + h) * P + (len - 1)) * D;
      vf qv[DC];
      for (int c = 0; c < DC; ++c) {
        store(kd + L * c, load(q + W + L * c));
        store(vd + L * c, load(q + 2 * W + L * c));
        qv[c] = load(q + L * c) * scale;
      }
      const int64_t* a = ap + n * as;
      if (nh + 1 < end) {  // the next task's keys and values on their way meanwhile
        const int64_t n1 = (nh + 1) / H, h1 = (nh + 1) % H, len1 = lens ? lens[n1] : len_all;
        const int64_t* a1 = ap + n1 * as;
        for (int64_t p = 0; p + 1 < len1; ++p) {
          const int64_t at = ((a1[p] * H + h1) * P + p) * D;
          for (int64_t i = 0; i < static_cast<int64_t>(D * sizeof(T)); i += 64) {
            __builtin_prefetch(reinterpret_cast<const char*>(kp + at) + i, 0, 2);
            __builtin_prefetch(reinterpret_cast<const char*>(vp + at) + i, 0, 2);
          }
        }
      }
      float mx = -INFINITY;
      for (int64_t p = 0; p < len; ++p) {
        const T* kr = kp + ((a[p] * H + h) * P + p) * D;
        vf acc = qv[0] * load(kr);
        for (int c = 1; c < DC; ++c) acc += qv[c] * load(kr + L * c);
        const float x = hsum(acc);
        s[p] = x;
        mx = x > mx ? x : mx;
      }
      float sum = 0.f;
      for (int64_t p = 0; p < len; ++p) { s[p] = std::exp(s[p] - mx); sum += s[p]; }
      const float inv = 1.f / sum;
      vf o[DC] = {};
      for (int64_t p = 0; p < len; ++p) {
        const T* vr = vp + ((a[p] * H + h) * P + p) * D;
        const float w = s[p] * inv;
        for (int c = 0; c < DC; ++c) o[c] += w * load(vr + L * c);
      }
      float* y = op + n * W + h * D;
      for (int c = 0; c < DC; ++c) store(y + L * c, o[c]);
    }
  });
}

// Cross-attention: q [N, >= W] fp32 or bf16, `group` consecutive rows (beams) per image; keys transposed
// KT [B, H, D, MP] and values V [B, H, MP, D] with the image's M positions padded to MP (a
// multiple of L). One task per (image, head): its keys and values are read once for all its beams,
// G beams at a time (`beams_attend`).
constexpr int64_t kMaxGroup = 4;  // beams attended together: G x 4 score vectors stay in registers

// scores s[g][c0 .. c0 + CC) = q_g . keys over G beams' queries and CC vectors of positions: the
// G x CC sums stay in registers while the keys stream by (the loop bounds are compile-time)
template <int D, int G, int CC, typename T, typename Q>
inline void cross_scores(const Q* const* qg, const T* k, int64_t MP, int64_t c0, int64_t C, vf* s) {
  vf acc[G][CC] = {};
  for (int64_t d = 0; d < D; ++d) {
    const T* kd = k + d * MP + c0 * L;
    vf kv[CC];
    for (int c = 0; c < CC; ++c) kv[c] = load(kd + L * c);
    for (int g = 0; g < G; ++g) {
      const float qd = static_cast<float>(qg[g][d]);
      for (int c = 0; c < CC; ++c) acc[g][c] += qd * kv[c];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CC; ++c) s[g * C + c0 + c] = acc[g][c];
}

// G beams' attention over one image and head: scores, softmax, then each value row read once for
// the G beams' weighted sums
template <int D, int G, typename T, typename Q>
void beams_attend(const Q* const* qg, const T* k, const T* v, int64_t M, int64_t MP, float scale, vf* s,
                  float* const* y) {
  constexpr int DC = D / L;
  const int64_t C = MP / L;
  int64_t c0 = 0;
  for (; c0 + 4 <= C; c0 += 4) cross_scores<D, G, 4>(qg, k, MP, c0, C, s);
  for (; c0 + 2 <= C; c0 += 2) cross_scores<D, G, 2>(qg, k, MP, c0, C, s);
  for (; c0 < C; ++c0) cross_scores<D, G, 1>(qg, k, MP, c0, C, s);
  float inv[G];
  for (int g = 0; g < G; ++g) {
    vf* sg = s + g * C;
    for (int64_t m = M; m < MP; ++m) sg[m / L][m % L] = -INFINITY;
    vf mv = sg[0];
    for (int64_t c = 1; c < C; ++c) mv = sg[c] > mv ? sg[c] : mv;
    const float mx = hmax(mv);
    vf sv = (vf){};
    for (int64_t c = 0; c < C; ++c) { sg[c] = vexp((sg[c] - mx) * scale); sv += sg[c]; }
    inv[g] = 1.f / hsum(sv);
  }
  vf o[G][DC] = {};
  for (int64_t m = 0; m < M; ++m) {
    const T* vm = v + m * D;
    vf row[DC];
    for (int c = 0; c < DC; ++c) row[c] = load(vm + L * c);
    for (int g = 0; g < G; ++g) {
      const float w = s[g * C + m / L][m % L];
      for (int c = 0; c < DC; ++c) o[g][c] += w * row[c];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < DC; ++c) store(y[g] + L * c, o[g][c] * inv[g]);
}

template <int D, typename T, typename Q>
void cross_attend_impl(const at::Tensor& q, const at::Tensor& KT, const at::Tensor& V, int64_t M,
                       int64_t group, float scale, at::Tensor& out) {
  const int64_t B = KT.size(0), H = KT.size(1), MP = KT.size(3), C = MP / L, W = H * D;
  const Q* qp = q.data_ptr<Q>();
  const T* kt = KT.data_ptr<T>();
  const T* vv = V.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const int64_t qs = q.stride(0);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<vf> s(C * kMaxGroup);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* k = kt + bh * D * MP;
      const T* v = vv + bh * MP * D;
      if (bh + 1 < end) {  // the next task's keys and values on their way meanwhile
        const char* nk = reinterpret_cast<const char*>(k + D * MP);
        const char* nv = reinterpret_cast<const char*>(v + MP * D);
        for (int64_t i = 0; i < static_cast<int64_t>(D * MP * sizeof(T)); i += 64) __builtin_prefetch(nk + i, 0, 2);
        for (int64_t i = 0; i < static_cast<int64_t>(M * D * sizeof(T)); i += 64) __builtin_prefetch(nv + i, 0, 2);
      }
      for (int64_t g0 = 0; g0 < group; g0 += kMaxGroup) {
        const Q* qg[kMaxGroup];
        float* y[kMaxGroup];
        const int64_t gn = std::min<int64_t>(kMaxGroup, group - g0);
        for (int64_t g = 0; g < gn; ++g) {
          qg[g] = qp + (b * group + g0 + g) * qs + h * D;
          y[g] = op + (b * group + g0 + g) * W + h * D;
        }
        switch (gn) {
          case 4: beams_attend<D, 4>(qg, k, v, M, MP, scale, s.data(), y); break;
          case 3: beams_attend<D, 3>(qg, k, v, M, MP, scale, s.data(), y); break;
          case 2: beams_attend<D, 2>(qg, k, v, M, MP, scale, s.data(), y); break;
          default: beams_attend<D, 1>(qg, k, v, M, MP, scale, s.data(), y);
        }
      }
    }
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1 && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              name, ": expected a 2-D fp32 or bf16 tensor with contiguous rows");
}

// Calls f(head_dim, cache value, query value) with the compile-time head size and element types
// the source instantiates for these tensors: fp32 or bf16 caches, fp32 queries or bf16 ones with
// bf16 caches, heads of 16, 32, 64 or 128.
template <typename F>
void dispatch(int64_t D, at::ScalarType caches, at::ScalarType queries, F&& f) {
  TORCH_CHECK(caches == at::kFloat || caches == at::kBFloat16, "caches: fp32 or bf16");
  TORCH_CHECK(caches == at::kBFloat16 || queries == at::kFloat, "bf16 queries need bf16 caches");
  auto types = [&](auto d) {
    if (caches == at::kFloat) f(d, float{}, float{});
    else if (queries == at::kFloat) f(d, at::BFloat16{}, float{});
    else f(d, at::BFloat16{}, at::BFloat16{});
  };
  switch (D) {
    case 16: types(std::integral_constant<int, 16>{}); break;
    case 32: types(std::integral_constant<int, 32>{}); break;
    case 64: types(std::integral_constant<int, 64>{}); break;
    case 128: types(std::integral_constant<int, 128>{}); break;
    default: TORCH_CHECK(false, "head_dim ", D, " not built (16, 32, 64, 128)");
  }
}

}  // namespace

// `len` positions for every row, or with `lens` [N] int64 each row its own (rows at different
// positions: a slot refilled with a new image starts again at position 0)
at::Tensor self_attend_impl_checked(at::Tensor qkv, at::Tensor K, at::Tensor V, at::Tensor anc, int64_t len,
                                    const c10::optional<at::Tensor>& lens, double scale) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(K.is_contiguous() && V.is_contiguous() && K.sizes() == V.sizes() && K.dim() == 4, "K, V: [R, H, P, D]");
  TORCH_CHECK(K.scalar_type() == V.scalar_type(), "K, V: one dtype");
  TORCH_CHECK(anc.dim() == 2 && anc.stride(1) == 1 && anc.scalar_type() == at::kLong && anc.size(0) == qkv.size(0),
              "anc: [N, positions] int64");
  TORCH_CHECK(qkv.size(0) <= K.size(0), "more rows than the caches");
  const int64_t* lp = nullptr;
  if (lens.has_value() && lens->defined()) {
    TORCH_CHECK(lens->dim() == 1 && lens->is_contiguous() && lens->scalar_type() == at::kLong &&
                lens->size(0) == qkv.size(0), "lens: [N] int64");
    lp = lens->data_ptr<int64_t>();
    const int64_t lo = qkv.size(0) ? lens->min().item<int64_t>() : 1, hi = qkv.size(0) ? lens->max().item<int64_t>() : 1;
    TORCH_CHECK(lo >= 1 && hi <= K.size(2) && hi <= anc.size(1), "lens: positions beyond the caches");
  } else {
    TORCH_CHECK(len >= 1 && len <= K.size(2) && anc.size(1) >= len, "positions beyond the caches");
  }
  const int64_t D = K.size(3), W = K.size(1) * D;
  TORCH_CHECK(qkv.size(1) >= 3 * W, "qkv: fewer than 3 x heads x head_dim columns");
  auto out = at::empty({qkv.size(0), W}, qkv.options().dtype(at::kFloat));
  dispatch(D, K.scalar_type(), qkv.scalar_type(), [&](auto d, auto t, auto q) {
    self_attend_impl<decltype(d)::value, decltype(t), decltype(q)>(qkv, K, V, anc, len, lp, static_cast<float>(scale), out);
  });
  return out;
}

at::Tensor self_attend(at::Tensor qkv, at::Tensor K, at::Tensor V, at::Tensor anc, int64_t len, double scale) {
  return self_attend_impl_checked(qkv, K, V, anc, len, c10::nullopt, scale);
}

at::Tensor self_attend_rows(at::Tensor qkv, at::Tensor K, at::Tensor V, at::Tensor anc, at::Tensor lens, double scale) {
  return self_attend_impl_checked(qkv, K, V, anc, 0, lens, scale);
}

at::Tensor cross_attend(at::Tensor q, at::Tensor KT, at::Tensor V, int64_t M, int64_t group,
                           double scale) {
  check_rows(q, "q");
  TORCH_CHECK(KT.is_contiguous() && V.is_contiguous() && KT.dim() == 4 && V.dim() == 4, "KT [B, H, D, MP], V [B, H, MP, D]");
  TORCH_CHECK(KT.scalar_type() == V.scalar_type(), "KT, V: one dtype");
  const int64_t B = KT.size(0), H = KT.size(1), D = KT.size(2), MP = KT.size(3);
  TORCH_CHECK(V.size(0) == B && V.size(1) == H && V.size(2) == MP && V.size(3) == D, "V: [B, H, MP, D]");
  TORCH_CHECK(MP % 16 == 0 && M >= 1 && M <= MP, "positions: 1 <= M <= MP, MP a multiple of 16");
  TORCH_CHECK(group >= 1 && q.size(0) == B * group && q.size(1) >= H * D, "q: [B x group, >= W]");
  auto out = at::empty({q.size(0), H * D}, q.options().dtype(at::kFloat));
  dispatch(D, KT.scalar_type(), q.scalar_type(), [&](auto d, auto t, auto qt) {
    cross_attend_impl<decltype(d)::value, decltype(t), decltype(qt)>(q, KT, V, M, group, static_cast<float>(scale), out);
  });
  return out;
}

// torch.ops.mmcap.*: registered with the dispatcher (no Python bindings to compile: a third of
// the build time), visible to torch's profiler
TORCH_LIBRARY(mmcap, m) {
  m.def("self_attend(Tensor qkv, Tensor(a!) K, Tensor(b!) V, Tensor anc, int len, float scale) -> Tensor",
        &self_attend);
  m.def("self_attend_rows(Tensor qkv, Tensor(a!) K, Tensor(b!) V, Tensor anc, Tensor lens, float scale) -> Tensor",
        &self_attend_rows);
  m.def("cross_attend(Tensor q, Tensor KT, Tensor V, int M, int group, float scale) -> Tensor", &cross_attend);
}
