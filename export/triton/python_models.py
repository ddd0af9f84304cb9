"""The repository's Python-backend models (imported by each model's ``1/model.py`` inside Triton's
Python backend stub; ``triton_python_backend_utils`` exists only there).

    OnnxStageModel   cpu variant: one encoder / fusion graph on ONNX Runtime (``favor.onnx_file``)
    DecoderModel     the step-wise decoder: an ``Inference`` of export/ort_inference.DECODERS per
                     sequence, its KV cache kept under the sequence's correlation id
    PipelineModel    BLS: mel + frames + prompt -> caption through the models above
                     (runtime/triton_backend.TritonStages with a BLS transport: the pipeline and
                     ``favor-rt run --backend triton`` are one code path)

Each model reads the files in its version directory (``<model>/1/``), written by
export/triton/repository.py. A failing request gets an error response naming the model and the
problem; the other requests of the batch are still answered.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np


def _pb():
    import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend stub

    return pb_utils


def _setup(args: dict) -> tuple[dict, dict[str, str], Path]:
    """(model config, its string parameters, the version directory) from the backend's ``args``."""
    config = json.loads(args["model_config"])
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    return config, params, Path(args["model_repository"]) / str(args["model_version"])


def _input(request, name: str):
    t = _pb().get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def _answer(requests, handle, model: str) -> list:
    """handle(request) -> {output name: array} for each request; an exception becomes that request's error."""
    pb = _pb()
    responses = []
    for r in requests:
        try:
            outputs = handle(r)
            responses.append(pb.InferenceResponse([pb.Tensor(n, np.ascontiguousarray(a)) for n, a in outputs.items()]))
        except Exception as err:  # noqa: BLE001 - reported to the client, the server keeps serving
            responses.append(pb.InferenceResponse(error=pb.TritonError(f"{model}: {type(err).__name__}: {err}")))
    return responses


def _threads(params: dict[str, str]) -> int | None:
    return int(params["favor.threads"]) if params.get("favor.threads") else None


def _providers(args: dict) -> list | None:
    """KIND_GPU instances: ONNX Runtime's CUDA provider on the instance's device when onnxruntime-gpu
    offers it (then CPU for nodes it lacks); KIND_CPU: the CPU provider (None)."""
    if args.get("model_instance_kind") != "GPU":
        return None
    from runtime.selection import CPU_PROVIDER, CUDA_PROVIDER, onnxruntime_providers

    if onnxruntime_providers()[0] != CUDA_PROVIDER:
        return None
    return [(CUDA_PROVIDER, {"device_id": int(args.get("model_instance_device_id", 0))}), CPU_PROVIDER]


class OnnxStageModel:
    """An encoder / fusion graph on ONNX Runtime; requests run one by one (the graph's batch axis is
    the export's ``--max-batch``, each request already carries its own batch)."""

    def initialize(self, args: dict) -> None:
        from favor.onnx_attention import ort_session

        config, params, version = _setup(args)
        self.name = config["name"]
        self.session = ort_session(version / params["favor.onnx_file"], _threads(params), _providers(args))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _run(self, request) -> dict[str, np.ndarray]:
        feed = {n: _input(request, n) for n in self.inputs}
        missing = [n for n, v in feed.items() if v is None]
        if missing:
            raise ValueError(f"missing input(s) {missing}")
        return dict(zip(self.outputs, self.session.run(self.outputs, feed), strict=True))

    def execute(self, requests) -> list:
        return _answer(requests, self._run, self.name)


class DecoderModel:
    """Prefill at START (``inputs_embeds`` [B, L, D]), one ``input_ids`` [B] per step, END releases the
    sequence's cache (that request is not decoded). Returns ``logits`` [B, V] of the last position."""

    def initialize(self, args: dict) -> None:
        import importlib

        from safetensors.numpy import load_file

        from export.manifest import EMBED_FILE
        from export.ort_inference import DECODERS, DYNAMO
        from favor.config import FavorConfig
        from favor.onnx_attention import ort_session

        config, params, version = _setup(args)
        self.name = config["name"]
        manifest = json.loads((version / "manifest.json").read_text())
        self.cfg = FavorConfig.from_dict(manifest["config"])
        module, cls = DECODERS[manifest["stages"]["decoder"].get("kind", DYNAMO)].split(":")
        session = ort_session(version / params["favor.onnx_file"], _threads(params), _providers(args))
        embedding = load_file(str(version / EMBED_FILE))["weight"]  # [V, D]
        self.inference = getattr(importlib.import_module(module), cls)(session, embedding, self.cfg)
        # the sequence batcher's candidate count bounds the caches an instance must hold
        self.capacity = int(config["sequence_batching"]["oldest"]["max_candidate_sequences"])
        self.caches: OrderedDict[int, object] = OrderedDict()

    def _step(self, request) -> dict[str, np.ndarray]:
        import torch

        start, end = int(_input(request, "START").reshape(-1)[0]), int(_input(request, "END").reshape(-1)[0])
        cid = int(_input(request, "CORRID").reshape(-1)[0])
        if end and not start:
            self.caches.pop(cid, None)
            return {"logits": np.zeros((1, self.cfg.llm.vocab_size), np.float32)}
        if start:
            embeds = _input(request, "inputs_embeds")
            if embeds is None:
                raise ValueError("a sequence starts with inputs_embeds [B, L, D] (the prompt)")
            x = torch.from_numpy(np.array(embeds, dtype=np.float32))
            logits, cache = self.inference.prefill(x, torch.ones(x.shape[:2], dtype=torch.long))
        else:
            ids = _input(request, "input_ids")
            if ids is None or cid not in self.caches:
                raise ValueError(f"sequence {cid}: " + ("no input_ids" if ids is None else
                                 "no KV cache (never started, ended, or evicted after idling)"))
            logits, cache = self.inference.decode(torch.from_numpy(np.array(ids, dtype=np.int64).reshape(-1)),
                                                  self.caches.pop(cid))
        self.caches[cid] = cache
        while len(self.caches) > self.capacity:  # the oldest idle sequence goes first
            self.caches.popitem(last=False)
        return {"logits": torch.as_tensor(logits).float().numpy()}

    def execute(self, requests) -> list:
        return _answer(requests, self._step, self.name)


class BlsTransport:
    """runtime/triton_backend.Transport over BLS: the pipeline calls its sibling models in-server."""

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str],
              sequence: tuple[int, bool, bool] | None = None) -> dict[str, np.ndarray]:
        pb = _pb()
        cid, start, end = sequence or (0, False, False)
        flags = (pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START if start else 0) | \
                (pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END if end else 0)
        request = pb.InferenceRequest(model_name=model, requested_output_names=outputs,
                                      inputs=[pb.Tensor(n, np.ascontiguousarray(a)) for n, a in inputs.items()],
                                      correlation_id=cid, flags=flags)
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return {n: pb.get_output_tensor_by_name(response, n).as_numpy() for n in outputs}


class PipelineModel:
    """One window per request: audio (mel) and frames (pixels) -> AV rows -> caption."""

    def initialize(self, args: dict) -> None:
        from runtime.triton_backend import TritonStages

        config, params, version = _setup(args)
        self.name = config["name"]
        manifest = json.loads((version / "bundle" / "manifest.json").read_text())
        self.stages = TritonStages(version / "bundle", manifest, BlsTransport(), params["favor.decoder"])

    def _window(self, request) -> dict[str, np.ndarray]:
        import torch

        prompt = _input(request, "prompt").reshape(-1)[0]
        prompt = prompt.decode() if isinstance(prompt, bytes) else str(prompt)
        mel, pixels = _input(request, "mel"), _input(request, "pixels")
        limit = _input(request, "max_new_tokens")
        if mel is None and pixels is None:
            raise ValueError("a window needs mel [1, M, Tm], pixels [1, n, 3, S, S] or both")
        s = self.stages
        s.set_instruction(prompt)
        visual = None if pixels is None else s.encode_frames(torch.from_numpy(np.array(pixels[0], np.float32)))
        audio = None if mel is None else s.encode_audio(torch.from_numpy(np.array(mel[0], np.float32)))
        av = s.fuse(visual, audio, None if pixels is None else pixels.shape[1])
        result = s.caption(prompt, av, 32 if limit is None else int(limit.reshape(-1)[0]))
        return {"text": np.array([result.text.encode()], dtype=np.object_),
                "tokens": np.array(result.tokens, dtype=np.int64)}

    def execute(self, requests) -> list:
        return _answer(requests, self._window, self.name)
