"""favor-eval: run AVEB (real or synthetic) on a FAVOR checkpoint, convert AVEB sets, run the ablations.

    favor-eval run CHECKPOINT MANIFEST --out runs/eval            # predictions.jsonl + scores.json
    favor-eval run demo.safetensors data/heldout.jsonl --judge-url http://127.0.0.1:8000/v1 --judge-model m
    favor-eval convert librispeech /data/LibriSpeech data/aveb/asr.jsonl
    favor-eval synth data/aveb_synth --num-clips 20                # a synthetic held-out test set
    favor-eval ablation --config training/configs/ablation.yaml --work-dir runs/ablation
    favor-eval table runs/ablation --out benchmarks/RESULTS_eval.md
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Evaluate FAVOR on AVEB tasks (real or synthetic) and run the paper's ablations.")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    checkpoint: Path = typer.Argument(..., help="FAVOR checkpoint (.safetensors / .pt)"),
    manifest: Path = typer.Argument(..., help="JSONL manifest (synthetic or converted AVEB)"),
    out: Path = typer.Option(Path("runs/eval"), "--out", "-o", help="directory for predictions and scores"),
    tokenizer: Path | None = typer.Option(None, help="tokenizer dir, when the checkpoint's LLM has none"),
    batch_size: int = typer.Option(4, min=1),
    max_new_tokens: int = typer.Option(48, min=1),
    limit: int | None = typer.Option(None, min=1, help="first N samples only"),
    task: list[str] = typer.Option(None, "--task", help="only these tasks (repeatable)"),
    skip_bad: bool = typer.Option(False, help="skip samples whose media cannot be decoded"),
    judge_url: str | None = typer.Option(None, help="OpenAI-compatible base URL for AVSD / VGGSS (off)"),
    judge_model: str = typer.Option("gpt-3.5-turbo", help="judge model name"),
    judge_key_env: str = typer.Option("OPENAI_API_KEY", help="environment variable holding the judge key"),
) -> None:
    """Greedy answers for every sample, scored per task by the paper's rules."""
    from rich.console import Console
    from rich.progress import Progress

    from favor.build import load_tokenizer
    from favor.checkpoint import load_model
    from training.eval.judge import Judge, JudgeConfig
    from training.eval.runner import format_table, predict, score_predictions, write_results

    try:
        tok = load_tokenizer(str(tokenizer)) if tokenizer else None
        model = load_model(checkpoint, tokenizer=tok)
        if model.tokenizer is None:
            _fail(f"{checkpoint}: the model has no tokenizer (random-init LLM); pass --tokenizer DIR")
        judge = Judge(JudgeConfig(judge_url, judge_model, judge_key_env)) if judge_url else None
        with Progress(transient=True) as bar:
            job = bar.add_task("generate", total=None)
            records = predict(model, manifest, batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit,
                              tasks=task or None, skip_bad=skip_bad,
                              progress=lambda done, total: bar.update(job, completed=done, total=total))
        scores = score_predictions(records, judge)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    path = write_results(out, records, scores, {"checkpoint": str(checkpoint), "manifest": str(manifest),
                                                "judge": judge_url, "max_new_tokens": max_new_tokens})
    Console().print(format_table(scores))
    typer.echo(f"scores: {path}")


@app.command()
def convert(
    name: str = typer.Argument(..., help="librispeech | audiocaps | flickr30k | textvqa | gqa | nextqa | how2 | "
                                         "avsd | vggss | spokencoco"),
    root: Path = typer.Argument(..., help="your local copy of that set, in its published layout"),
    out: Path = typer.Argument(..., help="manifest to write (.jsonl)"),
    limit: int | None = typer.Option(None, min=1, help="first N samples only"),
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
    out_dir: Path = typer.Argument(..., help="directory for the held-out clips and heldout.jsonl"),
    num_clips: int = typer.Option(20, "--num-clips", "-n", min=1),
    seed: int = typer.Option(0),
    workers: int = typer.Option(1, "--workers", "-j", min=1),
) -> None:
    """Write a synthetic AVEB test set (the held-out split: disjoint from every training seed stream)."""
    from training.synth import generate

    typer.echo(str(generate(out_dir, num_clips, seed, split="heldout", workers=workers)))


@app.command()
def ablation(
    config: Path = typer.Option(Path("training/configs/ablation.yaml"), "--config", "-c"),
    work_dir: Path = typer.Option(Path("runs/ablation"), "--work-dir"),
    variants: list[str] = typer.Option(None, "--variant", help="subset of variants (repeatable)"),
    seeds: list[int] = typer.Option([0, 1, 2], "--seed", help="seeds (repeatable)"),
    train_clips: int = typer.Option(240, min=1),
    heldout_clips: int = typer.Option(30, min=1),
    jobs: int = typer.Option(1, min=1, help="parallel 1-thread training processes"),
    eval_limit: int | None = typer.Option(None, min=1, help="score only the first N held-out samples"),
    overrides: list[str] = typer.Argument(None, help="dotted key=value overrides, e.g. train.steps=100"),
    results_md: Path | None = typer.Option(None, "--results-md", help="also write the table here"),
) -> None:
    """Train and evaluate the full model and its ablations over seeds (resumable), then print the table."""
    from training.eval import ablation as A

    try:
        A.run(config, work_dir, variants or A.VARIANTS, seeds, train_clips=train_clips,
              heldout_clips=heldout_clips, jobs=jobs, overrides=overrides or [], eval_limit=eval_limit,
              log=typer.echo)
    except ValueError as e:
        _fail(str(e))
    _table(work_dir, results_md)


def _table(work_dir: Path, out: Path | None) -> None:
    from training.eval import ablation as A

    results = A.load_results(work_dir)
    if not results:
        _fail(f"{work_dir}: no */seed*/result.json (run `favor-eval ablation` first)")
    agg = A.aggregate(results)
    text = A.table(agg)
    typer.echo(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        (out.with_suffix(".json")).write_text(json.dumps({"aggregate": agg,
                                                          "direction": A.direction_agreement(agg)}, indent=2))


@app.command()
def table(
    work_dir: Path = typer.Argument(..., help="an ablation work dir"),
    out: Path | None = typer.Option(None, "--out", help="write the markdown table (and a .json beside it)"),
) -> None:
    """Aggregate finished ablation runs: mean ± std over seeds per task, beside the paper's numbers."""
    _table(work_dir, out)


if __name__ == "__main__":
    app()
