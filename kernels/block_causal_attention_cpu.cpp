// CPU forward of block-causal attention (maths and limits: block_causal_attention.h).
//
// Two parallel phases over a per-thread-of-call workspace:
//   1. pack, per (b, h): Qs [L, Dp] = q * log2(e)/sqrt(D), Kt [Dp, Lp] (transposed, so a score
//      micro-tile is broadcast-FMA over keys), V [Lp, Dp]; fp32, zero padded to Dp = D rounded up
//      to kVec and Lp = L rounded up to kBlockK, so every inner loop has a fixed trip count.
//   2. attend, per (b, h, tile of kTileQ query rows): walk only the key blocks the tile can see.
// The hot loops (score tile, PV tile, exp) are plain loops with compile-time bounds that GCC/Clang
// vectorise; FAVOR_CLONES builds them for AVX-512, AVX2+FMA and baseline x86-64 with run-time
// dispatch, so the wheel stays portable.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "block_causal_attention.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FAVOR_NO_CLONES)
#define FAVOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FAVOR_CLONES
#endif

namespace favor {
namespace {

constexpr int64_t kVec = 16;     // pad head dim to a multiple of one AVX-512 register of fp32
constexpr int64_t kTileQ = 32;   // query rows per work item (one release frame of 32 tokens)
constexpr int64_t kBlockK = 32;  // keys per online-softmax step
constexpr int64_t kRows = 4;     // query rows per register micro-tile
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
  const float* q;   // [L, Dp], pre-scaled
  const float* kt;  // [Dp, Lp]
  const float* v;   // [Lp, Dp]
};

// s[r][c] = sum_d q[row r][d] kt[d][k0 + c] for kRows rows x kBlockK keys.
FAVOR_CLONES void score_tile(const float* __restrict q, const float* __restrict kt, int64_t dp,
                             int64_t lp, float* __restrict s) {
  float acc[kRows][kBlockK] = {};
  for (int64_t d = 0; d < dp; ++d) {
    const float* __restrict krow = kt + d * lp;
    for (int64_t r = 0; r < kRows; ++r) {
      const float qv = q[r * dp + d];
      for (int64_t c = 0; c < kBlockK; ++c) acc[r][c] += qv * krow[c];
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t c = 0; c < kBlockK; ++c) s[r * kBlockK + c] = acc[r][c];
}

// o[r][:] += sum_c p[r][c] v[c][:] for kRows rows, in column chunks of kVec.
FAVOR_CLONES void pv_tile(const float* __restrict p, const float* __restrict v, int64_t dp,
                          float* __restrict o) {
  for (int64_t d0 = 0; d0 < dp; d0 += 2 * kVec) {
    const int64_t width = std::min<int64_t>(2 * kVec, dp - d0);
    if (width == 2 * kVec) {
      float acc[kRows][2 * kVec];
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t c = 0; c < 2 * kVec; ++c) acc[r][c] = o[r * dp + d0 + c];
      for (int64_t j = 0; j < kBlockK; ++j) {
        const float* __restrict vrow = v + j * dp + d0;
        for (int64_t r = 0; r < kRows; ++r) {
          const float pv = p[r * kBlockK + j];
          for (int64_t c = 0; c < 2 * kVec; ++c) acc[r][c] += pv * vrow[c];
        }
      }
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t c = 0; c < 2 * kVec; ++c) o[r * dp + d0 + c] = acc[r][c];
    } else {  // one trailing register of columns (dp is a multiple of kVec)
      float acc[kRows][kVec];
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t c = 0; c < kVec; ++c) acc[r][c] = o[r * dp + d0 + c];
      for (int64_t j = 0; j < kBlockK; ++j) {
        const float* __restrict vrow = v + j * dp + d0;
        for (int64_t r = 0; r < kRows; ++r) {
          const float pv = p[r * kBlockK + j];
          for (int64_t c = 0; c < kVec; ++c) acc[r][c] += pv * vrow[c];
        }
      }
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t c = 0; c < kVec; ++c) o[r * dp + d0 + c] = acc[r][c];
    }
  }
}

// Online-softmax update of one block for kTileQ rows: s holds scores, becomes probabilities;
// m, l, o are the running max, sum and unnormalised output.
FAVOR_CLONES void softmax_block(float* __restrict s, float* __restrict m, float* __restrict l,
                                float* __restrict o, int64_t rows, int64_t dp) {
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict row = s + r * kBlockK;
    float bmax = kNegInf;
    for (int64_t c = 0; c < kBlockK; ++c) bmax = row[c] > bmax ? row[c] : bmax;
    float m_new;
    const float alpha = softmax_rescale(m[r], bmax, &m_new);
    m[r] = m_new;
    if (m_new == kNegInf) {  // nothing visible yet: this block adds nothing
      for (int64_t c = 0; c < kBlockK; ++c) row[c] = 0.f;
      continue;
    }
    float sum = 0.f;
    for (int64_t c = 0; c < kBlockK; ++c) {
      row[c] = exp2_neg(row[c] - m_new);
      sum += row[c];
    }
    l[r] = l[r] * alpha + sum;
    if (alpha != 1.f)
      for (int64_t d = 0; d < dp; ++d) o[r * dp + d] *= alpha;
  }
}

void pack_head(const BlockCausalParams& p, int64_t b, int64_t h, int64_t dp, int64_t lp, float* qs,
               float* kt, float* vs) {
  const int64_t L = p.length, D = p.head_dim;
  const float qscale = p.softmax_scale * kLog2e;  // scores in the log2 domain: exp -> exp2
  const int64_t qb = b * p.q_stride[0] + h * p.q_stride[1];
  const int64_t kb = b * p.k_stride[0] + h * p.k_stride[1];
  const int64_t vb = b * p.v_stride[0] + h * p.v_stride[1];
  std::fill(qs, qs + L * dp, 0.f);
  std::fill(kt, kt + dp * lp, 0.f);
  std::fill(vs, vs + lp * dp, 0.f);
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t d = 0; d < D; ++d) {
      qs[i * dp + d] = load(p.q, p.dtype, qb + i * p.q_stride[2] + d) * qscale;
      kt[d * lp + i] = load(p.k, p.dtype, kb + i * p.k_stride[2] + d);
      vs[i * dp + d] = load(p.v, p.dtype, vb + i * p.v_stride[2] + d);
    }
  }
}

void attend_tile(const BlockCausalParams& p, const Packed& pk, const uint8_t* key_ok, int64_t b,
                 int64_t h, int64_t row0, int64_t dp, int64_t lp) {
  const int64_t L = p.length, S = p.tokens_per_frame;
  const int64_t row1 = std::min(row0 + kTileQ, L);
  const int64_t rows = row1 - row0;
  alignas(64) float qtile[kTileQ * kVec * (kMaxHeadDim / kVec)];
  alignas(64) float o[kTileQ * kMaxHeadDim];
  alignas(64) float s[kTileQ * kBlockK];
  float m[kTileQ], l[kTileQ];
  int64_t lo_row[kTileQ], hi_row[kTileQ];
  // Copy the tile's rows and zero the tail so micro-tiles of kRows never read past the tile.
  std::fill(qtile, qtile + kTileQ * dp, 0.f);
  std::copy(pk.q + row0 * dp, pk.q + row1 * dp, qtile);
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
    for (int64_t r = 0; r < rows; r += kRows)
      score_tile(qtile + r * dp, pk.kt + k0, dp, lp, s + r * kBlockK);
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
    for (int64_t r = rows; r < round_up(rows, kRows); ++r)  // micro-tile tail rows add nothing
      std::fill(s + r * kBlockK, s + (r + 1) * kBlockK, 0.f);
    for (int64_t r = 0; r < rows; r += kRows) pv_tile(s + r * kBlockK, pk.v + k0 * dp, dp, o + r * dp);
  }
  const int64_t ob = b * p.o_stride[0] + h * p.o_stride[1];
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // l == 0: the row saw no key -> zeros
    for (int64_t d = 0; d < p.head_dim; ++d)
      store(p.out, p.dtype, ob + (row0 + r) * p.o_stride[2] + d, o[r * dp + d] * inv);
  }
}

}  // namespace

const char* block_causal_attention_cpu(const BlockCausalParams& p, int num_threads) {
  if (const char* err = check_params(p)) return err;
  const int64_t B = p.batch, H = p.heads, L = p.length;
  const int64_t dp = round_up(p.head_dim, kVec), lp = round_up(L, kBlockK);
  const int64_t per_head = L * dp + dp * lp + lp * dp;
  const int64_t nkb = lp / kBlockK, ntiles = (L + kTileQ - 1) / kTileQ;
  // Reused across calls from the same thread: no page faults on the hot path.
  thread_local std::vector<float> work;
  thread_local std::vector<uint8_t> blocks;
  work.resize(static_cast<size_t>(B * H * per_head));
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
#if defined(_OPENMP)
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
#endif
  {
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t bh = 0; bh < B * H; ++bh) {
      float* w = base + bh * per_head;
      pack_head(p, bh / H, bh % H, dp, lp, w, w + L * dp, w + L * dp + dp * lp);
    }
    // 'past' tiles late in the window see more keys: dynamic scheduling balances them.
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t item = 0; item < B * H * ntiles; ++item) {
      const int64_t bh = item / ntiles, tile = item % ntiles;
      const float* w = base + bh * per_head;
      const Packed pk{w, w + L * dp, w + L * dp + dp * lp};
      const int64_t b = bh / H;
      attend_tile(p, pk, key_ok ? key_ok + b * nkb * 2 : nullptr, b, bh % H, tile * kTileQ, dp, lp);
    }
  }
  return nullptr;
}

}  // namespace favor
