"""Host RAM each export step needs, from parameter counts on the meta device (no weight is loaded).

The figures are parameter bytes only (lower bounds): exporter and builder working memory come on top
and are not measured here (no 7B/13B weights on our machines). Per step (``favor-export``):

    import-release      the delta's tensors only: base models are checked on the meta device
    onnx (+ --verify)   every stage in fp32 + a merged fp32 copy of the LLM (export/decoder.merged_llm)
    tensorrt            nothing of the model when the bundle's ONNX graphs are reused (TensorRT's own
                        builder memory aside)
    trtllm              encoders fp32 + LLM loaded in fp16 + its merged fp16 copy + the fp16 arrays
                        written to rank0.safetensors (hand mapping)
"""

from __future__ import annotations

import torch

from favor.config import FavorConfig

FP32, FP16 = 4, 2  # bytes per parameter


def parameter_counts(cfg: FavorConfig) -> dict[str, int]:
    """Parameters per part: audio, visual, llm (base, LoRA excluded), trainable (the FAVOR delta)."""
    from favor.build import build_model

    with torch.device("meta"):
        model = build_model(cfg, pretrained=False)
    llm = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" not in n)
    return {"audio": sum(p.numel() for p in model.audio_encoder.parameters()),
            "visual": sum(p.numel() for p in model.visual_encoder.parameters()),
            "llm": llm, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def host_ram_bytes(cfg: FavorConfig) -> dict[str, int]:
    """Parameter bytes held at the peak of each export step (see the module docstring)."""
    n = parameter_counts(cfg)
    encoders = (n["audio"] + n["visual"] + n["trainable"]) * FP32
    return {"import-release": n["trainable"] * FP32,
            "onnx": encoders + 2 * n["llm"] * FP32,
            "tensorrt": 0,
            "trtllm": encoders + 3 * n["llm"] * FP16}
