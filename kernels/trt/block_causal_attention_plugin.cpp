// TensorRT IPluginV3 plugin "BlockCausalAttention" version "1" wrapping the CUDA kernel.
//
// The name and version match the ONNX node favor.BlockCausalAttention v1 (favor/onnx_attention.py),
// so TensorRT's ONNX parser maps that node to this plugin once the library is loaded
// (ctypes.CDLL / trtexec --dynamicPlugins). Inputs: q, k, v [N, H, L, Dh] (fp32, fp16 or bf16, one
// dtype, linear) and key_padding_mask [N, L] bool; output [N, H, L, Dh] in the input dtype.
// Fields: tokens_per_frame (int32 or int64) and orientation ("past" | "future").
//
// NEVER COMPILED OR RUN HERE: no TensorRT headers exist on our machines. CMake builds it only when
// NvInfer.h and libnvinfer are found (TensorRT >= 10, where IPluginV3 exists).

#include <NvInfer.h>
#include <NvInferRuntime.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "block_causal_attention.h"

using namespace nvinfer1;

namespace favor {
namespace {

constexpr char const* kPluginName = "BlockCausalAttention";
constexpr char const* kPluginVersion = "1";
constexpr int32_t kNbInputs = 4;

DType to_favor(DataType t) {
  return t == DataType::kHALF ? DType::kFloat16 : t == DataType::kBF16 ? DType::kBFloat16 : DType::kFloat32;
}

class BlockCausalAttentionPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild,
                                   public IPluginV3OneRuntime {
 public:
  BlockCausalAttentionPlugin(int32_t tokens_per_frame, Orientation orientation)
      : tokens_per_frame_(tokens_per_frame), orientation_(orientation) {
    orientation_name_ = orientation == Orientation::kPast ? "past" : "future";
    fields_.emplace_back("tokens_per_frame", &tokens_per_frame_, PluginFieldType::kINT32, 1);
    fields_.emplace_back("orientation", orientation_name_.c_str(), PluginFieldType::kCHAR,
                         static_cast<int32_t>(orientation_name_.size() + 1));
    collection_.nbFields = static_cast<int32_t>(fields_.size());
    collection_.fields = fields_.data();
  }

  // IPluginV3
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    if (type == PluginCapabilityType::kBUILD) return static_cast<IPluginV3OneBuild*>(this);
    if (type == PluginCapabilityType::kRUNTIME) return static_cast<IPluginV3OneRuntime*>(this);
    return static_cast<IPluginV3OneCore*>(this);
  }
  IPluginV3* clone() noexcept override { return new BlockCausalAttentionPlugin(tokens_per_frame_, orientation_); }

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return kPluginName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return ""; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return 1; }
  int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t nbInputs, DynamicPluginTensorDesc const*,
                          int32_t nbOutputs) noexcept override {
    return nbInputs == kNbInputs && nbOutputs == 1 ? 0 : -1;
  }
  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override {
    if (nbOutputs != 1 || nbInputs != kNbInputs) return -1;
    outputTypes[0] = inputTypes[0];
    return 0;
  }
  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
                          DimsExprs* outputs, int32_t nbOutputs, IExprBuilder&) noexcept override {
    if (nbInputs != kNbInputs || nbOutputs != 1 || inputs[0].nbDims != 4) return -1;
    outputs[0] = inputs[0];  // [N, H, L, Dh]
    return 0;
  }
  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    if (nbInputs != kNbInputs || nbOutputs != 1) return false;
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    if (pos == 3) return d.type == DataType::kBOOL;
    if (pos == 0)
      return d.type == DataType::kFLOAT || d.type == DataType::kHALF || d.type == DataType::kBF16;
    return d.type == inOut[0].desc.type;  // k, v and the output follow q
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*,
                        int32_t nbOutputs) noexcept override {
    if (nbInputs != kNbInputs || nbOutputs != 1 || in[0].dims.nbDims != 4) return -1;
    return in[0].dims.d[2] % tokens_per_frame_ == 0 ? 0 : -1;  // L must be whole frames
  }
  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void*, cudaStream_t stream) noexcept override {
    Dims const& dims = inputDesc[0].dims;  // [N, H, L, Dh], linear (contiguous)
    BlockCausalParams p;
    p.q = inputs[0];
    p.k = inputs[1];
    p.v = inputs[2];
    p.key_padding_mask = static_cast<uint8_t const*>(inputs[3]);  // TensorRT bool is one byte
    p.out = outputs[0];
    p.dtype = to_favor(inputDesc[0].type);
    p.batch = dims.d[0];
    p.heads = dims.d[1];
    p.length = dims.d[2];
    p.head_dim = dims.d[3];
    p.tokens_per_frame = tokens_per_frame_;
    p.orientation = orientation_;
    const int64_t strides[3] = {p.heads * p.length * p.head_dim, p.length * p.head_dim, p.head_dim};
    for (int i = 0; i < 3; ++i) p.q_stride[i] = p.k_stride[i] = p.v_stride[i] = p.o_stride[i] = strides[i];
    p.mask_stride[0] = p.length;
    p.mask_stride[1] = 1;
    p.softmax_scale = 1.f / std::sqrt(static_cast<float>(p.head_dim));
    return block_causal_attention_cuda(p, stream) == nullptr ? 0 : -1;
  }
  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &collection_; }

 private:
  int32_t tokens_per_frame_;
  Orientation orientation_;
  std::string orientation_name_;
  std::vector<PluginField> fields_;
  PluginFieldCollection collection_{};
};

class BlockCausalAttentionCreator : public IPluginCreatorV3One {
 public:
  BlockCausalAttentionCreator() {
    fields_.emplace_back("tokens_per_frame", nullptr, PluginFieldType::kINT32, 1);
    fields_.emplace_back("orientation", nullptr, PluginFieldType::kCHAR, 0);
    collection_.nbFields = static_cast<int32_t>(fields_.size());
    collection_.fields = fields_.data();
  }
  char const* getPluginName() const noexcept override { return kPluginName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return ""; }
  PluginFieldCollection const* getFieldNames() noexcept override { return &collection_; }

  IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
    int64_t tokens_per_frame = 0;
    std::string orientation = "past";
    for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
      PluginField const& f = fc->fields[i];
      if (!std::strcmp(f.name, "tokens_per_frame")) {
        if (f.type == PluginFieldType::kINT32) tokens_per_frame = *static_cast<int32_t const*>(f.data);
        if (f.type == PluginFieldType::kINT64) tokens_per_frame = *static_cast<int64_t const*>(f.data);
      } else if (!std::strcmp(f.name, "orientation") && f.type == PluginFieldType::kCHAR) {
        orientation.assign(static_cast<char const*>(f.data), strnlen(static_cast<char const*>(f.data), f.length));
      }
    }
    if (tokens_per_frame < 1 || (orientation != "past" && orientation != "future")) return nullptr;
    return new BlockCausalAttentionPlugin(static_cast<int32_t>(tokens_per_frame),
                                          orientation == "past" ? Orientation::kPast : Orientation::kFuture);
  }

 private:
  std::vector<PluginField> fields_;
  PluginFieldCollection collection_{};
};

}  // namespace
}  // namespace favor

// The macro pastes its argument into a variable name, so it needs an unqualified type name.
using favor::BlockCausalAttentionCreator;
REGISTER_TENSORRT_PLUGIN(BlockCausalAttentionCreator);
