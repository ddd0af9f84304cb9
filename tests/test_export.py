"""favor-export end to end on the tiny model: CLI export + verify, parity, tampering, bad inputs, int8
(weight-only: MatMulNBits).

One bundle is exported once per module (dynamo export takes ~15 s per graph on 2 cores) through the
real CLI with ``--verify``; the tests read its parity report and reuse its files. LoRA B matrices are
randomised so that merging LoRA before export actually changes the weights.

Random weights: caption identity is only meaningful if the logit margins exceed the ORT error; the
test checks min margin > 100 x the measured fp32 logit error.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tokenizer
from typer.testing import CliRunner

from export.cli import app
from export.manifest import load_manifest
from export.ort_inference import OrtBundle
from favor.build import build_model
from favor.checkpoint import Checkpoint, checkpoint_from_model, save_checkpoint

pytestmark = pytest.mark.slow
runner = CliRunner()


def _tiny_model(cfg):
    torch.manual_seed(7)
    model = build_model(cfg, pretrained=False, tokenizer=make_tokenizer())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from favor.config import get_config

    root = tmp_path_factory.mktemp("export")
    cfg = get_config("tiny")
    model = _tiny_model(cfg)
    ckpt = save_checkpoint(checkpoint_from_model(model, self_contained=True, hash_base_models=False),
                           root / "tiny.safetensors")
    make_tokenizer().save_pretrained(str(root / "tok"))
    out = root / "bundle"
    res = runner.invoke(app, ["--ckpt", str(ckpt), "--out", str(out), "--tokenizer", str(root / "tok"),
                              "--targets", "all", "--precision", "auto", "--max-batch", "2", "--verify"])
    assert res.exit_code == 0, res.output
    return {"root": root, "ckpt": ckpt, "out": out, "model": model, "output": res.output,
            "report": json.loads((out / "parity.json").read_text())}


def test_every_stage_within_tolerance_at_one_and_many_windows(exported):
    report = exported["report"]
    assert report["ok"]
    rows = report["stages"]
    for stage in ("audio_encoder", "visual_encoder", "fusion[past]", "fusion[future]", "decoder"):
        got = [r for r in rows if r["stage"] == stage]
        assert got and all(r["ok"] for r in got), stage
    windows = {r["case"].split()[0] for r in rows if r["stage"] == "fusion[past]"}
    max_w = exported["model"].cfg.timing.num_windows(exported["model"].cfg.timing.max_frames)
    assert windows == {f"W={w}" for w in range(1, max_w + 1)}  # every window count, 1..max
    assert max(r["max_rel"] for r in rows) < 1e-5  # measured ~3e-7; the stated tolerance is 1e-4


def test_captions_identical_torch_vs_ort(exported):
    caps = exported["report"]["captions"]
    assert len(caps) >= 3 and all(c["ort-fp32_identical"] for c in caps)
    assert all(len(c["torch"]) > 0 for c in caps)
    logit_err = max(r["max_abs"] for r in exported["report"]["stages"] if r["stage"] == "decoder")
    assert min(c["min_margin"] for c in caps) > 100 * logit_err  # identity is not luck of a near tie


def test_int8_accuracy_bounds(exported, tmp_path):
    """--precision int8 on a model the GenAI builder cannot serve (tiny: head_dim 12): our export,
    weight-only int8 (export/quantize.py). Logits vs PyTorch over a prefill and two decode steps."""
    import onnx

    from export.genai_decoder import decoder_stage
    from export.ort_inference import OrtInference
    from export.profiles import Limits, axes
    from favor.captions import TorchInference
    from favor.onnx_attention import ort_session

    model = exported["model"]
    entry = decoder_stage(model, tmp_path, "int8", axes(model.cfg, Limits()), lambda s, m: None)
    assert entry["kind"] == "torch-dynamo" and entry["precision"] == "int8"
    assert not (tmp_path / "decoder.onnx").exists()  # the fp32 intermediate is not left behind
    graph = onnx.load(str(tmp_path / entry["files"][0])).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"
             and {a.name: a.i for a in n.attribute}["bits"] == 8]
    # q, k, v, o, gate, up, down in every layer, plus the LM head, carry int8 weights
    assert len(nbits) >= 7 * model.cfg.llm.layers + 1
    emb = model.llm.base.get_input_embeddings().weight.detach().float().numpy()
    inf = OrtInference(ort_session(tmp_path / entry["files"][0]), emb, model.cfg)
    ref = TorchInference(model.llm.model)
    embeds = torch.randn(1, 9, model.cfg.llm.hidden, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(1, 9, dtype=torch.long)
    (got, gc), (want, wc) = inf.prefill(embeds, mask), ref.prefill(embeds, mask)
    rel = [float((got - want).abs().max() / want.abs().max())]
    for t in (5, 9):
        (got, gc), (want, wc) = inf.decode(torch.tensor([t]), gc), ref.decode(torch.tensor([t]), wc)
        rel.append(float((got - want).abs().max() / want.abs().max()))
    # weight-only int8, block 32, int8 activations per block: ~1 % of the logit scale measured
    assert max(rel) < 0.05
    assert min(rel) > 1e-5  # it really is quantised (not the fp32 graph)


def test_manifest_contents(exported):
    m = load_manifest(exported["out"])
    # auto resolves to fp32 where the GenAI builder cannot serve the model (tiny: head_dim 12)
    assert m["format"] == "favor-bundle" and m["opset"] == 18 and m["precision"] == "fp32"
    assert m["config"]["preset"] == "tiny" and m["verified"] is True
    assert set(m["stages"]) == {"audio_encoder", "visual_encoder", "fusion", "decoder"}
    # tiny's head_dim 12 is refused by GroupQueryAttention on CPU: our torch-dynamo export
    assert m["stages"]["decoder"]["kind"] == "torch-dynamo" and m["stages"]["decoder"]["precision"] == "fp32"
    assert m["dynamic_axes"]["windows"] == {"min": 1, "opt": 1, "max": 10}
    assert m["dynamic_axes"]["batch"]["max"] == 2
    fusion_in = {i["name"]: i["shape"] for i in m["stages"]["fusion"]["inputs"]}
    assert fusion_in["visual_tokens"][1] == "3*windows"  # frames come as whole windows of F=3
    assert m["toolchain"]["onnxruntime"] and m["toolchain"]["torch"]
    for f in ("parity.json", "manifest.json"):
        assert (exported["out"] / f).is_file()
    assert "parity.json" in m["files"] and "tokenizer/tokenizer.json" in m["files"]


def test_unavailable_targets_reported_and_onnx_still_built(exported):
    m = load_manifest(exported["out"])
    assert m["targets"]["onnx"] == "built"
    assert m["targets"]["tensorrt"].startswith("skipped: TensorRT cannot be installed")
    assert "TensorRT-LLM cannot be installed" in m["targets"]["trtllm"]
    assert (exported["out"] / "trtllm/checkpoint/rank0.safetensors").is_file()
    assert "trtexec --onnx=fusion.onnx" in (exported["out"] / "tensorrt/build_engines.sh").read_text()


def test_bundle_runs_fresh_inputs_like_torch(exported):
    model = exported["model"]
    bundle = OrtBundle(exported["out"])
    cfg = model.cfg
    torch.manual_seed(11)
    visual = torch.randn(2, 7, cfg.visual.num_query_tokens, cfg.visual_width)  # 7 frames: 3 windows
    audio = torch.randn(2, 31, cfg.audio_proj_dim)
    embeds, mask = bundle.fuse(visual, audio)
    ref = model.fuse(visual, audio)
    torch.testing.assert_close(embeds, ref.embeds, rtol=0, atol=1e-5)  # fp32 reorderings, see verify.py
    assert torch.equal(mask, ref.mask)


@pytest.mark.parametrize("victim", ["fusion.onnx.data", "decoder.onnx", "tokenizer/tokenizer.json"])
def test_tampered_bundle_refused_naming_the_file(exported, tmp_path, victim):
    bad = tmp_path / "bundle"
    shutil.copytree(exported["out"], bad)
    with open(bad / victim, "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match=rf"{victim}: sha256 .* does not match the manifest"):
        OrtBundle(bad)
    res = runner.invoke(app, ["info", str(bad)])
    assert res.exit_code == 2 and victim.split("/")[-1] in res.output


def test_edited_manifest_config_refused(exported, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(exported["out"], bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["config"]["qformer"]["orientation"] = "future"
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="audio_encoder.onnx: exported for a different FAVOR config"):
        load_manifest(bad)


def test_mismatched_checkpoint_is_one_line_error(exported, tmp_path):
    model = exported["model"]
    other = build_model(model.cfg.replace(**{"qformer.hidden": 39}), pretrained=False)
    ckpt = save_checkpoint(Checkpoint(model.cfg, other.state_dict(), self_contained=True), tmp_path / "bad.pt")
    res = runner.invoke(app, ["--ckpt", str(ckpt), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "bad.pt" in res.output and "config mismatch" in res.output


def test_missing_base_model_is_one_line_error(exported, tmp_path):
    model = exported["model"]
    cfg = model.cfg.replace(**{"llm.pretrained": "/nonexistent/vicuna-13b"})
    ckpt = save_checkpoint(Checkpoint(cfg, model.trainable_state_dict()), tmp_path / "lora.pt")
    res = runner.invoke(app, ["--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--base-models", str(tmp_path)])
    assert res.exit_code == 2
    assert "llm base model /nonexistent/vicuna-13b not found" in res.output


def test_info_prints_stages(exported, tmp_path):
    res = runner.invoke(app, ["info", str(exported["out"])])
    assert res.exit_code == 0, res.output
    assert "decoder" in res.output and "precision fp32" in res.output and "preset tiny" in res.output
    # a bundle path of any length keeps the summary on one line (it broke "precision fp32" at 80 columns)
    for pad in range(1, 12):
        deep = tmp_path / ("d" * pad) / "bundle"
        shutil.copytree(exported["out"], deep)
        res = runner.invoke(app, ["info", str(deep)])
        first = res.output.splitlines()[0]
        assert res.exit_code == 0 and "precision fp32" in first and " verified " in first, res.output
        shutil.rmtree(deep.parent)


def test_bad_options_rejected(exported, tmp_path):
    res = runner.invoke(app, ["--ckpt", str(exported["ckpt"]), "--out", str(tmp_path / "o"), "--precision", "fp8"])
    assert res.exit_code == 2 and "precision ('fp8') must be one of" in res.output
