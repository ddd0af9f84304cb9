// CUDA forward of block-causal attention (maths, limits and the shared tile helpers:
// block_causal_attention.h). Compiled for sm_87 (Jetson Orin) and sm_90 (Hopper).
//
// NEVER EXECUTED ON A GPU: our machines have none. It compiles in CI; its masking, block skipping,
// online softmax, exp2 and dtype conversions are the header functions the CPU tests exercise.
//
// Layout: one CTA per (query tile of kTileQ rows, head, batch); one thread per query row holding
// its q row and O accumulator in registers; K/V blocks of BK keys are staged in shared memory
// (converted to fp32) and read by all threads as broadcasts. Key blocks outside the tile's visible
// interval are never loaded; blocks inside every row's interval skip the per-element mask.

#include <cuda_runtime.h>

#include <cstdint>

#include "block_causal_attention.h"

namespace favor {
namespace {

constexpr int kTileQ = 64;  // query rows (threads) per CTA
// One thread keeps its q row and O row in registers: 2 x 128 fp32 is the most that fits without
// heavy spilling (a 256 instantiation also tripled the compile time).
constexpr int kMaxHeadDimCuda = 128;

template <DType T>
__device__ __forceinline__ float load_elem(const void* base, int64_t i) {
  if constexpr (T == DType::kFloat32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (T == DType::kFloat16) {
    return half_to_float(static_cast<const uint16_t*>(base)[i]);
  } else {
    return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

template <DType T>
__device__ __forceinline__ void store_elem(void* base, int64_t i, float x) {
  if constexpr (T == DType::kFloat32) {
    static_cast<float*>(base)[i] = x;
  } else if constexpr (T == DType::kFloat16) {
    static_cast<uint16_t*>(base)[i] = float_to_half(x);
  } else {
    static_cast<uint16_t*>(base)[i] = float_to_bf16(x);
  }
}

// DMAX >= head_dim; BK * DMAX * 2 fp32 (K and V) = 32 KiB of static shared memory.
template <DType T, int DMAX, int BK>
__global__ void __launch_bounds__(kTileQ) block_causal_attention_kernel(const BlockCausalParams p) {
  __shared__ float ks[BK][DMAX];
  __shared__ float vs[BK][DMAX];
  __shared__ bool key_real[BK];
  const int64_t L = p.length, D = p.head_dim, S = p.tokens_per_frame;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileQ;
  const int64_t row1 = row0 + kTileQ < L ? row0 + kTileQ : L;
  const int64_t row = row0 + threadIdx.x;
  const bool active = row < row1;

  float qr[DMAX], o[DMAX];
  const float qscale = p.softmax_scale * kLog2e;  // log2-domain scores, as on the CPU
  const int64_t qb = b * p.q_stride[0] + h * p.q_stride[1] + row * p.q_stride[2];
#pragma unroll
  for (int d = 0; d < DMAX; ++d) {
    qr[d] = (active && d < D) ? load_elem<T>(p.q, qb + d) * qscale : 0.f;
    o[d] = 0.f;
  }
  float m = -__builtin_huge_valf(), l = 0.f;
  int64_t lo_r = 0, hi_r = 0, lo, hi;
  if (active) visible_keys(row, S, L, p.orientation, &lo_r, &hi_r);
  tile_keys(row0, row1, S, L, p.orientation, &lo, &hi);

  const int64_t kb = b * p.k_stride[0] + h * p.k_stride[1];
  const int64_t vb = b * p.v_stride[0] + h * p.v_stride[1];
  for (int64_t k0 = lo / BK * BK; k0 < hi; k0 += BK) {
    // Stage the block: zeros past L, padding flags from the mask.
    for (int idx = threadIdx.x; idx < BK * DMAX; idx += kTileQ) {
      const int j = idx / DMAX, d = idx % DMAX;
      const int64_t key = k0 + j;
      const bool in = key < L && d < D;
      ks[j][d] = in ? load_elem<T>(p.k, kb + key * p.k_stride[2] + d) : 0.f;
      vs[j][d] = in ? load_elem<T>(p.v, vb + key * p.v_stride[2] + d) : 0.f;
    }
    for (int j = threadIdx.x; j < BK; j += kTileQ) {
      const int64_t key = k0 + j;
      key_real[j] = key < L && (!p.key_padding_mask ||
                                p.key_padding_mask[b * p.mask_stride[0] + key * p.mask_stride[1]]);
    }
    __syncthreads();
    if (active) {
      const bool full = block_fully_visible(row0, row1, k0, k0 + BK, S, L, p.orientation);
      // Pass 1: block max of the visible scores. Pass 2 recomputes each score (cheap next to the
      // register pressure of keeping BK of them) -- only the head-dim loops are unrolled.
      float bmax = -__builtin_huge_valf();
#pragma unroll 1
      for (int j = 0; j < BK; ++j) {
        const int64_t key = k0 + j;
        if (!key_real[j] || !(full || (key >= lo_r && key < hi_r))) continue;
        float acc = 0.f;
#pragma unroll
        for (int d = 0; d < DMAX; ++d) acc += qr[d] * ks[j][d];
        bmax = acc > bmax ? acc : bmax;
      }
      float m_new;
      const float alpha = softmax_rescale(m, bmax, &m_new);
      m = m_new;
      if (m_new != -__builtin_huge_valf()) {
        float sum = 0.f;
#pragma unroll
        for (int d = 0; d < DMAX; ++d) o[d] *= alpha;
#pragma unroll 1
        for (int j = 0; j < BK; ++j) {
          const int64_t key = k0 + j;
          if (!key_real[j] || !(full || (key >= lo_r && key < hi_r))) continue;
          float acc = 0.f;
#pragma unroll
          for (int d = 0; d < DMAX; ++d) acc += qr[d] * ks[j][d];
          const float pj = exp2_neg(acc - m_new);
          sum += pj;
#pragma unroll
          for (int d = 0; d < DMAX; ++d) o[d] += pj * vs[j][d];
        }
        l = l * alpha + sum;
      }
    }
    __syncthreads();  // the next block overwrites ks / vs
  }
  if (!active) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;  // a row that saw no key returns zeros
  const int64_t ob = b * p.o_stride[0] + h * p.o_stride[1] + row * p.o_stride[2];
#pragma unroll
  for (int d = 0; d < DMAX; ++d)
    if (d < D) store_elem<T>(p.out, ob + d, o[d] * inv);
}

template <DType T, int DMAX>
cudaError_t launch(const BlockCausalParams& p, cudaStream_t stream) {
  constexpr int kBK = 4096 / DMAX;  // 2 x BK x DMAX x 4 B = 32 KiB of shared memory
  const dim3 grid(static_cast<unsigned>((p.length + kTileQ - 1) / kTileQ), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  block_causal_attention_kernel<T, DMAX, kBK><<<grid, kTileQ, 0, stream>>>(p);
  return cudaGetLastError();
}

template <DType T>
cudaError_t dispatch_dim(const BlockCausalParams& p, cudaStream_t stream) {
  if (p.head_dim <= 32) return launch<T, 32>(p, stream);
  if (p.head_dim <= 64) return launch<T, 64>(p, stream);
  return launch<T, 128>(p, stream);  // head_dim <= kMaxHeadDimCuda, checked by the caller
}

}  // namespace

const char* block_causal_attention_cuda(const BlockCausalParams& p, void* stream) {
  if (const char* err = check_params(p)) return err;
  if (p.batch > 65535 || p.heads > 65535) return "batch and heads must be <= 65535 (CUDA grid limit)";
  if (p.head_dim > kMaxHeadDimCuda) return "head_dim must be <= 128 on CUDA (O and q live in registers)";
  const auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (p.dtype) {
    case DType::kFloat16: err = dispatch_dim<DType::kFloat16>(p, s); break;
    case DType::kBFloat16: err = dispatch_dim<DType::kBFloat16>(p, s); break;
    default: err = dispatch_dim<DType::kFloat32>(p, s);
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace favor
