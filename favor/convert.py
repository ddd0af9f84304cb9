"""Checkpoint conversion: one explicit WEIGHT_MAP per source format (STYLE point 20).

Sources and targets (target names are the transformers modules our encoders wrap):

    CTranslate2 Whisper (model.bin)  --CT2_WHISPER_MAP-->      openai-whisper names
    openai-whisper (.pt)             --OPENAI_WHISPER_MAP-->   transformers WhisperModel names
    LAVIS InstructBLIP (.pth)        --LAVIS_INSTRUCTBLIP_MAP-> transformers InstructBlip names
                                       (vision_model.*, qformer.*, query_tokens)

A map entry's value says what happens to the source tensor:
    "name"            rename
    None              drop (a known key we do not need)
    ("a", None, "b")  split along dim 0 into equal chunks; None drops that chunk
    Chunk(t, i, n)    the tensor is chunk i of n of target t along dim 0; absent chunks are zeros

``{i}`` in a name stands for a layer index. Every converter returns ``(state_dict, report)``; source
keys that no entry matches are an error unless the caller passes ``allow_unknown=True``.

Shapes: Whisper d = d_model; CT2 fuses self-attention q,k,v into one [3d, d] matrix and decoder
cross-attention k,v into [2d, d]. EVA ViT keeps q,k,v fused as [3w, w] with separate q/v biases.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

# ---------------------------------------------------------------------------------------------
# Map machinery


@dataclass(frozen=True)
class Chunk:
    """The source tensor is chunk ``index`` of ``count`` equal chunks of ``target`` (dim 0)."""

    target: str
    index: int
    count: int


Entry = str | None | tuple[str | None, ...] | Chunk


@dataclass
class ConversionReport:
    """Which source keys a conversion used, dropped as known, or did not recognise."""

    source: str
    used: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.source}: {len(self.used)} used, {len(self.dropped)} dropped as known, "
                f"{len(self.unknown)} unknown")


# A layer index is either `layer_7` (CTranslate2) or `.7.` (PyTorch module lists).
_INDEX = re.compile(r"(?<=layer_)\d+|(?<=\.)\d+(?=\.)")


def _template(key: str) -> tuple[str, str | None]:
    """'encoder.blocks.3.attn.query.weight' -> ('encoder.blocks.{i}.attn.query.weight', '3')."""
    m = _INDEX.search(key)
    if m is None:
        return key, None
    return key[: m.start()] + "{i}" + key[m.end():], m.group()


def _lookup(key: str, weight_map: Mapping[str, Entry], drop_prefixes: Sequence[str]
            ) -> tuple[bool, Entry, str | None]:
    """(known, entry, layer index) for one source key."""
    template, index = _template(key)
    if template in weight_map:
        return True, weight_map[template], index
    if key in weight_map:  # names whose digits are not a layer index
        return True, weight_map[key], None
    if any(key.startswith(p) for p in drop_prefixes):
        return True, None, None
    return False, None, None


def _fill(template: str, index: str | None) -> str:
    return template.replace("{i}", index) if index is not None else template


def apply_map(state: Mapping[str, torch.Tensor], weight_map: Mapping[str, Entry], source: str, *,
              drop_prefixes: Sequence[str] = (), allow_unknown: bool = False
              ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Convert ``state`` with ``weight_map``; see the module docstring for the entry kinds."""
    report = ConversionReport(source)
    out: dict[str, torch.Tensor] = {}
    chunks: dict[str, dict[int, torch.Tensor]] = {}
    chunk_count: dict[str, int] = {}
    for key in sorted(state):
        tensor = state[key]
        known, entry, index = _lookup(key, weight_map, drop_prefixes)
        if not known:
            report.unknown.append(key)
            continue
        if entry is None:
            report.dropped.append(key)
            continue
        report.used.append(key)

        if isinstance(entry, str):
            out[_fill(entry, index)] = tensor
        elif isinstance(entry, tuple):
            if tensor.shape[0] % len(entry):
                raise ValueError(f"{source}: {key} dim 0 ({tensor.shape[0]}) does not split into "
                                 f"{len(entry)} equal parts")
            for target, part in zip(entry, tensor.chunk(len(entry), dim=0), strict=True):
                if target is not None:
                    out[_fill(target, index)] = part.clone()
        else:  # Chunk
            target = _fill(entry.target, index)
            chunks.setdefault(target, {})[entry.index] = tensor
            chunk_count[target] = entry.count
    for target, parts in chunks.items():
        # Absent chunks are zeros: EVA's attention has no key bias (fused as q_bias, 0, v_bias).
        ref = next(iter(parts.values()))
        pieces = [parts.get(j, torch.zeros_like(ref)) for j in range(chunk_count[target])]
        out[target] = torch.cat(pieces, dim=0)
    if report.unknown and not allow_unknown:
        shown = ", ".join(report.unknown[:5]) + (" ..." if len(report.unknown) > 5 else "")
        raise ValueError(f"{source}: {len(report.unknown)} unknown keys ({shown}); expected only names "
                         f"in its WEIGHT_MAP (pass allow_unknown=True to ignore them)")
    return out, report


# ---------------------------------------------------------------------------------------------
# CTranslate2 model.bin reader (format version 6, see reference/OFFLINE-WEIGHTS.md)

CT2_FORMAT_VERSION = 6
_CT2_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16,
               5: torch.bfloat16}


def _ct2_parts(path: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(path, (list, tuple)):
        return [Path(p) for p in path]
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / "model.bin").is_file():
        return [path / "model.bin"]
    parts = sorted(path.glob("model.bin.part*"), key=lambda p: int(p.suffix.removeprefix(".part") or 0))
    if not parts:
        raise FileNotFoundError(f"{path}: expected model.bin or model.bin.part1, part2, ... in this "
                                f"CTranslate2 directory, found neither")
    return parts


class _Cursor:
    def __init__(self, data: bytearray, origin: str) -> None:
        self.data, self.pos, self.origin = data, 0, origin

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise ValueError(f"{self.origin}: truncated CTranslate2 file (needed {n} bytes at offset "
                             f"{self.pos}, file has {len(self.data)})")
        view = memoryview(self.data)[self.pos: self.pos + n]
        self.pos += n
        return view

    def u(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:  # uint16 length including the trailing NUL, then the bytes
        return bytes(self.take(self.u("H"))).rstrip(b"\0").decode("utf-8")


def read_ctranslate2(path: str | Path | Sequence[str | Path]) -> dict[str, torch.Tensor]:
    """Every variable of a CTranslate2 ``model.bin`` (dtype kept; the caller casts).

    ``path`` is a model.bin file, a directory holding ``model.bin`` or ``model.bin.part1..N``
    (concatenated in order), or an explicit list of part files. Scalars (``encoder/num_heads``)
    come back as 0-d tensors; aliases map to the tensor they alias.
    """
    parts = _ct2_parts(path)
    for p in parts:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: CTranslate2 model file not found")
    origin = str(parts[0]) if len(parts) == 1 else f"{parts[0]} (+{len(parts) - 1} parts)"
    data = bytearray()
    for p in parts:
        data += p.read_bytes()
    cur = _Cursor(data, origin)
    version = cur.u("I")
    if version != CT2_FORMAT_VERSION:
        raise ValueError(f"{origin}: CTranslate2 format version {version}, expected {CT2_FORMAT_VERSION}")
    cur.string()  # model spec name, e.g. 'WhisperSpec'
    cur.u("I")  # spec revision
    out: dict[str, torch.Tensor] = {}
    for _ in range(cur.u("I")):
        name = cur.string()
        shape = [cur.u("I") for _ in range(cur.u("B"))]
        dtype_id = cur.u("B")
        if dtype_id not in _CT2_DTYPES:
            raise ValueError(f"{origin}: variable {name} has unknown dtype id {dtype_id}")
        nbytes = cur.u("I")
        dtype = _CT2_DTYPES[dtype_id]
        expected = dtype.itemsize * (torch.Size(shape).numel())
        if nbytes != expected:
            raise ValueError(f"{origin}: variable {name} {shape} {dtype} should take {expected} bytes, "
                             f"header says {nbytes}")
        raw = cur.take(nbytes)
        out[name] = (torch.frombuffer(raw, dtype=dtype).reshape(shape).clone() if nbytes
                     else torch.empty(shape, dtype=dtype))
    for _ in range(cur.u("I")):
        alias, target = cur.string(), cur.string()
        out[alias] = out[target]
    if cur.pos != len(data):
        raise ValueError(f"{origin}: {len(data) - cur.pos} trailing bytes after the aliases")
    return out


# ---------------------------------------------------------------------------------------------
# Whisper: CTranslate2 -> openai-whisper -> transformers

CT2_WHISPER_MAP: dict[str, Entry] = {
    "encoder/conv1/weight": "encoder.conv1.weight",
    "encoder/conv1/bias": "encoder.conv1.bias",
    "encoder/conv2/weight": "encoder.conv2.weight",
    "encoder/conv2/bias": "encoder.conv2.bias",
    "encoder/position_encodings/encodings": "encoder.positional_embedding",
    # Fused [3d, d]; the key chunk of the bias is dropped: Whisper's key has no bias (CT2 stores
    # zeros), and a key bias only shifts every score of a query equally, which softmax ignores.
    "encoder/layer_{i}/self_attention/linear_0/weight": (
        "encoder.blocks.{i}.attn.query.weight", "encoder.blocks.{i}.attn.key.weight",
        "encoder.blocks.{i}.attn.value.weight"),
    "encoder/layer_{i}/self_attention/linear_0/bias": (
        "encoder.blocks.{i}.attn.query.bias", None, "encoder.blocks.{i}.attn.value.bias"),
    "encoder/layer_{i}/self_attention/linear_1/weight": "encoder.blocks.{i}.attn.out.weight",
    "encoder/layer_{i}/self_attention/linear_1/bias": "encoder.blocks.{i}.attn.out.bias",
    "encoder/layer_{i}/self_attention/layer_norm/gamma": "encoder.blocks.{i}.attn_ln.weight",
    "encoder/layer_{i}/self_attention/layer_norm/beta": "encoder.blocks.{i}.attn_ln.bias",
    "encoder/layer_{i}/ffn/layer_norm/gamma": "encoder.blocks.{i}.mlp_ln.weight",
    "encoder/layer_{i}/ffn/layer_norm/beta": "encoder.blocks.{i}.mlp_ln.bias",
    "encoder/layer_{i}/ffn/linear_0/weight": "encoder.blocks.{i}.mlp.0.weight",
    "encoder/layer_{i}/ffn/linear_0/bias": "encoder.blocks.{i}.mlp.0.bias",
    "encoder/layer_{i}/ffn/linear_1/weight": "encoder.blocks.{i}.mlp.2.weight",
    "encoder/layer_{i}/ffn/linear_1/bias": "encoder.blocks.{i}.mlp.2.bias",
    "encoder/layer_norm/gamma": "encoder.ln_post.weight",
    "encoder/layer_norm/beta": "encoder.ln_post.bias",
    "decoder/embeddings/weight": "decoder.token_embedding.weight",
    "decoder/position_encodings/encodings": "decoder.positional_embedding",
    "decoder/layer_{i}/self_attention/linear_0/weight": (
        "decoder.blocks.{i}.attn.query.weight", "decoder.blocks.{i}.attn.key.weight",
        "decoder.blocks.{i}.attn.value.weight"),
    "decoder/layer_{i}/self_attention/linear_0/bias": (
        "decoder.blocks.{i}.attn.query.bias", None, "decoder.blocks.{i}.attn.value.bias"),
    "decoder/layer_{i}/self_attention/linear_1/weight": "decoder.blocks.{i}.attn.out.weight",
    "decoder/layer_{i}/self_attention/linear_1/bias": "decoder.blocks.{i}.attn.out.bias",
    "decoder/layer_{i}/self_attention/layer_norm/gamma": "decoder.blocks.{i}.attn_ln.weight",
    "decoder/layer_{i}/self_attention/layer_norm/beta": "decoder.blocks.{i}.attn_ln.bias",
    "decoder/layer_{i}/attention/linear_0/weight": "decoder.blocks.{i}.cross_attn.query.weight",
    "decoder/layer_{i}/attention/linear_0/bias": "decoder.blocks.{i}.cross_attn.query.bias",
    "decoder/layer_{i}/attention/linear_1/weight": (
        "decoder.blocks.{i}.cross_attn.key.weight", "decoder.blocks.{i}.cross_attn.value.weight"),
    "decoder/layer_{i}/attention/linear_1/bias": (None, "decoder.blocks.{i}.cross_attn.value.bias"),
    "decoder/layer_{i}/attention/linear_2/weight": "decoder.blocks.{i}.cross_attn.out.weight",
    "decoder/layer_{i}/attention/linear_2/bias": "decoder.blocks.{i}.cross_attn.out.bias",
    "decoder/layer_{i}/attention/layer_norm/gamma": "decoder.blocks.{i}.cross_attn_ln.weight",
    "decoder/layer_{i}/attention/layer_norm/beta": "decoder.blocks.{i}.cross_attn_ln.bias",
    "decoder/layer_{i}/ffn/layer_norm/gamma": "decoder.blocks.{i}.mlp_ln.weight",
    "decoder/layer_{i}/ffn/layer_norm/beta": "decoder.blocks.{i}.mlp_ln.bias",
    "decoder/layer_{i}/ffn/linear_0/weight": "decoder.blocks.{i}.mlp.0.weight",
    "decoder/layer_{i}/ffn/linear_0/bias": "decoder.blocks.{i}.mlp.0.bias",
    "decoder/layer_{i}/ffn/linear_1/weight": "decoder.blocks.{i}.mlp.2.weight",
    "decoder/layer_{i}/ffn/linear_1/bias": "decoder.blocks.{i}.mlp.2.bias",
    "decoder/layer_norm/gamma": "decoder.ln.weight",
    "decoder/layer_norm/beta": "decoder.ln.bias",
    # Alias of the token embedding (tied output projection).
    "decoder/projection/weight": None,
    # Scalar spec variables: head counts are read by the loader from the raw dict, the rest are
    # constants of Whisper's architecture.
    "encoder/num_heads": None,
    "decoder/num_heads": None,
    "decoder/activation": None,
    "decoder/alibi": None,
    "decoder/alignment_heads": None,
    "decoder/alignment_layer": None,
    "decoder/pre_norm": None,
    "decoder/scale_embeddings": None,
    "decoder/start_from_zero_embedding": None,
}


def ct2_whisper_to_openai(state: Mapping[str, torch.Tensor], *, allow_unknown: bool = False
                          ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    return apply_map(state, CT2_WHISPER_MAP, "CTranslate2 Whisper", allow_unknown=allow_unknown)


OPENAI_WHISPER_MAP: dict[str, Entry] = {
    "encoder.conv1.weight": "encoder.conv1.weight",
    "encoder.conv1.bias": "encoder.conv1.bias",
    "encoder.conv2.weight": "encoder.conv2.weight",
    "encoder.conv2.bias": "encoder.conv2.bias",
    "encoder.positional_embedding": "encoder.embed_positions.weight",
    "encoder.ln_post.weight": "encoder.layer_norm.weight",
    "encoder.ln_post.bias": "encoder.layer_norm.bias",
    "decoder.token_embedding.weight": "decoder.embed_tokens.weight",
    "decoder.positional_embedding": "decoder.embed_positions.weight",
    "decoder.ln.weight": "decoder.layer_norm.weight",
    "decoder.ln.bias": "decoder.layer_norm.bias",
}
for _side in ("encoder", "decoder"):
    _blk, _lyr = f"{_side}.blocks.{{i}}", f"{_side}.layers.{{i}}"
    _attn = [("attn", "self_attn")] + ([("cross_attn", "encoder_attn")] if _side == "decoder" else [])
    for _src, _dst in _attn:
        for _a, _b in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
            OPENAI_WHISPER_MAP[f"{_blk}.{_src}.{_a}.weight"] = f"{_lyr}.{_dst}.{_b}.weight"
            if _a != "key":  # Whisper's key projection has no bias
                OPENAI_WHISPER_MAP[f"{_blk}.{_src}.{_a}.bias"] = f"{_lyr}.{_dst}.{_b}.bias"
        for _p in ("weight", "bias"):
            OPENAI_WHISPER_MAP[f"{_blk}.{_src}_ln.{_p}"] = f"{_lyr}.{_dst}_layer_norm.{_p}"
    for _p in ("weight", "bias"):
        OPENAI_WHISPER_MAP[f"{_blk}.mlp_ln.{_p}"] = f"{_lyr}.final_layer_norm.{_p}"
        OPENAI_WHISPER_MAP[f"{_blk}.mlp.0.{_p}"] = f"{_lyr}.fc1.{_p}"
        OPENAI_WHISPER_MAP[f"{_blk}.mlp.2.{_p}"] = f"{_lyr}.fc2.{_p}"


def openai_whisper_to_hf(state: Mapping[str, torch.Tensor], *, allow_unknown: bool = False
                         ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """openai-whisper names -> transformers ``WhisperModel`` names (``encoder.*``, ``decoder.*``;
    ``WhisperForConditionalGeneration`` adds ``model.`` and ties ``proj_out`` to ``embed_tokens``)."""
    return apply_map(state, OPENAI_WHISPER_MAP, "openai-whisper", allow_unknown=allow_unknown)


def ct2_whisper_to_hf(state: Mapping[str, torch.Tensor], *, allow_unknown: bool = False
                      ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """CTranslate2 -> transformers, through the openai-whisper names; the report is the CT2 one."""
    openai, report = ct2_whisper_to_openai(state, allow_unknown=allow_unknown)
    hf, _ = openai_whisper_to_hf(openai)
    return hf, report


# ---------------------------------------------------------------------------------------------
# LAVIS InstructBLIP -> transformers InstructBlip

_VE, _VL = "visual_encoder.blocks.{i}", "vision_model.encoder.layers.{i}"
LAVIS_INSTRUCTBLIP_MAP: dict[str, Entry] = {
    "visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
    "visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
    "visual_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual_encoder.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
    f"{_VE}.norm1.weight": f"{_VL}.layer_norm1.weight",
    f"{_VE}.norm1.bias": f"{_VL}.layer_norm1.bias",
    f"{_VE}.norm2.weight": f"{_VL}.layer_norm2.weight",
    f"{_VE}.norm2.bias": f"{_VL}.layer_norm2.bias",
    f"{_VE}.attn.qkv.weight": f"{_VL}.self_attn.qkv.weight",
    # EVA keeps q and v biases apart and has no key bias; HF fuses them as (q_bias, 0, v_bias).
    f"{_VE}.attn.q_bias": Chunk(f"{_VL}.self_attn.qkv.bias", 0, 3),
    f"{_VE}.attn.v_bias": Chunk(f"{_VL}.self_attn.qkv.bias", 2, 3),
    f"{_VE}.attn.proj.weight": f"{_VL}.self_attn.projection.weight",
    f"{_VE}.attn.proj.bias": f"{_VL}.self_attn.projection.bias",
    f"{_VE}.mlp.fc1.weight": f"{_VL}.mlp.fc1.weight",
    f"{_VE}.mlp.fc1.bias": f"{_VL}.mlp.fc1.bias",
    f"{_VE}.mlp.fc2.weight": f"{_VL}.mlp.fc2.weight",
    f"{_VE}.mlp.fc2.bias": f"{_VL}.mlp.fc2.bias",
    "ln_vision.weight": "vision_model.post_layernorm.weight",  # LAVIS applies it after the ViT
    "ln_vision.bias": "vision_model.post_layernorm.bias",
    "query_tokens": "query_tokens",
    "Qformer.bert.embeddings.word_embeddings.weight": "qformer.embeddings.word_embeddings.weight",
    "Qformer.bert.embeddings.position_embeddings.weight": "qformer.embeddings.position_embeddings.weight",
    "Qformer.bert.embeddings.LayerNorm.weight": "qformer.embeddings.layernorm.weight",
    "Qformer.bert.embeddings.LayerNorm.bias": "qformer.embeddings.layernorm.bias",
    "Qformer.bert.embeddings.position_ids": None,  # a buffer HF rebuilds (arange)
}
_QB, _QH = "Qformer.bert.encoder.layer.{i}", "qformer.encoder.layer.{i}"
for _attn in ("attention", "crossattention"):
    for _p in ("weight", "bias"):
        for _proj in ("query", "key", "value"):
            LAVIS_INSTRUCTBLIP_MAP[f"{_QB}.{_attn}.self.{_proj}.{_p}"] = f"{_QH}.{_attn}.attention.{_proj}.{_p}"
        for _sub in ("dense", "LayerNorm"):
            LAVIS_INSTRUCTBLIP_MAP[f"{_QB}.{_attn}.output.{_sub}.{_p}"] = f"{_QH}.{_attn}.output.{_sub}.{_p}"
for _ffn in ("", "_query"):  # text-token FFN and query-token FFN
    for _p in ("weight", "bias"):
        LAVIS_INSTRUCTBLIP_MAP[f"{_QB}.intermediate{_ffn}.dense.{_p}"] = f"{_QH}.intermediate{_ffn}.dense.{_p}"
        for _sub in ("dense", "LayerNorm"):
            LAVIS_INSTRUCTBLIP_MAP[f"{_QB}.output{_ffn}.{_sub}.{_p}"] = f"{_QH}.output{_ffn}.{_sub}.{_p}"

# Whole subtrees we knowingly drop: the LLM projection, the Q-Former's LM head (deleted by the
# release), and the LLM itself when a non-trimmed checkpoint carries it.
LAVIS_DROP_PREFIXES = ("llm_proj.", "Qformer.cls.", "llm_model.")


def lavis_instructblip_to_hf(state: Mapping[str, torch.Tensor],
                             vit_state: Mapping[str, torch.Tensor] | None = None, *,
                             allow_unknown: bool = False
                             ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """LAVIS InstructBLIP ``["model"]`` dict (+ optional raw ``eva_vit_g.pth`` dict) -> HF names.

    The EVA file holds the ViT without the ``visual_encoder.`` prefix; it is added here. A key
    present in both wins from ``state`` (the InstructBLIP checkpoint is the later one).
    """
    merged = {f"visual_encoder.{k}": v for k, v in (vit_state or {}).items()}
    merged.update(state)
    return apply_map(merged, LAVIS_INSTRUCTBLIP_MAP, "LAVIS InstructBLIP",
                     drop_prefixes=LAVIS_DROP_PREFIXES, allow_unknown=allow_unknown)
