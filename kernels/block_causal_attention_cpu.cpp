// CPU forward of block-causal attention (maths and limits: block_causal_attention.h).
//
// One parallel loop over work items, dynamically scheduled. An item is one head's query tiles of
// kTileQ rows (or a contiguous group of them when there are fewer than two heads per thread):
//   * it packs the keys its tiles can see, [k_lo, k_hi), into a thread-local buffer in the layout
//     of the chosen path (block_causal_attention_cpu_paths.h), zero padded to Dp x Lp so every
//     inner loop has a fixed trip count. At most one head per thread (320 KiB fp32 at the release
//     shape) stays in the core's L2 while the item's tiles reuse it, and no thread ever waits for
//     another's packing;
//   * per tile it loads the q rows (the next tile's are prefetched) and walks only the visible key
//     blocks: scores (in the log2 domain), element masks where a block crosses a row's interval,
//     online softmax, P.V (the first processed block writes O instead of accumulating).
// Paths, chosen once per process at run time (the wheel is built without -march):
//   AVX-512 BF16 (vdpbf16ps) for bf16 inputs when the CPU has avx512_bf16; AVX-512 fp32 (FMA
//   intrinsics, block_causal_attention_avx512.cpp) for everything else on x86-64-v4; AVX2+FMA
//   (block_causal_attention_avx2.cpp) on x86-64-v3; baseline x86-64 from the portable template
//   below, which GCC vectorises for SSE2.
// fp16 (and bf16 without avx512_bf16) inputs are converted to fp32 when packed.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "block_causal_attention.h"
#include "block_causal_attention_cpu_paths.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FAVOR_NO_CLONES)
#define FAVOR_X86_DISPATCH 1
#define FAVOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FAVOR_X86_DISPATCH 0
#define FAVOR_CLONES
#endif
#define FAVOR_ALWAYS_INLINE __attribute__((always_inline)) inline

namespace favor {
namespace cpu {


namespace {

// Below this much useful work per thread a parallel region costs more than it saves (~40 us of
// work at ~100 GFLOP/s against ~10 us to wake and join a thread).
constexpr double kMinFlopsPerThread = 4e6;
constexpr float kNegInf = -__builtin_huge_valf();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

float load(const void* base, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// Portable register micro-tiles, R rows x C fp32 columns of accumulators. Their best size depends
// on the register file (AVX2: 16 x 8 floats), so they are templates instantiated once per ISA
// below; always_inline makes each instantiation compile with its caller's target.

template <int R, int C>
FAVOR_ALWAYS_INLINE void score_tile(const float* __restrict q, const float* __restrict kt, int64_t dp,
                                    int64_t lp, float scale, float* __restrict s) {
  static_assert(kBlockK % C == 0, "key block must be whole micro-tiles");
  for (int64_t c0 = 0; c0 < kBlockK; c0 += C) {
    float acc[R][C] = {};
    for (int64_t d = 0; d < dp; ++d) {
      const float* __restrict krow = kt + d * lp + c0;
      for (int r = 0; r < R; ++r) {
        const float qv = q[r * dp + d];
        for (int c = 0; c < C; ++c) acc[r][c] += qv * krow[c];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) s[r * kBlockK + c0 + c] = acc[r][c] * scale;
  }
}

// o[r][d0:d0+C] += sum_j p[r][j] v[j][d0:d0+C] for R rows.
template <int R, int C>
FAVOR_ALWAYS_INLINE void pv_chunk(const float* __restrict p, const float* __restrict v, int64_t dp,
                                  int64_t d0, float* __restrict o, bool first) {
  float acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = first ? 0.f : o[r * dp + d0 + c];
  for (int64_t j = 0; j < kBlockK; ++j) {
    const float* __restrict vrow = v + j * dp + d0;
    for (int r = 0; r < R; ++r) {
      const float pv = p[r * kBlockK + j];
      for (int c = 0; c < C; ++c) acc[r][c] += pv * vrow[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) o[r * dp + d0 + c] = acc[r][c];
}

template <int R, int C>
FAVOR_ALWAYS_INLINE void pv_tile(const float* __restrict p, const float* __restrict v, int64_t dp,
                                 float* __restrict o, bool first) {
  static_assert(C % kVec == 0 || kVec % C == 0, "columns must tile the kVec-padded head dim");
  int64_t d0 = 0;
  for (; d0 + C <= dp; d0 += C) pv_chunk<R, C>(p, v, dp, d0, o, first);
  for (; d0 < dp; d0 += kVec) pv_chunk<R, kVec>(p, v, dp, d0, o, first);  // dp is a multiple of kVec
}

// One ISA's portable fp32 path: micro-kernels over a whole tile (rows padded to a multiple of R).
#define FAVOR_PORTABLE_PATH(NAME, TARGET, R, C)                                                      \
  TARGET void NAME##_scores(const void* q, const void* kt, int64_t k0, int64_t dp, int64_t lp,       \
                            float scale, float* s, int64_t rows) {                                   \
    for (int64_t r = 0; r < rows; r += R)                                                            \
      score_tile<R, C>(static_cast<const float*>(q) + r * dp, static_cast<const float*>(kt) + k0, dp, \
                       lp, scale, s + r * kBlockK);                                                  \
  }                                                                                                  \
  TARGET void NAME##_pv(const float* p, const uint16_t*, const void* v, int64_t k0, int64_t dp, float* o, \
                        int64_t rows, bool first) {                                                  \
    for (int64_t r = 0; r < rows; r += R)                                                            \
      pv_tile<R, C>(p + r * kBlockK, static_cast<const float*>(v) + k0 * dp, dp, o + r * dp, first); \
  }                                                                                                  \
  const Path NAME{#NAME " " #R "x" #C, R, 4, pack_f32, load_q_f32, NAME##_scores, softmax_block, NAME##_pv};

// Baseline x86-64 (SSE2) and non-x86 builds: 4 x 32, which GCC vectorises for the target (on
// x86-64 the AVX2 and AVX-512 paths have their own intrinsics files).
FAVOR_PORTABLE_PATH(kPortable, , 4, 32)

// What this process runs: the widest ISA the CPU supports, or FAVOR_CPU_ISA=avx512|avx2|baseline
// to force a narrower one (tests use it to exercise every path on one machine; avx512 disables
// the bf16 dot-product path). Read once per process.
struct Dispatch {
  const Path* fp32;
  const Path* bf16;  // nullptr: bf16 inputs take the fp32 path (converted when packed)
};

const Dispatch& dispatch() {
  static const Dispatch chosen = [] {
    Dispatch d{&kPortable, nullptr};
#if FAVOR_X86_DISPATCH
    const char* env = std::getenv("FAVOR_CPU_ISA");
    const std::string force = env ? env : "";
    const bool v4 = __builtin_cpu_supports("x86-64-v4") && force != "avx2" && force != "baseline";
    if (v4 && avx512_fp32_path()) {
      d.fp32 = avx512_fp32_path();
      if (force != "avx512" && __builtin_cpu_supports("avx512bf16")) d.bf16 = avx512_bf16_path();
    } else if (force != "baseline" && __builtin_cpu_supports("x86-64-v3") && avx2_fp32_path()) {
      d.fp32 = avx2_fp32_path();
    }
#endif
    return d;
  }();
  return chosen;
}

const Path& path_for(DType t) {
  const Dispatch& d = dispatch();
  return t == DType::kBFloat16 && d.bf16 ? *d.bf16 : *d.fp32;
}

// Online-softmax update of one block for kTileQ rows: s holds scores, becomes probabilities;
// m, l, o are the running max, sum and unnormalised output.
}  // namespace

FAVOR_CLONES void softmax_block(float* __restrict s, uint16_t*, float* __restrict m, float* __restrict l,
                                float* __restrict o, int64_t rows, int64_t dp) {
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict row = s + r * kBlockK;
    // Reductions over kVec independent lanes: an in-order scalar reduction would not vectorise
    // without -ffast-math, and lanes keep the result independent of ISA and thread count.
    float lane[kVec];
    for (int64_t c = 0; c < kVec; ++c) lane[c] = row[c];
    for (int64_t c0 = kVec; c0 < kBlockK; c0 += kVec)
      for (int64_t c = 0; c < kVec; ++c) lane[c] = row[c0 + c] > lane[c] ? row[c0 + c] : lane[c];
    float bmax = kNegInf;
    for (int64_t c = 0; c < kVec; ++c) bmax = lane[c] > bmax ? lane[c] : bmax;
    float m_new;
    const float m_old = m[r];
    const float alpha = softmax_rescale(m_old, bmax, &m_new);
    m[r] = m_new;
    if (m_new == kNegInf) {  // nothing visible yet: this block adds nothing
      for (int64_t c = 0; c < kBlockK; ++c) row[c] = 0.f;
      continue;
    }
    for (int64_t c = 0; c < kBlockK; ++c) row[c] = exp2_neg(row[c] - m_new);
    for (int64_t c = 0; c < kVec; ++c) lane[c] = row[c];
    for (int64_t c0 = kVec; c0 < kBlockK; c0 += kVec)
      for (int64_t c = 0; c < kVec; ++c) lane[c] += row[c0 + c];
    float sum = 0.f;
    for (int64_t c = 0; c < kVec; ++c) sum += lane[c];
    l[r] = l[r] * alpha + sum;
    if (alpha != 1.f && m_old != kNegInf)  // a row that saw nothing yet has no O to rescale
      for (int64_t d = 0; d < dp; ++d) o[r * dp + d] *= alpha;
  }
}

namespace {

// Zero the padding of keys [k_lo, k_hi) in either packed layout (only shapes with L % kBlockK or
// D % kVec need it). Both layouts are 32-bit words: K has Dp * packed_bytes / 4 rows of Lp words,
// and keys [k_lo, k_hi) of V are k_lo * Dp * packed_bytes bytes in, (k_hi - k_lo) * Dp * packed_bytes long.
void zero_padding(const Path& path, int64_t dp, int64_t lp, int64_t k_lo, int64_t k_hi, char* k, char* v) {
  const int64_t krows = dp * path.packed_bytes / 4;
  for (int64_t r = 0; r < krows; ++r) std::memset(k + (r * lp + k_lo) * 4, 0, static_cast<size_t>((k_hi - k_lo) * 4));
  std::memset(v + k_lo * dp * path.packed_bytes, 0, static_cast<size_t>((k_hi - k_lo) * dp * path.packed_bytes));
}

// Ask L1 for q rows [r0, r1) of head (b, h) one tile ahead: the next tile's rows are read while
// this tile computes, instead of stalling its first micro-tile on memory.
void prefetch_q_rows(const BlockCausalParams& p, int64_t b, int64_t h, int64_t r0, int64_t r1) {
  const int64_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
  const char* base = static_cast<const char*>(p.q) + (b * p.q_stride[0] + h * p.q_stride[1]) * elem;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t off = 0; off < p.head_dim * elem; off += 64)
      __builtin_prefetch(base + r * p.q_stride[2] * elem + off, 0, 3);
}

// out[at : at + D] = o / l in the output dtype (l == 0: the row saw no key -> zeros). One loop per
// dtype so each vectorises (the conversions are integer bit arithmetic).
FAVOR_CLONES void store_row(const float* __restrict o, float l, int64_t D, DType t, void* out, int64_t at) {
  const float inv = l > 0.f ? 1.f / l : 0.f;
  if (t == DType::kFloat32) {
    float* __restrict dst = static_cast<float*>(out) + at;
    for (int64_t d = 0; d < D; ++d) dst[d] = o[d] * inv;
  } else if (t == DType::kBFloat16) {
    uint16_t* __restrict dst = static_cast<uint16_t*>(out) + at;
    for (int64_t d = 0; d < D; ++d) dst[d] = float_to_bf16(o[d] * inv);
  } else {
    uint16_t* __restrict dst = static_cast<uint16_t*>(out) + at;
    for (int64_t d = 0; d < D; ++d) dst[d] = float_to_half(o[d] * inv);
  }
}

void attend_tile(const BlockCausalParams& p, const Path& path, const void* kpack, const void* vpack,
                 const uint8_t* key_ok, int64_t b, int64_t h, int64_t row0, int64_t dp, int64_t lp) {
  const int64_t L = p.length, S = p.tokens_per_frame;
  const int64_t row1 = std::min(row0 + kTileQ, L);
  const int64_t rows = row1 - row0;
  static_assert(kTileQ % kMaxRows == 0, "micro-tiles must not run past the tile buffers");
  alignas(64) float qtile[kTileQ * kMaxHeadDim];  // fp32 or bf16 bits, per the path
  alignas(64) float o[kTileQ * kMaxHeadDim];
  alignas(64) float s[kTileQ * kBlockK];
  alignas(64) uint16_t pbuf[kTileQ * kBlockK];  // P in bf16 for the bf16 path's P.V
  float m[kTileQ], l[kTileQ];
  int64_t lo_row[kTileQ], hi_row[kTileQ];
  path.load_q(p, b, h, row0, rows, dp, qtile);
  std::fill(s, s + kTileQ * kBlockK, 0.f);  // rows past `rows` stay finite in 16-row softmax groups
  const float qscale = p.softmax_scale * kLog2e;  // scores in the log2 domain (exp -> exp2)
  for (int64_t r = 0; r < kTileQ; ++r) {
    m[r] = kNegInf;
    l[r] = 0.f;
    if (r < rows) visible_keys(row0 + r, S, L, p.orientation, &lo_row[r], &hi_row[r]);
  }
  bool first = true;  // o is written, not accumulated, by the first processed block
  int64_t lo, hi;
  tile_keys(row0, row1, S, L, p.orientation, &lo, &hi);
  for (int64_t k0 = lo / kBlockK * kBlockK; k0 < hi; k0 += kBlockK) {
    const int64_t kblock = k0 / kBlockK;
    if (key_ok && !key_ok[kblock * 2]) continue;  // every key of this block is padding
    path.scores(qtile, kpack, k0, dp, lp, qscale, s, rows);
    // Element masks only where the block crosses some row's interval or holds padding.
    if (!block_fully_visible(row0, row1, k0, k0 + kBlockK, S, L, p.orientation)) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < kBlockK; ++c) {
          const int64_t j = k0 + c;
          if (j < lo_row[r] || j >= hi_row[r]) s[r * kBlockK + c] = kNegInf;
        }
    }
    if (key_ok && !key_ok[kblock * 2 + 1]) {  // some (not all) keys of the block are padding
      const uint8_t* mrow = p.key_padding_mask + b * p.mask_stride[0];
      for (int64_t c = 0; c < kBlockK; ++c) {
        const int64_t j = k0 + c;
        if (j < L && !mrow[j * p.mask_stride[1]])
          for (int64_t r = 0; r < rows; ++r) s[r * kBlockK + c] = kNegInf;
      }
    }
    path.softmax(s, pbuf, m, l, o, rows, dp);
    for (int64_t r = rows; r < round_up(rows, path.rows_per_tile); ++r)  // micro-tile tail rows add nothing
      std::fill(s + r * kBlockK, s + (r + 1) * kBlockK, 0.f);
    path.pv(s, pbuf, vpack, k0, dp, o, rows, first);
    first = false;
  }
  if (first) std::fill(o, o + kTileQ * dp, 0.f);  // no block processed (all keys padding): zeros
  const int64_t ob = b * p.o_stride[0] + h * p.o_stride[1];
  for (int64_t r = 0; r < rows; ++r)
    store_row(o + r * dp, l[r], p.head_dim, p.dtype, p.out, ob + (row0 + r) * p.o_stride[2]);
}

}  // namespace

// fp32 layout (block_causal_attention_cpu_paths.h): Kt [Dp][Lp], V [Lp][Dp], q [kTileQ][Dp];
// fp16 / bf16 inputs are widened here.
void pack_f32(const BlockCausalParams& p, int64_t b, int64_t h, int64_t dp, int64_t lp, int64_t k_lo, int64_t k_hi,
              void* k_out, void* v_out) {
  const int64_t D = p.head_dim, k_end = std::min(k_hi, p.length);
  const int64_t kb = b * p.k_stride[0] + h * p.k_stride[1];
  const int64_t vb = b * p.v_stride[0] + h * p.v_stride[1];
  float* kt = static_cast<float*>(k_out);
  float* vs = static_cast<float*>(v_out);
  for (int64_t i = k_lo; i < k_end; ++i) {
    for (int64_t d = 0; d < D; ++d) {
      kt[d * lp + i] = load(p.k, p.dtype, kb + i * p.k_stride[2] + d);
      vs[i * dp + d] = load(p.v, p.dtype, vb + i * p.v_stride[2] + d);
    }
  }
}

void load_q_f32(const BlockCausalParams& p, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t dp,
                void* qtile) {
  float* out = static_cast<float*>(qtile);
  const int64_t qb = b * p.q_stride[0] + h * p.q_stride[1];
  std::fill(out, out + kTileQ * dp, 0.f);  // padding rows / columns: micro-tiles never read garbage
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t at = qb + (row0 + r) * p.q_stride[2];
    if (p.dtype == DType::kFloat32) {
      std::memcpy(out + r * dp, static_cast<const float*>(p.q) + at, sizeof(float) * p.head_dim);
    } else {
      for (int64_t d = 0; d < p.head_dim; ++d) out[r * dp + d] = load(p.q, p.dtype, at + d);
    }
  }
}

}  // namespace cpu

const char* cpu_micro_kernels() {
  static const std::string name = [] {
    const cpu::Dispatch& d = cpu::dispatch();
    return std::string(d.fp32->name) + "; bf16: " + (d.bf16 ? d.bf16->name : "via fp32");
  }();
  return name.c_str();
}

const char* block_causal_attention_cpu(const BlockCausalParams& p, int num_threads, int64_t head_split) {
  using namespace cpu;
  if (const char* err = check_params(p)) return err;
  const Path& path = path_for(p.dtype);
  const int64_t B = p.batch, H = p.heads, L = p.length;
  const int64_t dp = round_up(p.head_dim, kVec), lp = round_up(L, kBlockK);
  const int64_t nkb = lp / kBlockK, ntiles = (L + kTileQ - 1) / kTileQ;
  const int64_t half = round_up(dp * lp * path.packed_bytes, 64);  // bytes of packed K, then of V
  // Per key block: [any key real, all keys real] (keys >= L count as padding).
  thread_local std::vector<uint8_t> blocks;
  const uint8_t* key_ok = nullptr;
  if (p.key_padding_mask) {
    blocks.assign(static_cast<size_t>(B * nkb * 2), 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t kb = 0; kb < nkb; ++kb) {
        bool any = false, all = true;
        for (int64_t j = kb * kBlockK; j < (kb + 1) * kBlockK; ++j) {
          const bool real = j < L && p.key_padding_mask[b * p.mask_stride[0] + j * p.mask_stride[1]];
          any |= real;
          all &= real;
        }
        blocks[(b * nkb + kb) * 2] = any;
        blocks[(b * nkb + kb) * 2 + 1] = all;
      }
    key_ok = blocks.data();
  }
  int nt = 1;
#if defined(_OPENMP)
  // Useful work upper bound (all pairs visible) decides whether threads pay for themselves.
  const double flops = 4.0 * B * H * static_cast<double>(L) * L * p.head_dim;
  nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  nt = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({nt, B * H * ntiles, static_cast<int64_t>(flops / kMinFlopsPerThread)})));
#else
  (void)num_threads;
#endif
  // Work item = one head's query tiles, or a contiguous group of them when there are too few
  // heads to keep every thread busy (each group then packs its own keys).
  const int64_t split = std::clamp<int64_t>(head_split > 0 ? head_split : (2 * nt + B * H - 1) / (B * H), 1, ntiles);
  auto run = [&](int64_t item) {
    const int64_t bh = item / split, g = item % split, b = bh / H;
    const int64_t t0 = g * ntiles / split, t1 = (g + 1) * ntiles / split;
    if (t0 == t1) return;
    // This thread's packed K/V: one head (at most Dp x Lp, ~320 KiB at the release shape), so it
    // stays in L2 while the item's tiles reuse it.
    thread_local std::vector<float> work;
    if (work.size() < static_cast<size_t>((2 * half + 64) / sizeof(float)))
      work.resize(static_cast<size_t>((2 * half + 64) / sizeof(float)));
    char* kpack = reinterpret_cast<char*>(round_up(reinterpret_cast<intptr_t>(work.data()), 64));
    char* vpack = kpack + half;
    int64_t k_lo, k_hi;  // keys the item's tiles can see, whole key blocks
    tile_keys(t0 * kTileQ, std::min(t1 * kTileQ, L), p.tokens_per_frame, L, p.orientation, &k_lo, &k_hi);
    k_lo = k_lo / kBlockK * kBlockK;
    k_hi = round_up(k_hi, kBlockK);
    if (lp != L || dp != p.head_dim) zero_padding(path, dp, lp, k_lo, k_hi, kpack, vpack);
    path.pack(p, b, bh % H, dp, lp, k_lo, k_hi, kpack, vpack);
    for (int64_t t = t0; t < t1; ++t) {
      if (t + 1 < t1) prefetch_q_rows(p, b, bh % H, (t + 1) * kTileQ, std::min((t + 2) * kTileQ, L));
      attend_tile(p, path, kpack, vpack, key_ok ? key_ok + b * nkb * 2 : nullptr, b, bh % H, t * kTileQ, dp, lp);
    }
  };
  const int64_t items = B * H * split;
#if defined(_OPENMP)
  if (nt > 1) {
    // Heads cost the same; split groups of 'past' tiles do not: dynamic scheduling balances both.
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t item = 0; item < items; ++item) run(item);
    return nullptr;
  }
#endif
  for (int64_t item = 0; item < items; ++item) run(item);
  return nullptr;
}

}  // namespace favor
