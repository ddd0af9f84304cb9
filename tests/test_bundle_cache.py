"""The bundle cache (runtime/bundle_cache.py): reused, invalidated by the checkpoint and the options,
never serving a half-written entry (killed exporter, truncated files), safe under concurrent
exporters; and (slow) the real export of the tiny checkpoint: auto runs it on ONNX Runtime with the
tuned threads, and thread counts never change results.

The fast tests inject the exporter (it writes a small valid bundle: a file plus a manifest that
hashes it) so that what is tested is the cache's own bookkeeping; the slow ones use the real one."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from export.manifest import write_manifest
from favor.config import get_config
from runtime import bundle_cache
from runtime.bundle_cache import RECORD, Request, cache_root, ensure_bundle, export_uncached

ROOT = Path(__file__).resolve().parents[1]


class Exporter:
    """Writes weights.bin + manifest.json (the cache's verify step re-hashes them); counts calls."""

    def __init__(self, delay: float = 0.0):
        self.calls = 0
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, req: Request, out: Path, say) -> None:
        with self.lock:
            self.calls += 1
        out.mkdir(parents=True)
        (out / "weights.bin").write_bytes(req.checkpoint.read_bytes()[::-1])
        time.sleep(self.delay)
        write_manifest(out, {"config": get_config("tiny").to_dict(), "stages": {}, "limits": {}, "dynamic_axes": {},
                             "files": {"weights.bin": ""}})


@pytest.fixture
def ckpt(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"weights v1" * 100)
    return p


def test_exported_once_then_reused(ckpt, tmp_path):
    ex = Exporter()
    first, exported = ensure_bundle(Request(ckpt), tmp_path / "cache", exporter=ex)
    again, exported_again = ensure_bundle(Request(ckpt), tmp_path / "cache", exporter=ex)
    assert (exported, exported_again, ex.calls) == (True, False, 1)
    assert first == again and first.parent == tmp_path / "cache" and first.name.startswith("model-")
    assert json.loads((first / RECORD).read_text())["sizes"]["weights.bin"] == 1000
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_checkpoint_or_option_changes_make_a_new_entry(ckpt, tmp_path):
    from export.bundle import ExportOptions

    ex = Exporter()
    cache = tmp_path / "cache"
    base, _ = ensure_bundle(Request(ckpt), cache, exporter=ex)
    entries = {base}
    for req in (Request(ckpt, fps=1.0), Request(ckpt, frames_per_window=5),
                Request(ckpt, options=ExportOptions(max_frames=60)),
                Request(ckpt, options=ExportOptions(fused_attention=True))):
        entry, exported = ensure_bundle(req, cache, exporter=ex)
        assert exported and entry not in entries
        entries.add(entry)
    assert ensure_bundle(Request(ckpt, autotune=False), cache, exporter=ex) == (base, False)  # not in the key
    ckpt.write_bytes(b"weights v2" * 100)  # retrained in place: same path, new sha256
    entry, exported = ensure_bundle(Request(ckpt), cache, exporter=ex)
    assert exported and entry not in entries and ex.calls == 6


def test_precision_is_part_of_the_key(ckpt, tmp_path):
    from export.bundle import PRECISIONS, ExportOptions

    names = {bundle_cache.entry_name(Request(ckpt), bundle_cache.key_fields(Request(ckpt, options=ExportOptions(
        precision=p)), "0" * 64)) for p in PRECISIONS}
    assert len(names) == len(PRECISIONS)


def test_version_bump_invalidates(ckpt, tmp_path, monkeypatch):
    import export.manifest

    ex = Exporter()
    before, _ = ensure_bundle(Request(ckpt), tmp_path, exporter=ex)
    monkeypatch.setattr(export.manifest, "BUNDLE_VERSION", export.manifest.BUNDLE_VERSION + 1)
    after, exported = ensure_bundle(Request(ckpt), tmp_path, exporter=ex)
    assert exported and after != before


KILLED_EXPORT = """
import os, signal, sys
from pathlib import Path
from runtime.bundle_cache import Request, ensure_bundle

def dies_mid_export(req, out, say):
    out.mkdir(parents=True)
    (out / "decoder.onnx").write_bytes(b"half a graph")
    os.kill(os.getpid(), signal.SIGKILL)  # power cut / OOM killer: no cleanup code runs

ensure_bundle(Request(Path(sys.argv[1])), sys.argv[2], exporter=dies_mid_export)
"""


def test_a_killed_export_is_never_used_and_is_rebuilt(ckpt, tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(ckpt), str(cache)], cwd=ROOT,
                          capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    leftovers = list(cache.glob(".tmp-model-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "bundle" / "decoder.onnx").exists()
    assert not [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]  # no entry
    ex = Exporter()
    entry, exported = ensure_bundle(Request(ckpt), cache, exporter=ex)
    assert exported and ex.calls == 1 and not (entry / "decoder.onnx").exists()
    assert not list(cache.glob(".tmp-*"))  # the dead exporter's directory is swept


@pytest.mark.parametrize("damage", ["no record", "truncated file", "record of another key", "missing file"])
def test_a_damaged_entry_is_ignored_and_rebuilt(ckpt, tmp_path, damage):
    ex = Exporter()
    entry, _ = ensure_bundle(Request(ckpt), tmp_path, exporter=ex)
    if damage == "no record":
        (entry / RECORD).unlink()
    elif damage == "truncated file":
        (entry / "weights.bin").write_bytes(b"short")
    elif damage == "record of another key":
        record = json.loads((entry / RECORD).read_text())
        record["key"]["checkpoint_sha256"] = "0" * 64
        (entry / RECORD).write_text(json.dumps(record))
    else:
        (entry / "manifest.json").unlink()
    again, exported = ensure_bundle(Request(ckpt), tmp_path, exporter=ex)
    assert again == entry and exported and ex.calls == 2
    assert (entry / "weights.bin").read_bytes() == ckpt.read_bytes()[::-1]


def test_a_failed_export_leaves_nothing(ckpt, tmp_path):
    def fails(req, out, say):
        out.mkdir(parents=True)
        (out / "x.onnx").write_bytes(b"partial")
        raise ValueError("exporter broke")

    with pytest.raises(ValueError, match="exporter broke"):
        ensure_bundle(Request(ckpt), tmp_path / "cache", exporter=fails)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_a_bundle_failing_its_manifest_check_is_not_committed(ckpt, tmp_path):
    def tampered(req, out, say):
        Exporter()(req, out, say)
        (out / "weights.bin").write_bytes(b"changed after hashing")

    with pytest.raises(ValueError, match="does not match the manifest"):
        ensure_bundle(Request(ckpt), tmp_path / "cache", exporter=tampered)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]


def test_concurrent_exporters_export_once(ckpt, tmp_path):
    ex = Exporter(delay=0.5)
    said: list[str] = []
    results: list[tuple[Path, bool]] = []

    def worker():
        results.append(ensure_bundle(Request(ckpt), tmp_path, say=lambda s, m: said.append(m), exporter=ex))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert ex.calls == 1 and len({r[0] for r in results}) == 1
    assert sorted(r[1] for r in results) == [False, False, True]
    assert any(m.startswith("waiting for another export") for m in said)


def test_rename_wins_against_an_exporter_that_bypassed_the_lock(ckpt, tmp_path):
    from export.manifest import sha256_file

    ex = Exporter()
    fields = bundle_cache.key_fields(Request(ckpt), sha256_file(ckpt))
    entry = tmp_path / bundle_cache.entry_name(Request(ckpt), fields)

    def racing(req, out, say):  # while we export, another writer commits the same entry
        Exporter()(req, entry, say)
        bundle_cache._write_record(entry, fields)
        ex(req, out, say)

    got, _ = ensure_bundle(Request(ckpt), tmp_path, exporter=racing)
    assert got == entry and bundle_cache.is_complete(entry, fields)
    assert not list(tmp_path.glob(".tmp-*"))


def test_cache_location_and_no_cache(ckpt, tmp_path, monkeypatch):
    monkeypatch.delenv("FAVOR_BUNDLE_CACHE")
    monkeypatch.setenv("FAVOR_CACHE", str(tmp_path / "env"))  # favor's cache root: bundles/ inside
    assert cache_root() == tmp_path / "env" / "bundles" and cache_root(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.setenv("FAVOR_BUNDLE_CACHE", str(tmp_path / "exact"))
    assert cache_root() == tmp_path / "exact"
    monkeypatch.delenv("FAVOR_BUNDLE_CACHE")
    monkeypatch.delenv("FAVOR_CACHE")
    assert cache_root() == Path("~/.cache/favor/bundles").expanduser()
    monkeypatch.setenv("FAVOR_BUNDLE_CACHE", str(tmp_path / "env"))
    ex = Exporter()
    out = export_uncached(Request(ckpt), exporter=ex)
    assert (out / "manifest.json").is_file() and not (tmp_path / "env").exists()


def test_missing_checkpoint_and_unwritable_cache_are_one_line_errors(ckpt, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="missing.safetensors: model checkpoint not found"):
        ensure_bundle(Request(tmp_path / "missing.safetensors"), tmp_path, exporter=Exporter())
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot create the bundle cache") as e:
        ensure_bundle(Request(ckpt), tmp_path / "file" / "cache", exporter=Exporter())
    assert "\n" not in str(e.value)
    locked = tmp_path / "read-only"
    locked.mkdir(mode=0o555)
    # as root every directory is writable: ask the permission check what an unprivileged user gets
    monkeypatch.setattr(bundle_cache.os, "access", lambda path, mode: Path(path) != locked)
    with pytest.raises(ValueError, match="read-only: the bundle cache is not writable; pass --cache-dir"):
        ensure_bundle(Request(ckpt), locked, exporter=Exporter())


def test_export_view_shows_each_step(tmp_path):
    from rich.console import Console

    console = Console(file=(tmp_path / "out.txt").open("w"), width=100, force_terminal=True)
    view = bundle_cache.ExportView(console)
    for step, msg in (("checkpoint", "loading m.safetensors"), ("checkpoint", "done"),
                      ("decoder", "exporting"), ("decoder", "done in 1.0 s")):
        view(step, msg)
    view.close()
    console.file.close()
    text = (tmp_path / "out.txt").read_text()
    assert "checkpoint: done" in text and "decoder: done in 1.0 s" in text
    log = Console(file=(tmp_path / "log.txt").open("w"), width=100, force_terminal=False)
    bundle_cache.ExportView(log)("decoder", "exporting")  # not a terminal: plain lines as they come
    log.file.close()
    assert (tmp_path / "log.txt").read_text() == "favor-rt: decoder: exporting\n"


# -- the real export (slow: torch.onnx export of every tiny stage, ~30-50 s on 2 cores) -----------

@pytest.fixture(scope="session")
def tiny_cache(tiny_ckpt, tmp_path_factory):
    cache = tmp_path_factory.mktemp("bundle-cache")
    entry, exported = ensure_bundle(Request(tiny_ckpt), cache)
    assert exported
    return cache, entry


@pytest.mark.slow
def test_auto_runs_a_checkpoint_from_its_cached_bundle(tiny_ckpt, tiny_cache, monkeypatch):
    from runtime.backends import make_backend
    from runtime.bundle_cache import Policy

    cache, entry = tiny_cache
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["checkpoint"]["path"] == str(tiny_ckpt)
    tuned = manifest["runtime"]["threads"]
    assert tuned and all(1 <= n <= manifest["runtime"]["autotune"]["cores"] for n in tuned.values())
    assert manifest["runtime"]["autotune"]["seconds"] < 3 * manifest["runtime"]["autotune"]["budget_s"]

    def no_export(*a, **k):
        raise AssertionError("a warm cache must not export again")

    monkeypatch.setattr(bundle_cache, "export_into", no_export)
    backend = make_backend("auto", tiny_ckpt, policy=Policy(cache_dir=cache), threads="decoder=1")
    assert backend.name == "onnxruntime" and backend.bundle.path == entry
    assert backend.bundle.threads == {**tuned, "decoder": 1}
    assert backend.selection.providers == ("CPUExecutionProvider",)


@pytest.mark.slow
def test_thread_counts_do_not_change_results(tiny_cache):
    import torch

    from export.ort_inference import OrtBundle

    _, entry = tiny_cache
    cfg = OrtBundle(entry, check_hashes=False).cfg
    torch.manual_seed(1)
    mel = torch.randn(1, cfg.audio.n_mels, 60)
    pixels = torch.randn(1, 2, 3, cfg.visual.image_size, cfg.visual.image_size)
    ids = torch.ones(1, 4, dtype=torch.long)
    prompt = torch.randn(1, 9, cfg.llm.hidden)
    outs = []
    for n in (1, 2):
        b = OrtBundle(entry, threads={"audio_encoder": n, "visual_encoder": n, "decoder": n}, check_hashes=False)
        logits, _ = b.inference().prefill(prompt, torch.ones(1, 9, dtype=torch.long))
        outs.append((b.encode_audio(mel), b.encode_visual(pixels, ids, ids), logits))
    for a, b in zip(*outs, strict=True):
        # ORT splits GEMMs by output blocks across threads, so each output element is reduced by one
        # thread in one order: 1 and 2 threads agree to rounding of the last bit at most.
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_cli_default_path_exports_once_then_reuses(tiny_ckpt, tmp_path):
    from typer.testing import CliRunner

    from runtime.cli import app
    from runtime.synthclip import write_clip
    from runtime.writers import parse_srt

    clip = write_clip(tmp_path / "c.mp4", 0.9)
    cache = tmp_path / "cache"

    def run(*extra):
        srt = tmp_path / f"out{len(list(tmp_path.glob('*.srt')))}.srt"
        r = CliRunner().invoke(app, ["run", str(clip), "--model", str(tiny_ckpt), "--offline", "--no-live",
                                     "--max-new-tokens", "3", "--cache-dir", str(cache), "--srt", str(srt),
                                     *extra])
        assert r.exit_code == 0, r.output
        return r.stderr, [c.text for c in parse_srt(srt)]

    first_err, first = run()
    second_err, second = run()
    torch_err, torch_caps = run("--backend", "torch")
    assert "exporting tiny.safetensors once into" in first_err and "exporting" not in second_err
    assert "| onnxruntime (CPU; threads " in second_err and "| torch |" in torch_err
    # 0.9 s at 10 FPS = 10 frame slots, 3 per window -> 4 windows; ORT captions equal torch's
    assert first == second == torch_caps and len(first) == 4


def test_the_checkpoints_own_timing_shares_the_entry_of_no_timing(tiny_ckpt):
    from export.manifest import sha256_file

    digest = sha256_file(tiny_ckpt)
    key = lambda **kw: bundle_cache.key_fields(Request(tiny_ckpt, **kw), digest)  # noqa: E731
    assert key(fps=10.0, frames_per_window=3) == key()  # tiny: 10 FPS x 3 frames
    assert key(fps=5.0) != key() and key(frames_per_window=4) != key()


def test_the_builder_decoder_carries_the_config_hash_the_cache_verifies(tmp_path, tokenizer):
    # The cache's verify step (load_manifest) checks every graph's favor.config_sha256: the GenAI
    # builder's graph must carry it too, else every default (builder) export would be refused.
    pytest.importorskip("onnxruntime_genai")
    import onnx
    import torch

    from export import genai_decoder
    from export.onnx import config_sha256
    from favor.build import build_model

    cfg = get_config("tiny").replace(**{"llm.heads": 3, "llm.kv_heads": 1})  # head_dim 16: GQA's CPU kernel
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False, tokenizer=tokenizer).eval()
    genai_decoder.export_decoder(model, tmp_path, "fp32")
    graph = onnx.load(str(tmp_path / genai_decoder.GRAPH), load_external_data=False)
    props = {p.key: p.value for p in graph.metadata_props}
    assert props["favor.config_sha256"] == config_sha256(cfg) and props["favor.stage"] == "decoder"


def test_an_exporter_crash_is_one_line_naming_the_checkpoint(ckpt, tmp_path, monkeypatch):
    import export.bundle
    import runtime.backends

    def crash(*args, **kwargs):
        raise RuntimeError("Failed to export the model with torch.export\nsix more lines")

    monkeypatch.setattr(runtime.backends, "load_runtime_model", lambda *a: object())
    monkeypatch.setattr(export.bundle, "export_bundle", crash)
    with pytest.raises(ValueError, match=r"model.safetensors: exporting its compiled bundle failed "
                                         r"\(RuntimeError: Failed to export the model with torch.export\)") as e:
        ensure_bundle(Request(ckpt, autotune=False), tmp_path / "cache")
    assert "\n" not in str(e.value) and "--backend torch" in str(e.value)
    with pytest.raises(RuntimeError):  # -v: the real traceback
        ensure_bundle(Request(ckpt, autotune=False, verbose=True), tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
