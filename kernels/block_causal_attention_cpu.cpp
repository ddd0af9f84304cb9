// CPU forward of block-causal attention (maths and limits: block_causal_attention.h).
//
// One parallel loop over work items (b, h, tile of kTileQ query rows), dynamically scheduled:
//   * the first item of a head packs it (others of that head wait on an atomic flag): Kt [Dp, Lp]
//     (transposed, so a score micro-tile is broadcast-FMA over keys) and V [Lp, Dp], fp32, zero
//     padded to Dp = D rounded up to kVec and Lp = L rounded up to kBlockK, so every inner loop has
//     a fixed trip count. Packing on demand avoids a barrier between a pack and an attend phase,
//     which costs a whole scheduler slice whenever a core is shared with another process;
//   * the item loads its q rows (scaled by log2(e)/sqrt(D)) and walks only the visible key blocks.
// The hot loops (score tile, PV tile, exp) are plain loops with compile-time bounds that GCC/Clang
// vectorise. The wheel stays portable (no -march): the register micro-tiles are instantiated for
// AVX-512, AVX2+FMA and baseline x86-64 and chosen once at run time (micro_kernels()); the softmax
// step is built for the same three by target_clones.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "block_causal_attention.h"

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
namespace {

constexpr int64_t kVec = 16;     // pad head dim to a multiple of one AVX-512 register of fp32
constexpr int64_t kTileQ = 32;   // query rows per work item (one release frame of 32 tokens)
constexpr int64_t kBlockK = 32;  // keys per online-softmax step
constexpr int64_t kMaxRows = 8;  // largest register micro-tile height (tiles are padded to it)
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

void store(void* base, DType t, int64_t i, float x) {
  switch (t) {
    case DType::kFloat16: static_cast<uint16_t*>(base)[i] = float_to_half(x); break;
    case DType::kBFloat16: static_cast<uint16_t*>(base)[i] = float_to_bf16(x); break;
    default: static_cast<float*>(base)[i] = x;
  }
}

struct Packed {
  const float* kt;  // [Dp, Lp]
  const float* v;   // [Lp, Dp]
};

// Register micro-tiles, R rows x C fp32 columns of accumulators. Their best size depends on the
// register file (AVX-512: 32 x 16 floats, AVX2: 16 x 8), so they are templates instantiated once
// per ISA below; always_inline makes each instantiation compile with its caller's target.

// s[r][c] = sum_d q[r][d] kt[d][c] for R rows x kBlockK keys, C keys at a time.
template <int R, int C>
FAVOR_ALWAYS_INLINE void score_tile(const float* __restrict q, const float* __restrict kt, int64_t dp,
                                    int64_t lp, float* __restrict s) {
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
      for (int c = 0; c < C; ++c) s[r * kBlockK + c0 + c] = acc[r][c];
  }
}

// o[r][d0:d0+C] += sum_j p[r][j] v[j][d0:d0+C] for R rows.
template <int R, int C>
FAVOR_ALWAYS_INLINE void pv_chunk(const float* __restrict p, const float* __restrict v, int64_t dp,
                                  int64_t d0, float* __restrict o) {
  float acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = o[r * dp + d0 + c];
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
                                 float* __restrict o) {
  static_assert(C % kVec == 0 || kVec % C == 0, "columns must tile the kVec-padded head dim");
  int64_t d0 = 0;
  for (; d0 + C <= dp; d0 += C) pv_chunk<R, C>(p, v, dp, d0, o);
  for (; d0 < dp; d0 += kVec) pv_chunk<R, kVec>(p, v, dp, d0, o);  // dp is a multiple of kVec
}

// One ISA's micro-kernels over a whole tile of `rows` query rows (rows padded to a multiple of R).
struct MicroKernels {
  const char* name;
  int rows_per_tile;  // R
  void (*scores)(const float*, const float*, int64_t, int64_t, float*, int64_t);
  void (*pv)(const float*, const float*, int64_t, float*, int64_t);
};

#define FAVOR_MICRO_KERNELS(NAME, TARGET, R, C)                                                      \
  TARGET void NAME##_scores(const float* q, const float* kt, int64_t dp, int64_t lp, float* s,      \
                            int64_t rows) {                                                          \
    for (int64_t r = 0; r < rows; r += R) score_tile<R, C>(q + r * dp, kt, dp, lp, s + r * kBlockK); \
  }                                                                                                  \
  TARGET void NAME##_pv(const float* p, const float* v, int64_t dp, float* o, int64_t rows) {       \
    for (int64_t r = 0; r < rows; r += R) pv_tile<R, C>(p + r * kBlockK, v, dp, o + r * dp);        \
  }                                                                                                  \
  constexpr MicroKernels NAME{#NAME " " #R "x" #C, R, NAME##_scores, NAME##_pv};

// Measured on one Zen 5 core at the release shape: AVX-512 8 x 32 (16 of 32 zmm) 111 GFLOP/s vs
// 100 for 4 x 32; AVX2 4 x 32 42 GFLOP/s, while 4 x 16 fell to 12 (GCC fully unrolls the 16-wide
// loop and its SLP pass emits poor code). Baseline / other ISAs use 4 x 32 as well.
#if FAVOR_X86_DISPATCH
FAVOR_MICRO_KERNELS(kAvx512, __attribute__((target("arch=x86-64-v4"))), 8, 32)
FAVOR_MICRO_KERNELS(kAvx2, __attribute__((target("arch=x86-64-v3"))), 4, 32)
#endif
FAVOR_MICRO_KERNELS(kPortable, , 4, 32)

// Chosen once per process: the best the CPU supports, or FAVOR_CPU_ISA=avx2|baseline to force a
// narrower one (tests use it to exercise every path on one machine).
const MicroKernels& micro_kernels() {
  static const MicroKernels& chosen = [&]() -> const MicroKernels& {
#if FAVOR_X86_DISPATCH
    const char* env = std::getenv("FAVOR_CPU_ISA");
    const std::string force = env ? env : "";
    if (force != "avx2" && force != "baseline" && __builtin_cpu_supports("x86-64-v4")) return kAvx512;
    if (force != "baseline" && __builtin_cpu_supports("x86-64-v3")) return kAvx2;
#endif
    return kPortable;
  }();
  return chosen;
}

// Online-softmax update of one block for kTileQ rows: s holds scores, becomes probabilities;
// m, l, o are the running max, sum and unnormalised output.
FAVOR_CLONES void softmax_block(float* __restrict s, float* __restrict m, float* __restrict l,
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
    const float alpha = softmax_rescale(m[r], bmax, &m_new);
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
    if (alpha != 1.f)
      for (int64_t d = 0; d < dp; ++d) o[r * dp + d] *= alpha;
  }
}

void pack_head(const BlockCausalParams& p, int64_t b, int64_t h, int64_t dp, int64_t lp, float* kt,
               float* vs) {
  const int64_t L = p.length, D = p.head_dim;
  const int64_t kb = b * p.k_stride[0] + h * p.k_stride[1];
  const int64_t vb = b * p.v_stride[0] + h * p.v_stride[1];
  std::fill(kt, kt + dp * lp, 0.f);
  std::fill(vs, vs + lp * dp, 0.f);
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t d = 0; d < D; ++d) {
      kt[d * lp + i] = load(p.k, p.dtype, kb + i * p.k_stride[2] + d);
      vs[i * dp + d] = load(p.v, p.dtype, vb + i * p.v_stride[2] + d);
    }
  }
}

// Pack head bh once; concurrent callers for the same head wait until it is ready.
void ensure_packed(std::atomic<int>& state, const BlockCausalParams& p, int64_t bh, int64_t dp, int64_t lp,
                   float* kt, float* vs) {
  enum { kEmpty = 0, kPacking = 1, kReady = 2 };
  if (state.load(std::memory_order_acquire) == kReady) return;
  int expected = kEmpty;
  if (state.compare_exchange_strong(expected, kPacking, std::memory_order_acq_rel)) {
    pack_head(p, bh / p.heads, bh % p.heads, dp, lp, kt, vs);
    state.store(kReady, std::memory_order_release);
    return;
  }
  while (state.load(std::memory_order_acquire) != kReady) std::this_thread::yield();
}

void attend_tile(const BlockCausalParams& p, const Packed& pk, const uint8_t* key_ok, int64_t b,
                 int64_t h, int64_t row0, int64_t dp, int64_t lp) {
  const int64_t L = p.length, S = p.tokens_per_frame;
  const int64_t row1 = std::min(row0 + kTileQ, L);
  const int64_t rows = row1 - row0;
  const MicroKernels& mk = micro_kernels();
  static_assert(kTileQ % kMaxRows == 0, "micro-tiles must not run past the tile buffers");
  alignas(64) float qtile[kTileQ * kMaxHeadDim];
  alignas(64) float o[kTileQ * kMaxHeadDim];
  alignas(64) float s[kTileQ * kBlockK];
  float m[kTileQ], l[kTileQ];
  int64_t lo_row[kTileQ], hi_row[kTileQ];
  // Load the tile's q rows in the log2 domain (exp -> exp2) and zero the padding, so micro-tiles
  // of R rows and Dp columns never read garbage.
  const float qscale = p.softmax_scale * kLog2e;
  const int64_t qb = b * p.q_stride[0] + h * p.q_stride[1];
  std::fill(qtile, qtile + kTileQ * dp, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < p.head_dim; ++d)
      qtile[r * dp + d] = load(p.q, p.dtype, qb + (row0 + r) * p.q_stride[2] + d) * qscale;
  std::fill(o, o + kTileQ * dp, 0.f);
  for (int64_t r = 0; r < kTileQ; ++r) {
    m[r] = kNegInf;
    l[r] = 0.f;
    if (r < rows) visible_keys(row0 + r, S, L, p.orientation, &lo_row[r], &hi_row[r]);
  }
  int64_t lo, hi;
  tile_keys(row0, row1, S, L, p.orientation, &lo, &hi);
  for (int64_t k0 = lo / kBlockK * kBlockK; k0 < hi; k0 += kBlockK) {
    const int64_t kblock = k0 / kBlockK;
    if (key_ok && !key_ok[kblock * 2]) continue;  // every key of this block is padding
    mk.scores(qtile, pk.kt + k0, dp, lp, s, rows);
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
    softmax_block(s, m, l, o, rows, dp);
    for (int64_t r = rows; r < round_up(rows, mk.rows_per_tile); ++r)  // micro-tile tail rows add nothing
      std::fill(s + r * kBlockK, s + (r + 1) * kBlockK, 0.f);
    mk.pv(s, pk.v + k0 * dp, dp, o, rows);
  }
  const int64_t ob = b * p.o_stride[0] + h * p.o_stride[1];
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // l == 0: the row saw no key -> zeros
    for (int64_t d = 0; d < p.head_dim; ++d)
      store(p.out, p.dtype, ob + (row0 + r) * p.o_stride[2] + d, o[r * dp + d] * inv);
  }
}

}  // namespace

const char* cpu_micro_kernels() { return micro_kernels().name; }

const char* block_causal_attention_cpu(const BlockCausalParams& p, int num_threads, int64_t workspace_bytes) {
  if (const char* err = check_params(p)) return err;
  const int64_t B = p.batch, H = p.heads, L = p.length;
  const int64_t dp = round_up(p.head_dim, kVec), lp = round_up(L, kBlockK);
  const int64_t per_head = dp * lp + lp * dp;  // Kt and V
  const int64_t nkb = lp / kBlockK, ntiles = (L + kTileQ - 1) / kTileQ;
  // Heads packed per parallel loop: the workspace stays under workspace_bytes whatever the batch
  // (at least one head); each extra chunk costs one join of the threads.
  const int64_t cap = workspace_bytes > 0 ? workspace_bytes : kDefaultWorkspaceBytes;
  const int64_t chunk = std::clamp<int64_t>(cap / (per_head * int64_t{sizeof(float)}), 1, B * H);
  // Reused across calls from the same thread: no page faults on the hot path.
  thread_local std::vector<float> work;
  thread_local std::vector<uint8_t> blocks;
  work.resize(static_cast<size_t>(chunk * per_head));
  std::unique_ptr<std::atomic<int>[]> packed(new std::atomic<int>[chunk]);
  // Per key block: [any key real, all keys real] (keys >= L count as padding).
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
  float* base = work.data();
  int nt = 1;
#if defined(_OPENMP)
  // Useful work upper bound (all pairs visible) decides whether threads pay for themselves.
  const double flops = 4.0 * B * H * static_cast<double>(L) * L * p.head_dim;
  nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  nt = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({nt, chunk * ntiles, static_cast<int64_t>(flops / kMinFlopsPerThread)})));
#else
  (void)num_threads;
#endif
  for (int64_t bh0 = 0; bh0 < B * H; bh0 += chunk) {
    const int64_t heads = std::min(chunk, B * H - bh0);
    for (int64_t i = 0; i < heads; ++i) packed[i].store(0, std::memory_order_relaxed);
    auto run = [&](int64_t item) {
      const int64_t local = item / ntiles, tile = item % ntiles, bh = bh0 + local, b = bh / H;
      float* kt = base + local * per_head;
      float* vs = kt + dp * lp;
      ensure_packed(packed[local], p, bh, dp, lp, kt, vs);
      attend_tile(p, Packed{kt, vs}, key_ok ? key_ok + b * nkb * 2 : nullptr, b, bh % H, tile * kTileQ, dp, lp);
    };
    const int64_t items = heads * ntiles;
#if defined(_OPENMP)
    if (nt > 1) {
      // 'past' tiles late in the window see more keys: dynamic scheduling balances them.
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
      for (int64_t item = 0; item < items; ++item) run(item);
      continue;
    }
#endif
    for (int64_t item = 0; item < items; ++item) run(item);
  }
  return nullptr;
}

}  // namespace favor
