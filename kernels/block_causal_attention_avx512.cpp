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

// GCC 12's AVX-512 headers build "undefined" vectors as `__m512 __Y = __Y;`, which -Wuninitialized
// reports wherever such an intrinsic is inlined (a known false positive, fixed in later GCCs).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define FAVOR_AVX512 __attribute__((target("arch=x86-64-v4")))
#define FAVOR_AVX512_BF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))

namespace favor {
namespace cpu {


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
                                                                     float* o, bool first) {
  __m512 acc[kR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(o + r * dp + 16 * c);
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

FAVOR_AVX512 void pv_f32(const float* p, const uint16_t*, const void* v_packed, int64_t k0, int64_t dp, float* o,
                         int64_t rows, bool first) {
  const float* v = static_cast<const float*>(v_packed) + k0 * dp;
  for (int64_t r0 = 0; r0 < rows; r0 += kR) {
    int64_t d0 = 0;
    for (; d0 + 32 <= dp; d0 += 32) pv_chunk_f32<2>(p + r0 * kBlockK, v + d0, dp, o + r0 * dp + d0, first);
    if (d0 < dp) pv_chunk_f32<1>(p + r0 * kBlockK, v + d0, dp, o + r0 * dp + d0, first);  // dp % 32 == 16
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
                                                                           int64_t dp, float* o, bool first) {
  __m512 acc[kR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(o + r * dp + 16 * c);
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

FAVOR_AVX512_BF16 void pv_bf16(const float*, const uint16_t* pb, const void* v_packed, int64_t k0, int64_t dp,
                               float* o, int64_t rows, bool first) {
  const uint32_t* vp = static_cast<const uint32_t*>(v_packed) + (k0 / 2) * dp;
  for (int64_t r0 = 0; r0 < rows; r0 += kR) {
    int64_t d0 = 0;
    for (; d0 + 32 <= dp; d0 += 32) pv_chunk_bf16<2>(pb + r0 * kBlockK, vp + d0, dp, o + r0 * dp + d0, first);
    if (d0 < dp) pv_chunk_bf16<1>(pb + r0 * kBlockK, vp + d0, dp, o + r0 * dp + d0, first);
  }
}

// ---- shared: online softmax and packing ----------------------------------------------------------

// exp2_neg (block_causal_attention.h) on 16 lanes: x = n + t with n = round(x), |t| <= 1/2;
// 2^t by the same Taylor series (coefficients ln2^k / k!, so no separate t ln 2 product), of degree
// 7 (fp32: truncation < 6e-9 relative) or 4 (bf16 path: < 6e-5 relative, far below the 2^-9
// rounding P gets when converted to bf16; l and P share it, so it cancels in P / l to first
// order); 2^n applied by vscalefps. The clamp is -151 rather than -127 so that 2^-151 rounds to
// exactly 0 (masked keys, -inf, contribute nothing); between -151 and -127 the vector form returns
// subnormals where the scalar one returns 0 (weights below 2^-127 of the row's largest).
// max(-151, x) returns x when x is NaN, so NaN scores propagate.
template <int kDegree>
FAVOR_AVX512 inline __attribute__((always_inline)) __m512 exp2_neg_v(__m512 x) {
  static_assert(kDegree == 4 || kDegree == 7, "the two accuracies in use");
  constexpr float c1 = 0.6931471805599453f, c2 = 0.2402265069591007f, c3 = 0.05550410866482158f,
                  c4 = 0.009618129107628477f, c5 = 0.0013333558146428443f, c6 = 0.00015403530393381608f,
                  c7 = 1.525273380405984e-05f;  // ln2^k / k!
  x = _mm512_max_ps(_mm512_set1_ps(-151.f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 t = _mm512_sub_ps(x, n);
  __m512 p;
  if (kDegree == 7) {
    p = _mm512_fmadd_ps(_mm512_set1_ps(c7), t, _mm512_set1_ps(c6));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c5));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c4));
  } else {
    p = _mm512_set1_ps(c4);
  }
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c3));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c2));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c1));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 16 rows of P (fp32, kBlockK = 32 each) -> bf16, round to nearest even (vcvtne2ps2bf16). Its own
// target: the softmax below is also instantiated for the fp32 path on CPUs without avx512_bf16.
FAVOR_AVX512_BF16 void p_to_bf16(const float* p, uint16_t* pb) {
  for (int r = 0; r < 16; ++r) {
    const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + r * kBlockK + 16), _mm512_loadu_ps(p + r * kBlockK));
    _mm512_storeu_si512(pb + r * kBlockK, (__m512i)h);
  }
}

struct MaxOp {
  FAVOR_AVX512 inline __attribute__((always_inline)) __m512 operator()(__m512 a, __m512 b) const {
    return _mm512_max_ps(a, b);
  }
};
struct AddOp {
  FAVOR_AVX512 inline __attribute__((always_inline)) __m512 operator()(__m512 a, __m512 b) const {
    return _mm512_add_ps(a, b);
  }
};

// Reduce 16 vectors to one: lane r = op over the 16 lanes of v[r]. Four halving steps (256-bit
// halves, 128-bit lanes, pairs, elements) leave row 4 (i % 4) + i / 4 in lane i; one permute
// restores row order.
template <typename Op>
FAVOR_AVX512 inline __attribute__((always_inline)) __m512 reduce16(__m512* v, Op op) {
  __m512 u[8], w[4], z[2];
  for (int i = 0; i < 8; ++i)
    u[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xee));
  for (int i = 0; i < 4; ++i)
    w[i] = op(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88), _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xdd));
  for (int i = 0; i < 2; ++i)
    z[i] = op(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44), _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xee));
  const __m512 x = op(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xdd));
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, x);
}

// Online-softmax step (the maths of softmax_block in block_causal_attention_cpu.cpp) for 16 rows
// at a time: one row of kBlockK = 32 scores is two registers; row max, row sum and the rescale
// factor alpha are computed for the 16 rows in one register each, not row by row. Rows beyond
// `rows` (up to kTileQ, zero scores) are computed but their P is written as zeros, so micro-tile
// padding rows add nothing in P.V. P replaces s; kBf16 also converts it to bf16 into pb for the
// vdpbf16ps P.V.
template <bool kBf16>
FAVOR_AVX512 void softmax_avx512(float* s, uint16_t* pb, float* m, float* l, float* o, int64_t rows,
                                                int64_t dp) {
  static_assert(kBlockK == 32 && kTileQ % 16 == 0, "rows of two zmm, groups of 16 rows");
  constexpr int kDegree = kBf16 ? 4 : 7;
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_huge_valf()), one = _mm512_set1_ps(1.f);
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    float* blk = s + r0 * kBlockK;
    __m512 t[16];
    for (int r = 0; r < 16; ++r)
      t[r] = _mm512_max_ps(_mm512_loadu_ps(blk + r * kBlockK), _mm512_loadu_ps(blk + r * kBlockK + 16));
    const __m512 bmax = reduce16(t, MaxOp{});
    const __m512 m_old = _mm512_loadu_ps(m + r0);
    const __m512 m_new = _mm512_max_ps(m_old, bmax);
    // Rows that have seen only masked keys keep m = -inf: alpha 1, and their p = 2^(-inf - 0) = 0.
    const __mmask16 empty = _mm512_cmp_ps_mask(m_new, neg_inf, _CMP_EQ_OQ);
    const __m512 alpha = _mm512_mask_blend_ps(empty, exp2_neg_v<kDegree>(_mm512_sub_ps(m_old, m_new)), one);
    alignas(64) float shift[16];
    _mm512_store_ps(shift, _mm512_mask_blend_ps(empty, m_new, _mm512_setzero_ps()));
    _mm512_storeu_ps(m + r0, m_new);
    for (int r = 0; r < 16; ++r) {
      float* row = blk + r * kBlockK;
      const __m512 mv = _mm512_set1_ps(shift[r]);
      __m512 pa = exp2_neg_v<kDegree>(_mm512_sub_ps(_mm512_loadu_ps(row), mv));
      __m512 pc = exp2_neg_v<kDegree>(_mm512_sub_ps(_mm512_loadu_ps(row + 16), mv));
      if (r0 + r >= rows) pa = pc = _mm512_setzero_ps();
      _mm512_storeu_ps(row, pa);
      _mm512_storeu_ps(row + 16, pc);
      t[r] = _mm512_add_ps(pa, pc);
    }
    if constexpr (kBf16) p_to_bf16(blk, pb + r0 * kBlockK);
    const __m512 sum = reduce16(t, AddOp{});
    _mm512_storeu_ps(l + r0, _mm512_fmadd_ps(_mm512_loadu_ps(l + r0), alpha, sum));
    // Rows whose max moved and that had seen something (a row still at -inf has no O yet).
    __mmask16 rescale = _mm512_cmp_ps_mask(alpha, one, _CMP_NEQ_UQ) & _mm512_cmp_ps_mask(m_old, neg_inf, _CMP_NEQ_UQ);
    if (!rescale) continue;
    alignas(64) float a[16];
    _mm512_store_ps(a, alpha);
    for (; rescale; rescale &= rescale - 1) {  // each row whose max moved
      const int r = __builtin_ctz(rescale);
      const __m512 av = _mm512_set1_ps(a[r]);
      float* orow = o + (r0 + r) * dp;
      for (int64_t d = 0; d < dp; d += 16) _mm512_storeu_ps(orow + d, _mm512_mul_ps(_mm512_loadu_ps(orow + d), av));
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
  static const Path path{"kAvx512 8x32", kR, 4, pack_f32_avx512, load_q_f32, scores_f32, softmax_avx512<false>, pv_f32};
  return &path;
}

const Path* avx512_bf16_path() {
  static const Path path{"kAvx512Bf16 8x32 vdpbf16ps", kR, 2, pack_bf16, load_q_bf16, scores_bf16,
                         softmax_avx512<true>, pv_bf16};
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
