"""The paper's ablations (Table 5; Tables 9-10) on the synthetic world: train + evaluate each variant x seed.

    prepare()   synthetic train / held-out sets and a word-level tokenizer (once, shared by every run)
    run_one()   FinetuneRecipe on the train set with the variant's config, then runner.predict on the
                held-out set -> {work}/{variant}/seed{seed}/result.json
    run()       every (variant, seed) without a result.json; a killed run resumes from its newest step_*
    table()     mean and spread (sample std over seeds) per task, beside the paper's numbers

Variants are config switches of favor.config (nothing is patched):
    full                 the complete model
    no_causal_encoder    qformer.causal_encoder = False (no block-causal self-attention across frames)
    no_sync              synchronise = False (each modality through the Q-Former alone, 2N queries)
    no_sliding_window    timing.frames_per_window = timing.max_frames (one window over the whole clip)
    no_diversity_loss    diversity_loss_weight = 0

Each process runs torch with one thread so the ablation can share the machine with other training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from favor.fileio import atomic_write
from training.eval.runner import LOWER_IS_BETTER, score_predictions

VARIANTS = ("full", "no_causal_encoder", "no_sync", "no_sliding_window", "no_diversity_loss")
LESION_DIR = "lesion"  # under an ablation work dir: the variants scored without fine-tuning (--lesion-only)

# Synthetic task -> (paper column, table it comes from). The synthetic task is the nearest analogue.
PAPER_COLUMNS = {
    "temporal_qa": ("Video QA", "Table 5 / 9"),
    "spoken_qa": ("ISQA", "Table 5 / 10"),
    "sound_source": ("AVSSD", "Table 5 / 10"),
    "av_matching": ("AVM", "Table 5 / 10"),
    "asr": ("ASR (WER)", "Table 9"),
    "sound_description": ("AC (SPIDEr)", "Table 9"),
}
# Sun et al., Tables 9 and 10 (Table 5 repeats the video / audio-visual columns). Percent except AC.
PAPER = {
    "full": {"temporal_qa": 49.3, "spoken_qa": 32.3, "sound_source": 51.1, "av_matching": 77.1, "asr": 3.3,
             "sound_description": 42.6},
    "no_diversity_loss": {"temporal_qa": 47.1, "spoken_qa": 34.1, "sound_source": 53.5, "av_matching": 75.7,
                          "asr": 3.1, "sound_description": 42.7},
    "no_causal_encoder": {"temporal_qa": 42.8, "spoken_qa": 20.9, "sound_source": 37.1, "av_matching": 74.8,
                          "asr": 3.0, "sound_description": 44.0},
    "no_sliding_window": {"temporal_qa": 44.8, "spoken_qa": 29.7, "sound_source": 45.3, "av_matching": 74.5,
                          "asr": 3.3, "sound_description": 42.7},
    "no_sync": {"temporal_qa": 47.4, "spoken_qa": 17.2, "sound_source": 50.5, "av_matching": 72.5, "asr": 3.0,
                "sound_description": 40.6},
}
SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: the LLMConfig bos / eos defaults
PROMPT_TEXT = "USER: <Img> </Img> \nASSISTANT:"  # favor.prompt's fixed strings must be in the vocabulary


def variant_overrides(variant: str, max_frames: int) -> list[str]:
    """The model.* overrides of one variant (dotted key=value, as favor-train takes them)."""
    table = {
        "full": [],
        "no_causal_encoder": ["model.qformer.causal_encoder=false"],
        "no_sync": ["model.synchronise=false"],
        "no_sliding_window": [f"model.timing.frames_per_window={max_frames}"],
        "no_diversity_loss": ["model.diversity_loss_weight=0.0"],
    }
    if variant not in table:
        raise ValueError(f"unknown ablation variant {variant!r}; expected one of {list(table)}")
    return table[variant]


# ------------------------------------------------------------------------------------------- data


def build_tokenizer(manifests: Sequence[Path], out_dir: Path):
    """A word-level HF tokenizer (lower-cased) over every word of the manifests' conversations."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from training.pairing import IMAGE_PREFIX, MATCH_NO, MATCH_QUESTIONS, MATCH_YES

    pre = pre_tokenizers.Whitespace()
    seen: dict[str, None] = {}
    # the prompt's fixed strings and the questions / answers training's pairing writes
    texts = [t.lower() for t in (PROMPT_TEXT, *MATCH_QUESTIONS, MATCH_YES, MATCH_NO, IMAGE_PREFIX, ", and")]
    for m in manifests:
        for line in Path(m).read_text(encoding="utf-8").splitlines():
            texts += [t["value"].lower() for t in json.loads(line)["conversation"]]
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            seen.setdefault(word)
    vocab = {w: i for i, w in enumerate([*SPECIALS, *sorted(seen)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.save_pretrained(out_dir)
    return fast


def prepare(work: Path, train_clips: int, heldout_clips: int, data_seed: int = 0, workers: int = 1,
            max_seconds: float = 8.0) -> dict[str, Path]:
    """Synthetic train / held-out sets and the tokenizer under ``work`` (reused when already there)."""
    from training.synth import generate

    work.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", train_clips), ("heldout", heldout_clips)):
        manifest, info = work / "data" / f"{split}.jsonl", work / "data" / f"{split}.json"
        made = json.loads(info.read_text()) if info.is_file() and manifest.is_file() else {}
        if made.get("num_clips") != n or made.get("seed") != data_seed:
            generate(work / "data", n, data_seed, split=split, workers=workers, max_seconds=max_seconds)
        paths[split] = manifest
    paths["tokenizer"] = work / "tokenizer"
    if not (paths["tokenizer"] / "tokenizer.json").is_file():
        build_tokenizer([paths["train"], paths["heldout"]], paths["tokenizer"])
    return paths


# ------------------------------------------------------------------------------------------- runs


def _memo_dataset_class():
    """ManifestDataset whose decoded media (mel, pixels) are kept in memory for the whole process: the
    same clips are decoded once for all the runs of a worker, not once per step."""
    from training.data import ManifestDataset, scene_of

    memo: dict[tuple, dict] = {}

    class MemoDataset(ManifestDataset):
        def _decode(self, plan):
            key = (str(plan.audio), str(plan.visual), plan.is_image)
            if key not in memo:
                memo[key] = super()._decode(plan)
            item = dict(memo[key])
            item.update(modality_mask=torch.tensor(plan.modality_mask, dtype=torch.float32),
                        conversation=plan.conversation, task=plan.task, id=plan.entry.id, line=plan.entry.line,
                        scene=scene_of(plan))  # what this draw's media show: its own, not the memo's first
            return item

    return MemoDataset


_MEMO_DATASET = None


def _recipe_class():
    from training.collate import Collator
    from training.data import DataOptions
    from training.recipe import FinetuneRecipe, pairing_options

    global _MEMO_DATASET
    if _MEMO_DATASET is None:
        _MEMO_DATASET = _memo_dataset_class()

    class AblationRecipe(FinetuneRecipe):
        def _setup_data(self) -> None:
            tc = self.tc
            self.train_set = _MEMO_DATASET(tc.train_manifest, self.cfg,
                                           DataOptions(tc.skip_bad, tc.validate_media, tc.min_audio_seconds,
                                                       pairing_options(tc)), seed=tc.seed)
            self.collator = Collator(self.cfg, self.inner.tokenizer, self.inner.instruction_tokenizer,
                                     tc.max_text_tokens)
            self.eval_set = None
            self.skipped = len(self.train_set.skipped)

    return AblationRecipe


def run_one(config: Path, work: Path, variant: str, seed: int, paths: dict[str, Path],
            overrides: Sequence[str] = (), eval_limit: int | None = None, eval_tasks: Sequence[str] = (),
            fine_tune: bool = True) -> dict:
    """Train one (variant, seed) and score it on the held-out set (``eval_tasks`` only, when given);
    result.json makes it idempotent. ``fine_tune=False`` scores the lesion alone: ``train.init_from`` with
    the variant's component removed and no optimiser step, under ``work/lesion/``."""
    from favor.build import load_tokenizer
    from training.cli import load_configs
    from training.eval.runner import predict, write_results
    from training.recipe import find_latest_checkpoint

    out = (work if fine_tune else work / LESION_DIR) / variant / f"seed{seed}"
    result_path = out / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    base, _ = load_configs(config, list(overrides))
    word_level = base.llm.pretrained is None  # a random LLM speaks the word-level vocabulary, else its own
    args = [*overrides, *variant_overrides(variant, base.timing.max_frames),
            f"train.train_manifest={paths['train']}", f"train.output_dir={out}", f"train.seed={seed}",
            f"train.feature_cache_dir={work / 'feature_cache'}",
            *([f"train.tokenizer={paths['tokenizer']}"] if word_level else [])]
    cfg, tc = load_configs(config, args)
    if not fine_tune and tc.init_from is None:
        raise ValueError(f"{config}: a lesion without fine-tuning needs train.init_from (the model to lesion)")
    tokenizer = load_tokenizer(str(paths["tokenizer"])) if word_level else None
    if word_level and (len(tokenizer) > cfg.llm.vocab_size or len(tokenizer) > cfg.visual.qformer_vocab_size):
        raise ValueError(f"tokenizer has {len(tokenizer)} words; raise model.llm.vocab_size "
                         f"({cfg.llm.vocab_size}) and model.visual.qformer_vocab_size in {config}")
    torch.manual_seed(seed)
    recipe = _recipe_class()(cfg, tc, tokenizer=tokenizer, resume=find_latest_checkpoint(out) is not None or None)
    t0 = time.perf_counter()
    recipe.setup()
    history = recipe.train() if fine_tune else []
    recipe.cleanup()
    train_s = time.perf_counter() - t0
    model = recipe.inner
    for name in ("audio_encoder", "visual_encoder"):  # evaluate through the plain encoders (no cache keys)
        setattr(model, name, getattr(getattr(model, name), "inner", getattr(model, name)))
    t0 = time.perf_counter()
    records = predict(model, paths["heldout"], max_new_tokens=tc.max_new_tokens, limit=eval_limit,
                      tasks=eval_tasks or None)
    scores = score_predictions(records)
    result = {"variant": variant, "seed": seed, "scores": scores, "train_seconds": round(train_s, 1),
              "eval_seconds": round(time.perf_counter() - t0, 1), "steps": tc.steps if fine_tune else 0,
              "final_loss": history[-1].loss if history else None, "config": cfg.to_dict(),
              "train": json.loads(json.dumps(dataclasses.asdict(tc)))}
    write_results(out, records, scores, {k: v for k, v in result.items() if k != "scores"})
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(result_path, lambda tmp: Path(tmp).write_text(text))  # exists only for a finished run
    return json.loads(result_path.read_text())  # the same object a later call reads back


def _worker(job: tuple) -> dict:
    torch.set_num_threads(1)
    return run_one(*job)


def worker_pool(jobs: int, verbose: bool = False):
    """``jobs`` fresh interpreters (spawn: no half-copied torch thread pools), as quiet as the caller unless
    ``verbose`` -- a spawned interpreter inherits the environment but not the caller's warning filters."""
    from favor.quiet import quiet_libraries

    return multiprocessing.get_context("spawn").Pool(jobs, initializer=quiet_libraries, initargs=(verbose,))


def run(config: Path, work: Path, variants: Sequence[str] = VARIANTS, seeds: Sequence[int] = (0, 1, 2), *,
        train_clips: int = 200, heldout_clips: int = 20, data_seed: int = 0, jobs: int = 1,
        overrides: Sequence[str] = (), eval_limit: int | None = None, eval_tasks: Sequence[str] = (),
        fine_tune: bool = True, verbose: bool = False, log=print) -> list[dict]:
    """Every (variant, seed); finished ones are read back, the rest run in ``jobs`` 1-thread processes."""
    for v in variants:
        variant_overrides(v, 1)  # unknown names fail before any work
    torch.set_num_threads(1)
    paths = prepare(work, train_clips, heldout_clips, data_seed, workers=max(1, jobs))
    # seed-major: a stopped ablation has whole seeds (every variant) rather than whole variants
    pending = [(config, work, v, s, paths, tuple(overrides), eval_limit, tuple(eval_tasks), fine_tune)
               for s in seeds for v in variants]
    log(f"ablation: {len(pending)} runs under {work}")
    if jobs == 1:
        results = []
        for job in pending:
            t0 = time.perf_counter()
            results.append(_worker(job))
            log(f"  {job[2]} seed {job[3]}: done in {time.perf_counter() - t0:.0f} s")
        return results
    with worker_pool(jobs, verbose) as pool:
        results = []
        for r in pool.imap(_worker, pending):
            log(f"  {r['variant']} seed {r['seed']}: train {r['train_seconds']} s, eval {r['eval_seconds']} s")
            results.append(r)
    return results


# ------------------------------------------------------------------------------------------- table


def load_results(work: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(work).glob("*/seed*/result.json"))]


def aggregate(results: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """{variant: {task: {mean, std, n, metric}}}; std is the sample standard deviation over seeds."""
    acc: dict[str, dict[str, list[float]]] = {}
    metric: dict[str, str] = {}
    for r in results:
        for task, s in r["scores"].items():
            acc.setdefault(r["variant"], {}).setdefault(task, []).append(s["score"])
            metric[task] = s["metric"]
    out: dict[str, dict[str, dict]] = {}
    for v, tasks in acc.items():
        for task, xs in tasks.items():
            m = sum(xs) / len(xs)
            sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan
            out.setdefault(v, {})[task] = {"mean": m, "std": sd, "n": len(xs), "metric": metric[task]}
    return out


def direction_agreement(agg: dict[str, dict[str, dict]]) -> list[dict]:
    """Per (variant, task with a paper number): does removing the component move our score the way the
    paper's moved (worse / better than full)? A change within one pooled std of ours counts as 'flat'."""
    rows = []
    if "full" not in agg:
        return rows
    for v in VARIANTS[1:]:
        for task in PAPER_COLUMNS:
            if v not in agg or task not in agg[v] or task not in agg["full"]:
                continue
            sign = -1.0 if agg["full"][task]["metric"] in LOWER_IS_BETTER else 1.0
            ours = sign * (agg[v][task]["mean"] - agg["full"][task]["mean"])  # > 0: variant better
            paper = PAPER[v][task] - PAPER["full"][task]
            paper *= -1.0 if task == "asr" else 1.0  # WER: lower is better
            noise = max(agg[v][task]["std"], agg["full"][task]["std"])
            flat = abs(ours) <= noise if not math.isnan(noise) else ours == 0  # one seed: only no change is flat
            ours_dir = "flat" if flat else ("better" if ours > 0 else "worse")
            paper_dir = "flat" if abs(paper) < 0.5 else ("better" if paper > 0 else "worse")
            rows.append({"variant": v, "task": task, "ours": ours_dir, "paper": paper_dir,
                         "ours_delta": ours, "paper_delta": paper, "agree": ours_dir == paper_dir,
                         "sigmas": abs(ours) / noise if noise > 0 else math.nan})  # |change| in seed stds
    return rows


def _cell(s: dict | None) -> str:
    if s is None:
        return "—"
    if math.isnan(s["std"]):
        return f"{s['mean']:.1f}"
    return f"{s['mean']:.1f} ± {s['std']:.1f}"


def table(agg: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per variant, ours (mean ± std over seeds) then the paper's number per column."""
    order = list(PAPER_COLUMNS)  # the paper's column order first, then tasks it has no column for
    tasks = sorted({t for v in agg.values() for t in v},
                   key=lambda t: (order.index(t) if t in order else len(order), t))
    head = ["variant"]
    for t in tasks:
        metric = next(v[t]["metric"] for v in agg.values() if t in v)
        arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
        head.append(f"{t} {metric} {arrow}")
        if t in PAPER_COLUMNS:
            head.append(f"paper {PAPER_COLUMNS[t][0]}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in VARIANTS:
        if v not in agg:
            continue
        row = [v]
        for t in tasks:
            row.append(_cell(agg[v].get(t)))
            if t in PAPER_COLUMNS:
                row.append(f"{PAPER[v][t]:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def direction_table(rows: Sequence[dict]) -> str:
    """Markdown: per (variant, task), our change against full (+ = better), how many seed stds it is, and
    the paper's change; 'beyond 2 std' is issue 12's bar (our change the paper's way by more than 2 std)."""
    lines = ["| variant | task | ours Δ | seed stds | ours | paper Δ | paper | agree | paper's way beyond 2 std |",
             "|" + "---|" * 9]
    for r in rows:
        beyond = r["agree"] and r["paper"] != "flat" and r["sigmas"] > 2  # nan (one seed) compares False
        stds = "—" if math.isnan(r["sigmas"]) else f"{r['sigmas']:.1f}"
        lines.append(f"| {r['variant']} | {r['task']} | {r['ours_delta']:+.1f} | {stds} | {r['ours']} | "
                     f"{r['paper_delta']:+.1f} | {r['paper']} | {'yes' if r['agree'] else 'no'} | "
                     f"{'yes' if beyond else 'no'} |")
    return "\n".join(lines)
