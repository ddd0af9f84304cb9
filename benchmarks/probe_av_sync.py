"""Do the fused tokens know whether the soundtrack belongs to the picture? A linear probe (issue 12).

AV matching (a clip's own soundtrack or another's?) stays at chance in every demo model so far. Either
the causal Q-Former's outputs do not carry audio-visual synchrony, or they do and the LLM never learnt to
read it from one yes/no token. This separates the two: for each clip, the Q-Former's window queries for
its own audio and for the next clip's audio (the synthetic world draws sounds independently of the
picture, except that a shape pulses while its sound plays), pooled over queries, then mean and max over
windows; a logistic regression fit on train clips, scored on held-out clips. Chance is 0.5; a probe near
chance means the information is not there for the LLM to read. A model trained with the synchrony
objective (favor/synchrony.py) also has its own head judge the held-out pairs, nothing fit.

    python benchmarks/probe_av_sync.py MODEL [MODEL ...] --train data/synth/train.jsonl \
        --heldout data/synth/heldout.jsonl --train-clips 300 --heldout-clips 100
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer

from favor.quiet import quiet_libraries

AVM_QUESTION = "Does the audio belong to this video? Answer yes or no."  # the visual encoder's instruction
PROBE_STEPS = 200  # L-BFGS iterations: the fit converges well within them on <= 1,000 rows
# L2 on standardised features (2H features against 2 x train_clips rows, so the fit can memorise): every
# strength is reported, none picked on the held-out clips
PROBE_WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1)


def clips(manifest: Path, n: int) -> list[Path]:
    """The first ``n`` distinct clips (av_caption rows: the clip's own video and audio)."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return [manifest.parent / r["video"] for r in rows if r["task"] == "av_caption"][:n]


@torch.no_grad()
def encoded(model, paths: list[Path]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per clip: visual tokens [T, Qv, Dv] (told the matching question) and audio tokens [Ta, Da]."""
    from favor.clip_media import decode_clip
    from favor.generation import instruction_inputs

    ids, mask = instruction_inputs(model.instruction_tokenizer, [AVM_QUESTION],
                                   model.visual_encoder.max_instruction_tokens)
    out = []
    for p in paths:
        mel, pixels = decode_clip(model.cfg, audio=p, visual=p)
        out.append((model.encode_visual(pixels[None], ids, mask)[0], model.encode_audio(mel[None])[0]))
    return out


@torch.no_grad()
def pooled(model, visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    """Q-Former queries of one (picture, soundtrack) pair -> [2H]: query mean, then window mean and max."""
    q = model.fuse(visual[None], audio[None]).queries[0].mean(1)  # [W, H]
    return torch.cat([q.mean(0), q.amax(0)])


def features(model, enc: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Own soundtrack (label 1) and the next clip's (label 0) for every clip."""
    x, y = [], []
    for i, (visual, audio) in enumerate(enc):
        other = enc[(i + 1) % len(enc)][1]
        x += [pooled(model, visual, audio), pooled(model, visual, other)]
        y += [1.0, 0.0]
    return torch.stack(x), torch.tensor(y)


@torch.no_grad()
def head_logit(model, visual: torch.Tensor, audio: torch.Tensor) -> float:
    """The synchrony head's logit (favor/synchrony.py) for one (picture, soundtrack) pair."""
    av = model.fuse(visual[None], audio[None])
    B, W, Nq = av.queries.shape[:3]
    return float(model.sync_head(av.embeds.view(B, W, Nq, -1), av.window_mask)[0])


def rotated(audio: torch.Tensor, tokens_per_frame: float) -> torch.Tensor:
    """A soundtrack's features [Ta, Da] rolled by half its whole frames: same sounds, wrong moments (and
    Whisper's encoded positions rolled with them; favor/synchrony.py says why that matters)."""
    frames = int(audio.shape[0] // tokens_per_frame)
    return torch.roll(audio, round(frames // 2 * tokens_per_frame), dims=0)


def head_accuracy(model, enc: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """A model trained with the synchrony objective judges pairs itself, nothing fit: accuracy on own
    soundtrack vs the next clip's (AV matching's negative) and vs its own rotated in time, each over
    2 x clips rows."""
    per_frame = model.cfg.timing.audio_tokens_per_frame
    other = moved = 0
    for i, (visual, audio) in enumerate(enc):
        own = head_logit(model, visual, audio) > 0
        other += own + (head_logit(model, visual, enc[(i + 1) % len(enc)][1]) <= 0)
        moved += own + (head_logit(model, visual, rotated(audio, per_frame)) <= 0)
    return {"other_clip": other / (2 * len(enc)), "rotated": moved / (2 * len(enc)), "rows": 2 * len(enc)}


def probe(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
          weight_decay: float) -> dict:
    """Logistic regression on standardised features (fit on train only): train / held-out accuracy."""
    (xtr, ytr), (xte, yte) = train, test
    mu, sd = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w = torch.zeros(xtr.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=PROBE_STEPS, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        fit = torch.nn.functional.binary_cross_entropy_with_logits(xtr @ w + b, ytr)
        loss = fit + weight_decay * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = {name: float(((x @ w + b > 0).float() == y).float().mean())
               for name, x, y in (("train", xtr, ytr), ("heldout", xte, yte))}
    return acc | {"weight_decay": weight_decay, "train_rows": len(ytr), "heldout_rows": len(yte)}


def main(models: Annotated[list[Path], typer.Argument(help="FAVOR checkpoints")],
         train: Annotated[Path, typer.Option(help="a generated train split")] = Path("data/synth/train.jsonl"),
         heldout: Annotated[Path, typer.Option(help="a generated heldout split")] = Path("data/synth/heldout.jsonl"),
         train_clips: int = 300, heldout_clips: int = 100,
         out: Annotated[Path | None, typer.Option(help="JSON of the results")] = None) -> None:
    quiet_libraries()
    from favor.checkpoint import load_model

    torch.manual_seed(0)
    results = {}
    for path in models:
        model = load_model(path)
        tr = features(model, encoded(model, clips(train, train_clips)))
        held = encoded(model, clips(heldout, heldout_clips))
        te = features(model, held)
        results[str(path)] = [probe(tr, te, wd) for wd in PROBE_WEIGHT_DECAYS]
        for r in results[str(path)]:
            typer.echo(f"{path}: L2 {r['weight_decay']:g}: train {r['train']:.3f}, held-out {r['heldout']:.3f} "
                       f"({r['train_rows']} / {r['heldout_rows']} pairs)")
        if model.sync_head is not None:
            h = head_accuracy(model, held)
            results[str(path)].append({"sync_head": h})
            typer.echo(f"{path}: synchrony head, held-out: own vs next clip's {h['other_clip']:.3f}, own vs "
                       f"rotated {h['rotated']:.3f} ({h['rows']} rows)")
    if out is not None:
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    typer.run(main)
