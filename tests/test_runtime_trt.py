"""The TensorRT backend's pure parts (files, engine I/O and shapes against the manifest, fusion feed,
prompt-table decoder request, limits, messages) and backend selection. The real-engine test needs
TensorRT, TensorRT-LLM and a GPU, and skips here."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import make_tokenizer

from export import profiles
from export.frontend import fusion_feed
from favor import prompt_table
from favor.config import get_config
from favor.prompt import inference_ids
from favor.prompt_table import embed_with_prompt_table
from runtime import trt_backend as tb
from runtime.backends import TorchBackend, make_backend

NO_TRT = "TensorRT cannot be installed on this machine (NVIDIA index unreachable, no GPU)"


@pytest.fixture
def manifest(tiny_cfg):
    """The encoder/fusion stages as favor-export writes them for the tiny config (export/onnx.py)."""
    v, q, a = tiny_cfg.visual, tiny_cfg.qformer, tiny_cfg.audio
    F = tiny_cfg.timing.frames_per_window
    stages = {
        "audio_encoder": {"files": ["audio_encoder.onnx"], "inputs": [
            {"name": "mel", "dtype": "float32", "shape": [1, a.n_mels, "mel_frames"]}],
            "outputs": [{"name": "audio_tokens", "dtype": "float32", "shape": [1, "s34", tiny_cfg.audio_proj_dim]}]},
        "visual_encoder": {"files": ["visual_encoder.onnx"], "inputs": [
            {"name": "pixels", "dtype": "float32", "shape": [1, "frames", 3, v.image_size, v.image_size]},
            {"name": "instruction_ids", "dtype": "int64", "shape": [1, "instruction"]},
            {"name": "instruction_mask", "dtype": "int64", "shape": [1, "instruction"]}],
            "outputs": [{"name": "visual_tokens", "dtype": "float32", "shape": [1, "frames", 5, 20]}]},
        "fusion": {"files": ["fusion.onnx"], "inputs": [
            {"name": "visual_tokens", "dtype": "float32",
             "shape": [1, f"{F}*windows", v.num_query_tokens, tiny_cfg.visual_width]},
            {"name": "audio_tokens", "dtype": "float32", "shape": [1, "audio_tokens", tiny_cfg.audio_proj_dim]},
            {"name": "modality_mask", "dtype": "float32", "shape": [1, 2]},
            {"name": "frame_lengths", "dtype": "int64", "shape": [1]}],
            "outputs": [{"name": "av_embeds", "dtype": "float32", "shape": [1, f"{F}*windows", tiny_cfg.llm.hidden]},
                        {"name": "av_mask", "dtype": "bool", "shape": [1, f"{F}*windows"]}]},
    }
    assert q.num_queries == F  # tiny: one query per frame, so the fusion output axis is F*windows too
    return {"stages": stages, "dynamic_axes": profiles.as_dict(profiles.axes(tiny_cfg)), "attention": "portable"}


def test_unavailable_names_what_is_missing_and_make_backend_says_it_in_one_line(tmp_path):
    reason = tb.unavailable_reason()
    assert reason is not None and "tensorrt and tensorrt_llm not installed" in reason
    with pytest.raises(ValueError, match=r"backend 'tensorrt' is not available \(tensorrt and tensorrt_llm") as e:
        make_backend("tensorrt", tmp_path)
    assert "\n" not in str(e.value) and "use onnxruntime" in str(e.value)
    with pytest.raises(ValueError, match="not available: tensorrt and tensorrt_llm"):
        tb.TensorRTBackend(tmp_path)


def test_auto_never_picks_tensorrt_here(tmp_path):
    from runtime.selection import select

    # real probes: TensorRT is not installed, so even a bundle with engines runs on ONNX Runtime
    (tmp_path / "trtllm" / "engine").mkdir(parents=True)
    assert select("auto", tmp_path).backend == "onnxruntime"


def test_engine_paths_name_the_missing_plan_and_stage(tmp_path, manifest):
    (tmp_path / "tensorrt").mkdir()
    for stage in ("audio_encoder", "visual_encoder"):
        (tmp_path / "tensorrt" / f"{stage}.plan").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"tensorrt/fusion\.plan: engine missing \(run tensorrt/build_engines"):
        tb.engine_paths(tmp_path, manifest)
    (tmp_path / "tensorrt" / "fusion.plan").write_bytes(b"x")
    assert sorted(tb.engine_paths(tmp_path, manifest)) == ["audio_encoder", "fusion", "visual_encoder"]
    del manifest["stages"]["audio_encoder"]
    with pytest.raises(ValueError, match="no audio_encoder stage"):
        tb.engine_paths(tmp_path, manifest)


def test_engine_io_names_checked_against_the_manifest(manifest, tmp_path):
    fusion = manifest["stages"]["fusion"]
    plan = tmp_path / "fusion.plan"
    tb.check_engine_io(plan, fusion, ["frame_lengths", "audio_tokens", "visual_tokens", "modality_mask"],
                       ["av_mask", "av_embeds"])  # order is free: TensorRT 10 addresses tensors by name
    with pytest.raises(ValueError, match=r"fusion\.plan: engine inputs .* \(missing \['modality_mask'\], "
                                         r"unexpected \['mask'\]"):
        tb.check_engine_io(plan, fusion, ["frame_lengths", "audio_tokens", "visual_tokens", "mask"],
                           ["av_mask", "av_embeds"])
    with pytest.raises(ValueError, match=r"engine outputs .* \(missing \['av_mask'\]"):
        tb.check_engine_io(plan, fusion, [i["name"] for i in fusion["inputs"]], ["av_embeds"])


def test_input_shapes_against_the_profile(tiny_cfg, manifest):
    stage, axes = manifest["stages"]["fusion"], manifest["dynamic_axes"]
    F = tiny_cfg.timing.frames_per_window
    feed = fusion_feed(tiny_cfg, torch.randn(1, 2, 5, 20), torch.randn(1, 7, 20), num_frames=F)
    shapes = tb.check_input_shapes("fusion", stage, axes, {n: tuple(t.shape) for n, t in feed.items()})
    assert shapes["visual_tokens"] == (1, F, 5, 20) and shapes["frame_lengths"] == (1,)
    too_many = (1, F * (axes["windows"]["max"] + 1), 5, 20)  # one window past the export limit
    with pytest.raises(ValueError, match=r"fusion: input visual_tokens has shape \[1, 33, 5, 20\], the engine's "
                                         r"profile takes \[1, 3, 5, 20\] \.\. \[1, 30, 5, 20\]"):
        tb.check_input_shapes("fusion", stage, axes, dict(shapes, visual_tokens=too_many))
    with pytest.raises(ValueError, match="input mel has shape"):  # wrong mel-bin count (fixed dim)
        tb.check_input_shapes("audio_encoder", manifest["stages"]["audio_encoder"], axes, {"mel": (1, 17, 9)})
    with pytest.raises(ValueError, match=r"inputs \['mel', 'x'\] given"):
        tb.check_input_shapes("audio_encoder", manifest["stages"]["audio_encoder"], axes, {"mel": (1, 16, 9),
                                                                                           "x": (1,)})


def test_decoder_request_addresses_av_rows_after_the_vocab(tiny_cfg):
    tok, cfg = make_tokenizer(), tiny_cfg
    A = 2 * cfg.qformer.num_queries  # two windows
    av = torch.randn(A, cfg.llm.hidden)
    req = tb.decoder_request(tok, cfg, "describe the video", av)
    p = inference_ids(tok, "describe the video")
    V = cfg.llm.vocab_size
    ids = req.ids.tolist()
    assert req.ids.dtype == torch.int32 and len(ids) == 1 + len(p.pre) + A + len(p.post)
    assert ids[0] == cfg.llm.bos_token_id and [i - V for i in ids if i >= V] == list(range(A))
    assert torch.equal(req.table, av)
    # What the engine's PromptTuningEmbedding computes equals the torch/ORT prompt splice exactly.
    emb = torch.randn(V, cfg.llm.hidden)
    got = prompt_table.embed_with_prompt_table(req.ids[None].long(), emb, req.table)[0]
    want = torch.cat([emb[[cfg.llm.bos_token_id, *p.pre]], av, emb[p.post]])
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"AV embeddings must be \[A, 48\], got \[3, 7\]"):
        tb.decoder_request(tok, cfg, "x", torch.randn(3, 7))


def test_request_limits_and_engine_config(tmp_path, tiny_cfg):
    req = tb.DecoderRequest(torch.zeros(20, dtype=torch.int32), torch.zeros(6, tiny_cfg.llm.hidden))
    tb.check_request(req, tb.LlmLimits(1, 20, 52, 6), max_new_tokens=32)
    with pytest.raises(ValueError, match=r"6 AV rows exceed the engine's prompt table \(5 rows\)"):
        tb.check_request(req, tb.LlmLimits(1, 20, 52, 5), 32)
    with pytest.raises(ValueError, match=r"prompt of 20 tokens exceeds the engine's max_input_len \(19\)"):
        tb.check_request(req, tb.LlmLimits(1, 19, 52, 6), 32)
    with pytest.raises(ValueError, match=r"prompt \(20\) \+ max_new_tokens \(33\) exceeds .* max_seq_len \(52\)"):
        tb.check_request(req, tb.LlmLimits(1, 20, 52, 6), 33)
    engine = tmp_path / "engine"
    with pytest.raises(ValueError, match=r"engine/config\.json: no TensorRT-LLM engine \(run trtllm/build_engine"):
        tb.llm_limits(engine)
    engine.mkdir()
    build = {"max_batch_size": 1, "max_input_len": 255, "max_seq_len": 256, "max_prompt_embedding_table_size": 30}
    (engine / "config.json").write_text(json.dumps({"version": "0.12.0", "build_config": build}))
    assert tb.llm_limits(engine) == tb.LlmLimits(1, 255, 256, 30)
    (engine / "config.json").write_text(json.dumps({"build_config": dict(build, max_prompt_embedding_table_size=0)}))
    with pytest.raises(ValueError, match="built without a prompt table"):
        tb.llm_limits(engine)
    (engine / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not a TensorRT-LLM engine config"):
        tb.llm_limits(engine)


def test_generated_tokens_strip_prompt_and_eos():
    row = torch.tensor([1, 5, 101, 102, 7, 8, 2, 2, 2])  # prompt (4) + answer + EOS padding
    assert tb.generated_tokens(row, 4, 7, end_id=2) == [7, 8]
    assert tb.generated_tokens(row, 4, 6, end_id=2) == [7, 8]  # length cut before EOS
    assert tb.generated_tokens(row, 4, 4, end_id=2) == []


def test_plugin_only_for_fused_bundles(tmp_path):
    assert tb.plugin_library({"attention": "portable"}, {}) is None
    with pytest.raises(ValueError, match="set FAVOR_TRT_PLUGIN"):
        tb.plugin_library({"attention": "fused"}, {})
    with pytest.raises(ValueError, match="FAVOR_TRT_PLUGIN names no file"):
        tb.plugin_library({"attention": "fused"}, {"FAVOR_TRT_PLUGIN": str(tmp_path / "nope.so")})
    lib = tmp_path / "libfavor_trt_plugin.so"
    lib.write_bytes(b"")
    assert tb.plugin_library({"attention": "fused"}, {"FAVOR_TRT_PLUGIN": str(lib)}) == str(lib)


def test_dtype_table():
    assert tb.torch_dtype("HALF") is torch.float16 and tb.torch_dtype("BOOL") is torch.bool
    with pytest.raises(ValueError, match="FP8 has no torch buffer type"):
        tb.torch_dtype("FP8")


class PromptTableRunner:
    """Stands in for TensorRT-LLM's ModelRunner: decodes ``generate``'s prompt-table request the way
    the engine's PromptTuningEmbedding reads it (ids >= vocab address table rows), greedily with the
    torch LLM, and streams one output dict per token as ModelRunner does (streaming=True)."""

    def __init__(self, backend: TorchBackend):
        self.torch = backend

    def generate(self, batch_ids, prompt_table: torch.Tensor, max_new_tokens, end_id, **kwargs):
        from favor.captions import greedy_decode

        assert kwargs["top_k"] == 1 and kwargs["streaming"] and kwargs["num_beams"] == 1
        ids = batch_ids[0].long()[None]  # [1, L]
        embeds = embed_with_prompt_table(ids, self.torch.embedding, prompt_table)
        answer = []
        greedy_decode(self.torch.inference(), embeds, torch.ones_like(ids), max_new_tokens, end_id,
                      on_token=lambda b, t: answer.append(t))
        L, width = ids.shape[1], ids.shape[1] + max_new_tokens
        for n in range(1, len(answer) + 2):  # the last dict ends in EOS (or the length limit)
            row = torch.full((width,), end_id)
            row[:L], row[L:L + min(n, len(answer))] = ids[0], torch.tensor(answer[:n])
            yield {"output_ids": row[None, None], "sequence_lengths": torch.tensor([[L + min(n, len(answer))]])}


def test_tensorrt_caption_decodes_the_prompt_table_request_like_torch(tiny_ckpt):
    """TensorRTBackend.caption (own TensorRT-LLM loop) over an engine that reads the prompt table as
    TensorRT-LLM does must give the torch backend's caption, token for token, streamed in order."""
    torch_backend = make_backend("torch", tiny_ckpt)
    trt = tb.TensorRTBackend.__new__(tb.TensorRTBackend)  # no engines here: only the decoder glue runs
    trt.cfg, trt.tokenizer, trt.runner = torch_backend.cfg, torch_backend.tokenizer, PromptTableRunner(torch_backend)
    trt.limits = tb.LlmLimits(1, 256, 512, 64)
    torch.manual_seed(5)
    av = torch.randn(2 * trt.cfg.qformer.num_queries, trt.cfg.llm.hidden)  # two windows
    want = torch_backend.caption("describe the video", av, 6)
    streamed = []
    got = trt.caption("describe the video", av, 6, on_token=lambda b, t: streamed.append((b, t)))
    assert want.tokens and got.tokens == want.tokens and got.text == want.text
    assert streamed == [(0, t) for t in want.tokens]
    assert got.prompt_tokens == want.prompt_tokens and got.prefill_s > 0 and got.decode_s >= 0


@pytest.mark.slow
def test_against_a_real_exported_fusion_stage(tmp_path, tiny_cfg, manifest):
    """The fixture's stage is what favor-export writes, and the fusion feed runs the real graph like ORT does."""
    from export.bundle import ExportOptions, export_bundle
    from export.ort_inference import OrtBundle
    from favor.build import build_model

    out = tmp_path / "bundle"
    model = build_model(tiny_cfg, pretrained=False, tokenizer=make_tokenizer()).eval()
    real = export_bundle(model, out,
                         ExportOptions(stages=("fusion",), targets=("onnx", "tensorrt")))
    fusion = real["stages"]["fusion"]
    for kind in ("inputs", "outputs"):
        assert [(t["name"], t["shape"]) for t in fusion[kind]] == \
               [(t["name"], t["shape"]) for t in manifest["stages"]["fusion"][kind]]
    with pytest.raises(ValueError, match="no audio_encoder stage"):
        tb.engine_paths(out, real)
    bundle = OrtBundle(out)
    F = tiny_cfg.timing.frames_per_window
    v = torch.randn(F - 1, tiny_cfg.visual.num_query_tokens, tiny_cfg.visual_width)
    a = torch.randn(round(F * tiny_cfg.timing.audio_tokens_per_frame), tiny_cfg.audio_proj_dim)
    feed = fusion_feed(tiny_cfg, v[None], a[None], num_frames=F)  # the video ended inside the window
    tb.check_input_shapes("fusion", fusion, real["dynamic_axes"], {n: tuple(t.shape) for n, t in feed.items()})
    assert tuple(feed["visual_tokens"].shape) == (1, F, *v.shape[1:]) and feed["frame_lengths"].tolist() == [F]
    got = bundle.run("fusion", feed)
    with torch.no_grad():
        ref = model.fuse(v[None], a[None], num_frames=F)  # the eager model, unpadded: the spec
    # fp32 graph vs eager: ORT reorders reductions; 1e-4 relative is export/verify.py's fp32 tolerance.
    torch.testing.assert_close(got["av_embeds"], ref.embeds, rtol=1e-4, atol=1e-4 * float(ref.embeds.abs().max()))
    assert torch.equal(got["av_mask"].bool(), ref.mask)


@pytest.mark.tensorrt
@pytest.mark.skipif(tb.unavailable_reason() is not None, reason=NO_TRT)
def test_engines_match_onnxruntime(tmp_path):
    from export.bundle import ExportOptions, export_bundle
    from favor.build import build_model
    from runtime.backends import OnnxRuntimeBackend

    cfg = get_config("tiny")
    model = build_model(cfg, pretrained=False, tokenizer=make_tokenizer())
    out = tmp_path / "bundle"
    export_bundle(model, out, ExportOptions(targets=("onnx", "tensorrt", "trtllm")))
    subprocess.run(["sh", str(out / "trtllm" / "build_engine.sh")], check=True)
    trt, ort = make_backend("tensorrt", out), OnnxRuntimeBackend(out)
    for b in (trt, ort):
        b.set_instruction("describe the video")
    F, S = cfg.timing.frames_per_window, cfg.visual.image_size
    pixels, mel = torch.rand(F, 3, S, S), torch.randn(cfg.audio.n_mels, 30)
    v_trt, v_ort = trt.encode_frames(pixels), ort.encode_frames(pixels)
    a_trt, a_ort = trt.encode_audio(mel), ort.encode_audio(mel)
    av_trt, av_ort = trt.fuse(v_trt, a_trt, F), ort.fuse(v_ort, a_ort, F)
    # fp32 engines: TensorRT picks different GEMM/softmax kernels than ORT's MLAS; 1e-3 absolute covers
    # their reduction-order differences on unit-scale activations of this width-20/48 model.
    for got, want in ((v_trt, v_ort), (a_trt, a_ort), (av_trt, av_ort)):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    assert trt.caption("describe the video", av_ort, 5).tokens == ort.caption("describe the video", av_ort, 5).tokens
