"""Checkpoint format: round trips, atomic writes, safe loading, named mismatches."""

import os

import pytest
import torch

from favor.build import build_model
from favor.checkpoint import (
    apply_weights,
    checkpoint_from_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
)


@pytest.fixture
def model(tiny_cfg, tokenizer):
    m = build_model(tiny_cfg, pretrained=False, tokenizer=tokenizer)
    for p in m.parameters():  # make LoRA B non-zero so the round trip checks real values
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    return m


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip_bit_exact(model, tokenizer, tmp_path, suffix):
    path = save_checkpoint(checkpoint_from_model(model, extra={"step": 7}), tmp_path / f"c{suffix}")
    ckpt = load_checkpoint(path)
    assert ckpt.config == model.cfg and ckpt.extra == {"step": 7}
    trainable = model.trainable_state_dict()
    assert set(ckpt.weights) == set(trainable)
    for k, v in trainable.items():
        assert torch.equal(ckpt.weights[k], v), k
    fresh = build_model(model.cfg, pretrained=False, tokenizer=tokenizer)
    apply_weights(fresh, ckpt.weights, str(path))
    for k, v in trainable.items():
        assert torch.equal(dict(fresh.named_parameters())[k], v)


def test_pt_loads_with_weights_only(model, tmp_path):
    path = save_checkpoint(checkpoint_from_model(model), tmp_path / "c.pt")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    blob = torch.load(path, weights_only=True)  # must not need pickled classes
    assert blob["meta"]["format"] == "favor-checkpoint"


def test_self_contained_needs_no_base(model, tokenizer, tmp_path):
    path = save_checkpoint(checkpoint_from_model(model, self_contained=True), tmp_path / "full.safetensors")
    loaded = load_model(path, tokenizer=tokenizer)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_atomic_write_keeps_previous_on_failure(model, tmp_path, monkeypatch):
    path = save_checkpoint(checkpoint_from_model(model), tmp_path / "c.safetensors")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_checkpoint(checkpoint_from_model(model, extra={"x": 1}), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp litter


def test_mismatches_are_named(model, tiny_cfg, tokenizer, tmp_path):
    path = save_checkpoint(checkpoint_from_model(model), tmp_path / "c.safetensors")
    other = build_model(tiny_cfg.replace(**{"qformer.num_queries": 4}), pretrained=False,
                        tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"qformer.query_tokens has shape \[1, 3, 36\].*\[1, 4, 36\]"):
        apply_weights(other, load_checkpoint(path).weights, str(path))
    weights = dict(load_checkpoint(path).weights)
    weights.pop("projector.proj.weight")
    with pytest.raises(ValueError, match="trainable weight.*missing.*projector.proj.weight"):
        apply_weights(model, weights, "x")
    weights["bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown weight.*bogus"):
        apply_weights(model, weights, "x")


def test_bad_files_name_the_file(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")
    pickled = tmp_path / "evil.pt"
    torch.save({"meta": {"format": "favor-checkpoint"}, "weights": {}, "obj": object()}, pickled)
    with pytest.raises(ValueError, match="evil.pt"):  # weights_only refuses arbitrary objects
        load_checkpoint(pickled)
