// Internal to the CPU kernel: one "path" = packed K/V layout + q tile layout + micro-kernels for
// one ISA and element type. block_causal_attention_cpu.cpp walks tiles and key blocks and calls a
// path; block_causal_attention_avx512.cpp defines the AVX-512 fp32 and AVX-512 BF16 paths.
//
// Shapes (Dp = head dim rounded up to kVec, Lp = length rounded up to kBlockK):
//   fp32 path: K packed as Kt [Dp][Lp] fp32 (keys contiguous), V as [Lp][Dp] fp32, q tile
//              [kTileQ][Dp] fp32;
//   bf16 path: K packed as [Dp/2][Lp] pairs (K[key][2t], K[key][2t+1]) in one 32-bit word, V as
//              [Lp/2][Dp] pairs (V[2j][d], V[2j+1][d]), q tile [kTileQ][Dp] bf16 bits. Pairs are
//              the operand layout of vdpbf16ps (two bf16 products summed per fp32 lane).
// Every micro-kernel works on `rows` query rows padded up to rows_per_tile (the tile buffers are
// zeroed beyond `rows`), one key block of kBlockK keys.

#pragma once

#include <cstdint>

#include "block_causal_attention.h"

namespace favor {
namespace cpu {

constexpr int64_t kVec = 16;     // pad head dim to a multiple of one AVX-512 register of fp32
constexpr int64_t kTileQ = 32;   // query rows per work item (one release frame of 32 tokens)
constexpr int64_t kBlockK = 32;  // keys per online-softmax step
constexpr int64_t kMaxRows = 8;  // largest register micro-tile height (tiles are padded to it)

struct Path {
  const char* name;
  int rows_per_tile;  // R of the register micro-tile
  int packed_bytes;   // bytes per packed K or V element (4 fp32, 2 bf16)
  // Pack keys [k_lo, k_hi) of head (b, h) (k_lo a multiple of kBlockK, k_hi <= Lp) into k_out /
  // v_out in this path's layout. Writes only real elements: padding (keys >= L, dims >= D) is
  // zeroed by the caller.
  void (*pack)(const BlockCausalParams& p, int64_t b, int64_t h, int64_t dp, int64_t lp, int64_t k_lo,
               int64_t k_hi, void* k_out, void* v_out);
  // q rows [row0, row0 + rows) of head (b, h) into the tile buffer; rows up to kTileQ zeroed.
  void (*load_q)(const BlockCausalParams& p, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t dp,
                 void* qtile);
  // s [rows][kBlockK] = (q . k_j) * scale for the keys [k0, k0 + kBlockK).
  void (*scores)(const void* qtile, const void* k_packed, int64_t k0, int64_t dp, int64_t lp, float scale,
                 float* s, int64_t rows);
  // Online-softmax step over s [rows][kBlockK]: updates the running max m, sum l and rescales the
  // output o [rows][Dp]; P goes back into s (fp32 paths) or into pb [kTileQ][kBlockK] as bf16
  // (bf16 path; rows past `rows` up to the micro-tile padding are zeros there).
  void (*softmax)(float* s, uint16_t* pb, float* m, float* l, float* o, int64_t rows, int64_t dp);
  // o [rows][Dp] += P [rows][kBlockK] . V[k0 : k0 + kBlockK], P from s or pb as written above;
  // first (the tile's first processed block): o = P . V, its old contents are never read.
  void (*pv)(const float* s, const uint16_t* pb, const void* v_packed, int64_t k0, int64_t dp, float* o,
             int64_t rows, bool first);
};

// fp32 K/V packing and q-tile loading (block_causal_attention_cpu.cpp), shared by every fp32 path.
void pack_f32(const BlockCausalParams& p, int64_t b, int64_t h, int64_t dp, int64_t lp, int64_t k_lo, int64_t k_hi,
              void* k_out, void* v_out);
void load_q_f32(const BlockCausalParams& p, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t dp,
                void* qtile);

// Portable online-softmax step (block_causal_attention_cpu.cpp), built per ISA by target_clones.
void softmax_block(float* s, uint16_t* pb, float* m, float* l, float* o, int64_t rows, int64_t dp);

// Defined in block_causal_attention_avx512.cpp; nullptr when not built for x86-64 with GCC.
const Path* avx512_fp32_path();
const Path* avx512_bf16_path();
const Path* avx2_fp32_path();  // block_causal_attention_avx2.cpp; nullptr likewise

}  // namespace cpu
}  // namespace favor
