"""Triton backend: the bundle's stages served by Triton Inference Server (a repository written by
``favor-export --targets triton``, export/triton/), called per stage like every other backend.

    favor-rt run clip.mp4 --backend triton --url localhost:8001 --model BUNDLE_OR_CHECKPOINT

The client keeps what is cheap and local: the bundle's config, tokenizers, instruction and embedding
table (``BundleBackend``); the server runs the encoders, fusion and decoder. ``run(stage, feeds)`` is
one inference on ``favor_<stage>``. Captions are decoded by favor.captions (the one loop) over
``SequenceInference``: the decoder's KV cache stays in the server under a correlation id (Triton's
sequence batcher), prefill sends the prompt embeddings, each step sends one token id, and the
caption's last call releases the cache. A ``tensorrtllm`` decoder (gpu repository with a built
engine) keeps its own loop: one request with the prompt-table ids and the AV rows as
``prompt_embedding_table`` (unverified here: no GPU).

The same class runs inside the repository's BLS pipeline model with a BLS transport instead of
tritonclient (export/triton/python_models.py), so the window pipeline is written once.

A repository exported from another config is refused: every model carries ``favor.config_sha256``.

Notation: A AV rows, D LLM width, V vocabulary, L prompt ids, B batch (1 per stream).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from favor import captions
from favor.captions import CaptionResult, OnToken
from runtime.backends import BundleBackend

# Model names in the repository (export/triton/configs.py writes them).
PREFIX = "favor_"
DECODER = f"{PREFIX}decoder"
STEPWISE, TENSORRTLLM = "stepwise", "tensorrtllm"
# Seconds a client waits for the server (connect + one inference); a window takes well under this.
CLIENT_TIMEOUT_S = 60.0


class Transport(Protocol):
    """One inference on a served model: named NumPy inputs -> the requested outputs.

    ``sequence`` = (correlation id, start, end) for the sequence-batched decoder, else None."""

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str],
              sequence: tuple[int, bool, bool] | None = None) -> dict[str, np.ndarray]: ...


def new_correlation_id() -> int:
    """A fresh non-zero 63-bit id (0 means "no sequence" to Triton); collisions between concurrent
    clients are as likely as guessing 63 random bits."""
    return secrets.randbits(63) | 1


class SequenceInference:
    """favor.captions.Inference over the served step-wise decoder; the cache is a correlation id."""

    def __init__(self, transport: Transport, eos_token_id: int):
        self.transport, self.eos = transport, eos_token_id
        self.open: list[int] = []

    def _call(self, feeds: dict[str, np.ndarray], cid: int, start: bool, end: bool) -> torch.Tensor:
        out = self.transport.infer(DECODER, feeds, ["logits"], (cid, start, end))
        return torch.from_numpy(np.array(out["logits"], dtype=np.float32))  # [B, V]

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        """embeds [B, L, D] (no padding: one stream's prompt) -> logits [B, V]; opens a sequence."""
        if not bool(torch.as_tensor(attention_mask).bool().all()):
            raise ValueError("the Triton decoder takes unpadded prompts (one stream per sequence)")
        cid = new_correlation_id()
        self.open.append(cid)
        feeds = {"inputs_embeds": np.ascontiguousarray(embeds.detach().float().cpu().numpy())}
        return self._call(feeds, cid, True, False), cid

    def decode(self, ids: torch.Tensor, cache: int) -> tuple[torch.Tensor, int]:
        """ids [B] -> logits [B, V]; the server appends to the sequence's KV cache."""
        return self._call({"input_ids": ids.long().cpu().numpy()[:, None]}, cache, False, False), cache

    def reorder(self, cache: int, rows: torch.Tensor) -> int:
        raise ValueError("beam search is not served: the Triton decoder keeps one KV cache per sequence "
                         "(greedy or sampling only)")

    def release(self) -> None:
        """END every sequence this caption opened (the server drops their KV caches)."""
        while self.open:
            cid = self.open.pop()
            self._call({"input_ids": np.full((1, 1), self.eos, np.int64)}, cid, False, True)


class TritonStages(BundleBackend):
    """A bundle's stages on Triton models through ``transport``; ``decoder`` = stepwise | tensorrtllm."""

    name = "triton"

    def __init__(self, bundle: str | Path, manifest: dict, transport: Transport, decoder: str = STEPWISE):
        super().__init__(bundle, manifest)
        if decoder not in (STEPWISE, TENSORRTLLM):
            raise ValueError(f"decoder kind {decoder!r} must be {STEPWISE} or {TENSORRTLLM}")
        self.transport, self.decoder = transport, decoder
        self._open: SequenceInference | None = None

    def run(self, stage: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The graph's own dtypes (the manifest's), as the ONNX session would take them.
        wanted = {t["name"]: t["dtype"] for t in self.manifest["stages"][stage]["inputs"]}
        arrays = {}
        for k, v in feeds.items():
            a = v.detach().cpu().numpy()
            a = a.astype(wanted[k]) if k in wanted else a
            # a per-sample scalar [B] is declared dims [1] + reshape [] (export/triton/configs.py): send [B, 1]
            arrays[k] = np.ascontiguousarray(a.reshape(-1, 1) if a.ndim == 1 else a)
        outputs = [t["name"] for t in self.manifest["stages"][stage]["outputs"]]
        out = self.transport.infer(PREFIX + stage, arrays, outputs)
        return {k: torch.from_numpy(np.array(v)) for k, v in out.items()}

    def inference(self) -> SequenceInference:
        self._open = SequenceInference(self.transport, self.cfg.llm.eos_token_id)
        return self._open

    def caption(self, prompt: str, av: torch.Tensor, max_new_tokens: int,
                on_token: OnToken | None = None) -> CaptionResult:
        if self.decoder == TENSORRTLLM:
            return self._caption_trtllm(prompt, av, max_new_tokens, on_token)
        try:
            return super().caption(prompt, av, max_new_tokens, on_token)
        finally:
            if self._open is not None:
                self._open.release()

    def _caption_trtllm(self, prompt: str, av: torch.Tensor, max_new_tokens: int,
                        on_token: OnToken | None) -> CaptionResult:
        """One request to the tensorrt_llm model: ids [1, L] int32 (AV rows as vocab + row), the rows as
        ``prompt_embedding_table`` [1, A, D] fp16 (unverified here: no GPU)."""
        import time

        from runtime.trt_backend import decoder_request, generated_tokens

        req = decoder_request(self.tokenizer, self.cfg, prompt, torch.as_tensor(av).float())
        eos, L, A = self.cfg.llm.eos_token_id, int(req.ids.shape[0]), int(req.table.shape[0])
        scalar = lambda v: np.full((1, 1), v, np.int32)  # noqa: E731
        feeds = {"input_ids": req.ids.numpy()[None].astype(np.int32), "input_lengths": scalar(L),
                 "request_output_len": scalar(max_new_tokens), "end_id": scalar(eos), "pad_id": scalar(eos),
                 "runtime_top_k": scalar(1), "prompt_vocab_size": scalar(A),
                 "prompt_embedding_table": req.table.numpy()[None].astype(np.float16)}
        t0 = time.perf_counter()
        out = self.transport.infer(DECODER, feeds, ["output_ids", "sequence_length"])
        seconds = time.perf_counter() - t0
        # exclude_input_in_output: output_ids [1, beams, n] holds the answer alone
        tokens = generated_tokens(torch.as_tensor(out["output_ids"][0, 0]), 0, int(out["sequence_length"][0, 0]), eos)
        for t in tokens if on_token is not None else ():
            on_token(0, t)
        result = captions.decode_text([CaptionResult(tokens, prompt_tokens=L)], self.tokenizer)[0]
        result.decode_s = seconds  # one request: prefill and decode are not separable here
        return result


# -- tritonclient transport ----------------------------------------------------------------------
def _client_module(url: str):
    """(tritonclient module, address): grpc:// -> tritonclient.grpc, else HTTP."""
    try:
        if url.startswith("grpc://"):
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError:
        raise ValueError("backend 'triton' needs tritonclient: pip install 'favor-rt[triton]'") from None
    address = url.split("://", 1)[1] if "://" in url else url
    return module, address


class ClientTransport:
    """tritonclient over HTTP (``http://host:8000`` or ``host:8000``) or gRPC (``grpc://host:8001``)."""

    def __init__(self, url: str, timeout: float = CLIENT_TIMEOUT_S):
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        self.module, self.address = _client_module(url)
        self.url, self.error, self.dtype = url, InferenceServerException, np_to_triton_dtype
        self.opts = ({"network_timeout": timeout, "connection_timeout": timeout}
                     if self.module.__name__.endswith("http") else {})
        # tritonclient's HTTP client runs on gevent greenlets bound to the thread that made it ("Cannot
        # switch to a different thread" from another): each thread that infers (the hub's worker, a
        # stream's own) gets its own client.
        self.local = threading.local()
        try:
            ready = self.client.is_server_ready()
        except Exception as err:  # noqa: BLE001 - connection errors come as several types
            raise ValueError(f"{url}: no Triton server answers ({type(err).__name__}: {err})") from None
        if not ready:
            raise ValueError(f"{url}: the Triton server is not ready (models still loading, or failed)")

    @property
    def client(self):
        """This thread's InferenceServerClient (made on first use)."""
        if getattr(self.local, "client", None) is None:
            self.local.client = self.module.InferenceServerClient(self.address, **self.opts)
        return self.local.client

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str],
              sequence: tuple[int, bool, bool] | None = None) -> dict[str, np.ndarray]:
        tensors = []
        for name, array in inputs.items():
            t = self.module.InferInput(name, list(array.shape), self.dtype(array.dtype))
            t.set_data_from_numpy(array)
            tensors.append(t)
        requested = [self.module.InferRequestedOutput(n) for n in outputs]
        cid, start, end = sequence or (0, False, False)
        try:
            result = self.client.infer(model, tensors, outputs=requested, sequence_id=cid,
                                       sequence_start=start, sequence_end=end)
        except self.error as err:
            raise ValueError(f"{self.url}: model {model}: {err.message()}") from None
        return {n: result.as_numpy(n) for n in outputs}

    def model_parameters(self, model: str) -> dict[str, str]:
        """The model config's ``parameters`` (favor.config_sha256, favor.decoder, ...)."""
        try:
            config = self.client.get_model_config(model)
        except self.error as err:
            raise ValueError(f"{self.url}: model {model}: {err.message()} (is this a favor-export "
                             "--targets triton repository?)") from None
        config = config.get("config", config) if isinstance(config, dict) else _as_dict(config.config)
        return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def _as_dict(message) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


def open_triton(model_path: str | Path, url: str | None, fps: float | None = None,
                frames_per_window: int | None = None, policy=None,
                transport_factory: Callable[[str], Transport] = ClientTransport) -> TritonStages:
    """``--backend triton``: the local bundle (a checkpoint is compiled through the bundle cache) for
    config and tokenizers, the server at ``url`` for every stage; the two must share a config."""
    from export.manifest import load_manifest
    from export.onnx import config_sha256
    from favor.config import FavorConfig
    from runtime import backends as b

    if not url:
        raise ValueError("backend 'triton' needs --url (the Triton server, e.g. localhost:8000 or "
                         "grpc://localhost:8001)")
    path = Path(model_path)
    if b.is_bundle(path):
        bundle, check = path, True
    else:
        from runtime.bundle_cache import Policy
        from runtime.selection import _bundle_for

        bundle, _ = _bundle_for(path, fps, frames_per_window, policy or Policy())
        check = False  # a cache entry was hashed when written (runtime/bundle_cache.py)
    manifest = load_manifest(bundle, check_hashes=check)
    transport = transport_factory(url)
    params = transport.model_parameters(DECODER) if hasattr(transport, "model_parameters") else {}
    want = config_sha256(FavorConfig.from_dict(manifest["config"]))
    if params and params.get("favor.config_sha256") != want:
        raise ValueError(f"{url}: the served repository was exported from another model config than {bundle} "
                         "(favor.config_sha256 differs); export the repository from this bundle")
    backend = TritonStages(bundle, manifest, transport, params.get("favor.decoder", STEPWISE))
    backend.url = url
    return b._check_bundle_timing(backend, bundle, fps, frames_per_window)
