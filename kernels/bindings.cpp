// pybind11 module favor._C: the CPU block-causal attention kernel over NumPy-protocol buffers.
//
// Framework-free on purpose: torch tensors arrive as zero-copy NumPy views (favor/ops.py), ONNX
// Runtime's Python kernels pass NumPy arrays directly. bfloat16 has no NumPy dtype, so bf16 data
// arrives as uint16 arrays with dtype="bfloat16". Every assumption the kernel makes is checked here
// and reported as a ValueError naming what was expected and what arrived.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>

#include "block_causal_attention.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;
using favor::BlockCausalParams;
using favor::DType;

namespace {

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << "]";
  return s.str();
}

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

DType parse_dtype(const std::string& dtype, const py::array& q) {
  const std::string got = py::str(q.dtype()).cast<std::string>();
  if (dtype == "bfloat16") {
    if (got != "uint16" && got != "int16")
      fail("dtype='bfloat16' expects q, k, v, out as 16-bit integer views of the bf16 bits, got " + got);
    return DType::kBFloat16;
  }
  if (dtype != "auto") fail("dtype must be 'auto' or 'bfloat16', got '" + dtype + "'");
  if (got == "float32") return DType::kFloat32;
  if (got == "float16") return DType::kFloat16;
  fail("q must be float32 or float16 (or bf16 bits with dtype='bfloat16'), got " + got);
}

// Element strides (b, h, l) of a [B, H, L, D] array whose D stride must be one element.
void strides_of(const py::array& a, const char* name, int64_t out[3]) {
  const int64_t item = a.itemsize();
  for (int i = 0; i < 4; ++i)
    if (a.strides(i) % item)
      fail(std::string(name) + " strides must be multiples of its item size " + std::to_string(item) +
           ", got " + std::to_string(a.strides(i)) + " bytes on dim " + std::to_string(i));
  if (a.shape(3) > 1 && a.strides(3) != item)
    fail(std::string(name) + " must be contiguous in the head dim (stride " + std::to_string(item) +
         " bytes), got " + std::to_string(a.strides(3)) + " bytes");
  for (int i = 0; i < 3; ++i) out[i] = a.strides(i) / item;
}

// [first, last] byte addresses touched by a (for the output/input overlap check).
std::pair<intptr_t, intptr_t> extent(const py::array& a) {
  intptr_t lo = reinterpret_cast<intptr_t>(a.data()), hi = lo;
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    const intptr_t span = static_cast<intptr_t>(a.shape(i) - 1) * a.strides(i);
    (span < 0 ? lo : hi) += span;
  }
  return {lo, hi + a.itemsize() - 1};
}

void forward(const py::array& q, const py::array& k, const py::array& v, py::array& out,
             int64_t tokens_per_frame, const std::string& orientation, const py::object& key_padding_mask,
             const std::string& dtype, int num_threads, double softmax_scale, int64_t head_split) {
  const char* names[4] = {"q", "k", "v", "out"};
  const py::array* arrays[4] = {&q, &k, &v, &out};
  for (int i = 0; i < 4; ++i)
    if (arrays[i]->ndim() != 4)
      fail(std::string(names[i]) + " must be 4-D [B, H, L, D], got shape " + shape_str(*arrays[i]));
  for (int i = 1; i < 4; ++i) {
    for (int d = 0; d < 4; ++d)
      if (arrays[i]->shape(d) != q.shape(d))
        fail(std::string(names[i]) + " shape " + shape_str(*arrays[i]) + " must equal q shape " + shape_str(q));
    if (!arrays[i]->dtype().is(q.dtype()))
      fail(std::string(names[i]) + " dtype " + py::str(arrays[i]->dtype()).cast<std::string>() +
           " must equal q dtype " + py::str(q.dtype()).cast<std::string>());
  }
  if (!out.writeable()) fail("out must be a writeable array");
  const auto oe = extent(out);
  for (int i = 0; i < 3; ++i) {
    const auto e = extent(*arrays[i]);
    if (e.first <= oe.second && oe.first <= e.second)
      fail(std::string("out must not overlap ") + names[i] + " (the kernel reads inputs while writing out)");
  }
  BlockCausalParams p;
  p.dtype = parse_dtype(dtype, q);
  p.batch = q.shape(0);
  p.heads = q.shape(1);
  p.length = q.shape(2);
  p.head_dim = q.shape(3);
  if (p.batch < 1 || p.heads < 1 || p.length < 1 || p.head_dim < 1)
    fail("q must have no empty dimension, got shape " + shape_str(q));
  if (p.head_dim > favor::kMaxHeadDim)
    fail("head dim must be <= " + std::to_string(favor::kMaxHeadDim) + ", got " + std::to_string(p.head_dim));
  if (tokens_per_frame < 1) fail("tokens_per_frame must be >= 1, got " + std::to_string(tokens_per_frame));
  if (p.length % tokens_per_frame)
    fail("window length (" + std::to_string(p.length) + ") must be a multiple of tokens_per_frame (" +
         std::to_string(tokens_per_frame) + ")");
  p.tokens_per_frame = tokens_per_frame;
  if (orientation == "past") {
    p.orientation = favor::Orientation::kPast;
  } else if (orientation == "future") {
    p.orientation = favor::Orientation::kFuture;
  } else {
    fail("orientation must be 'past' or 'future', got '" + orientation + "'");
  }
  strides_of(q, "q", p.q_stride);
  strides_of(k, "k", p.k_stride);
  strides_of(v, "v", p.v_stride);
  strides_of(out, "out", p.o_stride);
  py::array mask;
  if (!key_padding_mask.is_none()) {
    if (!py::isinstance<py::array>(key_padding_mask)) fail("key_padding_mask must be an array or None");
    mask = key_padding_mask.cast<py::array>();
    const std::string mdt = py::str(mask.dtype()).cast<std::string>();
    if (mdt != "bool" && mdt != "uint8")
      fail("key_padding_mask must be bool or uint8, got " + mdt);
    if (mask.ndim() != 2 || mask.shape(0) != p.batch || mask.shape(1) != p.length)
      fail("key_padding_mask must be [B, L] = [" + std::to_string(p.batch) + ", " + std::to_string(p.length) +
           "], got " + shape_str(mask));
    p.key_padding_mask = static_cast<const uint8_t*>(mask.data());
    p.mask_stride[0] = mask.strides(0);  // bytes == elements for 1-byte items
    p.mask_stride[1] = mask.strides(1);
  }
  p.softmax_scale = softmax_scale > 0 ? static_cast<float>(softmax_scale)
                                      : static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.head_dim)));
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.mutable_data();
  const char* err;
  {
    py::gil_scoped_release release;
    err = favor::block_causal_attention_cpu(p, num_threads, head_split);
  }
  if (err) fail(std::string("block_causal_attention: ") + err);
}

py::dict build_info() {
  py::dict d;
#if defined(_OPENMP)
  d["openmp"] = true;
  d["max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["max_threads"] = 1;
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FAVOR_NO_CLONES)
  d["isa_dispatch"] = "x86-64-v4 | x86-64-v3 | baseline, chosen at run time";
#else
  d["isa_dispatch"] = "compiler default";
#endif
  d["micro_kernels"] = favor::cpu_micro_kernels();
  d["max_head_dim"] = favor::kMaxHeadDim;
  d["compiler"] = __VERSION__;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "FAVOR-RT kernels: fused block-causal window attention (CPU).";
  m.def("block_causal_attention", &forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("tokens_per_frame"), py::arg("orientation"), py::arg("key_padding_mask") = py::none(),
        py::arg("dtype") = "auto", py::arg("num_threads") = 0, py::arg("softmax_scale") = 0.0,
        py::arg("head_split") = 0,
        "Write block-causal attention of q, k, v [B, H, L, D] into out (same shape and dtype).");
  m.def("build_info", &build_info, "How this extension was built (OpenMP, ISA dispatch, limits).");
}
