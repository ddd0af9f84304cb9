"""training.vit_pretrain / vit_targets / vit_data: labels from a hand-built scene, the objective learns,
resume is exact, and a pretrained encoder travels frozen through the recipe, pack, load and export."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import make_world
from typer.testing import CliRunner

from favor.build import build_model
from favor.checkpoint import checkpoint_from_model, load_checkpoint, load_model, save_checkpoint
from favor.config import get_config
from training.cli import app, load_configs
from training.features import CachedVisualEncoder, module_fingerprint
from training.recipe import FinetuneRecipe
from training.synth.render import render_frame
from training.synth.scene import COLOURS, PRINTED, SHAPES, Scene, Shape, Sound, Text
from training.vit_data import chroma_420, rendered_batch
from training.vit_pretrain import (
    ENCODER_FILE,
    PretrainConfig,
    VitPretrainer,
    all_outputs,
    encode_frames,
    load_encoder,
    probe_losses,
    save_encoder,
)
from training.vit_targets import frame_targets

TINY_YAML = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"


def hand_scene() -> Scene:
    """Red circle top-left from 0 s, blue square bottom-right from 0.5 s and pulsing (chime) 1.0-1.5 s,
    '7' printed 0.4-2.0 s. 160 x 160 frame: shapes above y = 120, cells 80 x 60 px."""
    red = Shape("circle", "red", 0.0, 3.0, (20.0, 15.0, 60.0, 45.0), 40.0, 30.0, 0.0, 0.0, 10.0)
    blue = Shape("square", "blue", 0.5, 3.0, (100.0, 75.0, 140.0, 105.0), 120.0, 90.0, 10.0, 0.0, 10.0)
    return Scene(clip_id="hand", split="train", seed=0, index=0, duration=3.0, num_frames=30, width=160, height=160,
                 fps=10.0, sample_rate=16000, channels=1, pan=0.5, background=(20, 20, 20), noise_level=0.0,
                 noise_seed=0, shapes=(red, blue), texts=(Text("7", 0.4, 2.0, 125, 10, 3),),
                 sounds=(Sound("chime", 1.0, 0.5, 1, 0, 1.0, 0.5),), speech=(), events=())


def test_targets_of_a_hand_built_scene():
    scene = hand_scene()
    at0 = frame_targets(scene, 0)  # t = 0: only the red circle, no text
    red, circle = 1 + list(COLOURS).index("red"), 1 + SHAPES.index("circle")
    assert at0.colour.tolist() == [red, 0, 0, 0] and at0.shape.tolist() == [circle, 0, 0, 0]
    assert at0.text == 0 and at0.pulse.tolist() == [0, 0, 0, 0]
    assert at0.centre[0].tolist() == pytest.approx([40 / 160, 30 / 160])
    at12 = frame_targets(scene, 12)  # t = 1.2: square present (cell 3), pulsing; '7' shown
    blue, square = 1 + list(COLOURS).index("blue"), 1 + SHAPES.index("square")
    assert at12.colour.tolist() == [red, 0, 0, blue] and at12.shape.tolist() == [circle, 0, 0, square]
    assert at12.pulse.tolist() == [0, 0, 0, 1] and at12.text == 1 + PRINTED.index("7")
    assert at12.centre[3].tolist() == pytest.approx([(120 + 10 * 0.7) / 160, 90 / 160])  # moved 0.7 s x 10 px/s
    assert frame_targets(scene, 25).text == 0 and frame_targets(scene, 25).pulse.sum() == 0
    frame = render_frame(scene, 12)  # the pixels agree with the labels at the labelled centres
    assert tuple(frame[30, 40]) == COLOURS["red"] and tuple(frame[90, 127]) == COLOURS["blue"]


def test_chroma_420_keeps_flat_colours_and_blurs_colour_edges():
    frame = np.zeros((4, 4, 3), dtype=np.uint8)
    frame[:] = COLOURS["green"]
    assert np.abs(chroma_420(frame).astype(int) - frame).max() <= 1  # flat colour: rounding only
    frame[:, 1] = COLOURS["red"]  # a 1-px red line inside 2x2 chroma blocks is mixed with green
    assert tuple(chroma_420(frame)[0, 1]) != COLOURS["red"]


def test_batches_are_a_function_of_the_seed_and_use_disjoint_splits():
    kw = dict(seed=0, clip_pool=1000, frames_per_scene=2, image_size=28)
    a = rendered_batch(np.random.default_rng(3), 5, split="train", **kw)
    b = rendered_batch(np.random.default_rng(3), 5, split="train", **kw)
    c = rendered_batch(np.random.default_rng(3), 5, split="heldout", **kw)
    assert torch.equal(a.pixels, b.pixels) and a.questions == b.questions
    assert a.pixels.shape == (5, 3, 28, 28) and a.targets["colour"].shape == (5, 4)
    assert not torch.equal(a.pixels, c.pixels)


def tiny_pretrain(tmp_path: Path, **kw) -> PretrainConfig:
    # image 28 / patch 14 (2 x 2 patches), 8 frames a step: seconds per run on 2 cores
    defaults = dict(preset="tiny", output_dir=str(tmp_path), steps=12, batch_size=8, frame_pool=32,
                    frames_per_scene=4, lr=3e-3, head_lr=3e-3, warmup_steps=2, log_every=1, eval_every=0,
                    ckpt_every=0, heldout_frames=8)
    return PretrainConfig(**{**defaults, **kw})


def test_pulse_positives_weigh_by_the_pools_imbalance(tmp_path):
    """pos_weight = (negatives / positives) ** pulse_balance over the pool's cells, and the pulse BCE weighs
    positives by it: with every logit 0 each cell costs ln 2, a positive cell w ln 2."""
    from training.vit_pretrain import FramePool

    pc = tiny_pretrain(tmp_path, frame_pool=64, pulse_balance=0.5)
    pool = FramePool(pc, image_size=28, video_fps=2.0)
    pos = float(pool.targets["pulse"].sum())
    assert pos > 0  # 64 frames of 16 scenes: some shape is sounding (else this test checks nothing)
    neg = pool.targets["pulse"].numel() - pos
    assert pool.pulse_pos_weight == pytest.approx((neg / pos) ** 0.5)
    assert FramePool(tiny_pretrain(tmp_path, frame_pool=64, pulse_balance=0.0), 28, 2.0).pulse_pos_weight == 1.0

    pulse = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # 1 positive of 8 cells
    t = {"colour": torch.zeros(2, 4, dtype=torch.long), "shape": torch.zeros(2, 4, dtype=torch.long), "pulse": pulse}
    out = {"colour": torch.zeros(2, 4, 3), "shape": torch.zeros(2, 4, 3), "pulse": torch.zeros(2, 4)}
    for w in (1.0, 5.0):
        got = probe_losses({"queries": out}, t, pulse_pos_weight=w)["queries_pulse"]
        assert float(got) == pytest.approx((w * 1 + 7) / 8 * np.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="pulse_balance"):
        tiny_pretrain(tmp_path, pulse_balance=1.5)


def test_decoded_train_clips_join_the_pool_and_other_splits_are_refused(tmp_path):
    """train_manifest: every decoded frame of the split's clips joins the rendered pool, labelled from its
    scene; a heldout split is refused (its clips must never train the encoder)."""
    from training.synth.generate import generate
    from training.vit_data import decoded_batches
    from training.vit_pretrain import FramePool

    train = generate(tmp_path / "synth", 2, 0, split="train")
    decoded = decoded_batches(train, 28, 2.0, max_clips=2, batch_size=4)
    n_decoded = sum(len(b.questions) for b in decoded)
    assert n_decoded >= 2 * 6  # two clips of >= 3 s at 2 FPS
    pool = FramePool(tiny_pretrain(tmp_path, frame_pool=8, train_manifest=str(train), train_clips=2), 28, 2.0)
    assert len(pool.questions) == 8 + n_decoded
    assert torch.equal(pool.targets["colour"][8:], torch.cat([b.targets["colour"] for b in decoded]))
    heldout = generate(tmp_path / "synth", 1, 0, split="heldout")
    with pytest.raises(ValueError, match="another split"):
        FramePool(tiny_pretrain(tmp_path, frame_pool=8, train_manifest=str(heldout)), 28, 2.0)


def test_objective_decreases_on_a_tiny_run(tmp_path, tokenizer):
    trainer = VitPretrainer(tiny_pretrain(tmp_path, steps=20), tokenizer=tokenizer)
    trainer.setup()
    probe = rendered_batch(np.random.default_rng(99), 32, split="train", seed=0, clip_pool=10**6,
                           frames_per_scene=4, image_size=28)

    def probe_loss() -> float:
        with torch.no_grad():
            return float(probe_losses(all_outputs(trainer.heads, *encode_frames(trainer.encoder, probe, tokenizer)),
                                      probe.targets)["loss"])

    before = probe_loss()
    trainer.train()
    after = probe_loss()
    # measured 26.1 -> 11.5 (seed 0) and 17.2 -> 10.5 (seed 1): ratios 0.44 and 0.61; 0.8 leaves margin
    assert after < 0.8 * before, (before, after)
    report = trainer.finish()
    assert 0.0 <= report["rendered"]["colour"] <= 1.0 and report["rendered"]["frames"] == 8
    curve = [r for r in trainer.curve if r["kind"] == "train"]
    assert [r["step"] for r in curve] == list(range(1, 21))
    assert (tmp_path / "curve.json").is_file() and (tmp_path / ENCODER_FILE).is_file()


def test_phases_train_the_vit_then_only_the_qformer(tmp_path, tokenizer):
    trainer = VitPretrainer(tiny_pretrain(tmp_path, steps=8, qformer_fraction=0.5), tokenizer=tokenizer)
    trainer.setup()

    def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in module.state_dict().items()}

    enc = trainer.encoder
    vit0, qformer0 = snapshot(enc.vision_model), snapshot(enc.qformer)
    for _ in range(4):
        trainer.train_step()
    vit4, qformer4 = snapshot(enc.vision_model), snapshot(enc.qformer)
    assert any(not torch.equal(vit0[k], vit4[k]) for k in vit0)  # phase 1 moves the ViT ...
    assert all(torch.equal(qformer0[k], qformer4[k]) for k in qformer0)  # ... and not the Q-Former
    for _ in range(4):
        parts = trainer.train_step()
    assert all(torch.equal(vit4[k], v) for k, v in enc.vision_model.state_dict().items())  # frozen now
    assert any(not torch.equal(qformer4[k], v) for k, v in enc.qformer.state_dict().items())
    assert "queries" in parts and "local" not in parts  # phase 2 trains the query readout only


def test_resume_continues_bit_for_bit(tmp_path, tokenizer):
    full = VitPretrainer(tiny_pretrain(tmp_path / "a", steps=6, ckpt_every=3), tokenizer=tokenizer)
    full.setup()
    full.train()
    half = tmp_path / "b"
    half.mkdir()
    shutil.copytree(tmp_path / "a" / "step_000003", half / "step_000003")
    shutil.copy(tmp_path / "a" / "curve.json", half / "curve.json")
    resumed = VitPretrainer(tiny_pretrain(half, steps=6, ckpt_every=3), tokenizer=tokenizer, resume=True)
    resumed.setup()
    assert resumed.step == 3
    resumed.train()
    for (k, v), w in zip(full.encoder.state_dict().items(), resumed.encoder.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert [r["step"] for r in resumed.curve] == [r["step"] for r in full.curve]
    other = VitPretrainer(tiny_pretrain(half, steps=6, ckpt_every=3, lr=1e-3), tokenizer=tokenizer, resume=True)
    with pytest.raises(ValueError, match="other pretraining settings"):
        other.setup()


@pytest.fixture
def pretrained_file(tmp_path, tiny_cfg):
    torch.manual_seed(5)
    from favor.encoders import VisualEncoder

    encoder = VisualEncoder(tiny_cfg)
    return save_encoder(encoder, tiny_cfg, tmp_path / "vit.safetensors", {"steps": 0}), encoder


def test_load_encoder_checks_the_architecture(pretrained_file, tiny_cfg, tmp_path):
    path, encoder = pretrained_file
    loaded = load_encoder(tiny_cfg, path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in encoder.state_dict().items())
    with pytest.raises(ValueError, match=r"another visual encoder \(vit_heads 3 != 1\)"):
        load_encoder(get_config("tiny", **{"visual.vit_heads": 1}), path)
    with pytest.raises(ValueError, match="not found"):
        load_encoder(tiny_cfg, tmp_path / "none.safetensors")


def features(model, tiny_cfg) -> torch.Tensor:
    torch.manual_seed(1)
    S = tiny_cfg.visual.image_size
    enc = getattr(model.visual_encoder, "inner", model.visual_encoder)
    with torch.no_grad():
        return enc(torch.randn(1, 2, 3, S, S), torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))


def test_embedded_encoder_round_trips_through_save_pack_load_and_export(pretrained_file, tmp_path, tokenizer):
    from export.cli import load_for_export

    path, encoder = pretrained_file
    cfg = get_config("tiny", embedded_visual=True)
    model = build_model(cfg, pretrained=False, tokenizer=tokenizer)
    model.visual_encoder.load_state_dict(load_encoder(cfg, path).state_dict())
    want = features(model, cfg)
    ckpt = save_checkpoint(checkpoint_from_model(model, hash_base_models=False), tmp_path / "c.safetensors")
    weights = load_checkpoint(ckpt).weights
    assert any(k.startswith("visual_encoder.") for k in weights)
    assert not any(p.requires_grad for p in load_model(ckpt, tokenizer=tokenizer).visual_encoder.parameters())
    assert torch.equal(features(load_model(ckpt, tokenizer=tokenizer), cfg), want)
    assert torch.equal(features(load_for_export(ckpt), cfg), want)
    half = tmp_path / "half.safetensors"
    assert CliRunner().invoke(app, ["pack", str(ckpt), str(half), "--dtype", "float16"]).exit_code == 0
    # fp16 storage: ~3 significant digits per weight; the tiny encoder's outputs (LayerNorm'd, O(1)) move
    # by well under 1e-2
    torch.testing.assert_close(features(load_model(half, tokenizer=tokenizer), cfg), want, rtol=0, atol=1e-2)
    blob = load_checkpoint(ckpt)
    blob.weights = {k: v for k, v in blob.weights.items() if not k.startswith("visual_encoder.")}
    stripped = save_checkpoint(blob, tmp_path / "stripped.safetensors")
    with pytest.raises(ValueError, match=r"stripped.safetensors: .*embedded_visual.* weights are missing"):
        load_model(stripped, tokenizer=tokenizer)


def test_embedded_visual_excludes_trainable_visual():
    with pytest.raises(ValueError, match="embedded_visual .* excludes trainable_visual"):
        get_config("tiny", embedded_visual=True, trainable_visual=True)


@pytest.mark.parametrize("resume", [False, True])
def test_frozen_pretrained_encoder_trains_with_cached_features(pretrained_file, tmp_path, tokenizer, resume):
    path, encoder = pretrained_file
    train = make_world(tmp_path / "world")
    cfg, tc = load_configs(TINY_YAML, [f"train.train_manifest={train}", "train.eval_manifest=null",
                                       f"train.output_dir={tmp_path / 'run'}", "train.progress=false",
                                       "train.steps=3", "train.ckpt_every=2", "train.pairing=false",
                                       "model.embedded_visual=true", f"train.init_visual_from={path}",
                                       "train.cache_visual_features=true"])
    recipe = FinetuneRecipe(cfg, tc, tokenizer=tokenizer)
    recipe.setup()
    recipe.train()
    if resume:  # continue from step 2 without the pretrained file: the checkpoint carries the encoder
        assert sorted(p.name for p in (tmp_path / "run").glob("step_*")) == ["step_000002"]
        path.unlink()
        recipe = FinetuneRecipe(cfg, tc, tokenizer=tokenizer, resume=True)
        recipe.setup()
        assert recipe.step == 2
        recipe.train()
    cache = recipe.caches["visual"]
    assert isinstance(recipe.inner.visual_encoder, CachedVisualEncoder)
    assert cache.fingerprint == module_fingerprint(encoder, "visual")  # keyed by the pretrained weights
    assert cache.hits > 0 if not resume else cache.misses > 0  # a resumed run starts with an empty cache
    inner = recipe.inner.visual_encoder.inner
    assert all(torch.equal(v, inner.state_dict()[k]) for k, v in encoder.state_dict().items())  # frozen
    assert not any(p.requires_grad for p in inner.parameters())
    final = load_checkpoint(tmp_path / "run" / "final.safetensors").weights
    for k, v in encoder.state_dict().items():
        assert torch.equal(final[f"visual_encoder.{k}"], v), k


def test_init_visual_from_needs_a_kept_encoder(pretrained_file, tmp_path, tokenizer):
    path, _ = pretrained_file
    train = make_world(tmp_path / "world")
    cfg, tc = load_configs(TINY_YAML, [f"train.train_manifest={train}", f"train.output_dir={tmp_path}",
                                       f"train.init_visual_from={path}"])
    with pytest.raises(ValueError, match="needs model.embedded_visual"):
        FinetuneRecipe(cfg, tc, tokenizer=tokenizer).setup()


def test_cli_pretrain_vit_bad_preset_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["pretrain-vit", "--preset", "nope", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and "error: unknown preset 'nope'" in result.output
