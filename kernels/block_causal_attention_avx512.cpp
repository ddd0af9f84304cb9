// AVX-512 paths of the CPU kernel: fp32 FMA and bf16 dot-product (vdpbf16ps) micro-kernels.
//
// Built without -march: every function carries its own target attribute and is only called after
// the dispatcher (block_causal_attention_cpu.cpp) has checked the CPU with __builtin_cpu_supports,
// so the wheel still loads on any x86-64.
//
// Register micro-tile (both paths): 8 query rows x 32 keys (scores) or 8 rows x 32 head-dim
// columns (P.V) = 16 zmm accumulators; the other operand is broadcast from memory, one per row.
// Per inner step: 2 vector loads + 8 broadcasts feed 16 FMAs (fp32) or 16 vdpbf16ps (bf16, each
// two multiply-adds per lane), so the loop is FMA-bound, not load-bound, on a core with two
// 512-bit FMA pipes (measured peak on our Zen 5: 264 GFLOP/s fp32 FMA, 534 GFLOP/s vdpbf16ps).
//
// bf16 numerics: products of bf16 inputs accumulate in fp32 (vdpbf16ps), the softmax is fp32,
// and only P is rounded to bf16 (round to nearest even) for P.V; the row sum l uses the fp32 P.
// The scale log2(e)/sqrt(D) is applied to the fp32 scores, not to the bf16 q (no extra rounding).

#include <algorithm>
#include <cstring>

#include "block_causal_attention_cpu_paths.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FAVOR_NO_CLONES)
#include <immintrin.h>

#define FAVOR_AVX512 __attribute__((target("arch=x86-64-v4")))
#define FAVOR_AVX512_BF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))

namespace favor {
namespace cpu {

// The fp32 path's generic pack / load_q are shared with the portable paths (block_causal_attention_cpu.cpp).
void pack_f32(const BlockCausalParams& p, int64_t b, int64_t h, int64_t dp, int64_t lp, int64_t k_lo, int64_t k_hi,
              void* k_out, void* v_out);
void load_q_f32(const BlockCausalParams& p, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t dp,
                void* qtile);

namespace {

constexpr int kR = 8;  // micro-tile rows

// ---- fp32 ---------------------------------------------------------------------------------------

FAVOR_AVX512 void scores_f32(const void* qtile, const void* k_packed, int64_t k0, int64_t dp, int64_t lp,
                             float scale, float* s, int64_t rows) {
  const float* q = static_cast<const float*>(qtile);
  const float* kt = static_cast<const float*>(k_packed) + k0;  // Kt[d][k0 ...]
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t r0 = 0; r0 < rows; r0 += kR) {
    const float* qr = q + r0 * dp;
    __m512 acc[kR][2];
#pragma GCC unroll 8
    for (int r = 0; r < kR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dp; ++d) {
      const __m512 ka = _mm512_loadu_ps(kt + d * lp), kb = _mm512_loadu_ps(kt + d * lp + 16);
#pragma GCC unroll 8
      for (int r = 0; r < kR; ++r) {
        const __m512 b = _mm512_set1_ps(qr[r * dp + d]);
        acc[r][0] = _mm512_fmadd_ps(b, ka, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(b, kb, acc[r][1]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < kR; ++r) {
      _mm512_storeu_ps(s + (r0 + r) * kBlockK, _mm512_mul_ps(acc[r][0], sc));
      _mm512_storeu_ps(s + (r0 + r) * kBlockK + 16, _mm512_mul_ps(acc[r][1], sc));
    }
  }
}

// o[8][d0 : d0 + 16 NV] += p[8][0:32] . v[0:32][d0 : d0 + 16 NV]
template <int NV>
FAVOR_AVX512 inline __attribute__((always_inline)) void pv_chunk_f32(const float* p, const float* v, int64_t dp,
                                                                     float* o) {
  __m512 acc[kR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(o + r * dp + 16 * c);
  for (int64_t j = 0; j < kBlockK; ++j) {
    __m512 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(v + j * dp + 16 * c);
#pragma GCC unroll 8
    for (int r = 0; r < kR; ++r) {
      const __m512 b = _mm512_set1_ps(p[r * kBlockK + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(b, vv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * dp + 16 * c, acc[r][c]);
}

FAVOR_AVX512 void pv_f32(const float* p, uint16_t*, const void* v_packed, int64_t k0, int64_t dp, float* o,
                         int64_t rows) {
  const float* v = static_cast<const float*>(v_packed) + k0 * dp;
  for (int64_t r0 = 0; r0 < rows; r0 += kR) {
    int64_t d0 = 0;
    for (; d0 + 32 <= dp; d0 += 32) pv_chunk_f32<2>(p + r0 * kBlockK, v + d0, dp, o + r0 * dp + d0);
    if (d0 < dp) pv_chunk_f32<1>(p + r0 * kBlockK, v + d0, dp, o + r0 * dp + d0);  // dp % 32 == 16
  }
}

// ---- bf16 (vdpbf16ps) ---------------------------------------------------------------------------

FAVOR_AVX512_BF16 inline __attribute__((always_inline)) __m512 dot2(__m512 acc, __m512i pair_bcast, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)pair_bcast, (__m512bh)b);
}

FAVOR_AVX512_BF16 inline __attribute__((always_inline)) __m512i bcast_pair(const uint16_t* x) {
  int32_t w;
  std::memcpy(&w, x, sizeof w);  // two adjacent bf16 as one 32-bit lane
  return _mm512_set1_epi32(w);
}

FAVOR_AVX512_BF16 void scores_bf16(const void* qtile, const void* k_packed, int64_t k0, int64_t dp, int64_t lp,
                                   float scale, float* s, int64_t rows) {
  const uint16_t* q = static_cast<const uint16_t*>(qtile);
  const uint32_t* kp = static_cast<const uint32_t*>(k_packed) + k0;  // pairs [t][k0 ...]
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t r0 = 0; r0 < rows; r0 += kR) {
    const uint16_t* qr = q + r0 * dp;
    __m512 acc[kR][2];
#pragma GCC unroll 8
    for (int r = 0; r < kR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t t = 0; t < dp / 2; ++t) {
      const __m512i ka = _mm512_loadu_si512(kp + t * lp), kb = _mm512_loadu_si512(kp + t * lp + 16);
#pragma GCC unroll 8
      for (int r = 0; r < kR; ++r) {
        const __m512i b = bcast_pair(qr + r * dp + 2 * t);
        acc[r][0] = dot2(acc[r][0], b, ka);
        acc[r][1] = dot2(acc[r][1], b, kb);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < kR; ++r) {
      _mm512_storeu_ps(s + (r0 + r) * kBlockK, _mm512_mul_ps(acc[r][0], sc));
      _mm512_storeu_ps(s + (r0 + r) * kBlockK + 16, _mm512_mul_ps(acc[r][1], sc));
    }
  }
}

// o[8][d0 : d0 + 16 NV] += pb[8][0:32] . V, V as 16 key pairs x Dp lanes.
template <int NV>
FAVOR_AVX512_BF16 inline __attribute__((always_inline)) void pv_chunk_bf16(const uint16_t* pb, const uint32_t* vp,
                                                                           int64_t dp, float* o) {
  __m512 acc[kR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(o + r * dp + 16 * c);
  for (int64_t j = 0; j < kBlockK / 2; ++j) {
    __m512i vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_si512(vp + j * dp + 16 * c);
#pragma GCC unroll 8
    for (int r = 0; r < kR; ++r) {
      const __m512i b = bcast_pair(pb + r * kBlockK + 2 * j);
      for (int c = 0; c < NV; ++c) acc[r][c] = dot2(acc[r][c], b, vv[c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * dp + 16 * c, acc[r][c]);
}

FAVOR_AVX512_BF16 void pv_bf16(const float* p, uint16_t* pb, const void* v_packed, int64_t k0, int64_t dp,
                               float* o, int64_t rows) {
  const int64_t padded = (rows + kR - 1) / kR * kR;
  for (int64_t r = 0; r < padded; ++r) {  // P row of 32 keys -> 32 bf16 in key order (RNE)
    const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + r * kBlockK + 16), _mm512_loadu_ps(p + r * kBlockK));
    _mm512_storeu_si512(pb + r * kBlockK, (__m512i)h);
  }
  const uint32_t* vp = static_cast<const uint32_t*>(v_packed) + (k0 / 2) * dp;
  for (int64_t r0 = 0; r0 < rows; r0 += kR) {
    int64_t d0 = 0;
    for (; d0 + 32 <= dp; d0 += 32) pv_chunk_bf16<2>(pb + r0 * kBlockK, vp + d0, dp, o + r0 * dp + d0);
    if (d0 < dp) pv_chunk_bf16<1>(pb + r0 * kBlockK, vp + d0, dp, o + r0 * dp + d0);
  }
}

// ---- shared: online softmax and packing ----------------------------------------------------------

// exp2_neg (block_causal_attention.h) on 16 lanes: same clamp, rounding and polynomial. max(-127, x)
// returns x when x is NaN, so NaN scores propagate as in the scalar version.
FAVOR_AVX512 inline __attribute__((always_inline)) __m512 exp2_neg_v(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-127.f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.6931471805599453f));
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// Online-softmax step (the maths of softmax_block in block_causal_attention_cpu.cpp), one row of
// kBlockK = 32 scores in two registers.
FAVOR_AVX512 void softmax_avx512(float* s, float* m, float* l, float* o, int64_t rows, int64_t dp) {
  static_assert(kBlockK == 32, "one row of scores is two zmm registers");
  constexpr float kNegInf = -__builtin_huge_valf();
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * kBlockK;
    const __m512 a = _mm512_loadu_ps(row), b = _mm512_loadu_ps(row + 16);
    float m_new;
    const float alpha = softmax_rescale(m[r], _mm512_reduce_max_ps(_mm512_max_ps(a, b)), &m_new);
    m[r] = m_new;
    if (m_new == kNegInf) {  // nothing visible yet: this block adds nothing
      _mm512_storeu_ps(row, _mm512_setzero_ps());
      _mm512_storeu_ps(row + 16, _mm512_setzero_ps());
      continue;
    }
    const __m512 mv = _mm512_set1_ps(m_new);
    const __m512 pa = exp2_neg_v(_mm512_sub_ps(a, mv)), pb = exp2_neg_v(_mm512_sub_ps(b, mv));
    _mm512_storeu_ps(row, pa);
    _mm512_storeu_ps(row + 16, pb);
    l[r] = l[r] * alpha + _mm512_reduce_add_ps(_mm512_add_ps(pa, pb));
    if (alpha != 1.f) {
      const __m512 av = _mm512_set1_ps(alpha);
      for (int64_t d = 0; d < dp; d += 16)
        _mm512_storeu_ps(o + r * dp + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * dp + d), av));
    }
  }
}

// 16 x 16 transpose of 32-bit words: dst row c = column c of src (byte strides).
FAVOR_AVX512 void transpose16(const char* src, int64_t src_stride, char* dst, int64_t dst_stride) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * src_stride);
  for (int i = 0; i < 8; ++i) {  // lane l of t[2i], t[2i+1]: rows 2i, 2i+1 interleaved
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c] lane l: column 4l + c of rows 4i .. 4i + 3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // gather the four 128-bit lanes of each column
    const __m512i t1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), t2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    const __m512i u1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd), u2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
    _mm512_storeu_si512(dst + c * dst_stride, _mm512_shuffle_i32x4(t1, t2, 0x88));
    _mm512_storeu_si512(dst + (8 + c) * dst_stride, _mm512_shuffle_i32x4(t1, t2, 0xdd));
    _mm512_storeu_si512(dst + (4 + c) * dst_stride, _mm512_shuffle_i32x4(u1, u2, 0x88));
    _mm512_storeu_si512(dst + (12 + c) * dst_stride, _mm512_shuffle_i32x4(u1, u2, 0xdd));
  }
}

// out [cols][lp] (32-bit words) = transpose of `rows` rows of `cols` words at src (byte stride):
// full 16 x 16 blocks by registers, the edges word by word. Padding is left to the caller.
FAVOR_AVX512 void transpose_words(const char* src, int64_t src_stride, int64_t rows, int64_t cols, uint32_t* out,
                                  int64_t lp) {
  const int64_t rows16 = rows / 16 * 16, cols16 = cols / 16 * 16;
  for (int64_t i = 0; i < rows16; i += 16)
    for (int64_t c = 0; c < cols16; c += 16)
      transpose16(src + i * src_stride + 4 * c, src_stride, reinterpret_cast<char*>(out + c * lp + i), 4 * lp);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = i < rows16 ? cols16 : 0; c < cols; ++c)
      std::memcpy(out + c * lp + i, src + i * src_stride + 4 * c, 4);
}

FAVOR_AVX512 void pack_f32_avx512(const BlockCausalParams& p, int64_t b, int64_t h, int64_t dp, int64_t lp,
                                  int64_t k_lo, int64_t k_hi, void* k_out, void* v_out) {
  if (p.dtype != DType::kFloat32) return pack_f32(p, b, h, dp, lp, k_lo, k_hi, k_out, v_out);  // widening
  const int64_t D = p.head_dim, k_end = std::min(k_hi, p.length);
  const float* k = static_cast<const float*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const float* v = static_cast<const float*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];
  float* kt = static_cast<float*>(k_out);  // [dp][lp]
  float* vs = static_cast<float*>(v_out);  // [lp][dp]
  transpose_words(reinterpret_cast<const char*>(k + k_lo * p.k_stride[2]), 4 * p.k_stride[2], k_end - k_lo, D,
                  reinterpret_cast<uint32_t*>(kt + k_lo), lp);
  for (int64_t i = k_lo; i < k_end; ++i) std::memcpy(vs + i * dp, v + i * p.v_stride[2], sizeof(float) * D);
}

// Packing copies bf16 bits.
FAVOR_AVX512 void pack_bf16(const BlockCausalParams& p, int64_t b, int64_t h, int64_t dp, int64_t lp,
                            int64_t k_lo, int64_t k_hi, void* k_out, void* v_out) {
  const int64_t D = p.head_dim, k_end = std::min(k_hi, p.length);
  const uint16_t* k = static_cast<const uint16_t*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];
  uint32_t* kp = static_cast<uint32_t*>(k_out);  // [dp/2][lp]
  uint32_t* vp = static_cast<uint32_t*>(v_out);  // [lp/2][dp]
  // K: a row of D bf16 is D/2 pairs; the pair-major layout is the transpose of those words.
  transpose_words(reinterpret_cast<const char*>(k + k_lo * p.k_stride[2]), 2 * p.k_stride[2], k_end - k_lo, D / 2,
                  kp + k_lo, lp);
  if (D % 2)  // the last pair holds (K[i][D-1], 0)
    for (int64_t i = k_lo; i < k_end; ++i) kp[(D / 2) * lp + i] = k[i * p.k_stride[2] + D - 1];
  // V: interleave rows 2j and 2j + 1 element by element (vpermt2w picks from both).
  uint16_t idx_lo[32], idx_hi[32];
  for (int i = 0; i < 16; ++i) {
    idx_lo[2 * i] = static_cast<uint16_t>(i), idx_lo[2 * i + 1] = static_cast<uint16_t>(32 + i);
    idx_hi[2 * i] = static_cast<uint16_t>(16 + i), idx_hi[2 * i + 1] = static_cast<uint16_t>(48 + i);
  }
  const __m512i lo = _mm512_loadu_si512(idx_lo), hi = _mm512_loadu_si512(idx_hi);
  const int64_t D32 = D / 32 * 32;
  for (int64_t j = k_lo / 2; 2 * j < k_end; ++j) {
    const uint16_t* r0 = v + 2 * j * p.v_stride[2];
    const uint16_t* r1 = 2 * j + 1 < k_end ? r0 + p.v_stride[2] : nullptr;  // past L: zero
    for (int64_t d = 0; d < D32; d += 32) {
      const __m512i a = _mm512_loadu_si512(r0 + d);
      const __m512i c = r1 ? _mm512_loadu_si512(r1 + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(vp + j * dp + d, _mm512_permutex2var_epi16(a, lo, c));
      _mm512_storeu_si512(vp + j * dp + d + 16, _mm512_permutex2var_epi16(a, hi, c));
    }
    for (int64_t d = D32; d < D; ++d) vp[j * dp + d] = r0[d] | (r1 ? uint32_t{r1[d]} << 16 : 0u);
  }
}

void load_q_bf16(const BlockCausalParams& p, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t dp,
                 void* qtile) {
  const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  uint16_t* out = static_cast<uint16_t*>(qtile);
  std::memset(out, 0, sizeof(uint16_t) * kTileQ * dp);
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(out + r * dp, q + (row0 + r) * p.q_stride[2], sizeof(uint16_t) * p.head_dim);
}

}  // namespace

const Path* avx512_fp32_path() {
  static const Path path{"kAvx512 8x32", kR, 4, pack_f32_avx512, load_q_f32, scores_f32, pv_f32, softmax_avx512};
  return &path;
}

const Path* avx512_bf16_path() {
  static const Path path{"kAvx512Bf16 8x32 vdpbf16ps", kR, 2, pack_bf16, load_q_bf16, scores_bf16, pv_bf16, softmax_avx512};
  return &path;
}

}  // namespace cpu
}  // namespace favor

#else  // no x86-64 GCC: only the portable paths exist

namespace favor {
namespace cpu {
const Path* avx512_fp32_path() { return nullptr; }
const Path* avx512_bf16_path() { return nullptr; }
}  // namespace cpu
}  // namespace favor

#endif
