"""What an export is asked for (``ExportOptions``), apart from the exporter so that readers (the
runtime's bundle cache key) get the options and their defaults without importing torch.onnx, peft or
the model stack (seconds at start-up)."""

from __future__ import annotations

from dataclasses import dataclass

TARGETS = ("onnx", "tensorrt", "trtllm")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8", "int4")
STAGES = ("audio_encoder", "visual_encoder", "fusion", "decoder")


@dataclass(frozen=True)
class ExportOptions:
    targets: tuple[str, ...] = ("onnx",)
    # ONNX encoders stay fp32 (ORT CPU gains nothing from fp16); fp16/bf16 set the TensorRT and
    # TensorRT-LLM build precision; int8 / int4 quantise the ONNX decoder's weights (MatMulNBits);
    # auto = export.genai_decoder.resolve_precision (int8 when the GenAI builder serves the model).
    precision: str = "auto"
    max_frames: int | None = None
    max_batch: int = 1
    fused_attention: bool = False
    stages: tuple[str, ...] = STAGES
    trtllm_lora: str = "merged"  # "merged" | "adapter" (peft adapter for trtllm-build --lora_dir)

    def __post_init__(self) -> None:
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"unknown target(s) {bad}; choose from {list(TARGETS)} or 'all'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision ({self.precision!r}) must be one of {list(PRECISIONS)}")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch ({self.max_batch}) must be >= 1")
        if self.trtllm_lora not in ("merged", "adapter"):
            raise ValueError(f"lora ({self.trtllm_lora!r}) must be 'merged' or 'adapter'")
