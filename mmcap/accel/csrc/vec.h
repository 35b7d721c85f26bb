// Vector helpers of mmcap's C++ kernels (`one_query_attention.cpp`, `row_top.cpp`; `Top` also in
// `int8_matmul.cpp`): GCC's generic
// vector types, as wide as the compiling CPU's registers, so the code builds for whatever CPU
// compiles it.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__SSE__)
#include <immintrin.h>
#endif

namespace mmcap_vec {

// Vectors as wide as the target's registers: 16 floats with AVX-512, 8 with AVX, else 4 (SSE,
// NEON). Wider generic vectors than the registers compile to slow code: 16 lanes on an AVX2-only
// target ran the kernels 4-7x slower, 8 lanes on SSE2 2-3x.
#if defined(__AVX512F__)
constexpr int L = 16;
#elif defined(__AVX__)
constexpr int L = 8;
#else
constexpr int L = 4;
#endif
typedef float vf __attribute__((vector_size(4 * L)));
typedef float vh __attribute__((vector_size(2 * L)));
typedef uint32_t vu32 __attribute__((vector_size(4 * L)));
typedef uint16_t vu16 __attribute__((vector_size(2 * L)));
typedef int32_t vi32 __attribute__((vector_size(4 * L)));

typedef int8_t vi8 __attribute__((vector_size(L)));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline vf load(const int8_t* p) {  // GCC scalarizes the generic int8 -> float conversion: intrinsics where they exist
#if defined(__AVX512F__)
  const __m512 r = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  const __m256 r = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  vi8 b; std::memcpy(&b, p, sizeof b);
  const vf r = __builtin_convertvector(b, vf);
#endif
  vf v; std::memcpy(&v, &r, sizeof v); return v;
}
inline vf load(const at::BFloat16* p) {  // bf16 is the high half of an fp32
  vu16 h; std::memcpy(&h, p, sizeof h);
  const vu32 w = __builtin_convertvector(h, vu32) << 16;
  vf v; std::memcpy(&v, &w, sizeof v); return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void store(at::BFloat16* p, vf v) {  // round to nearest even, as torch's .to(bfloat16)
  vu32 w; std::memcpy(&w, &v, sizeof w);
  w = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
  const vu16 h = __builtin_convertvector(w, vu16);
  std::memcpy(p, &h, sizeof h);
}

inline void store(int8_t* p, vf v) {  // rounded half to even; |v| <= 127
#if defined(__AVX512F__)
  __m512 r; std::memcpy(&r, &v, sizeof r);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
#else
  for (int i = 0; i < L; ++i) p[i] = static_cast<int8_t>(std::nearbyint(v[i]));
#endif
}

// Results below FLT_MIN flushed to zero, and such inputs read as zero, within a kernel's scope (x86;
// elsewhere nothing): a softmax's far tails are denormal, and every operation on a denormal costs
// about a hundred cycles (the cross-attention kernel ran 3x slower on a random decoder's scores)
struct FlushDenormals {
#if defined(__SSE__)
  const unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // FTZ, DAZ
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

inline float hsum(vf v) {  // halves added until four lanes are left
  vh a, b; std::memcpy(&a, &v, sizeof a); std::memcpy(&b, reinterpret_cast<char*>(&v) + sizeof a, sizeof b);
  const vh s = a + b;
  float t[L / 2]; std::memcpy(t, &s, sizeof s);
  float r = 0.f;
  for (int i = 0; i < L / 2; ++i) r += t[i];
  return r;
}

// the sums of four vectors' lanes into out[0..3]: halves added pairwise across the four (on AVX-512),
// fewer shuffles and a shorter chain than four `hsum`s
inline void hsum4(const vf* v, float* out) {
#if defined(__AVX512F__)
  __m256 u[4];
  for (int j = 0; j < 4; ++j) {
    __m512 x;
    std::memcpy(&x, &v[j], sizeof x);
    u[j] = _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  }
  const __m256 w = _mm256_hadd_ps(_mm256_hadd_ps(u[0], u[1]), _mm256_hadd_ps(u[2], u[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(w), _mm256_extractf128_ps(w, 1)));
#else
  for (int j = 0; j < 4; ++j) out[j] = hsum(v[j]);
#endif
}

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < L; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// e^x for x <= 0 (scores minus their maximum): x = n ln2 + r, a degree-6 polynomial for e^r;
// relative error about 1e-7
inline vf vexp(vf x) {
  x = x < -87.f ? (vf){} - 87.f : x;
  const vi32 ni = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi32);  // round(x log2 e)
  const vf n = __builtin_convertvector(ni, vf);
  const vf r = x - n * 0.693359375f - n * -2.12194440e-4f;
  vf p = (vf){} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const vi32 e = (ni + 127) << 23;
  vf scale; std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

constexpr int64_t kMaxTop = 64;

// the k largest values seen so far, best first; among equal values the first seen stays ahead
// (`row_top.cpp`, and the LM head's top k in `int8_matmul.cpp`)
struct Top {
  float value[kMaxTop];
  int64_t index[kMaxTop];
  int64_t k, filled = 0;
  float floor = -INFINITY;  // what a value must beat to enter: the k-th best once k are in

  explicit Top(int64_t k = 1) : k(k) {}

  void offer(float x, int64_t i) {
    if (!(x > floor) && filled == k) return;
    int64_t p = std::min(filled, k - 1);
    for (; p > 0 && value[p - 1] < x; --p) {
      value[p] = value[p - 1];
      index[p] = index[p - 1];
    }
    value[p] = x;
    index[p] = i;
    filled = std::min(filled + 1, k);
    if (filled == k) floor = value[k - 1];
  }

  // the k best as log-probs (each minus the row's log-sum-exp `log_z`) and their indices
  void write(float log_z, float* values, int64_t* indices) const {
    for (int64_t i = 0; i < k; ++i) {
      values[i] = value[i] - log_z;
      indices[i] = index[i];
    }
  }
};

}  // namespace mmcap_vec
