"""The bundle manifest: every file with its sha256, the FAVOR config, I/O, profiles and toolchain.

``manifest.json`` (format ``favor-bundle``) holds:
    format, bundle_version, model_version, config (FavorConfig.to_dict), checkpoint {path, sha256},
    precision, attention, opset, limits, dynamic_axes {axis: {min, opt, max}},
    stages {name: {files, inputs, outputs, axes, export_seconds}}, targets {...},
    toolchain {package: version}, files {relative path: sha256},
    runtime {threads {stage: n}, autotune {...}} (export/threads.py; optional, not hashed)

``load_manifest`` is what a runtime calls before touching a bundle. It refuses, with one line naming
the file, a missing or unreadable manifest, a file that is missing or whose sha256 differs, and a
graph whose embedded config hash (export/onnx.py) differs from the manifest's config.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from favor.config import FavorConfig
from favor.fileio import atomic_write, sha256_file

MANIFEST = "manifest.json"
EMBED_FILE = "embed_tokens.safetensors"  # LLM input embeddings [V, D]; read without importing the exporter
FORMAT = "favor-bundle"
BUNDLE_VERSION = 1
TOOLCHAIN = ("torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-extensions", "onnxruntime-genai",
             "transformers", "peft", "safetensors", "numpy", "tensorrt", "tensorrt-llm", "favor-rt")


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
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))  # a reader never sees half a manifest
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
    try:
        check_structure(bundle, manifest)
        cfg = FavorConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
    files = manifest["files"]
    for stage, entry in manifest["stages"].items():
        for name in entry["files"]:
            if name not in files:
                raise ValueError(f"{path}: stage {stage} file {name} is not listed with a sha256")
    check_external_data(bundle, manifest)
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


def _require(manifest: dict, key: str, kind: type) -> Any:
    if key not in manifest:
        raise ValueError(f"no {key!r} entry")
    if not isinstance(manifest[key], kind):
        raise ValueError(f"{key!r} must be a JSON {'object' if kind is dict else kind.__name__}, "
                         f"got {type(manifest[key]).__name__}")
    return manifest[key]


def check_structure(bundle: Path, manifest: dict) -> None:
    """Types, ranges and paths of a manifest's fields, before any of them is used (ValueError)."""
    from favor.config import MAX_TOKENS
    from favor.validate import check_number, inside

    version = manifest.get("bundle_version")
    check_number("bundle_version", version, 1, None, integer=True)
    if version > BUNDLE_VERSION:
        raise ValueError(f"bundle version {version} is newer than this reader ({BUNDLE_VERSION})")
    _require(manifest, "config", dict)
    for name, digest in _require(manifest, "files", dict).items():
        inside(bundle, name, "file")
        if not isinstance(digest, str):
            raise ValueError(f"file {name}: sha256 must be a string")
    for stage, entry in _require(manifest, "stages", dict).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("files"), list) or not entry["files"]:
            raise ValueError(f"stage {stage} has no 'files' list")
        for name in entry["files"]:
            inside(bundle, name, f"stage {stage} file")
    for key, value in _require(manifest, "limits", dict).items():
        if value is not None:
            check_number(f"limits.{key}", value, 1, MAX_TOKENS, integer=True)
    for axis, r in _require(manifest, "dynamic_axes", dict).items():
        if not isinstance(r, dict) or set(r) != {"min", "opt", "max"}:
            raise ValueError(f"dynamic_axes.{axis} must be an object with min, opt and max")
        for k in ("min", "opt", "max"):
            check_number(f"dynamic_axes.{axis}.{k}", r[k], 0, MAX_TOKENS, integer=True)
        if not r["min"] <= r["opt"] <= r["max"]:
            raise ValueError(f"dynamic_axes.{axis}: need min <= opt <= max, got {r['min']}/{r['opt']}/{r['max']}")


def _graph_tensors(graph) -> Iterator:
    """Every TensorProto of a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graph_tensors(g)


def check_external_data(bundle: Path, manifest: dict) -> None:
    """Each stage graph's external-data locations must resolve inside ``bundle`` (checked before ONNX
    Runtime opens the graph, which would otherwise read whatever path the graph names)."""
    import onnx

    from favor.validate import inside

    for entry in manifest["stages"].values():
        for name in entry["files"]:
            if not name.endswith(".onnx") or not (bundle / name).is_file():
                continue
            graph = bundle / name
            try:
                model = onnx.load(str(graph), load_external_data=False)
            except Exception as err:  # noqa: BLE001 - protobuf raises several kinds on a damaged file
                raise ValueError(f"{graph}: not a readable ONNX graph ({type(err).__name__})") from None
            for tensor in _graph_tensors(model.graph):
                if tensor.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                location = {e.key: e.value for e in tensor.external_data}.get("location")
                try:
                    inside(graph.parent, location, f"external data of tensor {tensor.name}")
                except ValueError as err:
                    raise ValueError(f"{graph}: {err}") from None


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
