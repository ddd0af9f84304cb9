"""Import of the authors' delta checkpoint, with key names written from FAVOR-SPEC.md section 9.3."""

import pytest
import torch

from favor.build import build_model
from favor.config import get_config
from favor.release import import_release


def _release_cfg():
    # favor-13b's structure (orientation 'future', 2 layers, 32 audio rows in a slot) at tiny widths
    return get_config("tiny", **{"qformer.orientation": "future"})


def release_state(cfg, zero3: bool, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A delta checkpoint with the release's exact key names (not derived from our module names).

    ``device="meta"``: names and shapes only (7B/13B-sized deltas without allocating them)."""
    g = torch.Generator().manual_seed(1)
    H, E, ffn, Nq = cfg.qformer.hidden, cfg.fused_width, cfg.qformer.ffn_dim, cfg.qformer.num_queries
    Dllm, r = cfg.llm.hidden, cfg.llm.lora_r
    kv = cfg.llm.hidden // cfg.llm.heads * cfg.llm.kv_heads

    def t(*shape):
        if device == "meta":
            return torch.empty(*shape, dtype=torch.float16, device="meta")
        return torch.randn(*shape, generator=g).half()  # the release stores fp16 under ZeRO-3

    s = {"speech_pre_qformer_proj.weight": t(cfg.audio_proj_dim, cfg.audio.d_model),
         "speech_pre_qformer_proj.bias": t(cfg.audio_proj_dim),
         "ln_video.weight": t(E), "ln_video.bias": t(E),
         "video_frame_position_embedding.weight": t(cfg.qformer.max_positions, E),
         "video_query_tokens": t(1, Nq, H),
         "video_Qformer.bert.embeddings.LayerNorm.weight": t(H),
         "video_Qformer.bert.embeddings.LayerNorm.bias": t(H),
         "llama_proj.weight": t(Dllm, H), "llama_proj.bias": t(Dllm)}
    for i in range(cfg.qformer.layers):
        p = f"video_Qformer.bert.encoder.layer.{i}."
        for blk, width, kvw in (("attention", H, H), ("crossattention", H, E),
                                ("encoder_causal_attention", E, E)):
            s[p + f"{blk}.self.query.weight"], s[p + f"{blk}.self.query.bias"] = t(width, width), t(width)
            for n in ("key", "value"):
                s[p + f"{blk}.self.{n}.weight"], s[p + f"{blk}.self.{n}.bias"] = t(width, kvw), t(width)
            s[p + f"{blk}.output.dense.weight"], s[p + f"{blk}.output.dense.bias"] = t(width, width), t(width)
            s[p + f"{blk}.output.LayerNorm.weight"], s[p + f"{blk}.output.LayerNorm.bias"] = t(width), t(width)
        s[p + "intermediate_query.dense.weight"], s[p + "intermediate_query.dense.bias"] = t(ffn, H), t(ffn)
        s[p + "output_query.dense.weight"], s[p + "output_query.dense.bias"] = t(H, ffn), t(H)
        s[p + "output_query.LayerNorm.weight"], s[p + "output_query.LayerNorm.bias"] = t(H), t(H)
    for i in range(cfg.llm.layers):
        for proj, out in (("q", Dllm), ("k", kv), ("v", kv), ("o", Dllm)):
            p = f"llama_model.base_model.model.model.layers.{i}.self_attn.{proj}_proj."
            s[p + "lora_A.default.weight"] = t(r, Dllm)
            s[p + "lora_B.default.weight"] = t(out, r)
    if zero3:  # every alias again, plus persistent buffers of frozen modules
        for k in list(s):
            for src, aliases in (("video_Qformer.", ("speech_Qformer.", "joint_Qformer.")),
                                 ("ln_video.", ("ln_speech.", "ln_joint.")),
                                 ("llama_proj.", ("llama_proj_speech.", "llama_proj_joint.")),
                                 ("video_query_tokens", ("speech_query_tokens", "joint_query_tokens")),
                                 ("video_frame_position_embedding.", ("joint_frame_position_embedding.",))):
                if k.startswith(src):
                    for a in aliases:
                        s[a + k[len(src):]] = s[k]
        s["video_Qformer.bert.embeddings.position_ids"] = torch.arange(512, device=device)[None]
        s["visual_encoder.blocks.0.attn.relative_position_index"] = torch.zeros(3, dtype=torch.long, device=device)
    return s


@pytest.mark.parametrize("zero3", [False, True])
def test_import_release_delta(tmp_path, tokenizer, zero3):
    cfg = _release_cfg()
    state = release_state(cfg, zero3)
    if zero3:  # a frozen-module buffer we do not know: reported, and refused unless allowed
        path = tmp_path / "pytorch_model_1_101.pt"
        torch.save(state, path)
        model = build_model(cfg, pretrained=False, tokenizer=tokenizer)
        with pytest.raises(ValueError, match="not understood.*relative_position_index"):
            import_release(model, path)
        del state["visual_encoder.blocks.0.attn.relative_position_index"]
    path = tmp_path / "pytorch_model_1_101.pt"
    torch.save(state, path)
    model = build_model(cfg, pretrained=False, tokenizer=tokenizer)
    report = import_release(model, path)
    assert report.unknown == []
    assert len(report.used) + len(report.aliases) + len(report.buffers) == len(state)
    assert len(report.used) == len(model.trainable_state_dict())
    params = dict(model.named_parameters())
    torch.testing.assert_close(params["qformer.ln.weight"], state["ln_video.weight"].float())
    torch.testing.assert_close(
        params["llm.model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"],
        state["llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"].float())
    torch.testing.assert_close(
        params["qformer.bert.encoder.layer.1.encoder_causal_attention.self.key.weight"],
        state["video_Qformer.bert.encoder.layer.1.encoder_causal_attention.self.key.weight"].float())


def test_missing_trainable_weight_fails(tmp_path, tokenizer):
    cfg = _release_cfg()
    state = release_state(cfg, zero3=False)
    del state["llama_proj.weight"]
    path = tmp_path / "delta.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing.*projector.proj.weight"):
        import_release(build_model(cfg, pretrained=False, tokenizer=tokenizer), path)
