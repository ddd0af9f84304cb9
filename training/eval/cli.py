"""favor-eval: run AVEB (real or synthetic) on a FAVOR checkpoint, convert AVEB sets, run the ablations.

    favor-eval run CHECKPOINT MANIFEST --out runs/eval            # predictions.jsonl + scores.json
    favor-eval run CHECKPOINT MANIFEST --backend onnxruntime      # score the compiled bundle the runtime ships
    favor-eval run demo.safetensors data/heldout.jsonl --judge-url http://127.0.0.1:8000/v1 --judge-model m
    favor-eval score runs/eval/predictions.jsonl --manifest data/heldout.jsonl   # re-score (adds grounding)
    favor-eval convert librispeech /data/LibriSpeech data/aveb/asr.jsonl
    favor-eval synth data/aveb_synth --num-clips 20                # a synthetic held-out test set
    favor-eval streams MODEL --num-clips 40 -o runs/streams.json   # the demo clip test on 40 held-out streams
    favor-eval ablation --config training/configs/ablation.yaml --work-dir runs/ablation
    favor-eval table runs/ablation --out runs/ablation/table.md   # then paste into benchmarks/RESULTS.md
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from favor.cli_options import CONTEXT, VerboseOption, VersionOption
from favor.quiet import quiet_libraries

app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings=CONTEXT, rich_markup_mode=None,
                  help="Evaluate FAVOR on AVEB tasks (real or synthetic) and run the paper's ablations.")


@app.callback()
def main(ctx: typer.Context, version: VersionOption = False, verbose: VerboseOption = False) -> None:
    """Evaluate FAVOR on AVEB tasks (real or synthetic) and run the paper's ablations."""
    quiet_libraries(verbose)
    ctx.obj = {"verbose": verbose}  # for the commands that start worker processes


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    checkpoint: Annotated[Path, typer.Argument(help="FAVOR checkpoint (.safetensors / .pt)")],
    manifest: Annotated[Path, typer.Argument(help="JSONL manifest (synthetic or converted AVEB)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for predictions and scores")] = Path("runs/eval"),
    backend: Annotated[str, typer.Option(help="torch (the checkpoint as trained, the default) | auto | onnxruntime "
                                               "(the compiled bundle the runtime ships, via the bundle cache)")
                       ] = "torch",
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer dir, when the checkpoint's LLM has none "
                                                        "(torch backend)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        min=1, help="greedy answer budget in tokens [default: training.eval.runner.MAX_NEW_TOKENS]")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="first N samples only")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", help="only these tasks (repeatable)")] = None,
    skip_bad: Annotated[bool, typer.Option(help="skip samples whose media cannot be decoded")] = False,
    judge_url: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL for AVSD / VGGSS (off)")] = None,
    judge_model: Annotated[str, typer.Option(help="judge model name")] = "gpt-3.5-turbo",
    judge_key_env: Annotated[str, typer.Option(help="environment variable holding the judge key")] = "OPENAI_API_KEY",
) -> None:
    """Greedy answers for every sample through the Python API (engine.ask), scored per task by the paper's rules."""
    from rich.console import Console
    from rich.progress import Progress

    from training.eval.judge import Judge, JudgeConfig
    from training.eval.runner import (
        MAX_NEW_TOKENS,
        format_grounding_table,
        format_table,
        predict,
        score_predictions,
        write_results,
    )

    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS

    try:
        engine = _engine(checkpoint, backend, tokenizer)
        judge = Judge(JudgeConfig(judge_url, judge_model, judge_key_env)) if judge_url else None
        with Progress(transient=True) as bar:
            job = bar.add_task("generate", total=None)
            records = predict(engine, manifest, max_new_tokens=max_new_tokens, limit=limit,
                              tasks=task or None, skip_bad=skip_bad,
                              progress=lambda done, total: bar.update(job, completed=done, total=total))
        scores = score_predictions(records, judge)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    path = write_results(out, records, scores, {"checkpoint": str(checkpoint), "manifest": str(manifest),
                                                "judge": judge_url, "max_new_tokens": max_new_tokens,
                                                "backend": backend})
    Console().print(format_table(scores))
    if grounding := format_grounding_table(scores):
        typer.echo(grounding)
    typer.echo(f"scores: {path}")


EVAL_BACKENDS = ("torch", "auto", "onnxruntime")


def _engine(checkpoint: Path, backend: str, tokenizer: Path | None):
    """The Engine eval asks: torch = the checkpoint's FavorModel as trained (LoRA unmerged, today's
    scores); auto / onnxruntime = favor.load's compiled bundle (what `favor-rt run` ships)."""
    if backend not in EVAL_BACKENDS:
        raise ValueError(f"--backend ({backend!r}) must be one of {', '.join(EVAL_BACKENDS)}")
    if backend != "torch":
        if tokenizer is not None:
            raise ValueError("--tokenizer applies to the torch backend; a compiled bundle takes the tokenizer "
                             "beside the checkpoint (favor-export)")
        import favor

        return favor.load(checkpoint, backend=backend)
    from favor.build import load_tokenizer
    from favor.checkpoint import load_model
    from training.eval.runner import as_engine

    model = load_model(checkpoint, tokenizer=load_tokenizer(str(tokenizer)) if tokenizer else None)
    if model.tokenizer is None:
        raise ValueError(f"{checkpoint}: the model has no tokenizer (random-init LLM); pass --tokenizer DIR")
    return as_engine(model)


@app.command()
def score(
    predictions: Annotated[Path, typer.Argument(help="a predictions.jsonl written by `favor-eval run`")],
    manifest: Annotated[Path | None, typer.Option(help="its manifest: scene events for records without them "
                                                       "(grounding of files written before it)")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write the scores JSON here")] = None,
) -> None:
    """Score an existing predictions file by the paper's rules, with grounding where scene events exist."""
    from rich.console import Console

    from training.eval.runner import format_grounding_table, format_table, read_predictions, score_predictions

    try:
        scores = score_predictions(read_predictions(predictions, manifest))
    except ValueError as e:
        _fail(str(e))
    Console().print(format_table(scores))
    if grounding := format_grounding_table(scores):
        typer.echo(grounding)
    if out is not None:
        from favor.fileio import atomic_write

        text = json.dumps({"info": {"predictions": str(predictions), "manifest": str(manifest) if manifest else None},
                           "scores": scores}, indent=2) + "\n"
        atomic_write(out, lambda tmp: Path(tmp).write_text(text))
        typer.echo(f"scores: {out}")


@app.command()
def streams(
    model: Annotated[Path, typer.Argument(help="FAVOR checkpoint or exported bundle (what favor-rt run takes)")],
    num_clips: Annotated[int, typer.Option("--num-clips", "-n", min=1, help="held-out long clips")] = 40,
    clip_dir: Annotated[Path, typer.Option(help="where the held-out long clips are written (once)")]
    = Path("runs/heldout_long"),
    backend: Annotated[str, typer.Option(help="runtime backend (favor-rt run --backend)")] = "torch",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens per cue (favor-rt run's default)")] = 32,
    context: Annotated[int, typer.Option(min=0, help="previous captions as context (favor-rt run's default)")] = 1,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write scores and every cue here (JSON)")] = None,
) -> None:
    """The demo clip test on many held-out long clips: favor-rt's stream loop, each cue checked against its
    window (training/eval/streams.py)."""
    from rich.progress import Progress

    from runtime.api import DEFAULT_PROMPT
    from runtime.backends import make_backend
    from training.eval.streams import score_streams

    try:
        engine = make_backend(backend, model)
        with Progress(transient=True) as bar:
            job = bar.add_task("streams", total=num_clips)
            scores, records = score_streams(engine, num_clips, clip_dir, DEFAULT_PROMPT, max_new_tokens, context,
                                            lambda done, total: bar.update(job, completed=done))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if out is not None:
        from favor.fileio import atomic_write

        text = json.dumps({"info": {"model": str(model), "backend": backend, "max_new_tokens": max_new_tokens,
                                    "context": context}, "scores": scores.to_dict(), "clips": records}, indent=1)
        atomic_write(out, lambda tmp: Path(tmp).write_text(text + "\n"))
    def show(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    typer.echo(f"{scores.clips} clips, {scores.cues} cues: cues grounded {scores.cues_grounded:.3f}, "
               f"clips grounded {scores.clips_grounded:.3f}, object precision {show(scores.object_precision)} "
               f"({scores.objects_named} named); events: precision {show(scores.event_precision)} "
               f"({scores.events_asserted} asserted), recall {show(scores.event_recall)} "
               f"({scores.events_true} happened)")


@app.command()
def convert(
    name: Annotated[str, typer.Argument(help="librispeech | audiocaps | flickr30k | textvqa | gqa | nextqa | how2 | "
                                         "avsd | vggss | spokencoco")],
    root: Annotated[Path, typer.Argument(help="your local copy of that set, in its published layout")],
    out: Annotated[Path, typer.Argument(help="manifest to write (.jsonl)")],
    limit: Annotated[int | None, typer.Option(min=1, help="first N samples only")] = None,
) -> None:
    """Convert one AVEB test set to a JSONL manifest (media paths relative to the manifest)."""
    from training.eval.aveb import convert as run_convert

    try:
        report = run_convert(name, root, out, limit)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"{report.manifest}: {report.written} samples, {len(report.skipped)} skipped")
    for reason in report.skipped[:5]:
        typer.echo(f"  skipped {reason}")


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="directory for the held-out clips and heldout.jsonl")],
    num_clips: Annotated[int, typer.Option("--num-clips", "-n", min=1)] = 20,
    seed: Annotated[int, typer.Option()] = 0,
    workers: Annotated[int, typer.Option("--workers", "-j", min=1)] = 1,
) -> None:
    """Write a synthetic AVEB test set (the held-out split: disjoint from every training seed stream)."""
    from training.synth import generate

    typer.echo(str(generate(out_dir, num_clips, seed, split="heldout", workers=workers)))


@app.command()
def ablation(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", "-c")] = Path("training/configs/ablation.yaml"),
    work_dir: Annotated[Path, typer.Option("--work-dir")] = Path("runs/ablation"),
    variants: Annotated[list[str] | None, typer.Option("--variant", help="subset of variants (repeatable)")] = None,
    seeds: Annotated[list[int] | None, typer.Option("--seed", help="seeds (repeatable; default 0 1 2)")] = None,
    train_clips: Annotated[int, typer.Option(min=1)] = 200,
    heldout_clips: Annotated[int, typer.Option(min=1)] = 20,
    data_seed: Annotated[int, typer.Option(min=0, help="synthetic data seed (the demo model trained on seed 0)")]
    = 0,
    jobs: Annotated[int, typer.Option(min=1, help="parallel 1-thread training processes")] = 1,
    eval_limit: Annotated[int | None, typer.Option(min=1, help="score only the first N held-out samples")] = None,
    eval_tasks: Annotated[list[str] | None, typer.Option("--eval-task",
                                                         help="score only these tasks (repeatable)")] = None,
    overrides: Annotated[list[str] | None,
                         typer.Argument(help="dotted key=value overrides, e.g. train.steps=100")] = None,
    results_md: Annotated[Path | None, typer.Option("--results-md", help="also write the table here")] = None,
    lesion_only: Annotated[bool, typer.Option(
        "--lesion-only", help="no fine-tuning: score train.init_from with each component removed (one seed, "
                              "results under WORK_DIR/lesion)")] = False,
) -> None:
    """Train and evaluate the full model and its ablations over seeds (resumable), then print the table."""
    from training.eval import ablation as A

    try:
        A.run(config, work_dir, variants or A.VARIANTS, seeds or ((0,) if lesion_only else (0, 1, 2)),
              train_clips=train_clips, fine_tune=not lesion_only,
              heldout_clips=heldout_clips, data_seed=data_seed, jobs=jobs, overrides=overrides or [],
              eval_limit=eval_limit, eval_tasks=eval_tasks or (),
              verbose=(ctx.obj or {}).get("verbose", False), log=typer.echo)
    except ValueError as e:
        _fail(str(e))
    _table(work_dir / A.LESION_DIR if lesion_only else work_dir, results_md)


def _table(work_dir: Path, out: Path | None) -> None:
    from training.eval import ablation as A

    results = A.load_results(work_dir)
    if not results:
        _fail(f"{work_dir}: no */seed*/result.json (run `favor-eval ablation` first)")
    agg = A.aggregate(results)
    text = A.table(agg)
    if "full" in agg and len(agg) > 1:
        text += "\n\n" + A.direction_table(A.direction_agreement(agg))
    typer.echo(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        (out.with_suffix(".json")).write_text(json.dumps({"aggregate": agg,
                                                          "direction": A.direction_agreement(agg)}, indent=2))


@app.command()
def table(
    work_dir: Annotated[Path, typer.Argument(help="an ablation work dir")],
    out: Annotated[Path | None, typer.Option("--out", help="write the markdown table (and a .json beside it)")] = None,
) -> None:
    """Aggregate finished ablation runs: mean ± std over seeds per task, beside the paper's numbers."""
    _table(work_dir, out)


if __name__ == "__main__":
    app()
