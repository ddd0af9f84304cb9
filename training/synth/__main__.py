"""``python -m training.synth --out DIR --num-clips N --seed S [--split train|heldout] [--workers 2]``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .generate import GENERATE_SPLITS, generate, generate_windows
from .scene import SceneOptions
from .windows import LONG_SECONDS

app = typer.Typer(add_completion=False, help="Generate the synthetic audio-visual world (mp4 + JSONL manifest).")
_DEFAULTS = SceneOptions()


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="output directory; the manifest is OUT/<split>.jsonl")],
    num_clips: Annotated[int, typer.Option(min=1, help="clips to generate (7 samples each)")],
    seed: Annotated[int, typer.Option(min=0, help="base seed; clip i uses (seed, split, i)")] = 0,
    split: Annotated[str, typer.Option(help=f"one of {', '.join(GENERATE_SPLITS)} (disjoint seed spaces)")]
    = "train",
    workers: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
    varied_audio: Annotated[bool, typer.Option(help="write about a third of clips at 44.1 kHz stereo")] = False,
    size: Annotated[int, typer.Option(help="frame width and height, px (even)")] = _DEFAULTS.width,
    min_seconds: Annotated[float | None, typer.Option(
        help=f"shortest clip, s [default: {_DEFAULTS.min_seconds:g}; {LONG_SECONDS[0]:g} with --windows]")] = None,
    max_seconds: Annotated[float | None, typer.Option(
        help=f"longest clip, s [default: {_DEFAULTS.max_seconds:g}; {LONG_SECONDS[1]:g} with --windows]")] = None,
    speech_cache: Annotated[Path | None, typer.Option(
        help="espeak-ng phrase cache (default ~/.cache/favor-rt/speech)")] = None,
    windows: Annotated[bool, typer.Option(help="long scenes cut into the runtime's windows instead (task "
                                               "stream_caption)")]
    = False,
) -> None:
    console = Console(stderr=True)
    start = time.perf_counter()
    with Progress(TextColumn("[bold]clips"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("clips", total=num_clips)
        try:
            lengths = {k: v for k, v in (("min_seconds", min_seconds), ("max_seconds", max_seconds)) if v is not None}
            manifest = (generate_windows if windows else generate)(
                out, num_clips, seed, split=split, workers=workers, speech_cache=speech_cache,
                progress=lambda done, total: bar.update(task, completed=done),
                width=size, height=size, varied_audio=varied_audio, **lengths)
        except ValueError as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
    elapsed = time.perf_counter() - start
    console.print(f"wrote {manifest} : {num_clips} clips in {elapsed:.1f} s "
                  f"({num_clips / elapsed * 60:.0f} clips/min, {workers} workers)")


if __name__ == "__main__":
    app()
