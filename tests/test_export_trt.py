"""TensorRT / TensorRT-LLM parts that need no NVIDIA library: profiles, flags, command lines, the
checkpoint conversion layout. Tests that need the libraries skip (they cannot be installed here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from export import profiles, tensorrt, trtllm
from export.decoder import merged_llm
from favor.build import build_model
from favor.config import get_config

NO_TRT = "TensorRT cannot be installed on this machine (NVIDIA index unreachable, no GPU)"


def test_profiles_follow_the_config():
    cfg = get_config("favor-13b")
    t = profiles.axes(cfg, profiles.Limits(max_batch=2))
    assert (t["windows"].min, t["windows"].opt, t["windows"].max) == (1, 1, 12)  # 120 frames / 10
    assert t["mel_frames"].max == 3000 and t["mel_frames"].opt == 500  # 30 s cap; 5 s window at 100 Hz
    assert t["audio_tokens"].max == 3000 and t["audio_tokens"].opt == 250  # 60 s x 50 Hz; 5 s
    assert t["frames"].max == 120 and t["batch"].max == 2
    assert t["seq"].max == 4096 and t["past"].max == 4095
    tiny = profiles.axes(get_config("tiny"), profiles.Limits(max_frames=7))
    assert tiny["windows"].max == 3 and tiny["mel_frames"].max == 70  # 7 frames at 10 FPS = 0.7 s
    with pytest.raises(ValueError, match="max_frames"):
        profiles.axes(get_config("tiny"), profiles.Limits(max_frames=0))


def test_eval_dim_and_stage_profiles():
    assert tensorrt.eval_dim("3*windows", {"windows": 4}) == 12
    assert tensorrt.eval_dim("(((mel_frames - 1)//2)) + 1", {"mel_frames": 7}) == 4  # conv stride 2
    assert tensorrt.eval_dim(16, {}) == 16
    with pytest.raises(ValueError, match="has no profile"):
        tensorrt.eval_dim("frames", {})
    with pytest.raises(ValueError, match="not a linear expression"):
        tensorrt.eval_dim("__import__('os')", {})
    axes = profiles.as_dict(profiles.axes(get_config("tiny")))
    stage = {"inputs": [{"name": "visual_tokens", "shape": ["batch", "3*windows", 5, 20]},
                        {"name": "frame_lengths", "shape": ["batch"]}]}
    shapes = tensorrt.profile_shapes(stage, axes)
    assert shapes["visual_tokens"] == ((1, 3, 5, 20), (1, 3, 5, 20), (1, 30, 5, 20))
    cmd = tensorrt.trtexec_command("fusion.onnx", "fusion.plan", shapes, "fp16", "libfavor.so")
    assert "--minShapes=visual_tokens:1x3x5x20,frame_lengths:1" in cmd
    assert "--maxShapes=visual_tokens:1x30x5x20,frame_lengths:1" in cmd
    assert "--fp16" in cmd and "--staticPlugins=libfavor.so" in cmd


def test_builder_flags():
    assert tensorrt.builder_flags("fp32") == [] and tensorrt.builder_flags("bf16") == ["BF16"]
    assert tensorrt.builder_flags("int8") == ["FP16"]  # no Q/DQ scales in the graphs: see module docstring
    with pytest.raises(ValueError, match="precision"):
        tensorrt.builder_flags("fp8")


@pytest.fixture
def tiny_llm(tiny_lora_model):
    return merged_llm(tiny_lora_model)  # a merged copy: the LoRA model itself keeps its adapters


def test_trtllm_conversion_layout_computes_the_same_layer(tiny_cfg, tiny_llm):
    cfg = tiny_cfg.llm
    w = {k: torch.from_numpy(v) for k, v in trtllm.convert_weights(tiny_llm.state_dict(), tiny_cfg, "float32").items()}
    hd = cfg.hidden // cfg.heads
    assert w["transformer.layers.0.attention.qkv.weight"].shape == ((cfg.heads + 2 * cfg.kv_heads) * hd, cfg.hidden)
    assert len([k for k in w if k.startswith("transformer.layers.1.")]) == 7
    layer = tiny_llm.model.layers[1]
    x = torch.randn(4, cfg.hidden)
    # GatedMLP in TensorRT-LLM: proj(silu(fc(x)) * gate(x))
    p = "transformer.layers.1.mlp."
    mlp = (torch.nn.functional.silu(x @ w[p + "fc.weight"].T) * (x @ w[p + "gate.weight"].T)) @ w[p + "proj.weight"].T
    torch.testing.assert_close(mlp, layer.mlp(x), rtol=0, atol=1e-6)  # same fp32 ops, same order
    qkv = x @ w["transformer.layers.1.attention.qkv.weight"].T
    q, k, v = qkv.split([cfg.heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd], -1)
    a = layer.self_attn
    for got, lin in ((q, a.q_proj), (k, a.k_proj), (v, a.v_proj)):
        torch.testing.assert_close(got, lin(x), rtol=0, atol=1e-6)
    assert torch.equal(w["lm_head.weight"], tiny_llm.lm_head.weight)


def test_trtllm_checkpoint_and_command(tiny_cfg, tiny_llm, tmp_path):
    out = trtllm.write_checkpoint(tiny_llm, tiny_cfg, tmp_path / "ckpt", "fp16")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "LlamaForCausalLM" and config["dtype"] == "float16"
    assert config["num_key_value_heads"] == 2 and config["vocab_size"] == 101
    from safetensors.numpy import load_file

    assert load_file(str(out / "rank0.safetensors"))["transformer.ln_f.weight"].dtype.name == "float16"
    cmd = trtllm.build_command("ckpt", "engine", tiny_cfg, "float16", max_batch=2, max_windows=10)
    assert "--max_prompt_embedding_table_size=60" in cmd  # 2 requests x 10 windows x 3 queries
    assert "--lora_plugin=float16" not in cmd
    lora = trtllm.build_command("ckpt", "engine", tiny_cfg, "float16", 1, 4, lora_dir="lora")
    assert "--lora_dir=lora" in lora and "--max_lora_rank=4" in lora
    i = lora.index("--lora_target_modules")
    assert lora[i + 1:i + 5] == ["attn_q", "attn_k", "attn_v", "attn_dense"]


@pytest.mark.tensorrt
def test_fusion_engine_builds_and_deserialises(tiny_cfg, tmp_path):
    if tensorrt.available() is not None:
        pytest.skip(reason=NO_TRT)  # TensorRT is not installable here (NVIDIA index unreachable, no GPU)
    import tensorrt as trt

    from export.bundle import example_inputs
    from export.frontend import FusionFrontend
    from export.onnx import export_stage

    model = build_model(tiny_cfg, pretrained=False).eval()
    table = profiles.axes(tiny_cfg)
    wrapper = FusionFrontend(model)
    st = export_stage(wrapper, example_inputs(wrapper, table), table, tmp_path, tiny_cfg)
    stage = {"inputs": st.inputs}
    plan = tensorrt.build_engine(tmp_path / st.files[0], tmp_path / "fusion.plan",
                                 tensorrt.profile_shapes(stage, profiles.as_dict(table)), "fp16")
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    assert engine is not None and engine.num_optimization_profiles == 1


@pytest.mark.tensorrt
def test_trtllm_engine_builds(tiny_cfg, tiny_llm, tmp_path):
    import shutil
    import subprocess

    if shutil.which("trtllm-build") is None:
        pytest.skip("TensorRT-LLM cannot be installed on this machine (NVIDIA index unreachable, no GPU)")
    trtllm.write_checkpoint(tiny_llm, tiny_cfg, tmp_path / "ckpt", "fp16")
    cmd = trtllm.build_command(str(tmp_path / "ckpt"), str(tmp_path / "engine"), tiny_cfg, "float16", 1, 2)
    subprocess.run(cmd, check=True)
    assert (tmp_path / "engine" / "rank0.engine").is_file()


@pytest.fixture
def tiny_lora_model(tiny_cfg):
    # lora_B drawn non-zero (peft starts it at 0), so merged and unmerged weights really differ
    torch.manual_seed(5)
    model = build_model(tiny_cfg, pretrained=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    return model.eval()


def test_trtllm_lora_adapter_in_peft_format(tiny_cfg, tiny_lora_model, tmp_path):
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import LlamaForCausalLM

    from favor.llm import llama_config

    status, files = trtllm.write_bundle_checkpoint(tiny_lora_model, tmp_path, "fp32", 1, 4, lora="adapter")
    assert "hand mapping, LoRA adapter" in status
    assert {"trtllm/lora/adapter_config.json", "trtllm/lora/adapter_model.safetensors"} <= set(files)
    config = json.loads((tmp_path / "trtllm" / "lora" / "adapter_config.json").read_text())
    assert config["r"] == tiny_cfg.llm.lora_r and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj",
                                                                                   "o_proj"}
    assert "--lora_dir=trtllm/lora" in (tmp_path / "trtllm" / "build_engine.sh").read_text()
    # The base checkpoint is the unmerged base; peft reloads the adapter onto it and computes what
    # the model's own LoRA LLM computes (same fp32 ops: exact up to summation order, 1e-6).
    base = tiny_lora_model.llm.model.get_base_model()
    w = load_file(str(tmp_path / "trtllm" / "checkpoint" / "rank0.safetensors"))
    q = base.model.layers[0].self_attn.q_proj.base_layer.weight.detach().numpy()
    assert (w["transformer.layers.0.attention.qkv.weight"][: q.shape[0]] == q).all()
    plain = LlamaForCausalLM(llama_config(tiny_cfg.llm)).eval()
    plain.load_state_dict(trtllm.base_state_dict(tiny_lora_model.llm.model))
    reloaded = PeftModel.from_pretrained(plain, str(tmp_path / "trtllm" / "lora")).eval()
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, tiny_lora_model.llm.model(ids).logits, rtol=0, atol=1e-6)


def test_trtllm_converter_receives_a_merged_hf_llama_dir(tiny_cfg, tiny_lora_model, tmp_path, monkeypatch):
    """Our side of TensorRT-LLM's converter contract, with the library replaced by a recorder (it
    cannot be installed here: the converter itself stays unverified)."""
    import sys
    import types

    from transformers import LlamaForCausalLM

    calls: dict = {}

    class Recorder:
        @classmethod
        def from_hugging_face(cls, hf_dir, dtype, mapping=None):
            calls.update(model=LlamaForCausalLM.from_pretrained(hf_dir), dtype=dtype, mapping=mapping)
            return cls()

        def save_checkpoint(self, out_dir, save_config=True):
            (Path(out_dir) / "config.json").parent.mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "config.json").write_text("{}")
            calls["save_config"] = save_config

    root, models = types.ModuleType("tensorrt_llm"), types.ModuleType("tensorrt_llm.models")
    root.Mapping, models.LLaMAForCausalLM, root.models = (lambda **kw: kw), Recorder, models
    monkeypatch.setitem(sys.modules, "tensorrt_llm", root)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.models", models)
    status, _ = trtllm.write_bundle_checkpoint(tiny_lora_model, tmp_path, "fp16", 1, 4, work_dir=tmp_path / "work")
    assert status.startswith("checkpoint written (TensorRT-LLM converter, LoRA merged)")
    assert calls["dtype"] == "float16" and calls["mapping"]["world_size"] == 1 and calls["save_config"]
    merged = merged_llm(tiny_lora_model).state_dict()
    loaded = calls["model"].state_dict()
    assert set(merged) <= set(loaded)
    for k, v in merged.items():
        assert torch.equal(loaded[k], v), k
