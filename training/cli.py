"""favor-train: run the fine-tuning recipe from a YAML config, or generate the synthetic world.

    favor-train --config training/configs/tiny.yaml train.steps=20 model.qformer.dropout=0.0
    favor-train --config training/configs/demo.yaml --resume
    torchrun --nproc_per_node 2 -m training --config training/configs/tiny.yaml train.distributed=ddp
    favor-train synth data/synth --num-clips 200 --seed 0
    favor-train synth-dense data/synth --split train
    favor-train pack runs/demo/final.safetensors favor/assets/demo/favor-demo.safetensors --dtype float16
    favor-train pretrain-vit --output-dir runs/demo_vit --heldout-manifest data/synth/heldout.jsonl

``train`` is the default command, so ``favor-train --config X`` and ``favor-train train --config X`` are
the same. A config YAML has two sections:

    model:  FavorConfig fields, nested (``preset`` picks the base preset, the rest override it)
    train:  TrainConfig fields (training.recipe)

``key=value`` overrides use dotted keys into those sections; values are parsed as YAML (numbers, bools,
null, lists). Relative manifest / output paths in the YAML are taken as given (from the working dir).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from typer.core import TyperGroup

from favor.cli_options import CONTEXT, VerboseOption, VersionOption
from favor.config import FavorConfig, get_config
from favor.quiet import quiet_libraries
from training.recipe import FinetuneRecipe, TrainConfig
from training.vit_pretrain import PretrainConfig

SECTIONS = ("model", "train")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 as a float (YAML 1.1 wants a dot: 1.0e-4)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class _DefaultTrain(TyperGroup):
    """Treat ``favor-train --config X ...`` as ``favor-train train --config X ...``."""

    def parse_args(self, ctx, args):
        k = 0  # the group's own options stay in front: favor-train -v --config X = -v train --config X
        while k < len(args) and args[k] in ("-v", "--verbose"):
            k += 1
        if k < len(args) and args[k] not in self.commands and args[k] not in (
                "--help", "-h", "--version", "--install-completion", "--show-completion"):
            args = [*args[:k], "train", *args[k:]]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_DefaultTrain, add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  context_settings=CONTEXT, rich_markup_mode=None,
                  help="Fine-tune FAVOR (train) or generate the synthetic audio-visual world (synth).")


@app.callback()
def main(version: VersionOption = False, verbose: VerboseOption = False) -> None:
    """Fine-tune FAVOR (train) or generate the synthetic audio-visual world (synth)."""
    quiet_libraries(verbose)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["train.lr=1e-4", "model.qformer.dropout=0"] -> {"train.lr": 1e-4, ...} (values parsed as YAML)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override must look like section.key=value, got {item!r}")
        if key.split(".")[0] not in SECTIONS:
            raise ValueError(f"override {key!r} must start with one of {SECTIONS}")
        out[key] = _yaml(value) if value else None
    return out


def load_configs(path: str | Path, overrides: list[str] | None = None) -> tuple[FavorConfig, TrainConfig]:
    """YAML (+ dotted overrides) -> (FavorConfig, TrainConfig); unknown keys are one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    try:
        raw = _yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or set(raw) - set(SECTIONS):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path}: expected top-level sections {SECTIONS}, found {found}")
    flat = _flatten({s: raw.get(s) or {} for s in SECTIONS})
    flat.update(parse_overrides(overrides or []))
    model = {k.removeprefix("model."): v for k, v in flat.items() if k.startswith("model.")}
    train = {k.removeprefix("train."): v for k, v in flat.items() if k.startswith("train.")}
    preset = model.pop("preset", None)
    if preset is None:
        raise ValueError(f"{path}: model.preset is required (one of tiny, demo, small, favor-7b, favor-13b)")
    try:
        cfg = get_config(preset, **model)
    except KeyError as e:
        raise ValueError(f"{path}: {e.args[0]} in the model section") from None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(k for k in train if k not in names)
    if unknown:
        raise ValueError(f"{path}: unknown train key(s) {unknown}")
    return cfg, TrainConfig(**train)


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="recipe YAML (training/configs/*.yaml)")],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="dotted key=value overrides, e.g. train.lr=1e-4")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the newest step_* in output_dir")]
    = False,
    resume_from: Annotated[Path | None, typer.Option("--resume-from", help="continue from this step_* dir")]
    = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="print the resolved config, exit")]
    = False,
) -> None:
    """Fine-tune FAVOR: CE + lambda * diversity, AdamW, warmup + cosine, checkpoints, evaluation."""
    try:
        cfg, tc = load_configs(config, overrides or [])
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--config") from None
    if print_config:
        typer.echo(json.dumps({"model": cfg.to_dict(), "train": dataclasses.asdict(tc)}, indent=2))
        return
    recipe = FinetuneRecipe(cfg, tc, resume=resume_from or resume or None)
    try:  # what a user gets wrong shows up here: a missing file, a stage that cannot continue another
        recipe.setup()
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    history = recipe.train()
    recipe.cleanup()  # success only (training.distributed.cleanup says why)
    if recipe.info.is_main and history:
        last = history[-1]
        typer.echo(f"step {last.step}: loss {last.loss:.4f}; checkpoint {recipe.out / 'final.safetensors'}")


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="output directory; the manifest is OUT_DIR/<split>.jsonl")],
    num_clips: Annotated[int, typer.Option("--num-clips", "-n", min=1, help="clips to generate")] = 100,
    seed: Annotated[int, typer.Option(min=0, help="base seed; clip i uses (seed, split, i)")] = 0,
    split: Annotated[str, typer.Option(help="train | heldout (disjoint seed streams)")] = "train",
    workers: Annotated[int, typer.Option("--workers", "-j", min=1, help="worker processes")] = 1,
    varied_audio: Annotated[bool, typer.Option(help="some clips at 44.1 kHz stereo (exercises resampling)")]
    = False,
    windows: Annotated[bool, typer.Option(help="long scenes cut into the runtime's windows instead "
                                               "(task stream_caption; manifest OUT_DIR/<split>_windows.jsonl)")]
    = False,
    window_seconds: Annotated[float | None, typer.Option(help="with --windows: the window the model captions, "
                                                              "frames_per_window / video_fps (default the "
                                                              "runtime's 5; the demo model's 2.5)")]
    = None,
) -> None:
    """Generate synthetic audio-visual clips and their manifest (training.synth.generate)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from training.synth.generate import generate, generate_windows

    if window_seconds is not None and not windows:
        raise typer.BadParameter("--window-seconds cuts long scenes: it needs --windows")
    make = generate
    if windows:
        make = generate_windows if window_seconds is None else functools.partial(generate_windows,
                                                                                 window_seconds=window_seconds)

    with Progress(TextColumn("[bold]clips"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task("clips", total=num_clips)
        try:
            manifest = make(out_dir, num_clips, seed, split=split, workers=workers,
                                progress=lambda done, total: bar.update(task, completed=done),
                                varied_audio=varied_audio)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    typer.echo(str(manifest))


@app.command("synth-dense")
def synth_dense(
    out_dir: Annotated[Path, typer.Argument(help="directory of a generated split (favor-train synth)")],
    split: Annotated[str, typer.Option(help="train | heldout")] = "train",
) -> None:
    """More questions on a split's clips, nothing rendered: every temporal template once and the other
    av_matching answer per clip (training.synth.dense), written to OUT_DIR/<split>_dense.jsonl."""
    from training.synth.dense import write_dense

    try:
        typer.echo(str(write_dense(out_dir, split)))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@app.command("pretrain-vit")
def pretrain_vit(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="run directory")] = Path("runs/demo_vit"),
    preset: Annotated[str, typer.Option(help="model preset whose visual encoder is pretrained")] = "demo",
    steps: Annotated[int, typer.Option(min=1, help="optimiser steps, both phases")] = PretrainConfig.steps,
    qformer_fraction: Annotated[float, typer.Option(
        min=0.0, max=0.99, help="share of the steps that train the Q-Former over the frozen ViT")]
    = PretrainConfig.qformer_fraction,
    batch_size: Annotated[int, typer.Option(min=1, help="frames per step")] = PretrainConfig.batch_size,
    frame_pool: Annotated[int, typer.Option(min=1, help="train frames rendered once and reused")]
    = PretrainConfig.frame_pool,
    lr: Annotated[float, typer.Option(min=0.0, help="peak AdamW learning rate of the encoder")] = PretrainConfig.lr,
    head_lr: Annotated[float, typer.Option(min=0.0, help="peak learning rate of the linear heads")]
    = PretrainConfig.head_lr,
    seed: Annotated[int, typer.Option(min=0, help="seed of the train-split clips drawn")] = 0,
    pulse_balance: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="pulse BCE positives weighted by (negatives / positives) ** this")]
    = PretrainConfig.pulse_balance,
    heldout_manifest: Annotated[Path | None, typer.Option(
        help="a generated heldout split (JSONL): its decoded mp4 frames are scored at the end")] = None,
    heldout_clips: Annotated[int, typer.Option(min=1, help="clips of --heldout-manifest scored")] = 40,
    train_manifest: Annotated[Path | None, typer.Option(
        help="a generated train split (JSONL): its decoded mp4 frames join the rendered pool")] = None,
    train_clips: Annotated[int, typer.Option(min=1, help="clips of --train-manifest decoded")]
    = PretrainConfig.train_clips,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the newest step_* in output_dir")]
    = False,
) -> None:
    """Pretrain the preset's visual encoder on rendered synthetic frames (training.vit_pretrain), writing
    OUTPUT_DIR/vit.safetensors for train.init_visual_from, OUTPUT_DIR/curve.json and held-out accuracy."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from training.vit_pretrain import ENCODER_FILE, VitPretrainer, describe

    try:
        pc = PretrainConfig(preset=preset, output_dir=str(output_dir), steps=steps, qformer_fraction=qformer_fraction,
                            batch_size=batch_size, frame_pool=frame_pool, lr=lr, head_lr=head_lr, seed=seed,
                            pulse_balance=pulse_balance, heldout_clips=heldout_clips, train_clips=train_clips,
                            heldout_manifest=str(heldout_manifest) if heldout_manifest else None,
                            train_manifest=str(train_manifest) if train_manifest else None)
        trainer = VitPretrainer(pc, resume=resume)
        trainer.setup()
        with Progress(TextColumn("[bold]pretrain-vit"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task("steps", total=steps, completed=trainer.step, loss=float("nan"))
            trainer.train(progress=lambda step, loss: bar.update(task, completed=step, loss=loss))
        report = trainer.finish()
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(describe(report))
    typer.echo(str(output_dir / ENCODER_FILE))


@app.command()
def pack(
    checkpoint: Annotated[Path, typer.Argument(help="a FAVOR checkpoint (e.g. RUN/final.safetensors)")],
    out: Annotated[Path, typer.Argument(help="output .safetensors or .pt")],
    dtype: Annotated[str, typer.Option(help="storage dtype of floating weights: float32 | float16 | bfloat16")]
    = "float16",
) -> None:
    """Re-save a checkpoint with its floating weights stored in a smaller dtype (loading casts back).

    The embedded demo model is packed this way: fp16 halves its size; the model computes in fp32.
    """
    import torch

    from favor.checkpoint import load_checkpoint, save_checkpoint

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise typer.BadParameter(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    try:
        ckpt = load_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    ckpt.weights = {k: v.to(dtypes[dtype]) if v.is_floating_point() else v for k, v in ckpt.weights.items()}
    ckpt.extra = {**ckpt.extra, "packed_from": checkpoint.name, "storage_dtype": dtype}
    typer.echo(str(save_checkpoint(ckpt, out)))
