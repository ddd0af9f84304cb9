"""Proof that the bundle computes what the PyTorch model computes, stage by stage and end to end.

Stage parity: each graph vs the same wrapper in PyTorch on seeded inputs, over window counts 1..max
(every count for the fusion graph, the first / middle / last for the encoders and the decoder), with
the last window partly padded. Errors are max|ort - torch| and the norm-wise relative error
max|ort - torch| / max|torch| (no division by near-zero elements).

Tolerances (``TOLERANCES``), relative:
- fp32 graphs, 1e-4: ORT fuses and reorders fp32 reductions (LayerNorm, softmax, GEMM blocking);
  each reordering moves a dot product of length K by about sqrt(K) x 6e-8, which after a few
  residual layers stays below 1e-5 of the activation scale. 1e-4 leaves 10x headroom and still
  catches any real difference (a wrong mask or position shifts outputs by >1e-2).
- int8 decoder (weight-only MatMulNBits, block 32, int8 activations per block), 0.15 on logits:
  each block's weights carry 1/254 of its range and each activation block the same per call;
  through every layer this adds up to a few % of the logit scale (measured 6.1e-2 on the trained
  demo model over 138 teacher-forced steps, 1.3e-2 on the tiny model). Caption identity is
  required separately.
- int4 decoder, 0.75: 1/15 of each block's range; measured 0.53 on the demo model. The bound only
  catches a broken graph (a wrong position or a missing layer moves logits by their whole scale);
  int4's top-1 agreement and caption identity are what decide it (``export/decoder_precisions.py``
  reports fp32 / int8 / int4 side by side in every verify run).

End to end: greedy captions from the PyTorch model (LoRA unmerged, as trained) and from the ORT
bundle (merged LoRA, prompt-table ids) must be token-identical; the smallest top-1/top-2 logit
margin is reported so a near tie is visible.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from export import decoder_precisions
from export.frontend import AudioFrontend, FusionFrontend, VisualFrontend, fusion_feed
from export.manifest import add_files
from export.ort_inference import OrtBundle, decoder_class
from favor.captions import CaptionResult, GenerationSettings, TorchInference, caption
from favor.generation import instruction_inputs
from favor.model import FavorModel
from favor.onnx_attention import ort_session

TOLERANCES = {"fp32": 1e-4, "int8": 0.15, "int4": 0.75}
DEFAULT_PROMPT = "describe the video"


@dataclass
class Row:
    stage: str
    case: str
    max_abs: float
    max_rel: float
    tolerance: float
    ok: bool


def _compare(stage: str, case: str, ort: list, ref: list, tol: float) -> Row:
    abs_err = max(float((torch.as_tensor(o).float() - r.float()).abs().max()) if r.numel() else 0.0
                  for o, r in zip(ort, ref, strict=False))
    scale = max(float(r.float().abs().max()) if r.numel() else 0.0 for r in ref)
    rel = abs_err / max(scale, 1e-30)
    return Row(stage, case, abs_err, rel, tol, rel <= tol)


def _run(sess, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [torch.from_numpy(o) for o in sess.run(None, {n: a.numpy() for n, a in feed.items()})]


def window_sweep(n: int, all_counts: bool) -> list[int]:
    return list(range(1, n + 1)) if all_counts else sorted({1, (n + 1) // 2, n})


@torch.no_grad()
def stage_parity(model: FavorModel, bundle: OrtBundle, seed: int = 0) -> list[Row]:
    """Every stage present in the bundle vs PyTorch over the window sweep."""
    g = torch.Generator().manual_seed(seed)
    cfg, man = model.cfg, bundle.manifest
    t = cfg.timing
    F = t.frames_per_window
    Wmax = man["dynamic_axes"]["windows"]["max"]
    mel_max = man["dynamic_axes"]["mel_frames"]["max"]
    rows: list[Row] = []
    stages = man["stages"]
    tol = TOLERANCES["fp32"]
    if "audio_encoder" in stages:
        w = AudioFrontend(model)
        for W in window_sweep(Wmax, False):
            Tm = min(mel_max, round(W * F * t.mel_rate / t.video_fps) - 1)  # odd length: conv padding
            mel = torch.randn(1, cfg.audio.n_mels, max(Tm, 1), generator=g)
            rows.append(_compare("audio_encoder", f"W={W} Tm={mel.shape[-1]}",
                                 [bundle.encode_audio(mel)], [w(mel)], tol))
    if "visual_encoder" in stages:
        w = VisualFrontend(model)
        v = cfg.visual
        for W in window_sweep(Wmax, False):
            T = min(W * F, man["dynamic_axes"]["frames"]["max"])
            px = torch.randn(1, T, 3, v.image_size, v.image_size, generator=g)
            Li = min(5, man["dynamic_axes"]["instruction"]["max"])
            ids = torch.randint(0, v.qformer_vocab_size, (1, Li), generator=g)
            mask = torch.ones_like(ids)
            mask[:, -1] = 0  # padded instruction token
            rows.append(_compare("visual_encoder", f"W={W} T={T}", [bundle.encode_visual(px, ids, mask)],
                                 [w(px, ids, mask)], tol))
    if "fusion" in stages:
        rows += fusion_parity(model, bundle.stage("fusion"), Wmax, g, f"fusion[{cfg.qformer.orientation}]")
    if "decoder" in stages:
        rows += decoder_parity(model, bundle, Wmax, g)
    return rows


def _fusion_row(model: FavorModel, sess, label: str, visual, audio, case: str) -> Row:
    """One fusion case: the graph on ``fusion_feed`` vs the wrapper on the same feed (tolerance), and
    the wrapper vs the unpadded model call, the spec, which must be equal exactly (a missing stream
    included: the feed's stand-in must compute what ``sync.align`` does with None)."""
    feed = fusion_feed(model.cfg, visual, audio)
    ref = FusionFrontend(model)(**feed)
    direct = model.fuse(visual, audio)
    ort = _run(sess, feed)
    row = _compare(label, case, [ort[0]], [ref[0]], TOLERANCES["fp32"])
    row.ok = (row.ok and torch.equal(direct.embeds, ref[0]) and torch.equal(direct.mask, ref[1].bool())
              and torch.equal(ort[1].bool(), ref[1].bool()))
    return row


def fusion_parity(model: FavorModel, sess, max_windows: int, g: torch.Generator, label: str) -> list[Row]:
    cfg = model.cfg
    F = cfg.timing.frames_per_window
    Qv, Dv, Da = cfg.visual.num_query_tokens, cfg.visual_width, cfg.audio_proj_dim
    rows = []
    for W in window_sweep(max_windows, True):
        Tv = max(1, W * F - 1) if F > 1 else W  # last window partly padded when it can be
        Ta = max(1, int((W * F) * cfg.timing.audio_tokens_per_frame) - 2)
        visual = torch.randn(1, Tv, Qv, Dv, generator=g)
        audio = torch.randn(1, Ta, Da, generator=g)
        rows.append(_fusion_row(model, sess, label, visual, audio, f"W={W} Tv={Tv} Ta={Ta}"))
    rows.append(_fusion_row(model, sess, label, visual, None, f"W={W} Tv={Tv} no audio"))
    rows.append(_fusion_row(model, sess, label, None, audio, f"W={W} no video Ta={Ta}"))
    return rows


def decoder_parity(model: FavorModel, bundle: OrtBundle, max_windows: int, g: torch.Generator) -> list[Row]:
    """Prefill of a one-window / max-window prompt, then two cached decode steps."""
    cfg = model.cfg
    torch_inf = TorchInference(model.llm.model)  # unmerged LoRA: what training produced
    rows = []
    precision = bundle.manifest["stages"]["decoder"].get("precision", "fp32")  # weight-only int8 / int4
    backends = [("decoder", precision)] + ([("decoder.int8", "int8")] if "decoder.int8" in bundle.manifest["stages"]
                                           else [])
    for W in window_sweep(max_windows, False):
        L = min(cfg.llm.max_positions - 3, W * cfg.qformer.num_queries + 9)
        embeds = torch.randn(1, L, cfg.llm.hidden, generator=g) * 0.02 * cfg.llm.hidden ** 0.5
        mask = torch.ones(1, L, dtype=torch.long)
        next_ids = torch.randint(0, cfg.llm.vocab_size, (2, 1), generator=g)
        ref_logits, cache = torch_inf.prefill(embeds, mask)
        refs = [ref_logits]
        for ids in next_ids:
            logits, cache = torch_inf.decode(ids, cache)
            refs.append(logits)
        ref_cache = [x for layer in cache.kv.layers for x in (layer.keys, layer.values)]
        for stage, precision in backends:
            inf = decoder_class(bundle, stage).from_bundle(bundle, stage)
            logits, oc = inf.prefill(embeds, mask)
            outs = [logits]
            for ids in next_ids:
                logits, oc = inf.decode(ids, oc)
                outs.append(logits)
            row = _compare(stage, f"W={W} prefill {L} + 2 decode", outs, refs, TOLERANCES[precision])
            rows.append(row)
            if precision == "fp32" and hasattr(oc, "kv"):  # the cache too (genai: buffers valid to length)
                kv = [x[:, :, : oc.length] for x in oc.kv] if hasattr(oc, "length") else oc.kv
                rows.append(_compare(stage, f"W={W} KV cache", [torch.from_numpy(x) for x in kv],
                                     ref_cache, TOLERANCES[precision]))
    return rows


@torch.no_grad()
def orientation_parity(model: FavorModel, max_windows: int, seed: int = 0) -> list[Row]:
    """Export the fusion graph with the other mask orientation (same weights) and check it too."""
    from export.bundle import example_inputs
    from export.onnx import export_stage
    from export.profiles import Limits, axes
    from favor.build import build_model

    flipped = "future" if model.cfg.qformer.orientation == "past" else "past"
    cfg = model.cfg.replace(**{"qformer.orientation": flipped})
    other = build_model(cfg, pretrained=False, tokenizer=model.tokenizer)
    other.load_state_dict(model.state_dict())
    other.eval()
    table = axes(cfg, Limits(max_frames=max_windows * cfg.timing.frames_per_window))
    with tempfile.TemporaryDirectory() as tmp:
        w = FusionFrontend(other)
        st = export_stage(w, example_inputs(w, table), table, tmp, cfg)
        sess = ort_session(Path(tmp) / st.files[0])
        return fusion_parity(other, sess, max_windows, torch.Generator().manual_seed(seed), f"fusion[{flipped}]")


@dataclass
class Media:
    name: str
    mel: torch.Tensor | None  # [1, n_mels, Tm]
    pixels: torch.Tensor | None  # [1, T, 3, S, S]


def synthetic_media(model: FavorModel, count: int, max_frames: int, seed: int = 0) -> list[Media]:
    g = torch.Generator().manual_seed(seed)
    cfg, t = model.cfg, model.cfg.timing
    out = []
    for i in range(count):
        T = 1 + (i * 7) % max_frames  # spread window counts
        Tm = min(t.whisper_mel_frames, round(T * t.mel_rate / t.video_fps))
        s = cfg.visual.image_size
        out.append(Media(f"synthetic-{i}", torch.randn(1, cfg.audio.n_mels, Tm, generator=g),
                         torch.randn(1, T, 3, s, s, generator=g)))
    return out


def load_clips(paths: list[Path], model: FavorModel, max_frames: int) -> list[Media]:
    from favor import media

    cfg, t = model.cfg, model.cfg.timing
    out = []
    for p in paths:
        try:
            audio = media.load_audio(p, t.sample_rate)
            mel = media.log_mel_spectrogram(audio, cfg.audio.n_mels, t)[None, :, : t.whisper_mel_frames]
        except media.MediaError:
            mel = None  # a silent clip: the audio modality is masked
        try:
            frames, _ = media.load_frames(p, t.video_fps, max_frames)
            pixels = media.preprocess_frames(frames, cfg.visual.image_size)[None]
        except media.MediaError:
            pixels = None
        out.append(Media(Path(p).name, mel, pixels))
    return out


def _instruction(model: FavorModel, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return instruction_inputs(model.instruction_tokenizer, [prompt], model.cfg.visual.max_instruction_tokens)


@torch.no_grad()
def torch_caption(model: FavorModel, m: Media, prompt: str, max_new_tokens: int) -> CaptionResult:
    ids, mask = _instruction(model, prompt)
    av = model.encode_av(mel=m.mel, pixels=m.pixels, instruction_ids=ids if m.pixels is not None else None,
                         instruction_mask=mask)
    embedding = model.llm.base.get_input_embeddings().weight.detach()  # [V, D]
    return caption(TorchInference(model.llm.model), embedding, model.tokenizer, model.cfg.llm, [prompt],
                   av.embeds, av.mask, GenerationSettings(max_new_tokens=max_new_tokens))[0]


def ort_caption(bundle: OrtBundle, tokenizer, instruction_tokenizer, m: Media, prompt: str,
                max_new_tokens: int) -> CaptionResult:
    cfg = bundle.cfg
    audio = bundle.encode_audio(m.mel) if m.mel is not None else None
    visual = None
    if m.pixels is not None:
        ids, mask = instruction_inputs(instruction_tokenizer, [prompt], cfg.visual.max_instruction_tokens)
        visual = bundle.encode_visual(m.pixels, ids, mask)
    embeds, av_mask = bundle.fuse(visual, audio)  # a missing stream: export.frontend.fusion_feed's stand-in
    return caption(bundle.inference(), bundle.embedding, tokenizer, cfg.llm, [prompt], embeds, av_mask,
                   GenerationSettings(max_new_tokens=max_new_tokens))[0]


def caption_parity(model: FavorModel, bundle_path: Path, clips: list[Media], prompt: str = DEFAULT_PROMPT,
                   max_new_tokens: int = 16) -> list[dict]:
    tok = model.tokenizer
    main = OrtBundle(bundle_path, check_hashes=False)
    backends = [(f"ort-{decoder_precision(main.manifest)}", main)]  # the bundle's own decoder
    if "decoder.int8" in backends[0][1].manifest["stages"]:
        backends.append(("ort-int8", OrtBundle(bundle_path, int8=True, check_hashes=False)))
    out = []
    for m in clips:
        ref = torch_caption(model, m, prompt, max_new_tokens)
        entry = {"clip": m.name, "torch": ref.tokens, "text": tok.decode(ref.tokens),
                 "min_margin": min(ref.margins, default=float("inf"))}
        for name, b in backends:
            got = ort_caption(b, tok, model.instruction_tokenizer, m, prompt, max_new_tokens)
            entry[name] = got.tokens
            entry[f"{name}_identical"] = got.tokens == ref.tokens
        out.append(entry)
    return out


def decoder_precision(manifest: dict) -> str:
    """The precision of a bundle's own decoder graph (GenAI builder: fp32 / int8 / int4)."""
    return manifest["stages"]["decoder"].get("precision", "fp32")


def captions_pass(caps: list[dict], precision: str, precisions: dict) -> bool:
    """The bundle's whole pipeline against PyTorch: an fp32 decoder must give token-identical captions; a
    quantised one is held to its row of the precision table (agreement, and divergence only at near ties),
    the rule decoder_precisions states -- bit identity cannot be asked of int8 weights."""
    if precision == "fp32":
        return all(c["ort-fp32_identical"] for c in caps)
    row = next((r for r in precisions.get("rows", []) if r["precision"] == precision), None)
    return row is not None and row["passes"]


def caption_identity(report: dict, caption: dict) -> tuple[bool, bool | str]:
    """One caption row: the bundle's own pipeline identical to PyTorch, and a legacy ``decoder.int8``
    stage's identity ("-" when the bundle has none)."""
    own = f"ort-{report['bundle_decoder']}"
    legacy = caption.get("ort-int8_identical", "-") if own != "ort-int8" else "-"
    return caption[own + "_identical"], legacy


def verify_bundle(model: FavorModel, bundle_path: str | Path, clips: list[Media] | None = None,
                  both_orientations: bool = True, captions: int = 3, max_new_tokens: int = 16,
                  prompt: str = DEFAULT_PROMPT) -> dict:
    """Run every check, write ``parity.json`` / ``parity.md`` into the bundle (and its manifest)."""
    bundle_path = Path(bundle_path)
    bundle = OrtBundle(bundle_path)  # refuses tampered bundles before anything runs
    model = model.eval()
    rows = stage_parity(model, bundle)
    Wmax = bundle.manifest["dynamic_axes"]["windows"]["max"]
    if both_orientations and "fusion" in bundle.manifest["stages"]:
        rows += orientation_parity(model, Wmax)
    caps: list[dict] = []
    precisions: dict = {}
    precision = decoder_precision(bundle.manifest) if "decoder" in bundle.manifest["stages"] else None
    if model.tokenizer is not None and {"fusion", "decoder"} <= set(bundle.manifest["stages"]):
        media = clips if clips is not None else synthetic_media(
            model, captions, bundle.manifest["limits"]["max_frames"])
        caps = caption_parity(model, bundle_path, media, prompt, max_new_tokens)
        precisions = decoder_precisions.verify_section(model, media, prompt, max_new_tokens)  # fp32 / int8 / int4
    ok = all(r.ok for r in rows) and (not caps or captions_pass(caps, precision, precisions))
    report = {"ok": ok, "tolerances": TOLERANCES, "stages": [asdict(r) for r in rows], "captions": caps,
              "bundle_decoder": precision, "decoder_precisions": precisions}
    (bundle_path / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
    (bundle_path / "parity.md").write_text(markdown(report))
    add_files(bundle_path, ["parity.json", "parity.md"], verified=ok)
    return report


def markdown(report: dict) -> str:
    lines = ["| stage | case | max abs err | max rel err | tolerance | ok |", "|---|---|---|---|---|---|"]
    for r in report["stages"]:
        lines.append(f"| {r['stage']} | {r['case']} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | "
                     f"{r['tolerance']:.0e} | {'yes' if r['ok'] else 'NO'} |")
    if report["captions"]:
        lines += ["", f"| clip | torch tokens | bundle ({report['bundle_decoder']} decoder) identical | "
                  "ort int8 stage identical | min margin |", "|---|---|---|---|---|"]
        for c in report["captions"]:
            identical, legacy = caption_identity(report, c)
            lines.append(f"| {c['clip']} | {len(c['torch'])} | {identical} | {legacy} | {c['min_margin']:.3g} |")
    if report.get("decoder_precisions", {}).get("rows"):
        lines += ["", decoder_precisions.markdown(report["decoder_precisions"]["rows"]).rstrip()]
    return "\n".join(lines) + "\n"
