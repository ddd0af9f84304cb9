"""TensorRT-LLM: the merged Llama/Vicuna decoder as a TensorRT-LLM checkpoint, plus its build command.

Pinned line: TensorRT-LLM 0.12.0 (``pip install tensorrt-llm==0.12.0``; pyproject extra ``trtllm``).
Why: Jetson Orin has only the ``v0.12.0-jetson`` branch (JetPack 6.1), and upstream is removing
the TensorRT engine backend (the engine-based multimodal recipe lives in <= 1.2-era releases;
../shared/reference/EDGE-NOTES.md). 0.12's checkpoint layout and ``trtllm-build`` flags are what
this module writes; newer 1.x engine releases still read the same Llama checkpoint layout.

Conversion runs without tensorrt_llm (numpy + safetensors), so it is unit tested here:

    HF LlamaForCausalLM                       TensorRT-LLM (0.12, tp=pp=1)
    model.embed_tokens.weight                 transformer.vocab_embedding.weight
    layers.i.input_layernorm                  transformer.layers.i.input_layernorm
    layers.i.self_attn.{q,k,v}_proj (cat 0)   transformer.layers.i.attention.qkv  [(H+2KV)*hd, D]
    layers.i.self_attn.o_proj                 transformer.layers.i.attention.dense
    layers.i.post_attention_layernorm         transformer.layers.i.post_layernorm
    layers.i.mlp.gate_proj                    transformer.layers.i.mlp.fc     (SiLU-gated branch)
    layers.i.mlp.up_proj                      transformer.layers.i.mlp.gate
    layers.i.mlp.down_proj                    transformer.layers.i.mlp.proj
    model.norm                                transformer.ln_f
    lm_head (or the tied embedding)           lm_head

AV tokens reach the engine as a prompt table (favor/prompt_table.py: ids >= vocab_size address
rows); the engine's table must hold max_batch x max_windows x queries rows.

LoRA: ``lora="merged"`` (default) folds it into the weights (one engine, no adapter cost);
``lora="adapter"`` writes the unmerged base checkpoint plus the adapter in peft's own format
(``trtllm/lora/adapter_config.json`` + ``adapter_model.safetensors``, written by peft's
``save_pretrained``), which ``trtllm-build --lora_plugin --lora_dir`` reads.

Converter: with tensorrt_llm installed, the checkpoint comes from TensorRT-LLM's own converter
(``LLaMAForCausalLM.from_hugging_face`` on a merged HF Llama directory written here, then
``save_checkpoint``), so its layout always matches the installed release; without it, the hand
mapping above (tested here) is the fallback. The converter path is unverified: TensorRT-LLM cannot
be installed on our machines.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from favor.config import FavorConfig
from favor.prompt_table import max_prompt_table_rows

TRTLLM_VERSION = "0.12.0"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float16", "int4": "float16"}
# peft target names -> TensorRT-LLM LoRA module names
LORA_MODULES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_dense",
                "gate_proj": "mlp_h_to_4h", "up_proj": "mlp_gate", "down_proj": "mlp_4h_to_h"}
_NP = {"float32": np.float32, "float16": np.float16}
LORA_MODES = ("merged", "adapter")


def checkpoint_config(cfg: FavorConfig, dtype: str) -> dict:
    """TensorRT-LLM PretrainedConfig (config.json) for the FAVOR LLM."""
    llm = cfg.llm
    return {
        "architecture": "LlamaForCausalLM", "dtype": dtype, "logits_dtype": "float32",
        "num_hidden_layers": llm.layers, "num_attention_heads": llm.heads, "num_key_value_heads": llm.kv_heads,
        "hidden_size": llm.hidden, "intermediate_size": llm.ffn_dim, "vocab_size": llm.vocab_size,
        "head_size": llm.hidden // llm.heads, "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": llm.max_positions, "rotary_base": llm.rope_theta, "rotary_scaling": None,
        "hidden_act": "silu", "norm_epsilon": llm.rms_eps, "share_embedding_table": False,
        "use_parallel_embedding": False, "embedding_sharding_dim": 0, "mlp_bias": False, "attn_bias": False,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }


def convert_weights(state: dict[str, torch.Tensor], cfg: FavorConfig, dtype: str = "float16"
                    ) -> dict[str, np.ndarray]:
    """HF Llama state dict (LoRA merged) -> TensorRT-LLM checkpoint tensors (see module table)."""
    def get(name: str) -> np.ndarray:
        if name not in state:
            raise ValueError(f"LLM weight {name} missing (expected a merged HF LlamaForCausalLM state dict)")
        t = state[name].detach().float().cpu().numpy()
        return t.astype(_NP[dtype]) if dtype in _NP else t  # bfloat16: written as float32 by safetensors.numpy

    out = {"transformer.vocab_embedding.weight": get("model.embed_tokens.weight"),
           "transformer.ln_f.weight": get("model.norm.weight"),
           "lm_head.weight": get("lm_head.weight" if "lm_head.weight" in state else "model.embed_tokens.weight")}
    for i in range(cfg.llm.layers):
        src, dst = f"model.layers.{i}.", f"transformer.layers.{i}."
        qkv = [get(src + f"self_attn.{p}_proj.weight") for p in "qkv"]
        out[dst + "attention.qkv.weight"] = np.concatenate(qkv, axis=0)  # [(H+2KV)*hd, D]
        out[dst + "attention.dense.weight"] = get(src + "self_attn.o_proj.weight")
        out[dst + "input_layernorm.weight"] = get(src + "input_layernorm.weight")
        out[dst + "post_layernorm.weight"] = get(src + "post_attention_layernorm.weight")
        out[dst + "mlp.fc.weight"] = get(src + "mlp.gate_proj.weight")
        out[dst + "mlp.gate.weight"] = get(src + "mlp.up_proj.weight")
        out[dst + "mlp.proj.weight"] = get(src + "mlp.down_proj.weight")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def build_command(checkpoint_dir: str, engine_dir: str, cfg: FavorConfig, dtype: str, max_batch: int,
                  max_windows: int, max_new_tokens: int = 256, lora_dir: str | None = None) -> list[str]:
    """``trtllm-build`` for the decoder with a prompt table of batch x windows x queries rows."""
    rows = max_prompt_table_rows(max_batch, max_windows, cfg.qformer.num_queries)
    max_input = min(cfg.llm.max_positions - 1, max_windows * cfg.qformer.num_queries + 256)
    cmd = ["trtllm-build", f"--checkpoint_dir={checkpoint_dir}", f"--output_dir={engine_dir}",
           f"--gemm_plugin={dtype}", f"--gpt_attention_plugin={dtype}", "--remove_input_padding=enable",
           "--context_fmha=enable", f"--max_batch_size={max_batch}", f"--max_input_len={max_input}",
           f"--max_seq_len={min(cfg.llm.max_positions, max_input + max_new_tokens)}",
           # 0.12 name; later releases also accept --max_multimodal_len
           f"--max_prompt_embedding_table_size={rows}"]
    if lora_dir:
        modules = [LORA_MODULES[m] for m in cfg.llm.lora_targets]
        cmd += [f"--lora_plugin={dtype}", f"--lora_dir={lora_dir}", f"--max_lora_rank={cfg.llm.lora_r}",
                "--lora_target_modules", *modules]
    return cmd


def write_checkpoint(llm: torch.nn.Module, cfg: FavorConfig, out_dir: str | Path, precision: str = "fp16",
                     state: dict[str, torch.Tensor] | None = None) -> Path:
    """config.json + rank0.safetensors in the TensorRT-LLM layout (hand mapping); returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[precision]
    weights = convert_weights(llm.state_dict() if state is None else state, cfg, dtype)
    stored = dtype if dtype in _NP else "float32"
    config = checkpoint_config(cfg, dtype)
    config["favor_stored_dtype"] = stored  # bf16 tensors are stored fp32; trtllm-build casts on load
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(weights, str(out_dir / "rank0.safetensors"))
    return out_dir


def base_state_dict(peft_llm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unmerged base Llama weights under HF names (peft's ``.base_layer`` removed, LoRA dropped)."""
    base = peft_llm.get_base_model()
    return {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}


def write_lora_adapter(peft_llm: torch.nn.Module, out_dir: str | Path) -> Path:
    """The LoRA adapter as peft writes it: adapter_config.json + adapter_model.safetensors."""
    out_dir = Path(out_dir)
    peft_llm.save_pretrained(str(out_dir), safe_serialization=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (out_dir / name).is_file():
            raise ValueError(f"{out_dir}: peft did not write {name}")
    return out_dir


def converter_available() -> str | None:
    """None when TensorRT-LLM's own converter can run, else why not."""
    try:
        from tensorrt_llm.models import LLaMAForCausalLM  # noqa: F401
    except ImportError:
        return "TensorRT-LLM cannot be installed on this machine"
    return None


def convert_with_trtllm(hf_llm: torch.nn.Module, state: dict[str, torch.Tensor], out_dir: Path, precision: str,
                        work_dir: Path) -> Path:
    """TensorRT-LLM's converter on a merged HF Llama directory (unverified here: no TensorRT-LLM)."""
    from tensorrt_llm import Mapping
    from tensorrt_llm.models import LLaMAForCausalLM

    hf_dir = work_dir / "hf_llama"
    hf_llm.save_pretrained(str(hf_dir), state_dict=state, safe_serialization=True)
    model = LLaMAForCausalLM.from_hugging_face(str(hf_dir), DTYPES[precision],
                                               mapping=Mapping(world_size=1, rank=0, tp_size=1, pp_size=1))
    model.save_checkpoint(str(out_dir), save_config=True)
    return out_dir


def write_bundle_checkpoint(model, bundle: Path, precision: str, max_batch: int, max_windows: int,
                            lora: str = "merged", work_dir: Path | None = None) -> tuple[str, list[str]]:
    """bundle/trtllm/{checkpoint/, lora/ (adapter mode), build_engine.sh}; returns (status, files).

    ``model`` is the FavorModel (its LLM carries peft LoRA); ``work_dir`` holds the merged HF directory
    the TensorRT-LLM converter reads (outside the bundle)."""
    from export.decoder import merged_llm

    if lora not in LORA_MODES:
        raise ValueError(f"lora ({lora!r}) must be one of {list(LORA_MODES)}")
    cfg, out = model.cfg, bundle / "trtllm"
    if lora == "merged":
        llm = merged_llm(model)
        state = llm.state_dict()
    else:
        llm, state = model.llm.model.get_base_model(), base_state_dict(model.llm.model)
        write_lora_adapter(model.llm.model, out / "lora")
    missing = converter_available()
    if missing is None:
        convert_with_trtllm(llm, state, out / "checkpoint", precision, Path(work_dir or bundle))
        how = "TensorRT-LLM converter"
    else:
        write_checkpoint(llm, cfg, out / "checkpoint", precision, state=state)
        how = "hand mapping"
    cmd = build_command("trtllm/checkpoint", "trtllm/engine", cfg, DTYPES[precision], max_batch, max_windows,
                        lora_dir="trtllm/lora" if lora == "adapter" else None)
    script = ["#!/bin/sh", f"# Needs tensorrt-llm=={TRTLLM_VERSION} (see export/trtllm.py for why this line).",
              f"# Checkpoint written by the {how}; LoRA {lora}.", 'set -e', 'cd "$(dirname "$0")/.."',
              shlex.join(cmd)]
    (out / "build_engine.sh").write_text("\n".join(script) + "\n")
    files = [str(p.relative_to(bundle)) for p in sorted(out.rglob("*")) if p.is_file()]
    note = ("" if precision not in ("int8", "int4")
            else f" ({precision}: use TensorRT-LLM weight-only {precision} at build time)")
    if missing is not None:
        return (f"checkpoint written ({how}, LoRA {lora}); engine not built: {missing} "
                f"(run trtllm/build_engine.sh on the target){note}", files)
    return f"checkpoint written ({how}, LoRA {lora}); run trtllm/build_engine.sh{note}", files
