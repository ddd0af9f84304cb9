"""Triton model repository (export/triton/) and the triton backend (runtime/triton_backend.py).

Configs are parsed back with protobuf's own text parser into Triton's ModelConfig message (strict:
an unknown field or a wrong type fails) and checked against the ONNX graphs. The CPU repository is
served by a real ``tritonserver`` (the nvidia-pytriton wheel's, started and stopped by the module's
fixture, bounded in time) and its captions compared with the ONNX Runtime bundle's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.triton import configs
from export.triton.repository import CONFIG, MARKER, write_repository
from runtime.scheduler import DeadlineScheduler
from runtime.sources import MediaSource
from runtime.stream import StreamingCaptioner

PROMPT = "describe the video"
STAGE_MODELS = {f"favor_{s}": s for s in configs.ENCODER_STAGES}
ALL_MODELS = sorted([*STAGE_MODELS, configs.DECODER, configs.PIPELINE])
pytestmark = pytest.mark.slow  # the module's bundle export (~30 s) and server start (~30 s)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as tests/test_runtime_stream.py: tiny graphs, steady times on a shared machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundle(tiny_ckpt, tmp_path_factory):
    from export.bundle import export_bundle
    from runtime.backends import load_runtime_model

    out = tmp_path_factory.mktemp("triton") / "bundle"
    export_bundle(load_runtime_model(tiny_ckpt), out)
    return out


def parse_config(path: Path):
    """config.pbtxt -> tritonclient's ModelConfig protobuf (the server's own schema)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def graph_io(path: Path) -> dict[str, list]:
    """name -> shape of every graph input / output (ints or symbolic names)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in [*g.input, *g.output]}


def _trt_dims(graph_shape: list) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in graph_shape[1:]] or [1]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_repository_configs_parse_and_match_the_graphs(bundle, tmp_path, variant):
    from google.protobuf.json_format import MessageToDict

    record = write_repository(bundle, tmp_path / "repo", variant)
    repo = tmp_path / "repo"
    assert record["models"] == ALL_MODELS
    assert json.loads((repo / MARKER).read_text())["variant"] == variant
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name, stage in STAGE_MODELS.items():
        cfg = parse_config(repo / name / CONFIG)
        assert cfg.name == name and cfg.max_batch_size == manifest["limits"]["max_batch"]
        assert cfg.backend == ("python" if variant == "cpu" else "onnxruntime")
        assert cfg.HasField("dynamic_batching") and cfg.instance_group[0].count >= 1
        graph = repo / name / "1" / f"{stage}.onnx"
        assert graph.is_file() and (repo / name / "1" / f"{stage}.onnx.data").is_file()
        assert os.path.samefile(graph, bundle / f"{stage}.onnx")  # hard-linked, not copied
        io = graph_io(graph)
        for t in [*cfg.input, *cfg.output]:
            assert list(t.dims) == _trt_dims(io[t.name]), (name, t.name)
        assert sorted(t.name for t in [*cfg.input, *cfg.output]) == sorted(io)
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        assert params["favor.stage"] == stage and len(params["favor.config_sha256"]) == 64
        if variant == "gpu":
            assert cfg.default_model_filename == f"{stage}.onnx" and not (repo / name / "1" / "model.py").exists()
        else:
            assert "OnnxStageModel" in (repo / name / "1" / "model.py").read_text()
    dec = parse_config(repo / configs.DECODER / CONFIG)
    llm = manifest["config"]["llm"]
    assert dec.backend == "python" and list(dec.output[0].dims) == [llm["vocab_size"]]
    assert list(dec.input[0].dims) == [-1, llm["hidden"]]
    controls = MessageToDict(dec.sequence_batching)["controlInput"]
    assert [c["name"] for c in controls] == ["START", "END", "CORRID"]
    pipe = parse_config(repo / configs.PIPELINE / CONFIG)
    assert [t.name for t in pipe.input] == ["mel", "pixels", "prompt", "max_new_tokens"]
    assert (repo / configs.PIPELINE / "1" / "bundle" / "tokenizer" / "tokenizer.json").is_file()


def _bundle_copy(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest, copy_function=os.link)
    return dest


def test_gpu_repository_takes_engines_and_the_trtllm_decoder(bundle, tmp_path):
    """With built TensorRT engines and a TensorRT-LLM engine the gpu variant serves them natively: the
    tensorrt backend per stage and tensorrtllm with the prompt table (configs only: no GPU here)."""
    b = _bundle_copy(bundle, tmp_path / "b")
    for stage in configs.ENCODER_STAGES:
        (b / "tensorrt").mkdir(exist_ok=True)
        (b / "tensorrt" / f"{stage}.plan").write_bytes(b"engine bytes")
    engine = b / "trtllm" / "engine"
    engine.mkdir(parents=True)
    build = {"max_batch_size": 3, "max_input_len": 200, "max_seq_len": 256, "max_prompt_embedding_table_size": 30}
    (engine / "config.json").write_text(json.dumps({"build_config": build}))
    record = write_repository(b, tmp_path / "repo", "gpu")
    repo = tmp_path / "repo"
    assert record["decoder"] == "tensorrtllm"
    for name in STAGE_MODELS:
        cfg = parse_config(repo / name / CONFIG)
        assert (cfg.backend, cfg.platform, cfg.default_model_filename) == ("tensorrt", "tensorrt_plan", "model.plan")
        assert (repo / name / "1" / "model.plan").read_bytes() == b"engine bytes"
    dec = parse_config(repo / configs.DECODER / CONFIG)
    assert dec.backend == "tensorrtllm" and dec.max_batch_size == 3
    names = {t.name: t for t in dec.input}
    assert {"input_ids", "prompt_embedding_table", "prompt_vocab_size", "request_output_len"} <= set(names)
    assert names["prompt_embedding_table"].optional
    params = {k: v.string_value for k, v in dec.parameters.items()}
    assert Path(params["gpt_model_path"]) == (repo / configs.DECODER / "1" / "engine").resolve()
    assert (Path(params["gpt_model_path"]) / "config.json").is_file()
    assert params["favor.max_prompt_table_rows"] == "30"
    pipe = {k: v.string_value for k, v in parse_config(repo / configs.PIPELINE / CONFIG).parameters.items()}
    assert pipe["favor.decoder"] == "tensorrtllm"


def test_repository_errors_and_atomic_replacement(bundle, tmp_path):
    repo = tmp_path / "repo"
    with pytest.raises(ValueError, match="variant"):
        write_repository(bundle, repo, "tpu")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a FAVOR Triton repository"):
        write_repository(bundle, other, "cpu")
    assert (other / "keep.txt").read_text() == "x"
    write_repository(bundle, repo, "cpu")
    fused = _bundle_copy(bundle, tmp_path / "fused")
    m = json.loads((fused / "manifest.json").read_text())
    (fused / "manifest.json").unlink()  # a hard link: write a new file, not through the link
    (fused / "manifest.json").write_text(json.dumps(dict(m, attention="fused")))
    with pytest.raises(ValueError, match="BlockCausalAttention"):
        write_repository(fused, repo, "gpu")
    # the failed write left the earlier repository whole and no staging directory behind
    assert json.loads((repo / MARKER).read_text())["variant"] == "cpu"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    write_repository(bundle, repo, "gpu")  # replaces it
    assert parse_config(repo / "favor_fusion" / CONFIG).backend == "onnxruntime"


def test_favor_export_triton_target(bundle, tmp_path):
    from typer.testing import CliRunner

    from export.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["--out", str(bundle), "--targets", "triton", "--triton-variant", "cpu",
                              "--triton-repo", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted([MARKER, *ALL_MODELS])
    bad = runner.invoke(app, ["--out", str(tmp_path / "none"), "--targets", "triton"])
    assert bad.exit_code == 2 and "no bundle manifest" in bad.output


class _Params:
    """A transport whose server reports ``sha`` as its repository's config hash."""

    def __init__(self, sha):
        self.sha = sha

    def model_parameters(self, model):
        return {"favor.config_sha256": self.sha, "favor.decoder": "stepwise"}


def test_open_triton_checks_url_and_config(bundle):
    from runtime.triton_backend import open_triton

    with pytest.raises(ValueError, match="needs --url"):
        open_triton(bundle, None)
    with pytest.raises(ValueError, match="another model config"):
        open_triton(bundle, "localhost:1", transport_factory=lambda url: _Params("0" * 64))
    with pytest.raises(ValueError, match="no Triton server answers"):
        open_triton(bundle, "localhost:1")  # nothing listens on port 1


class _FakeTrtllm:
    """Stands in for the tensorrt_llm model: records the request, answers with fixed ids."""

    def __init__(self, answer: list[int]):
        self.answer, self.requests = answer, []

    def infer(self, model, inputs, outputs, sequence=None):
        self.requests.append((model, inputs, sequence))
        ids = np.array(self.answer, np.int32)[None, None]  # [1, beams, n]: exclude_input_in_output
        return {"output_ids": ids, "sequence_length": np.array([[ids.shape[-1]]], np.int32)}


def test_tensorrtllm_decoder_request(bundle):
    """The tensorrtllm decoder path's request: prompt-table ids (AV rows as vocab + row), the rows as an
    fp16 table, greedy, the answer cut at EOS (the engine itself is unverified here: no GPU)."""
    from runtime.triton_backend import DECODER, TENSORRTLLM, TritonStages

    manifest = json.loads((bundle / "manifest.json").read_text())
    llm = manifest["config"]["llm"]
    fake = _FakeTrtllm([17, 23, llm["eos_token_id"], 40])
    stages = TritonStages(bundle, manifest, fake, TENSORRTLLM)
    av = torch.randn(6, llm["hidden"])
    result = stages.caption(PROMPT, av, max_new_tokens=9)
    assert result.tokens == [17, 23]
    (model, feeds, sequence), = fake.requests
    assert model == DECODER and sequence is None
    ids = feeds["input_ids"][0]
    assert feeds["input_ids"].dtype == np.int32 and int(feeds["input_lengths"][0, 0]) == len(ids)
    assert sorted(ids[ids >= llm["vocab_size"]] - llm["vocab_size"]) == list(range(6))
    table = feeds["prompt_embedding_table"]
    assert table.dtype == np.float16 and table.shape == (1, 6, llm["hidden"])
    torch.testing.assert_close(torch.from_numpy(table[0].astype(np.float32)), av, rtol=1e-3, atol=1e-3)  # fp16
    assert int(feeds["prompt_vocab_size"][0, 0]) == 6 and int(feeds["runtime_top_k"][0, 0]) == 1
    assert int(feeds["request_output_len"][0, 0]) == 9


# -- a real tritonserver on the cpu repository -------------------------------------------------------
@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    from export.triton.server import TritonServer, distribution

    try:
        distribution()
    except ValueError as err:
        pytest.skip(reason=f"nvidia-pytriton's tritonserver binary is not installed (make test installs it): {err}")
    repo = tmp_path_factory.mktemp("served") / "repo"
    write_repository(bundle, repo, "cpu")
    with TritonServer(repo, ready_timeout=240) as s:  # five Python models, each stub imports torch
        yield s


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from runtime.synthclip import write_clip

    return write_clip(tmp_path_factory.mktemp("media") / "clip.mp4", 2.0, fps=25.0, sample_rate=22_050, channels=2)


def _captions(backend, clip, context: int = 1):
    out = []
    report = StreamingCaptioner(backend, PROMPT, max_new_tokens=6, context=context).run(
        MediaSource(str(clip), backend.cfg.timing.sample_rate), False, DeadlineScheduler(None), out.append)
    assert report.error is None
    return out


def test_served_repository_captions_like_the_ort_bundle(server, bundle, clip):
    from runtime.backends import OnnxRuntimeBackend, make_backend

    triton = make_backend("triton", bundle, url=server.http_url)
    assert triton.name == "triton" and triton.decoder == "stepwise"
    served, local = _captions(triton, clip), _captions(OnnxRuntimeBackend(bundle), clip)
    assert len(served) == len(local) >= 2
    assert [c.text for c in served] == [c.text for c in local]
    for a, b in zip(served, local, strict=True):
        # The same graphs on the same ONNX Runtime build, in another process with its own thread pool:
        # reductions may split differently, float32 rounding (~1e-7 relative) is all that can differ.
        torch.testing.assert_close(a.embeds, b.embeds, rtol=1e-5, atol=1e-6)


def test_stream_hub_over_triton(server, bundle, clip, tmp_path):
    """favor-rt serve's engine (the StreamHub) over the Triton backend: two offline streams batched
    through the served encoders, each with the captions a single in-process ONNX Runtime stream gives."""
    from runtime.backends import OnnxRuntimeBackend, make_backend
    from runtime.hub import StreamHub
    from runtime.synthclip import write_clip

    clips = [clip, write_clip(tmp_path / "other.mp4", 1.4, fps=25.0, seed=5)]
    expected = [[c.text for c in _captions(OnnxRuntimeBackend(bundle), c, context=0)] for c in clips]
    with StreamHub(make_backend("triton", bundle, url=server.http_url), max_new_tokens=6, prompt=PROMPT,
                   context=0) as hub:
        sids = [hub.add(str(c), realtime=False) for c in clips]
        got = []
        for sid in sids:
            sub, events = hub.subscribe(sid), []
            while not events or events[-1]["type"] != "end":
                events.append(sub.get(timeout=40))
                assert events[-1] is not None, f"stream {sid}: no event within 40 s"
            assert events[-1]["reason"] == "eof", events[-1]
            got.append([e["text"] for e in events if e["type"] == "caption"])
    assert got == expected


def test_favor_rt_run_backend_triton(server, bundle, clip, tmp_path):
    """``favor-rt run --backend triton --url``: the same captions as the served backend object gives."""
    from typer.testing import CliRunner

    from runtime.backends import make_backend
    from runtime.cli import app

    out = tmp_path / "c.jsonl"
    args = ["run", str(clip), "--model", str(bundle), "--backend", "triton", "--url", server.http_url,
            "--offline", "--no-live", "--max-new-tokens", "6", "--context", "0", "--prompt", PROMPT,
            "--jsonl", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    cap = StreamingCaptioner(make_backend("triton", bundle, url=server.http_url), PROMPT, max_new_tokens=6,
                             context=0)
    expected = []
    cap.run(MediaSource(str(clip), cap.cfg.timing.sample_rate), False, DeadlineScheduler(None), expected.append)
    assert texts == [c.text for c in expected]
    wrong = CliRunner().invoke(app, ["run", str(clip), "--model", str(bundle), "--url", server.http_url])
    assert wrong.exit_code == 2 and "--url is the Triton server of --backend triton" in wrong.output


def test_pipeline_model_and_sequence_release(server, bundle):
    """The BLS pipeline gives the caption the client-side stage calls give; an ended sequence's KV
    cache is gone; beam search is refused; gRPC answers like HTTP."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from runtime.backends import make_backend
    from runtime.triton_backend import DECODER, ClientTransport, SequenceInference

    g = torch.Generator().manual_seed(3)
    pixels, mel = torch.rand(3, 3, 28, 28, generator=g), torch.randn(16, 30, generator=g)
    backend = make_backend("triton", bundle, url=server.grpc_url)
    backend.set_instruction(PROMPT)
    av = backend.fuse(backend.encode_frames(pixels), backend.encode_audio(mel), 3)
    expected = backend.caption(PROMPT, av, 6)
    client = http.InferenceServerClient(server.http_url)
    inputs = []
    for name, array, dtype in (("mel", mel[None].numpy(), "FP32"), ("pixels", pixels[None].numpy(), "FP32"),
                               ("prompt", np.array([PROMPT.encode()], dtype=np.object_), "BYTES"),
                               ("max_new_tokens", np.array([6], np.int32), "INT32")):
        t = http.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        inputs.append(t)
    result = client.infer(configs.PIPELINE, inputs)
    assert result.as_numpy("text")[0].decode() == expected.text
    assert result.as_numpy("tokens").tolist() == expected.tokens
    audio_only = backend.caption(PROMPT, backend.fuse(None, backend.encode_audio(mel), None), 6)
    result = client.infer(configs.PIPELINE, [inputs[0], *inputs[2:]])  # no pixels: a sound-only window
    assert result.as_numpy("tokens").tolist() == audio_only.tokens
    with pytest.raises(InferenceServerException, match="a window needs mel"):
        client.infer(configs.PIPELINE, inputs[2:])
    transport = ClientTransport(server.http_url)
    seq = SequenceInference(transport, eos_token_id=2)
    logits, cid = seq.prefill(torch.randn(1, 5, 48), torch.ones(1, 5))
    assert logits.shape == (1, 101)
    assert seq.decode(torch.tensor([7]), cid)[0].shape == (1, 101)
    seq.release()
    with pytest.raises(ValueError, match="START flag"):  # the sequence batcher knows it ended
        transport.infer(DECODER, {"input_ids": np.array([[7]], np.int64)}, ["logits"], (cid, False, False))
    with pytest.raises(ValueError, match="beam search"):
        seq.reorder(cid, torch.tensor([0]))


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_gpu_repository_on_a_gpu_server(bundle, clip, tmp_path):
    """The gpu variant (onnxruntime backend on KIND_GPU instances) on a full Triton install."""
    from export.triton.server import HOME_ENV, TritonServer
    from runtime.backends import OnnxRuntimeBackend, make_backend

    if not torch.cuda.is_available() or not os.environ.get(HOME_ENV):
        pytest.skip(f"needs an NVIDIA GPU and ${HOME_ENV} naming a Triton install with the onnxruntime backend "
                    "(the nvidia-pytriton wheel ships only the Python backend)")
    write_repository(bundle, tmp_path / "repo", "gpu")
    with TritonServer(tmp_path / "repo") as s:
        served = _captions(make_backend("triton", bundle, url=s.http_url), clip)
    assert [c.text for c in served] == [c.text for c in _captions(OnnxRuntimeBackend(bundle), clip)]


def test_client_transport_gives_each_thread_its_own_client(monkeypatch):
    # tritonclient's HTTP client is bound to the thread that made it (gevent): the hub infers from its
    # worker thread, so a transport made on another thread must not hand it that thread's client.
    import threading
    import types

    from runtime import triton_backend

    class ThreadBoundClient:
        def __init__(self, address, **opts):
            self.owner = threading.get_ident()

        def _check(self):
            if threading.get_ident() != self.owner:
                raise RuntimeError("Cannot switch to a different thread")

        def is_server_ready(self):
            self._check()
            return True

        def get_model_config(self, model):
            self._check()
            return {"config": {"parameters": {"favor.decoder": {"string_value": model}}}}

    fake = types.SimpleNamespace(__name__="tritonclient.http", InferenceServerClient=ThreadBoundClient)
    monkeypatch.setattr(triton_backend, "_client_module", lambda url: (fake, "host:8000"))
    transport = triton_backend.ClientTransport("http://host:8000")
    got = {}
    worker = threading.Thread(target=lambda: got.update(params=transport.model_parameters("decoder")))
    worker.start()
    worker.join()
    assert got["params"] == {"favor.decoder": "decoder"}
    assert transport.model_parameters("fusion") == {"favor.decoder": "fusion"}  # the first thread's still works
