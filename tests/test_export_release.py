"""The 13B path a user walks (issue 11): the authors' delta checkpoint -> favor-export -> a bundle.

A fake release delta in the release's key names and shapes (tests/test_release.py, tiny widths, the
release's timing: 2 FPS, 10-frame windows, 25 audio rows per frame) and tiny base models laid out
under the names the release's README uses (whisper-large-v2/, instruct_blip_vicuna13b_trimmed.pth +
eva_vit_g.pth, bert-base-uncased/, vicuna-13b-v1.5/) go through the real CLI: the three-step deploy
recipe (onnx + verify, then tensorrt, then trtllm) into one bundle, verify from another directory,
a moved checkpoint, a foreign checkpoint refused. 7B/13B-shaped deltas are checked on the meta device.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import WORDS, make_tokenizer
from test_encoders import _tiny_hf_instructblip, hf_to_lavis
from test_release import release_state
from transformers import BertTokenizer, LlamaForCausalLM, WhisperForConditionalGeneration
from typer.testing import CliRunner

from export.cli import app
from export.manifest import load_manifest
from export.memory import host_ram_bytes, parameter_counts
from favor.build import build_model
from favor.checkpoint import apply_weights, load_checkpoint
from favor.config import get_config
from favor.encoders import whisper_config
from favor.llm import llama_config
from favor.release import RELEASE_BEHAVIOUR, convert_release_state, infer_preset

runner = CliRunner()
# The release's timing at tiny widths (10 frames x 25 audio rows = 250 tokens per window).
SETS = {"timing.video_fps": 2.0, "timing.frames_per_window": 10, "timing.max_frames": 120,
        "qformer.max_positions": 256}
SET_ARGS = ["--preset", "tiny"] + [a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]


def tiny_release_cfg():
    return get_config("tiny", **RELEASE_BEHAVIOUR, **SETS)


@pytest.mark.parametrize("preset,keys", [("favor-7b", 338), ("favor-13b", 402)])
def test_release_shaped_delta_maps_every_key_on_the_meta_device(preset, keys):
    cfg = get_config(preset)
    state = release_state(cfg, zero3=False, device="meta")
    assert infer_preset(state) == preset and len(state) == keys
    weights, report = convert_release_state(state)
    assert report.unknown == [] and len(report.used) == keys  # 0 unmapped
    with torch.device("meta"):
        model = build_model(cfg, pretrained=False)
    apply_weights(model, weights, preset, require_trainable=True)  # names and shapes, no memory
    assert sum(w.numel() for w in weights.values()) == {"favor-7b": 84_164_352, "favor-13b": 103_826_176}[preset]


def test_host_ram_per_export_step_from_parameter_bytes():
    n = parameter_counts(get_config("favor-13b"))
    assert n["trainable"] == 103_826_176  # FAVOR-SPEC.md section 4
    ram = host_ram_bytes(get_config("favor-13b"))
    assert ram["import-release"] == 4 * n["trainable"] and ram["tensorrt"] == 0
    assert ram["trtllm"] < ram["onnx"]  # the LLM in fp16, not fp32
    assert 2 * 4 * n["llm"] < ram["onnx"] < 2 * 4 * n["llm"] + 4 * (n["audio"] + n["visual"]) + 1e9


# ------------------------------------------------------------------------------- the CLI path


def make_base_models(root, cfg):
    """Tiny base models under the release's names (LAVIS trimmed .pth + a separate EVA file)."""
    torch.manual_seed(11)
    wcfg = whisper_config(cfg)
    wcfg.update({"decoder_layers": 1, "decoder_attention_heads": cfg.audio.heads, "decoder_ffn_dim": 11,
                 "vocab_size": 13, "max_target_positions": 8, "pad_token_id": 0, "bos_token_id": 1,
                 "eos_token_id": 2, "decoder_start_token_id": 1})
    WhisperForConditionalGeneration(wcfg).save_pretrained(root / "whisper-large-v2")
    lavis = hf_to_lavis(_tiny_hf_instructblip(cfg).state_dict())
    torch.save({"model": {k: v for k, v in lavis.items() if not k.startswith("visual_encoder.")}},
               root / "instruct_blip_vicuna13b_trimmed.pth")
    torch.save({k.removeprefix("visual_encoder."): v for k, v in lavis.items() if k.startswith("visual_encoder.")},
               root / "eva_vit_g.pth")
    vocab = root / "bert-vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]) + "\n")
    BertTokenizer(str(vocab), truncation_side="left").save_pretrained(root / "bert-base-uncased")
    LlamaForCausalLM(llama_config(cfg.llm)).save_pretrained(root / "vicuna-13b-v1.5")
    make_tokenizer().save_pretrained(root / "vicuna-13b-v1.5")


def fake_delta(path, cfg, seed_shift: float = 0.0):
    state = release_state(cfg, zero3=True)
    del state["visual_encoder.blocks.0.attn.relative_position_index"]  # unknown: refused (test_release)
    state = {k: (v * 0.2 + seed_shift if v.is_floating_point() else v) for k, v in state.items()}
    torch.save(state, path)
    return path


def run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    if res.exit_code == 1 and res.exception is not None:  # a bug, not a one-line error: show it
        raise res.exception
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def release_bundle(tmp_path_factory):
    """Step 1 of the deploy recipe: the release delta -> ONNX bundle, verified."""
    root = tmp_path_factory.mktemp("release")
    cfg = tiny_release_cfg()
    (root / "base").mkdir()
    make_base_models(root / "base", cfg)
    delta = fake_delta(root / "pytorch_model_1_101.pt", cfg)
    code, out = run("--ckpt", delta, "--base-models", root / "base", "--out", root / "bundle",
                    "--targets", "onnx", "--verify", *SET_ARGS)
    assert code == 0, out
    return {"root": root, "delta": delta, "bundle": root / "bundle", "cfg": cfg, "output": out}


@pytest.mark.slow
def test_release_delta_exports_to_a_bundle_that_verifies(release_bundle):
    m = load_manifest(release_bundle["bundle"])
    assert m["verified"] is True and m["targets"]["onnx"] == "built"
    c = m["config"]
    assert c["audio"]["pad_to_30s"] and c["qformer"]["orientation"] == "future"  # what the release computes
    assert c["llm"]["pretrained"].endswith("vicuna-13b-v1.5") and c["visual"]["pretrained"].endswith("trimmed.pth")
    from transformers import AutoTokenizer

    bert = AutoTokenizer.from_pretrained(str(release_bundle["bundle"] / "instruction_tokenizer"))
    assert bert.cls_token == "[CLS]"  # the visual Q-Former's BERT tokenizer travels with the bundle
    record = m["checkpoint"]
    assert record["path"] == str(release_bundle["delta"].resolve()) and len(record["sha256"]) == 64


@pytest.mark.slow
def test_three_step_deploy_recipe_keeps_every_step(release_bundle, tmp_path, monkeypatch):
    b, delta = release_bundle["bundle"], release_bundle["delta"]
    before = load_manifest(b)["files"]
    monkeypatch.chdir(tmp_path)  # another directory: paths in the manifest are absolute
    # 2. engines: no model load and no base models needed, the ONNX graphs are reused.
    code, out = run("--ckpt", delta, "--out", b, "--targets", "tensorrt", "--precision", "fp16")
    assert code == 0, out
    m = load_manifest(b)
    assert "TensorRT cannot be installed" in m["targets"]["tensorrt"] and m["targets"]["onnx"] == "built"
    assert (b / "tensorrt" / "build_engines.sh").is_file() and (b / "tensorrt" / "profiles.json").is_file()
    assert all(m["files"][f] == h for f, h in before.items())  # step 1's files untouched
    assert m["verified"] is True
    # 3. the decoder for TensorRT-LLM (fp16 LLM load), merged LoRA by default.
    code, out = run("--ckpt", delta, "--base-models", release_bundle["root"] / "base", "--out", b,
                    "--targets", "trtllm", "--precision", "fp16", *SET_ARGS)
    assert code == 0, out
    m = load_manifest(b)
    assert set(m["targets"]) == {"onnx", "tensorrt", "trtllm"}
    assert (b / "trtllm" / "checkpoint" / "rank0.safetensors").is_file()
    assert "hand mapping, LoRA merged" in m["targets"]["trtllm"]
    assert all(m["files"][f] == h for f, h in before.items()) and "tensorrt/build_engines.sh" in m["files"]
    # Re-running the trtllm target with the peft adapter replaces that target only.
    code, out = run("--ckpt", delta, "--base-models", release_bundle["root"] / "base", "--out", b,
                    "--targets", "trtllm", "--lora", "adapter", *SET_ARGS)
    assert code == 0, out
    m = load_manifest(b)
    assert {"trtllm/lora/adapter_config.json", "trtllm/lora/adapter_model.safetensors"} <= set(m["files"])
    assert json.loads((b / "trtllm" / "lora" / "adapter_config.json").read_text())["r"] == 4
    assert "--lora_dir=trtllm/lora" in (b / "trtllm" / "build_engine.sh").read_text()
    assert "tensorrt/build_engines.sh" in m["files"] and all(m["files"][f] == h for f, h in before.items())
    # verify from this other directory finds the checkpoint and the base models through the manifest.
    code, out = run("verify", b)
    assert code == 0, out


@pytest.mark.slow
def test_foreign_or_moved_checkpoint(release_bundle, tmp_path):
    b, cfg = release_bundle["bundle"], release_bundle["cfg"]
    other = fake_delta(tmp_path / "pytorch_model_2_7.pt", cfg, seed_shift=0.01)
    code, out = run("--ckpt", other, "--out", b, "--targets", "tensorrt")
    assert code == 2 and "exported from another checkpoint" in out and "new directory" in out
    code, out = run("verify", b, "--ckpt", other)
    assert code == 2 and "sha256 differs" in out
    moved = tmp_path / "moved.pt"
    release_bundle["delta"].rename(moved)
    try:
        code, out = run("verify", b)
        assert code == 2 and "has moved or been deleted" in out and "--ckpt" in out
    finally:
        moved.rename(release_bundle["delta"])


def test_import_release_writes_our_checkpoint_once(tmp_path):
    cfg = tiny_release_cfg()
    (tmp_path / "base").mkdir()
    make_base_models(tmp_path / "base", cfg)
    delta = fake_delta(tmp_path / "pytorch_model_1_101.pt", cfg)
    code, out = run("import-release", delta, "--base-models", tmp_path / "base", "--out",
                    tmp_path / "favor13b.safetensors", *SET_ARGS)
    assert code == 0, out
    assert "0 unknown" in out
    ckpt = load_checkpoint(tmp_path / "favor13b.safetensors")
    assert ckpt.config.audio.pad_to_30s and ckpt.config.qformer.orientation == "future"
    assert ckpt.config.visual.instruction_tokenizer.endswith("bert-base-uncased")
    assert set(ckpt.base_models) == {"audio", "visual", "llm"} and all(r["sha256"] for r in ckpt.base_models.values())
    state = torch.load(delta, weights_only=True)
    torch.testing.assert_close(ckpt.weights["qformer.position_embedding.weight"].float(),
                               state["video_frame_position_embedding.weight"].float(), rtol=0, atol=0)
    assert ckpt.extra["imported_from"]["path"] == str(delta.resolve())
    # Our checkpoint builds the same model the delta does (base models from the recorded paths).
    model = build_model(ckpt.config)
    apply_weights(model, ckpt.weights, "ours")
    assert model.instruction_tokenizer.cls_token == "[CLS]"
    # --preset / --set are refused for our checkpoints (they carry their config).
    code, out = run("--ckpt", tmp_path / "favor13b.safetensors", "--out", tmp_path / "b", "--preset", "tiny")
    assert code == 2 and "release delta only" in out


def test_release_delta_without_base_models_is_refused(tmp_path):
    delta = fake_delta(tmp_path / "pytorch_model_1_101.pt", tiny_release_cfg())
    code, out = run("--ckpt", delta, "--out", tmp_path / "bundle", *SET_ARGS)
    assert code == 2 and "no --base-models given" in out and "vicuna-13b-v1.5" in out
    assert not (tmp_path / "bundle").exists()  # never a bundle from random base weights
