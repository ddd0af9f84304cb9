// Block-causal window attention: parameters, limits and the tile maths shared by CPU and CUDA.
//
// What is computed (the spec is favor/attention.py::reference_attention):
//   q, k, v, out : [B, H, L, D], L = F frames x S tokens per frame; token i is in frame i / S.
//   row i may see key j  <=>  frame(j) <= frame(i)   (orientation 'past', the paper)
//                             frame(j) >= frame(i)   (orientation 'future', the release's triu mask)
//                         and key_padding_mask[b, j] != 0 (when a mask is given).
//   out[b,h,i,:] = sum_j softmax_j(q_i . k_j / sqrt(D)) v_j over the visible j; a row that sees no
//   key at all returns zeros (it can only be a padded row).
//
// So every row's visible keys form one contiguous interval [lo(i), hi(i)) cut by the padding mask:
//   past:   [0, (frame(i) + 1) * S)      future: [frame(i) * S, L)
// A key block outside the union of its query tile's intervals is never touched (block skipping);
// a block inside every row's interval needs no per-element mask (the common case).
//
// Algorithm (flash-attention forward, online softmax): for a tile of query rows, walk the visible
// key blocks; per block S = Q K^T (log2 domain: q is pre-scaled by log2(e)/sqrt(D)), m' = max(m,
// rowmax S), alpha = 2^(m - m'), l = alpha l + sum 2^(S - m'), O = alpha O + 2^(S - m') V.
// Finally out = O / l (l == 0 -> 0). Accumulation is fp32 whatever the input dtype.
//
// Limits: 1 <= D <= kMaxHeadDim (256; 128 on CUDA); L % S == 0; innermost (D) stride 1 for q, k, v and out, other
// strides arbitrary (so q/k/v may be views of one fused projection); the mask is bytes [B, L] with
// any strides. fp32 / fp16 / bf16 inputs; out has the input dtype. Indices are int64.

#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FAVOR_HD __host__ __device__ __forceinline__
#else
#define FAVOR_HD inline
#endif

namespace favor {

constexpr int kMaxHeadDim = 256;  // CPU tiles live on the stack; CUDA allows 128 (registers)
constexpr float kLog2e = 1.4426950408889634f;

enum class Orientation : int32_t { kPast = 0, kFuture = 1 };
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Strides are in elements of the tensor's own dtype; the D stride is 1 by contract.
struct BlockCausalParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  const uint8_t* key_padding_mask = nullptr;  // optional, nonzero = real token
  DType dtype = DType::kFloat32;
  int64_t batch = 0, heads = 0, length = 0, head_dim = 0;
  int64_t tokens_per_frame = 1;
  Orientation orientation = Orientation::kPast;
  int64_t q_stride[3] = {0, 0, 0};  // b, h, l
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int64_t o_stride[3] = {0, 0, 0};
  int64_t mask_stride[2] = {0, 0};  // b, l
  float softmax_scale = 0.f;       // 1/sqrt(D) unless the caller overrides it
};

// Returns nullptr when p is valid, else a static description of the first violated limit.
inline const char* check_params(const BlockCausalParams& p) {
  if (!p.q || !p.k || !p.v || !p.out) return "q, k, v and out must be non-null";
  if (p.batch < 1 || p.heads < 1 || p.length < 1) return "batch, heads and length must be >= 1";
  if (p.head_dim < 1 || p.head_dim > kMaxHeadDim) return "head_dim must be in [1, 256]";
  if (p.tokens_per_frame < 1) return "tokens_per_frame must be >= 1";
  if (p.length % p.tokens_per_frame) return "length must be a multiple of tokens_per_frame";
  if (p.orientation != Orientation::kPast && p.orientation != Orientation::kFuture)
    return "orientation must be past (0) or future (1)";
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return "dtype must be float32, float16 or bfloat16";
  if (!(p.softmax_scale > 0.f)) return "softmax_scale must be > 0";
  return nullptr;
}

// CPU forward. num_threads <= 0 uses the OpenMP default. Work items are whole heads (each packs
// its visible K/V into a thread-local buffer of at most one head), or, when there are fewer than
// two heads per thread, groups of a head's query tiles; head_split > 0 forces that many groups
// per head (tests use it; the result does not depend on it). Returns nullptr or an error message.
const char* block_causal_attention_cpu(const BlockCausalParams& p, int num_threads, int64_t head_split = 0);

// Names of the CPU paths this process uses for fp32 and bf16 inputs (e.g. "kAvx512 8x32; bf16:
// kAvx512Bf16 8x32 vdpbf16ps"); FAVOR_CPU_ISA=avx512|avx2|baseline forces a narrower set (read
// once per process; avx512 turns the bf16 dot-product path off).
const char* cpu_micro_kernels();

// CUDA forward on device pointers (mask included), enqueued on `stream` (a cudaStream_t).
// Returns nullptr or an error message. Defined in block_causal_attention.cu.
const char* block_causal_attention_cuda(const BlockCausalParams& p, void* stream);

// ---- tile maths shared by the CPU core and the CUDA kernel -----------------------------------

// Visible key interval [lo, hi) of query row `row`.
FAVOR_HD void visible_keys(int64_t row, int64_t tokens_per_frame, int64_t length, Orientation o,
                           int64_t* lo, int64_t* hi) {
  const int64_t frame = row / tokens_per_frame;
  if (o == Orientation::kPast) {
    *lo = 0;
    *hi = (frame + 1) * tokens_per_frame;
  } else {
    *lo = frame * tokens_per_frame;
    *hi = length;
  }
}

// Union of the intervals of rows [row0, row1) (row1 > row0): the only keys a tile can touch.
FAVOR_HD void tile_keys(int64_t row0, int64_t row1, int64_t tokens_per_frame, int64_t length,
                        Orientation o, int64_t* lo, int64_t* hi) {
  int64_t lo0, hi0, lo1, hi1;
  visible_keys(row0, tokens_per_frame, length, o, &lo0, &hi0);
  visible_keys(row1 - 1, tokens_per_frame, length, o, &lo1, &hi1);
  *lo = lo0 < lo1 ? lo0 : lo1;  // intervals move monotonically with the row
  *hi = hi0 > hi1 ? hi0 : hi1;
}

// True when keys [k0, k1) are visible to every row of [row0, row1): no element mask needed.
FAVOR_HD bool block_fully_visible(int64_t row0, int64_t row1, int64_t k0, int64_t k1,
                                  int64_t tokens_per_frame, int64_t length, Orientation o) {
  int64_t lo0, hi0, lo1, hi1;
  visible_keys(row0, tokens_per_frame, length, o, &lo0, &hi0);
  visible_keys(row1 - 1, tokens_per_frame, length, o, &lo1, &hi1);
  const int64_t lo = lo0 > lo1 ? lo0 : lo1;  // intersection of the first and last row's intervals
  const int64_t hi = hi0 < hi1 ? hi0 : hi1;
  return k0 >= lo && k1 <= hi;
}

FAVOR_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FAVOR_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// 2^x for x <= 0 (scores minus the running max), written so compilers vectorise it. x = n + f with
// n = round(x), |f| <= 1/2; 2^f by its degree-7 Taylor series (truncation < 6e-9 relative, below
// fp32 rounding); 2^n built in the exponent bits. x <= -127 (including -inf) returns exactly 0, so
// masked keys contribute nothing.
FAVOR_HD float exp2_neg(float x) {
  x = x < -127.f ? -127.f : x;
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer in fp32
  const float n = (x + magic) - magic;
  const float f = (x - n) * 0.6931471805599453f;  // f ln 2, |.| <= 0.347
  float p = 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t e = static_cast<int32_t>(n) + 127;  // 0 for n = -127: the result is +0
  return p * bits_to_float(static_cast<uint32_t>(e) << 23);
}

// Online-softmax step: new running max and the factor that rescales the old l and O.
// A row that has seen only masked keys keeps m = -inf; its alpha is 1 and its p's are 0.
FAVOR_HD float softmax_rescale(float m_old, float block_max, float* m_new) {
  const float m = m_old > block_max ? m_old : block_max;
  *m_new = m;
  if (m == -__builtin_huge_valf()) return 1.f;
  return exp2_neg(m_old - m);  // m_old = -inf -> 0
}

// IEEE half / bfloat16 <-> float, round-to-nearest-even, no intrinsics (host and device).
FAVOR_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {                                                           // zero / subnormal
    const float mag = static_cast<float>(man) * 5.9604644775390625e-8f;     // man * 2^-24
    return sign ? -mag : mag;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

FAVOR_HD uint16_t float_to_half(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {  // below the smallest normal half: round ax * 2^24 to an integer
    const float mag = bits_to_float(ax) * 16777216.f;
    const float r = (mag + 12582912.f) - 12582912.f;  // round half to even
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(r));
  }
  const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);  // RNE on the 13 dropped bits
  return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

FAVOR_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

FAVOR_HD uint16_t float_to_bf16(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet nan
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace favor
