// One-query attention for cached decoding on CPUs: each (row, head) attends with one query, in
// one kernel call per layer instead of torch's chain (cast, gather, cat, matmul, softmax, matmul).
// Built at first use by mmcap.attention_kernel (torch.utils.cpp_extension, -O3 -march=native) as
// the operators torch.ops.mmcap.self_attend and torch.ops.mmcap.cross_attend.
//
// Queries and caches are fp32 or bf16 (the caller's mode), the image's keys and values also int8
// (`pack_image_kv` writes them); arithmetic and results are fp32, in vectors as wide as the
// compiling CPU's registers (`vec.h`).
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "vec.h"

// int8 image keys and values in VNNI order, attended with VPDPBUSD (AVX-512 VNNI): see
// `beams_attend_vnni`. Elsewhere they keep the plain layout and fp32 arithmetic.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define MMCAP_IMAGE_VNNI 1
#endif

namespace {

using namespace mmcap_vec;

// x[0, len) (a multiple of L) into dst quantized symmetrically to int8 (round half to even); returns
// the scale (largest |x| / 127; 0 keeps an all-zero vector zero): the int8 caches' vectors and the
// image's value rows
inline float quantize_int8(const float* x, int64_t len, int8_t* dst) {
  vf mv = (vf){};
  for (int64_t j = 0; j < len; j += L) {
    const vf a = load(x + j), abs = a < 0 ? -a : a;
    mv = abs > mv ? abs : mv;
  }
  const float amax = hmax(mv), inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t j = 0; j < len; j += L) store(dst + j, load(x + j) * inv);
  return amax / 127.f;
}

// Self-attention at position len-1 of rows [0, N): qkv [N, >= 3W] fp32 or bf16 (this step's query,
// key and value, heads of D values); caches K, V [R, H, P, D]. Row n's position p lives in cache row
// anc[n, p], so a beam reorder only permutes `anc`. This step's key and value are written first,
// at row n, position len-1 (the caller sets anc[n, len-1] = n). int8 caches hold each key and value
// vector quantized on its own (symmetric, round half to even), its scale in ks / vs [R, H, P]: half
// bf16's bytes, which a decoding step reads from memory.
template <int D, typename T, typename Q>
void self_attend_impl(const at::Tensor& qkv, at::Tensor& K, at::Tensor& V, const at::Tensor& anc,
                      int64_t len_all, const int64_t* lens, float scale, at::Tensor& out, float* ks, float* vs) {
  constexpr int DC = D / L;
  constexpr bool q8 = std::is_same_v<T, int8_t>;
  const int64_t N = qkv.size(0), H = K.size(1), P = K.size(2), W = H * D;
  const Q* base = qkv.data_ptr<Q>();
  T* kp = K.data_ptr<T>();
  T* vp = V.data_ptr<T>();
  // one vector of D values into `dst`, quantized with its scale into *sc where the caches are int8
  auto put = [](const vf* x, T* dst, float* sc) {
    if constexpr (q8) {
      alignas(64) float row[D];
      for (int c = 0; c < DC; ++c) store(row + L * c, x[c]);
      *sc = quantize_int8(row, D, dst);
    } else {
      for (int c = 0; c < DC; ++c) store(dst + L * c, x[c]);
    }
  };
  const int64_t* ap = anc.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t qs = qkv.stride(0), as = anc.stride(0);
  at::parallel_for(0, N * H, 16, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    std::vector<float> s((P + L - 1) / L * L);  // whole vectors of scores
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      const int64_t len = lens ? lens[n] : len_all;
      const Q* q = base + n * qs + h * D;
      T* kd = kp + ((n * H + h) * P + (len - 1)) * D;
      T* vd = vp + ((n * H + h) * P + (len - 1)) * D;
      vf qv[DC], kn[DC], vn[DC];
      for (int c = 0; c < DC; ++c) {
        kn[c] = load(q + W + L * c);
        vn[c] = load(q + 2 * W + L * c);
        qv[c] = load(q + L * c) * scale;
      }
      const int64_t at_new = (n * H + h) * P + (len - 1);
      put(kn, kd, q8 ? ks + at_new : nullptr);
      put(vn, vd, q8 ? vs + at_new : nullptr);
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
          if constexpr (q8) {
            __builtin_prefetch(ks + at / D, 0, 2);
            __builtin_prefetch(vs + at / D, 0, 2);
          }
        }
      }
      int64_t p = 0;
      for (; p + 4 <= len; p += 4) {  // four positions' sums reduced together
        vf acc[4];
        for (int j = 0; j < 4; ++j) {
          const T* kr = kp + ((a[p + j] * H + h) * P + p + j) * D;
          acc[j] = qv[0] * load(kr);
          for (int c = 1; c < DC; ++c) acc[j] += qv[c] * load(kr + L * c);
        }
        hsum4(acc, s.data() + p);
      }
      for (; p < len; ++p) {
        const T* kr = kp + ((a[p] * H + h) * P + p) * D;
        vf acc = qv[0] * load(kr);
        for (int c = 1; c < DC; ++c) acc += qv[c] * load(kr + L * c);
        s[p] = hsum(acc);
      }
      if constexpr (q8)
        for (p = 0; p < len; ++p) s[p] *= ks[(a[p] * H + h) * P + p];
      float mx = -INFINITY;
      for (p = 0; p < len; ++p) mx = s[p] > mx ? s[p] : mx;
      for (p = 0; p < len; p += L) store(s.data() + p, vexp(load(s.data() + p) - mx));  // past len: unused
      float sum = 0.f;
      for (p = 0; p < len; ++p) sum += s[p];
      const float inv = 1.f / sum;
      vf o[DC] = {};
      for (int64_t p = 0; p < len; ++p) {
        const T* vr = vp + ((a[p] * H + h) * P + p) * D;
        const float w = s[p] * inv * (q8 ? vs[(a[p] * H + h) * P + p] : 1.f);
        for (int c = 0; c < DC; ++c) o[c] += w * load(vr + L * c);
      }
      float* y = op + n * W + h * D;
      for (int c = 0; c < DC; ++c) store(y + L * c, o[c]);
    }
  });
}

// Cross-attention: q [N, >= W] fp32 or bf16, `group` consecutive rows (beams) per image; keys transposed
// KT [B, H, D, MP] and values V [B, H, MP, D] with the image's M positions padded to MP (a
// multiple of L), fp32, bf16, or int8 with a scale per key channel (ks [B, H, D]) and per value
// row (vs [B, H, MP]). One task per (image, head): its keys and values are read once for all its
// beams, G beams at a time (`beams_attend`).
constexpr int64_t kMaxGroup = 4;  // beams attended together: G x 4 score vectors stay in registers

// scores s[g][c0 .. c0 + CC) = q_g . keys over G beams' queries and CC vectors of positions: the
// G x CC sums stay in registers while the keys stream by (the loop bounds are compile-time)
template <int D, int G, int CC, typename T>
inline void cross_scores(const float (*qg)[D], const T* k, int64_t MP, int64_t c0, int64_t C, vf* s) {
  vf acc[G][CC] = {};
  for (int64_t d = 0; d < D; ++d) {
    const T* kd = k + d * MP + c0 * L;
    vf kv[CC];
    for (int c = 0; c < CC; ++c) kv[c] = load(kd + L * c);
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CC; ++c) acc[g][c] += qg[g][d] * kv[c];
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CC; ++c) s[g * C + c0 + c] = acc[g][c];
}

// G beams' attention over one image and head (queries `qg`, with the key scales folded in):
// scores, softmax, then each value row read once for the G beams' weighted sums
template <int D, int G, typename T>
void beams_attend(const float (*qg)[D], const T* k, const T* v, const float* vs, int64_t M, int64_t MP,
                  float scale, vf* s, float* const* y) {
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
    if (vs)  // int8 values: each row's scale goes into its weights
      for (int64_t c = 0; c < C; ++c) sg[c] *= load(vs + L * c);
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

#ifdef MMCAP_IMAGE_VNNI
// scores s[g][c0 x 16 ...) of G beams' int8 queries `q8` over CC vectors of 16 positions: int32 sums
// of VPDPBUSD over the keys' groups of 4 channels, then (sum - qoff) x qscale. Keys `k` [D/4, MP, 4]
// are unsigned (int8 + 128): qoff = 128 x the query's sum takes the 128 off.
template <int D, int G, int CC>
inline void vnni_scores(const int8_t (*q8)[D], const uint8_t* k, int64_t MP, int64_t c0, const int32_t* qoff,
                        const float* qscale, float* s) {
  __m512i acc[G][CC];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CC; ++c) acc[g][c] = _mm512_setzero_si512();
  for (int dg = 0; dg < D / 4; ++dg) {
    __m512i kv[CC];
    for (int c = 0; c < CC; ++c) kv[c] = _mm512_loadu_si512(k + (dg * MP + (c0 + c) * 16) * 4);
    for (int g = 0; g < G; ++g) {
      int32_t four;
      std::memcpy(&four, q8[g] + 4 * dg, 4);
      const __m512i qb = _mm512_set1_epi32(four);
      for (int c = 0; c < CC; ++c) acc[g][c] = _mm512_dpbusd_epi32(acc[g][c], kv[c], qb);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CC; ++c) {
      const __m512 x = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[g][c], _mm512_set1_epi32(qoff[g])));
      _mm512_storeu_ps(s + g * MP + (c0 + c) * 16, _mm512_mul_ps(x, _mm512_set1_ps(qscale[g])));
    }
}

// G beams' attention over one image and head with int8 image keys and values on AVX-512 VNNI: each
// beam's query (the key scales folded in, `qg`) quantized to int8 (symmetric, per beam), its scores
// summed by VPDPBUSD; then each beam's softmax weights times the value rows' scales, quantized to
// unsigned 8 bits (relative to the beam's largest), summed with the values by VPDPBUSD. Keys `k`
// [D/4, MP, 4] unsigned (int8 + 128: four channels of a position side by side), values `v` [MP/4,
// D, 4] (four positions of a channel side by side): `pack_image_kv`'s VNNI order. A quarter of the
// fp32 path's multiply-adds and no int8 -> fp32 conversions; the queries and weights rounded to 8
// bits as the int8 linear layers round their rows.
template <int D, int G>
void beams_attend_vnni(const float (*qg)[D], const uint8_t* k, const int8_t* v, const float* vs, int64_t M,
                       int64_t MP, float scale, float* s, uint8_t* wq, float* const* y) {
  constexpr int DC = D / 16;
  alignas(64) int8_t q8[G][D];
  float qscale[G];
  int32_t qoff[G];
  for (int g = 0; g < G; ++g) {
    __m512 mv = _mm512_setzero_ps();
    for (int c = 0; c < DC; ++c) mv = _mm512_max_ps(mv, _mm512_abs_ps(_mm512_loadu_ps(qg[g] + 16 * c)));
    const float amax = _mm512_reduce_max_ps(mv), inv = amax > 0.f ? 127.f / amax : 0.f;
    __m512i sum = _mm512_setzero_si512();
    for (int c = 0; c < DC; ++c) {  // rounded half to even (MXCSR's default)
      const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(qg[g] + 16 * c), _mm512_set1_ps(inv)));
      sum = _mm512_add_epi32(sum, qi);
      _mm_store_si128(reinterpret_cast<__m128i*>(q8[g] + 16 * c), _mm512_cvtsepi32_epi8(qi));
    }
    qscale[g] = amax / 127.f;
    qoff[g] = 128 * _mm512_reduce_add_epi32(sum);
  }
  const int64_t C = MP / 16;
  int64_t c0 = 0;
  for (; c0 + 4 <= C; c0 += 4) vnni_scores<D, G, 4>(q8, k, MP, c0, qoff, qscale, s);
  for (; c0 + 2 <= C; c0 += 2) vnni_scores<D, G, 2>(q8, k, MP, c0, qoff, qscale, s);
  for (; c0 < C; ++c0) vnni_scores<D, G, 1>(q8, k, MP, c0, qoff, qscale, s);
  // softmax weights x value scales, as unsigned bytes into wq [G, MP] (positions past M: 0)
  const int64_t groups = (M + 3) / 4, full = (M + 15) / 16;
  const __mmask16 tail = M % 16 ? static_cast<__mmask16>((1u << (M % 16)) - 1) : 0xFFFF;
  float out_scale[G];
  for (int g = 0; g < G; ++g) {
    float* sg = s + g * MP;
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int64_t c = 0; c < full; ++c)
      mv = _mm512_mask_max_ps(mv, c + 1 < full ? 0xFFFF : tail, mv, _mm512_loadu_ps(sg + 16 * c));
    const float mx = _mm512_reduce_max_ps(mv);
    __m512 sum = _mm512_setzero_ps(), wmax = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const __mmask16 live = c + 1 < full ? 0xFFFF : c + 1 == full ? tail : 0;
      const __m512 e = _mm512_maskz_mov_ps(live, (__m512)vexp((load(sg + 16 * c) - mx) * scale));
      sum = _mm512_add_ps(sum, e);
      const __m512 w = _mm512_mul_ps(e, _mm512_loadu_ps(vs + 16 * c));
      wmax = _mm512_max_ps(wmax, w);
      _mm512_storeu_ps(sg + 16 * c, w);
    }
    const float top = _mm512_reduce_max_ps(wmax), inv = top > 0.f ? 255.f / top : 0.f;
    for (int64_t c = 0; c < C; ++c) {
      const __m512i wi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(sg + 16 * c), _mm512_set1_ps(inv)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(wq + g * MP + 16 * c), _mm512_cvtusepi32_epi8(wi));
    }
    out_scale[g] = top / 255.f / _mm512_reduce_add_ps(sum);
  }
  __m512i o[G][DC];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < DC; ++c) o[g][c] = _mm512_setzero_si512();
  for (int64_t mg = 0; mg < groups; ++mg) {
    __m512i vv[DC];
    for (int c = 0; c < DC; ++c) vv[c] = _mm512_loadu_si512(v + (mg * D + 16 * c) * 4);
    for (int g = 0; g < G; ++g) {
      int32_t four;
      std::memcpy(&four, wq + g * MP + 4 * mg, 4);
      const __m512i wb = _mm512_set1_epi32(four);
      for (int c = 0; c < DC; ++c) o[g][c] = _mm512_dpbusd_epi32(o[g][c], wb, vv[c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < DC; ++c)
      _mm512_storeu_ps(y[g] + 16 * c, _mm512_mul_ps(_mm512_cvtepi32_ps(o[g][c]), _mm512_set1_ps(out_scale[g])));
}
#endif

template <int D, typename T, typename Q>
void cross_attend_impl(const at::Tensor& q, const at::Tensor& KT, const at::Tensor& V, const float* ks,
                       const float* vs, int64_t M, int64_t group, float scale, at::Tensor& out) {
  const int64_t B = KT.size(0), H = KT.size(1), MP = KT.size(3), C = MP / L, W = H * D;
  const Q* qp = q.data_ptr<Q>();
  const T* kt = KT.data_ptr<T>();
  const T* vv = V.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const int64_t qs = q.stride(0);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    std::vector<vf> s(C * kMaxGroup);
    std::vector<uint8_t> w8(std::is_same_v<T, int8_t> ? kMaxGroup * MP : 0);  // VNNI: 8-bit weights
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
        alignas(64) float qg[kMaxGroup][D];
        float* y[kMaxGroup];
        const int64_t gn = std::min<int64_t>(kMaxGroup, group - g0);
        for (int64_t g = 0; g < gn; ++g) {
          const Q* qr = qp + (b * group + g0 + g) * qs + h * D;
          for (int64_t d = 0; d < D; ++d) qg[g][d] = static_cast<float>(qr[d]) * (ks ? ks[bh * D + d] : 1.f);
          y[g] = op + (b * group + g0 + g) * W + h * D;
        }
        const float* vsr = vs ? vs + bh * MP : nullptr;
#ifdef MMCAP_IMAGE_VNNI
        if constexpr (std::is_same_v<T, int8_t> && D % 16 == 0) {
          const auto* ku = reinterpret_cast<const uint8_t*>(k);
          float* sf = reinterpret_cast<float*>(s.data());
          switch (gn) {
            case 4: beams_attend_vnni<D, 4>(qg, ku, v, vsr, M, MP, scale, sf, w8.data(), y); break;
            case 3: beams_attend_vnni<D, 3>(qg, ku, v, vsr, M, MP, scale, sf, w8.data(), y); break;
            case 2: beams_attend_vnni<D, 2>(qg, ku, v, vsr, M, MP, scale, sf, w8.data(), y); break;
            default: beams_attend_vnni<D, 1>(qg, ku, v, vsr, M, MP, scale, sf, w8.data(), y);
          }
          continue;
        }
#endif
        switch (gn) {
          case 4: beams_attend<D, 4>(qg, k, v, vsr, M, MP, scale, s.data(), y); break;
          case 3: beams_attend<D, 3>(qg, k, v, vsr, M, MP, scale, s.data(), y); break;
          case 2: beams_attend<D, 2>(qg, k, v, vsr, M, MP, scale, s.data(), y); break;
          default: beams_attend<D, 1>(qg, k, v, vsr, M, MP, scale, s.data(), y);
        }
      }
    }
  });
}

// Image keys and values of images `slots` into the cross-attention layout: k, v [n, M, H x D] fp32
// (rows contiguous) -> KT[slot] [H, D, MP] (transposed) and V[slot] [H, MP, D], positions past M
// zero. int8 caches: each key channel and each value row quantized on its own (symmetric, round
// half to even), their scales into ks [B, H, D] and vs [B, H, MP] (0 past M).
template <int D, typename T>
void pack_image_kv_impl(const at::Tensor& k, const at::Tensor& v, const int64_t* slots, at::Tensor& KT,
                        at::Tensor& V, float* ks, float* vs) {
  const int64_t n = k.size(0), M = k.size(1), H = KT.size(1), MP = KT.size(3);
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  T* ktp = KT.data_ptr<T>();
  T* vtp = V.data_ptr<T>();
  const int64_t k0 = k.stride(0), k1 = k.stride(1), v0 = v.stride(0), v1 = v.stride(1);
#ifdef MMCAP_IMAGE_VNNI
  if constexpr (std::is_same_v<T, int8_t>) {  // VNNI order (`beams_attend_vnni`)
    at::parallel_for(0, n * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ih = begin; ih < end; ++ih) {
        const int64_t i = ih / H, h = ih % H, bh = slots[i] * H + h;
        const float* kr = kp + i * k0 + h * D;
        const float* vr = vp + i * v0 + h * D;
        // keys: a scale per channel (the largest |k| over the positions), as unsigned k + 128 in
        // [D/4, MP, 4]: the 4 bytes of channels 4j..4j+3 of position m at (j x MP + m) x 4
        vf mv[D / L] = {};
        for (int64_t m = 0; m < M; ++m)
          for (int c = 0; c < D / L; ++c) {
            const vf a = load(kr + m * k1 + L * c), abs = a < 0 ? -a : a;
            mv[c] = abs > mv[c] ? abs : mv[c];
          }
        alignas(64) float inv[D];
        for (int c = 0; c < D / L; ++c)
          for (int l = 0; l < L; ++l) {
            const float amax = mv[c][l];
            inv[L * c + l] = amax > 0.f ? 127.f / amax : 0.f;
            ks[bh * D + L * c + l] = amax / 127.f;
          }
        uint32_t* kd = reinterpret_cast<uint32_t*>(ktp + bh * D * MP);
        std::fill(kd, kd + D / 4 * MP, 0x80808080u);  // positions past M: keys 0
        for (int64_t m = 0; m < M; ++m) {
          alignas(64) int8_t q[D];
          for (int c = 0; c < D / L; ++c) store(q + L * c, load(kr + m * k1 + L * c) * load(inv + L * c));
          for (int j = 0; j < D / 4; ++j) {
            uint32_t four;
            std::memcpy(&four, q + 4 * j, 4);
            kd[j * MP + m] = four ^ 0x80808080u;
          }
        }
        // values: a scale per position, in [MP/4, D, 4]: positions 4j..4j+3 of channel d at (j x D + d) x 4
        uint32_t* vd = reinterpret_cast<uint32_t*>(vtp + bh * MP * D);
        for (int64_t m0 = 0; m0 < MP; m0 += 4) {
          alignas(64) uint8_t q[4][D] = {};  // positions past M: zero
          for (int64_t j = 0; j < 4; ++j) {
            const int64_t m = m0 + j;
            if (m >= M) {
              vs[bh * MP + m] = 0.f;
              continue;
            }
            vs[bh * MP + m] = quantize_int8(vr + m * v1, D, reinterpret_cast<int8_t*>(q[j]));
          }
          for (int64_t d = 0; d < D; ++d)
            vd[(m0 / 4) * D + d] = q[0][d] | q[1][d] << 8 | q[2][d] << 16 | static_cast<uint32_t>(q[3][d]) << 24;
        }
      }
    });
    return;
  }
#endif
  at::parallel_for(0, n * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tk(D * MP, 0.f);  // a task's keys transposed; positions past M stay zero
    for (int64_t ih = begin; ih < end; ++ih) {
      const int64_t i = ih / H, h = ih % H, bh = slots[i] * H + h;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t d = 0; d < D; ++d) tk[d * MP + m] = kp[i * k0 + m * k1 + h * D + d];
      // one row of `len` values (a key channel, a value row; a multiple of L) into `dst`,
      // quantized where int8
      auto put = [&](const float* x, int64_t len, T* dst, float* scale) {
        if constexpr (std::is_same_v<T, int8_t>) {
          *scale = quantize_int8(x, len, dst);
        } else {
          for (int64_t j = 0; j < len; j += L) store(dst + j, load(x + j));
        }
      };
      T* kd = ktp + bh * D * MP;
      for (int64_t d = 0; d < D; ++d) put(tk.data() + d * MP, MP, kd + d * MP, ks ? ks + bh * D + d : nullptr);
      T* vd = vtp + bh * MP * D;
      for (int64_t m = 0; m < MP; ++m) {
        if (m < M) {
          put(vp + i * v0 + m * v1 + h * D, D, vd + m * D, vs ? vs + bh * MP + m : nullptr);
        } else {
          std::fill(vd + m * D, vd + (m + 1) * D, T(0.f));
          if (vs) vs[bh * MP + m] = 0.f;
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
// bf16 caches, heads of 16, 32, 64 or 128; where Int8 (the image's keys and values), int8 caches
// with fp32 or bf16 queries too.
template <bool Int8 = false, typename F>
void dispatch(int64_t D, at::ScalarType caches, at::ScalarType queries, F&& f) {
  TORCH_CHECK(caches == at::kFloat || caches == at::kBFloat16 || (Int8 && caches == at::kChar),
              Int8 ? "caches: fp32, bf16 or int8" : "caches: fp32 or bf16");
  TORCH_CHECK(caches != at::kFloat || queries == at::kFloat, "bf16 queries need bf16 or int8 caches");
  auto types = [&](auto d) {
    if constexpr (Int8) {
      if (caches == at::kChar) {
        if (queries == at::kFloat) f(d, int8_t{}, float{});
        else f(d, int8_t{}, at::BFloat16{});
        return;
      }
    }
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
                                    const c10::optional<at::Tensor>& lens, double scale,
                                    const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale) {
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
    int64_t lo = 1, hi = 1;  // a loop over a few dozen rows, not two reductions through the dispatcher
    if (qkv.size(0)) {
      lo = hi = lp[0];
      for (int64_t r = 1; r < qkv.size(0); ++r) lo = std::min(lo, lp[r]), hi = std::max(hi, lp[r]);
    }
    TORCH_CHECK(lo >= 1 && hi <= K.size(2) && hi <= anc.size(1), "lens: positions beyond the caches");
  } else {
    TORCH_CHECK(len >= 1 && len <= K.size(2) && anc.size(1) >= len, "positions beyond the caches");
  }
  const int64_t D = K.size(3), W = K.size(1) * D;
  TORCH_CHECK(qkv.size(1) >= 3 * W, "qkv: fewer than 3 x heads x head_dim columns");
  const bool q8 = K.scalar_type() == at::kChar, given = k_scale.has_value() && k_scale->defined();
  TORCH_CHECK(given == q8 && given == (v_scale.has_value() && v_scale->defined()),
              "K, V: scales go with int8 caches, and only with them");
  float *ks = nullptr, *vs = nullptr;
  if (q8) {
    for (const auto* t : {&*k_scale, &*v_scale})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == K.sizes().slice(0, 3),
                  "k_scale, v_scale: fp32 [R, H, P]");
    ks = k_scale->data_ptr<float>();
    vs = v_scale->data_ptr<float>();
  }
  auto out = at::empty({qkv.size(0), W}, qkv.options().dtype(at::kFloat));
  dispatch<true>(D, K.scalar_type(), qkv.scalar_type(), [&](auto d, auto t, auto q) {
    self_attend_impl<decltype(d)::value, decltype(t), decltype(q)>(qkv, K, V, anc, len, lp, static_cast<float>(scale), out,
                                                                   ks, vs);
  });
  return out;
}

at::Tensor self_attend(at::Tensor qkv, at::Tensor K, at::Tensor V, at::Tensor anc, int64_t len, double scale,
                       const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale) {
  return self_attend_impl_checked(qkv, K, V, anc, len, c10::nullopt, scale, k_scale, v_scale);
}

at::Tensor self_attend_rows(at::Tensor qkv, at::Tensor K, at::Tensor V, at::Tensor anc, at::Tensor lens, double scale,
                            const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale) {
  return self_attend_impl_checked(qkv, K, V, anc, 0, lens, scale, k_scale, v_scale);
}

// the scales of int8 image keys ([B, H, D]) and values ([B, H, MP]): given exactly for int8 caches
static std::pair<float*, float*> image_scales(const at::Tensor& KT, const c10::optional<at::Tensor>& k_scale,
                                                  const c10::optional<at::Tensor>& v_scale) {
  const bool given = k_scale.has_value() && k_scale->defined();
  TORCH_CHECK(given == (KT.scalar_type() == at::kChar) && given == (v_scale.has_value() && v_scale->defined()),
              "image keys and values: scales go with int8 caches, and only with them");
  if (!given) return {nullptr, nullptr};
  const int64_t B = KT.size(0), H = KT.size(1), D = KT.size(2), MP = KT.size(3);
  TORCH_CHECK(k_scale->scalar_type() == at::kFloat && k_scale->is_contiguous() && k_scale->sizes() == at::IntArrayRef({B, H, D}),
              "k_scale: fp32 [B, H, D]");
  TORCH_CHECK(v_scale->scalar_type() == at::kFloat && v_scale->is_contiguous() && v_scale->sizes() == at::IntArrayRef({B, H, MP}),
              "v_scale: fp32 [B, H, MP]");
  return {k_scale->data_ptr<float>(), v_scale->data_ptr<float>()};
}

static void check_image_layout(const at::Tensor& KT, const at::Tensor& V) {
  TORCH_CHECK(KT.is_contiguous() && V.is_contiguous() && KT.dim() == 4 && V.dim() == 4, "KT [B, H, D, MP], V [B, H, MP, D]");
  TORCH_CHECK(KT.scalar_type() == V.scalar_type(), "KT, V: one dtype");
  TORCH_CHECK(V.size(0) == KT.size(0) && V.size(1) == KT.size(1) && V.size(2) == KT.size(3) && V.size(3) == KT.size(2),
              "V: [B, H, MP, D]");
  TORCH_CHECK(KT.size(3) % 16 == 0, "positions: MP a multiple of 16");
}

at::Tensor cross_attend(at::Tensor q, at::Tensor KT, at::Tensor V, int64_t M, int64_t group, double scale,
                        const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale) {
  check_rows(q, "q");
  check_image_layout(KT, V);
  const int64_t B = KT.size(0), H = KT.size(1), D = KT.size(2), MP = KT.size(3);
  TORCH_CHECK(M >= 1 && M <= MP, "positions: 1 <= M <= MP");
  TORCH_CHECK(group >= 1 && q.size(0) == B * group && q.size(1) >= H * D, "q: [B x group, >= W]");
  const auto [ks, vs] = image_scales(KT, k_scale, v_scale);
  auto out = at::empty({q.size(0), H * D}, q.options().dtype(at::kFloat));
  dispatch<true>(D, KT.scalar_type(), q.scalar_type(), [&](auto d, auto t, auto qt) {
    cross_attend_impl<decltype(d)::value, decltype(t), decltype(qt)>(q, KT, V, ks, vs, M, group,
                                                                     static_cast<float>(scale), out);
  });
  return out;
}

void pack_image_kv(at::Tensor k, at::Tensor v, at::Tensor slots, at::Tensor KT, at::Tensor V,
                   const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale) {
  check_image_layout(KT, V);
  const int64_t B = KT.size(0), H = KT.size(1), D = KT.size(2), MP = KT.size(3);
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
              k.stride(2) == 1 && v.stride(2) == 1 && k.size(2) == H * D && k.size(1) <= MP,
              "k, v: fp32 [n, M <= ", MP, ", ", H * D, "] with contiguous rows");
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.size(0) == k.size(0),
              "slots: [n] int64");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.size(0); ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < B, "slots: ", sp[i], " outside the ", B, " images");
  const auto [ks, vs] = image_scales(KT, k_scale, v_scale);
  dispatch<true>(D, KT.scalar_type(), at::kFloat, [&](auto d, auto t, auto) {
    pack_image_kv_impl<decltype(d)::value, decltype(t)>(k, v, sp, KT, V, ks, vs);
  });
}

// whether int8 image keys and values are packed in VNNI order and attended by VPDPBUSD (AVX-512 VNNI
// builds), else in the plain layout, attended in fp32
bool vnni_image_kv() {
#ifdef MMCAP_IMAGE_VNNI
  return true;
#else
  return false;
#endif
}

// torch.ops.mmcap.*: registered with the dispatcher (no Python bindings to compile: a third of
// the build time), visible to torch's profiler
TORCH_LIBRARY(mmcap, m) {
  m.def("self_attend(Tensor qkv, Tensor(a!) K, Tensor(b!) V, Tensor anc, int len, float scale, "
        "Tensor(c!)? k_scale=None, Tensor(d!)? v_scale=None) -> Tensor", &self_attend);
  m.def("self_attend_rows(Tensor qkv, Tensor(a!) K, Tensor(b!) V, Tensor anc, Tensor lens, float scale, "
        "Tensor(c!)? k_scale=None, Tensor(d!)? v_scale=None) -> Tensor", &self_attend_rows);
  m.def("cross_attend(Tensor q, Tensor KT, Tensor V, int M, int group, float scale, Tensor? k_scale=None, "
        "Tensor? v_scale=None) -> Tensor", &cross_attend);
  m.def("vnni_image_kv() -> bool", &vnni_image_kv);
  m.def("pack_image_kv(Tensor k, Tensor v, Tensor slots, Tensor(a!) KT, Tensor(b!) V, Tensor(c!)? k_scale=None, "
        "Tensor(d!)? v_scale=None) -> ()", &pack_image_kv);
}
