"""The bundle manifest: every file with its sha256, the FAVOR config, I/O, profiles and toolchain.

``manifest.json`` (format ``favor-bundle``) holds:
    format, bundle_version, model_version, config (FavorConfig.to_dict), checkpoint {path, sha256},
    precision, attention, opset, limits, dynamic_axes {axis: {min, opt, max}},
    stages {name: {files, inputs, outputs, axes, export_seconds}}, targets {...},
    toolchain {package: version}, files {relative path: sha256}

``load_manifest`` is what a runtime calls before touching a bundle. It refuses, with one line naming
the file, a missing or unreadable manifest, a file that is missing or whose sha256 differs, and a
graph whose embedded config hash (export/onnx.py) differs from the manifest's config.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

from favor.config import FavorConfig

MANIFEST = "manifest.json"
FORMAT = "favor-bundle"
BUNDLE_VERSION = 1
TOOLCHAIN = ("torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-extensions", "transformers",
             "peft", "safetensors", "numpy", "tensorrt", "tensorrt-llm", "favor-rt")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def toolchain_versions() -> dict[str, str | None]:
    """Installed versions of the packages an export depends on (None = not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in TOOLCHAIN:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def hash_files(bundle: Path, names: list[str]) -> dict[str, str]:
    return {n: sha256_file(bundle / n) for n in sorted(names)}


def write_manifest(bundle: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` (its ``files`` are re-hashed from disk) as ``bundle/manifest.json``."""
    bundle = Path(bundle)
    manifest = dict(manifest, format=FORMAT, bundle_version=BUNDLE_VERSION)
    manifest["files"] = hash_files(bundle, list(manifest.get("files", {})))
    path = bundle / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def add_files(bundle: str | Path, names: list[str], **fields: Any) -> dict[str, Any]:
    """Add (or re-hash) files in an existing manifest, optionally setting top-level fields."""
    bundle = Path(bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"] = {**manifest["files"], **{n: "" for n in names}}
    manifest.update(fields)
    write_manifest(bundle, manifest)
    return manifest


def load_manifest(bundle: str | Path, check_hashes: bool = True) -> dict[str, Any]:
    """Read and check ``bundle/manifest.json``; ValueError naming the first file that does not match."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: no bundle manifest (expected a directory written by favor-export)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    if int(manifest.get("bundle_version", 0)) > BUNDLE_VERSION:
        raise ValueError(f"{path}: bundle version {manifest['bundle_version']} is newer than this reader "
                         f"({BUNDLE_VERSION})")
    try:
        cfg = FavorConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: config does not parse ({err})") from None
    files = manifest.get("files", {})
    for stage, entry in manifest.get("stages", {}).items():
        for name in entry["files"]:
            if name not in files:
                raise ValueError(f"{path}: stage {stage} file {name} is not listed with a sha256")
    if check_hashes:
        for name, digest in files.items():
            f = bundle / name
            if not f.is_file():
                raise ValueError(f"{f}: listed in the manifest but missing")
            found = sha256_file(f)
            if found != digest:
                raise ValueError(f"{f}: sha256 {found[:12]}... does not match the manifest ({digest[:12]}...); "
                                 f"the file was modified or replaced")
        _check_graph_configs(bundle, manifest, cfg)
    return manifest


def _check_graph_configs(bundle: Path, manifest: dict, cfg: FavorConfig) -> None:
    import onnx

    from export.onnx import config_sha256

    expected = config_sha256(cfg)
    for entry in manifest.get("stages", {}).values():
        graph = bundle / entry["files"][0]
        props = {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}
        if props.get("favor.config_sha256") != expected:
            raise ValueError(f"{graph}: exported for a different FAVOR config than {bundle / MANIFEST} "
                             f"describes (config hash mismatch)")
