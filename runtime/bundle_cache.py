"""Compiled bundles cached per checkpoint: ``favor-rt run --model CKPT`` exports once, reuses after.

    --cache-dir, $FAVOR_BUNDLE_CACHE, or $FAVOR_CACHE/bundles (default ~/.cache/favor/bundles)/
      <stem>-<key16>/                      a complete, verified bundle: manifest.json + cache.json
      <stem>-<key16>.lock                  flock'd while that entry is exported (a second exporter waits)
      .tmp-<stem>-<key16>-<pid>-<rand>/    an export in progress (bundle/ inside is renamed into place)

Key: sha256 over the checkpoint's sha256, the frame timing asked for (--fps / --window, None = the
checkpoint's), every ExportOptions field (precision, max frames, attention kind, targets, ...), the
favor-rt package version, the bundle format version and the model version. Change any and the
entry is a different directory; old entries stay until deleted (``rm -r`` the cache is always safe).

Atomicity: an entry only ever appears by ``os.rename`` of a finished temporary directory whose
manifest (every file's sha256, every graph's config hash) has been re-checked; ``cache.json``, the
completeness record, is the last file written. Renaming onto an existing entry fails, so two
exporters without the lock still cannot mix files (rename wins). A process killed mid-export leaves
only a ``.tmp-*`` directory, which is never read and is removed by the next exporter of that key.
A reader accepts an entry when cache.json names its key and every listed file has its recorded
size; anything else is removed and rebuilt.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from favor.fileio import atomic_write, sha256_file

if TYPE_CHECKING:
    from export.options import ExportOptions

CACHE_ENV = "FAVOR_CACHE"  # favor's cache root (favor/pretrained.py keeps base weights there too)
BUNDLE_CACHE_ENV = "FAVOR_BUNDLE_CACHE"  # this directory exactly (tests, a shared bundle store)
DEFAULT_ROOT = Path("~/.cache/favor")
BUNDLES = "bundles"
RECORD = "cache.json"  # written last: its presence with the right key marks an entry complete
KEY_HEX = 16  # 64 bits of the key in the directory name: collisions are not a practical concern

Say = Callable[[str, str], None]  # (step, message), as export.bundle.Progress


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """--cache-dir, else $FAVOR_BUNDLE_CACHE, else $FAVOR_CACHE/bundles, else ~/.cache/favor/bundles."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(BUNDLE_CACHE_ENV):
        return Path(os.environ[BUNDLE_CACHE_ENV]).expanduser()
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_ROOT).expanduser() / BUNDLES


@dataclass(frozen=True)
class Request:
    """What a cached bundle is exported from: a checkpoint, its timing overrides and export options."""

    checkpoint: Path
    fps: float | None = None
    frames_per_window: int | None = None
    options: ExportOptions | None = None  # None = ExportOptions() (their defaults are in the key)
    autotune: bool = True  # tune threads per stage at export (export/threads.py); not part of the key
    verbose: bool = False  # library logs during the export (favor.quiet); not part of the key

    def export_options(self) -> ExportOptions:
        from export.options import ExportOptions  # light: no exporter import on a warm start

        return self.options if self.options is not None else ExportOptions()


@dataclass(frozen=True)
class Policy:
    """How a run gets its bundle: --cache-dir, --no-cache, --no-autotune, export options, progress."""

    cache_dir: Path | None = None  # None: cache_root()'s default
    use_cache: bool = True  # False: export into a temporary directory for this run only
    autotune: bool = True
    options: ExportOptions | None = None  # None = ExportOptions()
    say: Say | None = None  # progress messages (ExportView)
    verbose: bool = False  # -v: the exporter's library logs are shown


def checkpoint_timing(checkpoint: Path) -> tuple[float | None, int | None]:
    """(video_fps, frames_per_window) from a .safetensors checkpoint's header, else (None, None)."""
    if checkpoint.suffix != ".safetensors":
        return None, None
    try:
        from safetensors import safe_open

        with safe_open(str(checkpoint), "np") as fh:
            timing = json.loads((fh.metadata() or {})["config"]).get("timing", {})
        return timing.get("video_fps"), timing.get("frames_per_window")
    except Exception:  # noqa: BLE001 - unreadable header: the export reports it; the key keeps the request
        return None, None


def key_fields(req: Request, checkpoint_sha256: str) -> dict:
    """Everything a cached bundle depends on, as JSON-able values. A timing equal to the checkpoint's
    own counts as None, so `--fps 2` on a 2-FPS model and no --fps share one entry."""
    import importlib.metadata

    from export.manifest import BUNDLE_VERSION
    from favor.checkpoint import MODEL_VERSION

    own_fps, own_frames = checkpoint_timing(req.checkpoint)
    fps = None if req.fps is None or req.fps == own_fps else float(req.fps)
    frames = None if req.frames_per_window is None or req.frames_per_window == own_frames else req.frames_per_window
    return {"checkpoint_sha256": checkpoint_sha256, "fps": fps, "frames_per_window": frames,
            "options": json.loads(json.dumps(asdict(req.export_options()), default=str)),
            "favor_rt": importlib.metadata.version("favor-rt"),
            "bundle_version": BUNDLE_VERSION, "model_version": MODEL_VERSION}


def entry_name(req: Request, fields: dict) -> str:
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return f"{req.checkpoint.stem}-{digest[:KEY_HEX]}"


def is_complete(entry: Path, fields: dict) -> bool:
    """cache.json present, naming this key, and every file it lists has its recorded size."""
    try:
        record = json.loads((entry / RECORD).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("key") != fields:
        return False
    sizes = record.get("sizes")
    if not isinstance(sizes, dict) or "manifest.json" not in sizes:
        return False
    try:
        return all((entry / name).stat().st_size == size for name, size in sizes.items())
    except OSError:
        return False


@contextlib.contextmanager
def _locked(path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    """Exclusive flock on ``path`` (created if needed); ``on_wait`` runs once if another holds it."""
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    """Remove a directory so that no reader sees it half-deleted: rename it aside first."""
    if not path.exists():
        return
    aside = path.with_name(f".trash-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def export_into(req: Request, out: Path, say: Say) -> None:
    """Load the checkpoint, export the bundle into ``out`` and tune its threads per stage.
    (Library chatter is the CLI's business: favor.quiet.quiet_libraries.)"""
    from export.bundle import export_bundle
    from favor.quiet import quiet_libraries
    from runtime.backends import load_runtime_model

    # again now that torch is imported: its logging setup resets torch.onnx's level, and the
    # exporter's "torchvision is not installed" lines would break into the progress view
    quiet_libraries(req.verbose)

    say("checkpoint", f"loading {req.checkpoint.name}")
    model = load_runtime_model(req.checkpoint, req.fps, req.frames_per_window)
    say("checkpoint", "done")
    try:
        export_bundle(model, out, req.export_options(), checkpoint=req.checkpoint, progress=say)
    except (ValueError, KeyboardInterrupt):
        raise
    except Exception as err:  # an exporter bug: one line for the run, the traceback with -v
        if req.verbose:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{req.checkpoint}: exporting its compiled bundle failed ({type(err).__name__}: "
                         f"{first}); -v shows the exporter's traceback, --backend torch runs it eagerly") from None
    del model  # the weights are not needed past this point; the bundle holds everything
    if req.autotune:
        from export.threads import tune_bundle

        say("threads", "timing each stage per thread count")
        chosen = tune_bundle(out)
        say("threads", "done: " + (", ".join(f"{k} {v}" for k, v in chosen.items()) or "out of time, defaults"))


def _verify(out: Path, say: Say) -> None:
    """Every file's sha256 and every graph's config hash against the manifest (ValueError if not)."""
    from export.manifest import load_manifest

    say("verify", "re-hashing every file against the manifest")
    load_manifest(out, check_hashes=True)
    say("verify", "done")


def _write_record(entry: Path, fields: dict) -> None:
    sizes = {str(p.relative_to(entry)): p.stat().st_size for p in sorted(entry.rglob("*")) if p.is_file()}
    text = json.dumps({"key": fields, "sizes": sizes, "created": time.time()}, indent=1)
    atomic_write(entry / RECORD, lambda tmp: Path(tmp).write_text(text))


def _sweep_stale(root: Path, name: str) -> None:
    """Temporary and half-removed directories of ``name`` left by killed processes (we hold its lock:
    none of them is live)."""
    for pattern in (f".tmp-{name}-*", f".trash-{name}-*"):
        for d in root.glob(pattern):
            shutil.rmtree(d, ignore_errors=True)


def ensure_bundle(req: Request, cache_dir: str | Path | None = None, say: Say | None = None,
                  exporter: Callable[[Request, Path, Say], None] | None = None) -> tuple[Path, bool]:
    """The cached bundle for ``req`` (exported now if absent or incomplete): (its directory, exported?).

    ``exporter(req, out, say)`` writes a bundle into ``out`` (default ``export_into``)."""
    say = say or (lambda step, msg: None)
    exporter = exporter or export_into
    if not req.checkpoint.is_file():
        raise ValueError(f"{req.checkpoint}: model checkpoint not found (expected a .safetensors or .pt file)")
    fields = key_fields(req, sha256_file(req.checkpoint))
    root = cache_root(cache_dir)
    name = entry_name(req, fields)
    entry = root / name
    if is_complete(entry, fields):
        return entry, False
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{root}: cannot create the bundle cache ({e.strerror}); "
                         "pass --cache-dir DIR or --no-cache") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ValueError(f"{root}: the bundle cache is not writable; pass --cache-dir DIR or --no-cache")
    with _locked(root / f"{name}.lock", lambda: say("cache", f"waiting for another export of {name}")):
        if is_complete(entry, fields):  # another process finished it while we waited
            return entry, False
        _sweep_stale(root, name)
        _remove(entry)  # present but incomplete or from another key: never used
        # everything the export writes (its own staging directories included) stays inside `work`
        work = root / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
        work.mkdir()
        out = work / "bundle"
        say("cache", f"exporting {req.checkpoint.name} once into {entry} (later runs reuse it)")
        try:
            exporter(req, out, say)
            _verify(out, say)
            _write_record(out, fields)
            try:
                os.rename(out, entry)
            except OSError:  # an exporter that bypassed the lock got there first: its entry wins
                if not is_complete(entry, fields):
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return entry, True


def export_uncached(req: Request, say: Say | None = None,
                    exporter: Callable[[Request, Path, Say], None] | None = None) -> Path:
    """--no-cache: export into a temporary directory removed when this process exits."""
    say = say or (lambda step, msg: None)
    out = Path(tempfile.mkdtemp(prefix="favor-bundle-"))
    atexit.register(shutil.rmtree, out, True)
    say("cache", f"--no-cache: exporting {req.checkpoint.name} into {out} for this run only")
    (exporter or export_into)(req, out / "bundle", say)
    _verify(out / "bundle", say)
    return out / "bundle"


class ExportView:
    """Our progress view of an export: one line per step with a spinner and elapsed time, on the
    given rich console (plain lines when it is not a terminal). Starts on the first message, so a
    warm cache prints nothing."""

    DONE = ("done", "built", "skipped", "wrote")

    def __init__(self, console):
        self.console = console
        self.bar = None
        self.tasks: dict[str, int] = {}

    def __call__(self, step: str, message: str) -> None:
        from rich.markup import escape
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        if not self.console.is_terminal:  # a log (CI, make demo piped): one plain line per message
            self.console.print(escape(f"favor-rt: {step}: {message}"), highlight=False)
            return
        if self.bar is None:
            self.bar = Progress(SpinnerColumn(finished_text="[green]done[/]"), TextColumn("{task.description}"),
                                TimeElapsedColumn(), console=self.console, transient=False)
            self.bar.start()
        if step not in self.tasks:
            for task in self.tasks.values():  # steps run one after another: a new one ends the last
                self.bar.update(task, completed=1)
            self.tasks[step] = self.bar.add_task("", total=1)
        self.bar.update(self.tasks[step], description=escape(f"{step}: {message}"),
                        completed=int(message.startswith(self.DONE)))

    def close(self) -> None:
        if self.bar is not None:
            for task in self.tasks.values():
                self.bar.update(task, completed=1)
            self.bar.stop()
            self.bar = None
