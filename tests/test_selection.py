"""Backend selection order (runtime/selection.py) with the machine's answers replaced: TensorRT only
with engines in the bundle and TensorRT usable, then ONNX Runtime CUDA, then CPU; and the --threads
override against the manifest's tuned counts."""

from __future__ import annotations

import pytest

from export.threads import TUNED_STAGES, candidates, parse_threads, stage_threads
from runtime import selection
from runtime.selection import CPU_PROVIDER, CUDA_PROVIDER, Probes, select


def probes(trt: str | None = "tensorrt and tensorrt_llm not installed", providers=(CPU_PROVIDER,),
           engines: bool = False) -> Probes:
    return Probes(tensorrt_unavailable=lambda: trt, ort_providers=lambda: list(providers),
                  has_engines=lambda bundle: engines)


@pytest.mark.parametrize("trt, providers, engines, backend, chosen", [
    (None, (CUDA_PROVIDER, CPU_PROVIDER), True, "tensorrt", ()),  # engines + TensorRT usable
    ("no CUDA device", (CUDA_PROVIDER, CPU_PROVIDER), True, "onnxruntime", (CUDA_PROVIDER, CPU_PROVIDER)),
    (None, (CUDA_PROVIDER, CPU_PROVIDER), False, "onnxruntime", (CUDA_PROVIDER, CPU_PROVIDER)),  # no engines
    (None, ("AzureExecutionProvider", CPU_PROVIDER), False, "onnxruntime", (CPU_PROVIDER,)),  # CPU wheel
    ("not installed", (CPU_PROVIDER,), True, "onnxruntime", (CPU_PROVIDER,)),
])
def test_auto_prefers_tensorrt_then_cuda_then_cpu(tmp_path, trt, providers, engines, backend, chosen):
    s = select("auto", tmp_path, probes(trt, providers, engines))
    assert (s.backend, s.providers) == (backend, chosen)


def test_the_reason_says_why_tensorrt_was_passed_over(tmp_path):
    s = select("auto", tmp_path, probes("no CUDA device", engines=True))
    assert "engines present but TensorRT unusable (no CUDA device)" in s.reason
    assert s.describe() == "onnxruntime (CPU)"


def test_named_backends_are_not_second_guessed(tmp_path):
    p = probes(None, (CUDA_PROVIDER, CPU_PROVIDER), engines=True)
    assert select("onnxruntime", tmp_path, p).backend == "onnxruntime"  # engines there, ORT asked for
    assert select("onnxruntime", tmp_path, p).providers == (CUDA_PROVIDER, CPU_PROVIDER)
    assert select("torch", None, p).backend == "torch"
    assert select("tensorrt", tmp_path, probes(engines=True)).backend == "tensorrt"


def test_probes_ask_this_machine():
    # the real probes: this machine's onnxruntime is the CPU wheel and TensorRT is not installed
    assert CPU_PROVIDER in selection.ort_providers()
    assert selection.tensorrt_unavailable() is not None
    assert select("auto", None).providers[-1] == CPU_PROVIDER


def test_has_engines_needs_every_plan_and_the_llm_engine(tmp_path):
    from export.tensorrt import ENGINE_STAGES

    (tmp_path / "tensorrt").mkdir()
    for stage in ENGINE_STAGES:
        assert not selection.has_engines(tmp_path)
        (tmp_path / "tensorrt" / f"{stage}.plan").write_bytes(b"x")
    assert not selection.has_engines(tmp_path)  # no trtllm/engine yet
    (tmp_path / "trtllm" / "engine").mkdir(parents=True)
    assert selection.has_engines(tmp_path)


def test_tensorrt_by_name_without_tensorrt_is_one_line_before_any_export(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"backend 'tensorrt' is not available \(gone\)") as e:
        selection.open_backend("tensorrt", ckpt, probes=probes("gone"))
    assert "\n" not in str(e.value)


# -- --threads: N for all, stage=N for some, the manifest's tuned counts for the rest --------------

def test_threads_override_and_manifest_choice():
    manifest = {"runtime": {"threads": {"decoder": 1, "audio_encoder": 2, "fusion": 2}}}
    assert stage_threads(manifest, parse_threads("3")) == dict.fromkeys(TUNED_STAGES, 3)
    assert stage_threads(manifest, parse_threads("decoder=2,visual_encoder=1")) == {
        "decoder": 2, "audio_encoder": 2, "fusion": 2, "visual_encoder": 1}
    assert stage_threads(manifest, {}) == {"decoder": 1, "audio_encoder": 2, "fusion": 2}
    assert stage_threads({}, parse_threads(None)) == {}  # untuned bundle: ONNX Runtime's defaults


@pytest.mark.parametrize("spec, message", [("0", "must be >= 1"), ("decoder=0", "must be N or stage=N"),
                                           ("decoder", "must be N or stage=N"), ("llm=2", "unknown stage 'llm'"),
                                           ("two", "must be N or stage=N")])
def test_bad_threads_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_threads(spec)


def test_per_stage_threads_on_torch_are_refused(tmp_path):
    with pytest.raises(ValueError, match="per-stage counts need a compiled bundle"):
        selection.open_backend("torch", tmp_path / "m.safetensors", threads="decoder=1")


def test_thread_candidates_cover_small_machines_and_stay_few_on_big_ones():
    assert candidates(1) == [1] and candidates(2) == [1, 2] and candidates(4) == [1, 2, 3, 4]
    assert candidates(12) == [1, 2, 4, 8, 12] and candidates(64) == [1, 2, 4, 8, 16, 32, 64]


def test_the_module_probes_can_be_monkeypatched(tmp_path, monkeypatch):
    monkeypatch.setattr(selection, "ort_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    assert select("auto", tmp_path).providers == (CUDA_PROVIDER, CPU_PROVIDER)  # onnxruntime-gpu
    monkeypatch.setattr(selection, "has_engines", lambda bundle: True)
    monkeypatch.setattr(selection, "tensorrt_unavailable", lambda: None)
    assert select("auto", tmp_path).backend == "tensorrt"
    monkeypatch.setattr(selection, "tensorrt_unavailable", lambda: "no CUDA device")
    assert select("auto", tmp_path).backend == "onnxruntime"
