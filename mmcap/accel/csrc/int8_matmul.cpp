// y = x W^T + b for decoding steps on CPUs with AMX: W in int8 (symmetric, per output channel), x
// quantized per row as it comes in, int8 products summed in int32 by AMX tiles; on CPUs with
// AVX-512 VNNI but no AMX, by VPDPBUSD over the same packed weights (`colsum` given), to the same
// int32 sums.
//
// A decoding step multiplies every decoder weight by a few dozen rows, so each weight byte is read
// from memory once per step and used by every row: the kernel streams the packed weights once, in
// the order the tiles consume them, and keeps the rows (a few KB) in cache. Without AMX in the
// compiler's target (-march=native elsewhere) it compiles to `amx_int8() == false`, without
// AVX-512 VNNI to `vnni_int8() == false`.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "vec.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define MMCAP_VNNI 1  // AVX-512 with VNNI: the vector helpers below, and the products without AMX
#endif
#if defined(MMCAP_VNNI) && defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define MMCAP_AMX 1
#endif

namespace {

constexpr int64_t kRows = 16;   // rows of a tile (activations, outputs); K / 4 rows of a weight tile
constexpr int64_t kCols = 16;   // output columns of a tile
constexpr int64_t kDepth = 64;  // int8 products summed per tile row
constexpr int64_t kTile = kRows * kDepth;  // bytes in a tile
constexpr int64_t kPanel = 8;  // column blocks whose weights stay in cache while all row pairs pass

bool amx_ready() {
#ifdef MMCAP_AMX
  static const bool ready = [] {
    // Linux hands out AMX's tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return false;
    unsigned long features = 0;
    return syscall(SYS_arch_prctl, 0x1022, &features) == 0 && (features & (1UL << 18));
  }();
  return ready;
#else
  return false;
#endif
}

// y = (x - mean) / sqrt(var + eps) * g + b over the row (LayerNorm, biased variance, two passes). The
// sums run in four accumulators: one chained through every 16 inputs held a 768-wide row to the
// adder's latency (a step's LayerNorm-ed layers spent ~5 us a call in these loops). Returns max |y|,
// taken as y is written (quantize_row's first pass, saved)
inline float normalize_row(const float* x, int64_t k, const float* g, const float* b, float eps, float* y) {
  float sum = 0.f, sq = 0.f;
  int64_t j = 0;
#ifdef MMCAP_VNNI
  __m512 vs[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; j + 64 <= k; j += 64)
    for (int u = 0; u < 4; ++u) vs[u] = _mm512_add_ps(vs[u], _mm512_loadu_ps(x + j + 16 * u));
  for (; j + 16 <= k; j += 16) vs[0] = _mm512_add_ps(vs[0], _mm512_loadu_ps(x + j));
  sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(vs[0], vs[1]), _mm512_add_ps(vs[2], vs[3])));
#endif
  for (; j < k; ++j) sum += x[j];
  const float mean = sum / static_cast<float>(k);
  j = 0;
#ifdef MMCAP_VNNI
  const __m512 vm = _mm512_set1_ps(mean);
  __m512 vq[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; j + 64 <= k; j += 64)
    for (int u = 0; u < 4; ++u) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + j + 16 * u), vm);
      vq[u] = _mm512_fmadd_ps(d, d, vq[u]);
    }
  for (; j + 16 <= k; j += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + j), vm);
    vq[0] = _mm512_fmadd_ps(d, d, vq[0]);
  }
  sq = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(vq[0], vq[1]), _mm512_add_ps(vq[2], vq[3])));
#endif
  for (; j < k; ++j) sq += (x[j] - mean) * (x[j] - mean);
  const float r = 1.f / std::sqrt(sq / static_cast<float>(k) + eps);
  j = 0;
#ifdef MMCAP_VNNI
  const __m512 vr = _mm512_set1_ps(r);
  __m512 vmax = _mm512_setzero_ps();
  for (; j + 16 <= k; j += 16) {
    const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm), vr);
    const __m512 out = _mm512_fmadd_ps(d, _mm512_loadu_ps(g + j), _mm512_loadu_ps(b + j));
    _mm512_storeu_ps(y + j, out);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(out));
  }
  float amax = _mm512_reduce_max_ps(vmax);
#else
  float amax = 0.f;
#endif
  for (; j < k; ++j) {
    y[j] = (x[j] - mean) * r * g[j] + b[j];
    amax = std::max(amax, std::fabs(y[j]));
  }
  return amax;
}

// max |x| over the row
inline float row_amax(const float* x, int64_t k) {
  float amax = 0.f;
  int64_t j = 0;
#ifdef MMCAP_VNNI
  __m512 vmax[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; j + 64 <= k; j += 64)  // four chains, as in normalize_row
    for (int u = 0; u < 4; ++u) vmax[u] = _mm512_max_ps(vmax[u], _mm512_abs_ps(_mm512_loadu_ps(x + j + 16 * u)));
  for (; j + 16 <= k; j += 16) vmax[0] = _mm512_max_ps(vmax[0], _mm512_abs_ps(_mm512_loadu_ps(x + j)));
  amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(vmax[0], vmax[1]), _mm512_max_ps(vmax[2], vmax[3])));
#endif
  for (; j < k; ++j) amax = std::max(amax, std::fabs(x[j]));
  return amax;
}

// q = round(x * 127 / amax) (half to even) into `q`, amax = max |x| (`row_amax`, or normalize_row's),
// each byte XORed with `flip` (0x80 gives VNNI's q + 128 as unsigned bytes); returns the row's
// scale amax / 127
inline float quantize_row(const float* x, int64_t k, float amax, int8_t* q, uint8_t flip) {
  if (!(amax > 0.f)) {  // an all-zero row: its zeros stay zeros
    std::memset(q, flip, k);
    return 1.f;
  }
  const float inv = 127.f / amax;
  int64_t j = 0;
#ifdef MMCAP_VNNI
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m128i vflip = _mm_set1_epi8(static_cast<char>(flip));
  for (; j + 16 <= k; j += 16) {
    // the conversion rounds half to even itself (MXCSR's default mode, which the kernels never change)
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + j), vinv);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j),
                     _mm_xor_si128(_mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)), vflip));
  }
#endif
  for (; j < k; ++j) q[j] = static_cast<int8_t>(static_cast<uint8_t>(std::nearbyint(x[j] * inv)) ^ flip);
  return amax / 127.f;
}

#ifdef MMCAP_AMX
struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
#endif

#ifdef MMCAP_VNNI
// e^x, x clamped to [-87, 88]: x = n ln2 + r, a degree-6 polynomial for e^r (relative error ~1e-7)
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// GPT-2's tanh GELU: x (1 + tanh(u)) / 2 = x / (1 + e^(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3).
// The division as a 14-bit reciprocal and one Newton step (relative error a few 1e-8): a
// vector division waits ~16 cycles, and the fc layer divides 48 x 3,072 outputs a call
inline __m512 gelu_tanh16(__m512 x) {
  const __m512 x2 = _mm512_mul_ps(x, x);
  const __m512 u2 = _mm512_mul_ps(x, _mm512_fmadd_ps(x2, _mm512_set1_ps(-2.f * 0.7978845608028654f * 0.044715f),
                                                     _mm512_set1_ps(-2.f * 0.7978845608028654f)));
  // u2 at most 80: 1 / (1 + e^80) = 1.8e-35 stays a normal float (at e^88 the reciprocal is
  // subnormal, and products with subnormals take microcode assists: the step ran 1.6x slower);
  // x / (1 + e^80) is below 1e-33 for any x a layer makes, where the GELU is 0 to fp32 anyway
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_min_ps(u2, _mm512_set1_ps(80.f))));
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(x, _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f))));
}

// rows x column blocks of sums in registers: 6 x 4 + 4 weights + 1 row = 29 of 32 (12 x 2, 8 x 3 and
// 4 x 4 timed the same, 17-18.5 ms for a step's 73 layers at 48 rows)
constexpr int kVnniRows = 6;
constexpr int kVnniCols = 4;
static_assert(kVnniRows <= 6 && kVnniCols == 4, "vnni_sums names 6 x 4 sums; its prefetch takes j & 3, j >> 2");
// inputs per pass over a column group's weights: 4 blocks x 256 inputs = 16 KB, which stay in L1
// while every row passes over them
constexpr int64_t kVnniDepth = 256;

// int32 sums of R rows of activations by C 16-column blocks of weights, over `groups` groups of 4
// inputs, into `sums` [R, ld] (C x 16 columns of it): started from the C x 16 values at `first`
// where given, else added to. On AVX-512 VNNI (CPUs without AMX): VPDPBUSD multiplies unsigned
// bytes by signed ones, so the rows come in as q + 128 (`a`) and the sums start from -128 x the
// weight's column sums, which takes that off. The weights are AMX's
// packing: a tile's row holds 4 products of 16 columns, one register here, and a column block's
// tiles lie in a row, so group g of a block is 64 bytes at g x 64. Meanwhile it prefetches `pf_lines`
// lines into L2, line j (from `pf_first`) at pf + (j % kVnniCols) x b_stride + (j / kVnniCols) x 64:
// the next weights of a group of blocks.
template <int R, int C>
inline void vnni_sums(const uint8_t* a, int64_t lda, const int8_t* b, int64_t b_stride, int64_t groups, int32_t* sums,
                      int64_t ld, const int32_t* first, const char* pf, int64_t pf_first, int64_t pf_lines) {
  // the sums as named variables: GCC kept an array of them on the stack, loading and storing every
  // sum at every product (2-D or flat, loops unrolled or not)
  __m512i w0, w1, w2, w3;
#define MMCAP_ROW_SUMS(r)                                                                                     \
  __m512i s##r##_0 = _mm512_setzero_si512(), s##r##_1 = s##r##_0, s##r##_2 = s##r##_0, s##r##_3 = s##r##_0; \
  if constexpr (R > r) {                                                                                      \
    const int32_t* in = first ? first : sums + r * ld;                                                        \
    s##r##_0 = _mm512_load_si512(in);                                                                         \
    if constexpr (C > 1) s##r##_1 = _mm512_load_si512(in + kCols);                                            \
    if constexpr (C > 2) s##r##_2 = _mm512_load_si512(in + 2 * kCols);                                        \
    if constexpr (C > 3) s##r##_3 = _mm512_load_si512(in + 3 * kCols);                                        \
  }
  MMCAP_ROW_SUMS(0) MMCAP_ROW_SUMS(1) MMCAP_ROW_SUMS(2) MMCAP_ROW_SUMS(3) MMCAP_ROW_SUMS(4) MMCAP_ROW_SUMS(5)
#undef MMCAP_ROW_SUMS
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* wg = b + g * kDepth;
    if (g < pf_lines) {
      const int64_t j = pf_first + g;
      _mm_prefetch(pf + (j & (kVnniCols - 1)) * b_stride + (j >> 2) * kDepth, _MM_HINT_T1);  // j >= 0
    }
    w0 = _mm512_load_si512(wg);
    if constexpr (C > 1) w1 = _mm512_load_si512(wg + b_stride);
    if constexpr (C > 2) w2 = _mm512_load_si512(wg + 2 * b_stride);
    if constexpr (C > 3) w3 = _mm512_load_si512(wg + 3 * b_stride);
// VPDPBUSD in asm, the sum tied to its register: GCC 12's builtin left it moving and spilling sums
#define MMCAP_DPBUSD(sum, x, w) asm("vpdpbusd %2, %1, %0" : "+v"(sum) : "v"(x), "v"(w))
#define MMCAP_ROW_PRODUCTS(r)                                       \
    if constexpr (R > r) {                                          \
      int32_t four;                                                 \
      std::memcpy(&four, a + r * lda + 4 * g, 4);                   \
      const __m512i x = _mm512_set1_epi32(four);                    \
      MMCAP_DPBUSD(s##r##_0, x, w0);                                \
      if constexpr (C > 1) MMCAP_DPBUSD(s##r##_1, x, w1);           \
      if constexpr (C > 2) MMCAP_DPBUSD(s##r##_2, x, w2);           \
      if constexpr (C > 3) MMCAP_DPBUSD(s##r##_3, x, w3);           \
    }
    MMCAP_ROW_PRODUCTS(0) MMCAP_ROW_PRODUCTS(1) MMCAP_ROW_PRODUCTS(2)
    MMCAP_ROW_PRODUCTS(3) MMCAP_ROW_PRODUCTS(4) MMCAP_ROW_PRODUCTS(5)
#undef MMCAP_ROW_PRODUCTS
#undef MMCAP_DPBUSD
  }
#define MMCAP_ROW_STORE(r)                                                           \
  if constexpr (R > r) {                                                             \
    int32_t* out = sums + r * ld;                                                    \
    _mm512_store_si512(out, s##r##_0);                                               \
    if constexpr (C > 1) _mm512_store_si512(out + kCols, s##r##_1);                  \
    if constexpr (C > 2) _mm512_store_si512(out + 2 * kCols, s##r##_2);              \
    if constexpr (C > 3) _mm512_store_si512(out + 3 * kCols, s##r##_3);              \
  }
  MMCAP_ROW_STORE(0) MMCAP_ROW_STORE(1) MMCAP_ROW_STORE(2) MMCAP_ROW_STORE(3) MMCAP_ROW_STORE(4) MMCAP_ROW_STORE(5)
#undef MMCAP_ROW_STORE
}

using VnniSums = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, int32_t*, int64_t, const int32_t*,
                          const char*, int64_t, int64_t);
template <int R, int... C>
constexpr std::array<VnniSums, kVnniCols> vnni_row(std::integer_sequence<int, C...>) { return {vnni_sums<R, C + 1>...}; }
template <int... R>
constexpr std::array<std::array<VnniSums, kVnniCols>, kVnniRows> vnni_table(std::integer_sequence<int, R...>) {
  return {vnni_row<R + 1>(std::make_integer_sequence<int, kVnniCols>())...};
}
constexpr auto kVnniSums = vnni_table(std::make_integer_sequence<int, kVnniRows>());
#endif

#ifdef MMCAP_AMX
// int32 sums of Rows 16-row blocks of activations by Cols 16-column blocks of weights, left in the
// tiles (`store_sums` writes them out). Tiles 0-3 hold the sums (r x 2 + c), 4-5 the activations, 6-7 the
// weights: each loaded tile feeds Cols or Rows products. AMX does not rename tiles, so a tile is
// loaded again only once the products reading it are done; at 2 x 2 a decoding step's int8 layers
// ran 1.2-1.5x faster than at 3 row blocks x 1 column block, which loads every activation tile
// once per product (both kernels side by side on GPT-2 small's 73 layers); 3 x 1 with the weight
// tile double-buffered was slower too (docs/performance.md)
template <int Rows, int Cols>
inline void tile_sums(const int8_t* a, int64_t lda, const int8_t* b, int64_t b_stride, int64_t depth_tiles) {
  _tile_zero(0);
  if (Cols > 1) _tile_zero(1);
  if (Rows > 1) _tile_zero(2);
  if (Rows > 1 && Cols > 1) _tile_zero(3);
  for (int64_t kb = 0; kb < depth_tiles; ++kb) {
    _tile_loadd(4, a + kb * kDepth, lda);
    _tile_loadd(6, b + kb * kTile, kDepth);
    _tile_dpbssd(0, 4, 6);
    if (Cols > 1) {
      _tile_loadd(7, b + b_stride + kb * kTile, kDepth);
      _tile_dpbssd(1, 4, 7);
    }
    if (Rows > 1) {
      _tile_loadd(5, a + kRows * lda + kb * kDepth, lda);
      _tile_dpbssd(2, 5, 6);
      if (Cols > 1) _tile_dpbssd(3, 5, 7);
    }
  }
}

// the sums of `tile_sums<Rows, Cols>` into `sums` [Rows x 16, Cols x 16]
template <int Rows, int Cols>
inline void store_sums(int32_t* sums) {
  constexpr int64_t ld = Cols * kCols;
  _tile_stored(0, sums, ld * 4);
  if (Cols > 1) _tile_stored(1, sums + kCols, ld * 4);
  if (Rows > 1) _tile_stored(2, sums + kRows * ld, ld * 4);
  if (Rows > 1 && Cols > 1) _tile_stored(3, sums + kRows * ld + kCols, ld * 4);
}
#endif

// one thread's running log-sum-exp of a row's outputs (a maximum and a sum of exponentials below it
// per lane) and the row's k best outputs so far: the LM head's log-softmax top k, folded in as the
// outputs are made, so that the [rows, vocab] logits are never written
struct RowLse {
  alignas(64) float max[16];
  alignas(64) float sum[16];
  mmcap_vec::Top top;
};

}  // namespace

bool amx_int8() { return amx_ready(); }

#ifdef MMCAP_VNNI
bool vnni_int8() { return true; }
#else
bool vnni_int8() { return false; }
#endif

// W [N, K] int8 -> [N/16, K/64, 16, 64]: each 16 x 64 block of W as one AMX weight tile, whose row
// r holds the 4 products k = 4r..4r+3 of each of the 16 columns side by side (zero-padded)
at::Tensor int8_pack(at::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "int8_pack: want an int8 matrix [out, in]");
  w = w.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t nb = (n + kCols - 1) / kCols, kb = (k + kDepth - 1) / kDepth;
  auto out = at::zeros({nb, kb, kRows, kDepth}, w.options());
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < k; ++j)
      dst[((i / kCols) * kb + j / kDepth) * kTile + ((j % kDepth) / 4) * kDepth + (i % kCols) * 4 + j % 4] =
          src[i * k + j];
  return out;
}

// x [M, K] float -> y [M, N] float: x LayerNorm-ed per row where `norm_weight` is given, then
// quantized per row (symmetric, round half to even), int8
// products summed in int32 on AMX, then y = sum * x_scale[m] * w_scale[n] + bias[n], then GPT-2's
// GELU of y where `gelu`, then y + residual[m, n] where given: a decoding step's layer and what
// follows it in one pass over the outputs
// With `lse` (int8_linear_top), y is not written: thread t folds its columns of row r into
// (*lse)[t * rows + r], and the result is an empty tensor.
static at::Tensor int8_matmul(at::Tensor x, const at::Tensor& packed, const at::Tensor& w_scale,
                              const c10::optional<at::Tensor>& bias, int64_t n, const c10::optional<at::Tensor>& residual,
                              bool gelu, const c10::optional<at::Tensor>& norm_weight,
                              const c10::optional<at::Tensor>& norm_bias, double eps, std::vector<RowLse>* lse,
                              int64_t top_k, const c10::optional<at::Tensor>& colsum) {
  const bool vnni = colsum.has_value() && colsum->defined();
  TORCH_CHECK(vnni || amx_ready(), "int8_linear: AMX is not available on this CPU");
  TORCH_CHECK(!vnni || vnni_int8(), "int8_linear: this build has no AVX-512 VNNI (colsum given)");
  TORCH_CHECK(x.dim() == 2, "int8_linear: want x [rows, in]");
  x = x.to(at::kFloat).contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t nb = packed.size(0), kb = packed.size(1), kp = kb * kDepth;
  TORCH_CHECK(k <= kp && kp - k < kDepth && (n + kCols - 1) / kCols == nb && w_scale.numel() == n,
              "int8_linear: x [", m, ", ", k, "] does not match the packed weight of ", n, " outputs");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous(), "int8_linear: want fp32 scales");
  TORCH_CHECK(!vnni || (colsum->scalar_type() == at::kInt && colsum->is_contiguous() && colsum->numel() == nb * kCols),
              "int8_linear: want int32 column sums of the weight, zero-padded to ", nb * kCols);
  TORCH_CHECK(!bias.has_value() || !bias->defined() || (bias->scalar_type() == at::kFloat && bias->numel() == n &&
              bias->is_contiguous()), "int8_linear: want an fp32 bias of ", n);
  const bool has_residual = residual.has_value() && residual->defined();
  TORCH_CHECK(!has_residual || (residual->scalar_type() == at::kFloat && residual->dim() == 2 &&
              residual->size(0) == m && residual->size(1) == n),
              "int8_linear: want an fp32 residual [", m, ", ", n, "]");
  const at::Tensor res = has_residual ? residual->contiguous() : at::Tensor();
  const bool norm = norm_weight.has_value() && norm_weight->defined();
  TORCH_CHECK(!norm || (norm_bias.has_value() && norm_bias->defined() && norm_weight->scalar_type() == at::kFloat &&
              norm_bias->scalar_type() == at::kFloat && norm_weight->is_contiguous() && norm_bias->is_contiguous() &&
              norm_weight->numel() == k && norm_bias->numel() == k),
              "int8_linear: want an fp32 LayerNorm weight and bias of ", k);
  auto out = at::empty({lse ? 0 : m, n}, x.options());
  if (m == 0) return out;
#if defined(_OPENMP)
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nb)));
#else
  const int threads = 1;
#endif
  if (lse) {
    lse->resize(threads * m);
    for (RowLse& st : *lse) {
      std::fill(st.max, st.max + 16, -INFINITY);
      std::fill(st.sum, st.sum + 16, 0.f);
      st.top = mmcap_vec::Top(top_k);
    }
  }
  const int64_t mp = (m + kRows - 1) / kRows * kRows;
  // the rows quantized into buffers kept between calls (padding rows and columns zero), then the
  // column blocks: both split between the threads of one parallel region
  thread_local std::vector<int8_t> qbuf;
  thread_local std::vector<float> sbuf;
  qbuf.resize(mp * kp);
  sbuf.resize(m);
  int8_t* qp = qbuf.data();
  float* sp = sbuf.data();
  const float* xp = x.data_ptr<float>();
  std::memset(qp + m * kp, 0, (mp - m) * kp);
  auto quantize_rows = [&](int64_t r0, int64_t r1) {
    thread_local std::vector<float> normed;
    normed.resize(norm ? k : 0);
    const uint8_t flip = vnni ? 0x80u : 0u;  // on VNNI q + 128 as unsigned bytes (the padding's 128s meet zero weights)
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + r * k;
      float amax;
      if (norm) {
        amax = normalize_row(row, k, norm_weight->data_ptr<float>(), norm_bias->data_ptr<float>(),
                             static_cast<float>(eps), normed.data());
        row = normed.data();
      } else {
        amax = row_amax(row, k);
      }
      int8_t* q = qp + r * kp;
      sp[r] = quantize_row(row, k, amax, q, flip);
      std::memset(q + k, flip, kp - k);
    }
  };
  const float* ws = w_scale.data_ptr<float>();
  const float* bp = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  const int8_t* wp = packed.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  const float* rp = has_residual ? res.data_ptr<float>() : nullptr;
#ifdef MMCAP_VNNI
  auto column_blocks = [&](int64_t b0, int64_t b1, RowLse* st) {
    if (b0 >= b1) return;
    // y for `rows` rows from r0 and `blocks` (1-4) column blocks from c0, from their int32 sums
    // (row stride ld, block c at c x 16): row by row, its blocks side by side. Block by block, the
    // fc layer's rows were 12 KB apart (48 rows in one set of L1) and the LM head's running
    // log-sum-exp went through memory at every block
    auto finish = [&](int64_t r0, int64_t rows, int64_t c0, int64_t blocks, const int32_t* s, int64_t ld) {
      __mmask16 mask[4];
      __m512 wsv[4], bv[4];
      for (int64_t c = 0; c < blocks; ++c) {
        const int64_t cols = std::min(kCols, n - c0 - c * kCols);
        mask[c] = cols == kCols ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
        wsv[c] = _mm512_maskz_loadu_ps(mask[c], ws + c0 + c * kCols);
        bv[c] = bp ? _mm512_maskz_loadu_ps(mask[c], bp + c0 + c * kCols) : _mm512_setzero_ps();
      }
      for (int64_t i = 0; i < rows; ++i) {
        const __m512 xs = _mm512_set1_ps(sp[r0 + i]);
        if (st) {  // the row's top k and log-sum-exp (int8_linear_top has no GELU or residual)
          RowLse& row = st[r0 + i];
          __m512 mx = _mm512_load_ps(row.max), sum = _mm512_load_ps(row.sum);
          for (int64_t c = 0; c < blocks; ++c) {
            const __m512 acc = _mm512_cvtepi32_ps(_mm512_load_si512(s + i * ld + c * kCols));
            const __m512 y = _mm512_mask_blend_ps(mask[c], _mm512_set1_ps(-INFINITY),
                                                  _mm512_fmadd_ps(_mm512_mul_ps(acc, xs), wsv[c], bv[c]));
            const __mmask16 hit = row.top.filled < top_k ? mask[c]
                                  : _mm512_mask_cmp_ps_mask(mask[c], y, _mm512_set1_ps(row.top.floor), _CMP_GT_OQ);
            if (hit) {
              alignas(64) float v[16];
              _mm512_store_ps(v, y);
              for (int l = 0; l < 16; ++l)
                if (hit >> l & 1) row.top.offer(v[l], c0 + c * kCols + l);
            }
            const __mmask16 grow = _mm512_mask_cmp_ps_mask(mask[c], y, mx, _CMP_GT_OQ);
            if (grow) {  // a new maximum in some lanes: their sums rescaled to it (lanes at -inf hold 0)
              const __m512 nm = _mm512_mask_mov_ps(mx, grow, y);
              sum = _mm512_mask_mul_ps(sum, grow, sum, exp16(_mm512_sub_ps(mx, nm)));
              mx = nm;
            }
            sum = _mm512_mask_add_ps(sum, mask[c], sum, exp16(_mm512_sub_ps(y, mx)));
          }
          _mm512_store_ps(row.max, mx);
          _mm512_store_ps(row.sum, sum);
          continue;
        }
        float* out_row = op + (r0 + i) * n + c0;
        for (int64_t c = 0; c < blocks; ++c) {
          const __m512 acc = _mm512_cvtepi32_ps(_mm512_load_si512(s + i * ld + c * kCols));
          __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(acc, xs), wsv[c], bv[c]);
          if (gelu) y = gelu_tanh16(y);
          if (rp) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask[c], rp + (r0 + i) * n + c0 + c * kCols));
          _mm512_mask_storeu_ps(out_row + c * kCols, mask[c], y);
        }
      }
    };
    if (vnni) {
      // column groups of kVnniCols blocks; within one, kVnniDepth inputs at a time, whose weights
      // (16 KB) stay in L1 while every row passes over them, kVnniRows rows a call, the sums kept
      // for all rows. Re-reading a panel's weights from L2 for every 6 rows held a 768 x 2304 layer's
      // 6-row passes to L2's rate (one row over its 1.8 MB took 44 us; 6 rows' products, at the inner
      // loop's in-cache rate, come to about 27 us). A step's 73 layers,
      // alternating builds: 16.4-18.9 ms against 18.2-19.3 at 48 rows, 9.0-9.4 against 10.1-10.9 at 16.
      const uint8_t* qu = reinterpret_cast<const uint8_t*>(qp);
      const int32_t* cs = colsum->data_ptr<int32_t>();
      constexpr int64_t ld = kVnniCols * kCols;
      thread_local std::vector<int32_t> vbuf;
      vbuf.resize(m * ld + 16);
      int32_t* vs = reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(vbuf.data()) + 63) & ~uintptr_t(63));
      const int64_t groups = kp / 4, step = kVnniDepth / 4;
      const int64_t row_calls = (m + kVnniRows - 1) / kVnniRows;
      alignas(64) int32_t start[ld];  // the sums' start: -128 x the column sums of the group's blocks
      for (int64_t b = b0; b < b1; b += kVnniCols) {
        const int64_t cols = std::min<int64_t>(kVnniCols, b1 - b);
        const int8_t* wb = wp + b * kb * kTile;
        for (int64_t c = 0; c < cols; ++c)
          _mm512_store_si512(start + c * kCols, _mm512_sub_epi32(_mm512_setzero_si512(),
                                                                 _mm512_slli_epi32(_mm512_loadu_si512(cs + (b + c) * kCols), 7)));
        for (int64_t g0 = 0; g0 < groups; g0 += step) {
          const int64_t gn = std::min(step, groups - g0);
          // the next weights into L2 while the rows after the first pass over these: the next
          // inputs of these blocks, or the next group's first
          const bool last = g0 + step >= groups;
          const char* pf = reinterpret_cast<const char*>(last ? wb + cols * kb * kTile : wb + (g0 + step) * kDepth);
          const int64_t pf_total = kVnniCols * (last ? (b + cols < b1 ? std::min(step, groups) : 0)
                                                      : std::min(step, groups - g0 - step));
          const int64_t per_call = row_calls > 1 ? (pf_total + row_calls - 2) / (row_calls - 1) : 0;
          int64_t fetched = 0;
          for (int64_t r0 = 0; r0 < m; r0 += kVnniRows) {
            const int64_t rows = std::min<int64_t>(kVnniRows, m - r0);
            const int64_t lines = r0 > 0 ? std::min({per_call, pf_total - fetched, gn}) : 0;
            kVnniSums[rows - 1][cols - 1](qu + r0 * kp + 4 * g0, kp, wb + g0 * kDepth, kb * kTile, gn, vs + r0 * ld, ld,
                                          g0 == 0 ? start : nullptr, pf, fetched, lines);
            fetched += lines;
          }
        }
        finish(0, m, b * kCols, cols, vs, ld);
      }
      return;
    }
#ifdef MMCAP_AMX
    // two buffers of sums: a pass's products run on the tiles while the outputs of the pass
    // before are finished from the other (its sums stored long before they are read back)
    alignas(64) int32_t sums[2][2 * kRows * 2 * kCols];
    struct Pass {
      int64_t r0, rows, b;
      bool two_cols;
    };
    Pass done{0, 0, 0, false};  // the pass whose outputs are still to finish (rows 0: none)
    int buf = 0;
    auto finish_pass = [&](const Pass& q, const int32_t* s) {
      const int64_t blocks = q.two_cols ? 2 : 1;  // the sums [rows, blocks x 16], row after row
      finish(q.r0, q.rows, q.b * kCols, blocks, s, blocks * kCols);
    };
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.rows[t] = kRows;
      cfg.colsb[t] = kDepth;
    }
    _tile_loadconfig(&cfg);
    // panels of kPanel column blocks: the first pair of row blocks reads a panel's weights from
    // memory, the next pairs (a step's rows 32-47; an image's keys and values) from cache
    for (int64_t p0 = b0; p0 < b1; p0 += kPanel) {
      const int64_t p1 = std::min(b1, p0 + kPanel);
      for (int64_t r0 = 0; r0 < mp; r0 += 2 * kRows) {
        const bool two_rows = mp - r0 >= 2 * kRows;
        const int64_t rows = std::min<int64_t>((two_rows ? 2 : 1) * kRows, m - r0);
        const int8_t* a = qp + r0 * kp;
        for (int64_t b = p0; b < p1; b += 2) {
          const int8_t* wb = wp + b * kb * kTile;
          const bool two_cols = b + 1 < p1;
          // this pass's products, the pass before finished meanwhile, then this pass's sums stored
          auto pass = [&](auto R, auto C) {
            tile_sums<R(), C()>(a, kp, wb, kb * kTile, kb);
            if (done.rows > 0) finish_pass(done, sums[1 - buf]);
            store_sums<R(), C()>(sums[buf]);
          };
          using One = std::integral_constant<int, 1>;
          using Two = std::integral_constant<int, 2>;
          if (two_rows && two_cols) pass(Two{}, Two{});
          else if (two_rows) pass(Two{}, One{});
          else if (two_cols) pass(One{}, Two{});
          else pass(One{}, One{});
          done = Pass{r0, rows, b, two_cols};
          buf = 1 - buf;
        }
      }
    }
    if (done.rows > 0) finish_pass(done, sums[1 - buf]);
    _tile_release();
#endif
  };
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    quantize_rows(m * t / nt, m * (t + 1) / nt);
#pragma omp barrier
    column_blocks(nb * t / nt, nb * (t + 1) / nt, lse ? lse->data() + t * m : nullptr);
  }
#else
  quantize_rows(0, m);
  if (lse) column_blocks(0, nb, lse->data());  // one thread: its columns in order
  else at::parallel_for(0, nb, 8, [&](int64_t b0, int64_t b1) { column_blocks(b0, b1, nullptr); });
#endif
#else
  (void)quantize_rows;  // unreachable without AVX-512: the checks at the top refuse the call
  (void)threads;
#endif
  return out;
}

at::Tensor int8_linear(at::Tensor x, at::Tensor packed, at::Tensor w_scale, c10::optional<at::Tensor> bias,
                       int64_t n, c10::optional<at::Tensor> residual, bool gelu, c10::optional<at::Tensor> norm_weight,
                       c10::optional<at::Tensor> norm_bias, double eps, c10::optional<at::Tensor> colsum) {
  return int8_matmul(x, packed, w_scale, bias, n, residual, gelu, norm_weight, norm_bias, eps, nullptr, 0, colsum);
}

// int8_linear's y, then log_softmax_top(y, k) (`row_top.cpp`), without writing y: (log-probs [M, k]
// best first, their columns [M, k] int64). For an LM head: at 48 rows of GPT-2's 50,257 tokens the
// logits are 9.6 MB that the layer wrote and the top k read back, each step.
std::tuple<at::Tensor, at::Tensor> int8_linear_top(at::Tensor x, at::Tensor packed, at::Tensor w_scale,
                                                   c10::optional<at::Tensor> bias, int64_t n, int64_t k,
                                                   c10::optional<at::Tensor> norm_weight,
                                                   c10::optional<at::Tensor> norm_bias, double eps,
                                                   c10::optional<at::Tensor> colsum) {
  TORCH_CHECK(k >= 1 && k <= n && k <= mmcap_vec::kMaxTop, "int8_linear_top: k = ", k, " outside 1..min(outputs ", n,
              ", ", mmcap_vec::kMaxTop, ")");
  std::vector<RowLse> lse;
  int8_matmul(x, packed, w_scale, bias, n, c10::nullopt, false, norm_weight, norm_bias, eps, &lse, k, colsum);
  const int64_t m = x.size(0), threads = m ? static_cast<int64_t>(lse.size()) / m : 0;
  auto values = at::empty({m, k}, x.options().dtype(at::kFloat));
  auto tokens = at::empty({m, k}, x.options().dtype(at::kLong));
  float* vp = values.data_ptr<float>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  for (int64_t r = 0; r < m; ++r) {  // the threads' parts, in column order
    float mx = -INFINITY;
    for (int64_t t = 0; t < threads; ++t)
      for (int l = 0; l < 16; ++l) mx = std::max(mx, lse[t * m + r].max[l]);
    double sum = 0;
    mmcap_vec::Top top(k);
    for (int64_t t = 0; t < threads; ++t) {
      const RowLse& part = lse[t * m + r];
      for (int l = 0; l < 16; ++l)
        if (part.max[l] > -INFINITY) sum += part.sum[l] * std::exp(part.max[l] - mx);
      for (int64_t i = 0; i < part.top.filled; ++i) top.offer(part.top.value[i], part.top.index[i]);
    }
    top.write(mx + static_cast<float>(std::log(sum)), vp + r * k, tp + r * k);
  }
  return {values, tokens};
}

TORCH_LIBRARY_FRAGMENT(mmcap, m) {
  m.def("amx_int8() -> bool", &amx_int8);
  m.def("vnni_int8() -> bool", &vnni_int8);
  m.def("int8_pack(Tensor w) -> Tensor", &int8_pack);
  m.def("int8_linear(Tensor x, Tensor packed, Tensor w_scale, Tensor? bias, int n, Tensor? residual=None, "
        "bool gelu=False, Tensor? norm_weight=None, Tensor? norm_bias=None, float eps=1e-5, Tensor? colsum=None) -> Tensor",
        &int8_linear);
  m.def("int8_linear_top(Tensor x, Tensor packed, Tensor w_scale, Tensor? bias, int n, int k, "
        "Tensor? norm_weight=None, Tensor? norm_bias=None, float eps=1e-5, Tensor? colsum=None) -> (Tensor, Tensor)",
        &int8_linear_top);
}
