// AVX2 + FMA fp32 path of the CPU kernel, for x86-64 CPUs without AVX-512 (x86-64-v3).
//
// Built without -march: every function carries target("arch=x86-64-v3") and is only called after
// the dispatcher (block_causal_attention_cpu.cpp) has checked the CPU. Same packed layout as the
// AVX-512 fp32 path (Kt [Dp][Lp], V [Lp][Dp], fp32); the softmax is the portable one (its x86-64-v3
// target clone).
//
// Register micro-tile: 4 query rows x 16 keys (scores) or 4 rows x 16 head-dim columns (P.V) =
// 8 ymm accumulators, enough independent FMA chains to cover the FMA latency of two pipes, plus
// 2 loaded and 1 broadcast register: 11 of the 16 ymm, so nothing spills (the portable 4 x 32
// template needs 16 accumulators and spills). Per inner step 2 loads + 4 broadcasts feed 8 FMAs.

#include "block_causal_attention_cpu_paths.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FAVOR_NO_CLONES)
#include <immintrin.h>

#define FAVOR_AVX2 __attribute__((target("arch=x86-64-v3")))

namespace favor {
namespace cpu {


namespace {

constexpr int kR = 4;   // micro-tile rows
constexpr int kC = 16;  // micro-tile columns: keys (scores) or head dims (P.V), two ymm

FAVOR_AVX2 void scores_avx2(const void* qtile, const void* k_packed, int64_t k0, int64_t dp, int64_t lp, float scale,
                            float* s, int64_t rows) {
  const float* q = static_cast<const float*>(qtile);
  const __m256 sc = _mm256_set1_ps(scale);
  for (int64_t c0 = 0; c0 < kBlockK; c0 += kC) {
    const float* kt = static_cast<const float*>(k_packed) + k0 + c0;  // Kt[d][k0 + c0 ...]
    for (int64_t r0 = 0; r0 < rows; r0 += kR) {
      const float* qr = q + r0 * dp;
      __m256 acc[kR][2];
      for (int r = 0; r < kR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      for (int64_t d = 0; d < dp; ++d) {
        const __m256 ka = _mm256_loadu_ps(kt + d * lp), kb = _mm256_loadu_ps(kt + d * lp + 8);
        for (int r = 0; r < kR; ++r) {
          const __m256 bq = _mm256_broadcast_ss(qr + r * dp + d);
          acc[r][0] = _mm256_fmadd_ps(bq, ka, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(bq, kb, acc[r][1]);
        }
      }
      for (int r = 0; r < kR; ++r) {
        _mm256_storeu_ps(s + (r0 + r) * kBlockK + c0, _mm256_mul_ps(acc[r][0], sc));
        _mm256_storeu_ps(s + (r0 + r) * kBlockK + c0 + 8, _mm256_mul_ps(acc[r][1], sc));
      }
    }
  }
}

FAVOR_AVX2 void pv_avx2(const float* p, const uint16_t*, const void* v_packed, int64_t k0, int64_t dp, float* o,
                        int64_t rows, bool first) {
  const float* v = static_cast<const float*>(v_packed) + k0 * dp;
  for (int64_t r0 = 0; r0 < rows; r0 += kR) {
    for (int64_t d0 = 0; d0 < dp; d0 += kC) {  // dp is a multiple of kVec = 16
      float* orow = o + r0 * dp + d0;
      __m256 acc[kR][2];
      for (int r = 0; r < kR; ++r) {
        acc[r][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(orow + r * dp);
        acc[r][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(orow + r * dp + 8);
      }
      for (int64_t j = 0; j < kBlockK; ++j) {
        const __m256 va = _mm256_loadu_ps(v + j * dp + d0), vb = _mm256_loadu_ps(v + j * dp + d0 + 8);
        for (int r = 0; r < kR; ++r) {
          const __m256 bp = _mm256_broadcast_ss(p + (r0 + r) * kBlockK + j);
          acc[r][0] = _mm256_fmadd_ps(bp, va, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(bp, vb, acc[r][1]);
        }
      }
      for (int r = 0; r < kR; ++r) {
        _mm256_storeu_ps(orow + r * dp, acc[r][0]);
        _mm256_storeu_ps(orow + r * dp + 8, acc[r][1]);
      }
    }
  }
}

}  // namespace

const Path* avx2_fp32_path() {
  static_assert(kVec % kC == 0 && kBlockK % kC == 0 && kTileQ % kR == 0, "micro-tiles tile the padded tile");
  static const Path path{"kAvx2 4x16", kR, 4, pack_f32, load_q_f32, scores_avx2, softmax_block, pv_avx2};
  return &path;
}

}  // namespace cpu
}  // namespace favor

#else

namespace favor {
namespace cpu {
const Path* avx2_fp32_path() { return nullptr; }
}  // namespace cpu
}  // namespace favor

#endif
