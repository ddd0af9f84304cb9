"""Frames of the synthetic world rendered in memory, with labels and instructions, for ViT pretraining.

A batch is a pure function of (split, seed, step): scenes are drawn by clip index from one split's seed
space (training uses "train" only; evaluation "heldout"), frames are rendered by training.synth.render,
passed through the 4:2:0 chroma subsampling the H.264 clips have, then through favor.media's
``preprocess_frames`` -- the exact normalisation the runtime and the training recipe apply to decoded
frames. Each frame's instruction is one of its clip's task questions (training.synth.tasks), so the
instruction Q-Former learns to pass the picture through whatever the prompt.

Notation: B frames per batch, S model image side, H, W rendered frame size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from favor.media import load_frames, preprocess_frames
from training.synth.generate import clip_paths
from training.synth.render import render_frame
from training.synth.scene import STREAM_TASKS, Scene, SceneOptions, clip_rng, make_scene
from training.synth.tasks import build_samples
from training.vit_targets import FrameTargets, frame_targets, stack_targets

# BT.601 full-range RGB <-> YCbCr (what libswscale uses for the synthetic clips' yuv420p).
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                       dtype=np.float32)
_YCC_TO_RGB = np.linalg.inv(_RGB_TO_YCC).astype(np.float32)
CHROMA_OFFSET = 128.0


def chroma_420(frame: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] (H, W even) with its chroma averaged over 2 x 2 blocks, as yuv420p stores it:
    the colour edges of shapes and text blur exactly as in the mp4 clips the recipe decodes."""
    h, w = frame.shape[:2]
    ycc = frame.astype(np.float32) @ _RGB_TO_YCC.T  # [H, W, 3]
    chroma = ycc[..., 1:].reshape(h // 2, 2, w // 2, 2, 2).mean(axis=(1, 3))  # [H/2, W/2, 2]
    ycc[..., 1:] = chroma.repeat(2, axis=0).repeat(2, axis=1)
    rgb = ycc @ _YCC_TO_RGB.T
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def scene_questions(scene: Scene) -> list[str]:
    """The text questions the synthetic tasks ask about this clip (the recipe's instructions)."""
    samples, _ = build_samples(scene, clip_rng(scene.seed, scene.split, scene.index, STREAM_TASKS),
                               clip_paths(scene.split, scene.index), partner=None)
    return [s["conversation"][0]["value"] for s in samples]


@dataclass
class FrameBatch:
    pixels: torch.Tensor  # [B, 3, S, S] float32, preprocess_frames' normalisation
    targets: dict[str, torch.Tensor]  # vit_targets.stack_targets, as tensors
    questions: list[str]  # [B] instruction texts


def _batch(frames: list[np.ndarray], labels: list[FrameTargets], questions: list[str],
           image_size: int) -> FrameBatch:
    pixels = preprocess_frames(torch.from_numpy(np.stack(frames)), image_size)  # [B, 3, S, S]
    targets = {k: torch.from_numpy(v) for k, v in stack_targets(labels).items()}
    return FrameBatch(pixels, targets, questions)


def rendered_batch(rng: np.random.Generator, size: int, *, split: str, seed: int, clip_pool: int,
                   frames_per_scene: int, image_size: int, options: SceneOptions | None = None,
                   codec: bool = True) -> FrameBatch:
    """``size`` frames from clips ``rng`` picks in [0, clip_pool) of ``split`` under ``seed``; each scene
    gives ``frames_per_scene`` frames at random file-frame times (rendering one scene costs more than a
    frame)."""
    frames, labels, questions = [], [], []
    while len(frames) < size:
        scene = make_scene(seed, split, int(rng.integers(clip_pool)), options)
        asked = scene_questions(scene)
        for k in rng.choice(scene.num_frames, size=min(frames_per_scene, size - len(frames)), replace=False):
            frame = render_frame(scene, int(k))
            frames.append(chroma_420(frame) if codec else frame)
            labels.append(frame_targets(scene, int(k)))
            questions.append(asked[int(rng.integers(len(asked)))])
    return _batch(frames, labels, questions, image_size)


def decoded_batches(manifest: str | Path, image_size: int, video_fps: float, max_clips: int,
                    batch_size: int, split: str | None = None) -> list[FrameBatch]:
    """Frames of a generated split's mp4 clips decoded exactly as the recipe decodes them (favor.media at
    the model's fps), labelled from the scenes regenerated from the manifest's (seed, split, clip); each
    clip's instruction is its own av_caption question. The end-to-end check of the pretrained encoder, and
    (``split="train"``, which every row must be from) training frames with the codec's real artefacts."""
    manifest = Path(manifest)
    opts_file = manifest.with_suffix(".json")  # generate() records the scene options beside the manifest
    options = (SceneOptions(**json.loads(opts_file.read_text())["scene_options"]) if opts_file.is_file()
               else SceneOptions())
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["task"] == "av_caption"][:max_clips]
    if not rows:
        raise ValueError(f"{manifest}: no av_caption rows to evaluate on")
    if split is not None and any(r["meta"]["split"] != split for r in rows):
        raise ValueError(f"{manifest}: holds clips of another split than {split!r}")
    frames, labels, questions = [], [], []
    for r in rows:
        m = r["meta"]
        scene = make_scene(m["seed"], m["split"], m["clip"], options)
        pixels, times = load_frames(manifest.parent / r["video"], video_fps)  # [T, H, W, 3], [T] s
        for frame, t in zip(pixels.numpy(), times.tolist(), strict=True):
            frames.append(frame)
            labels.append(frame_targets(scene, min(scene.num_frames - 1, round(t * scene.fps))))
            questions.append(r["conversation"][0]["value"])
    return [_batch(frames[i:i + batch_size], labels[i:i + batch_size], questions[i:i + batch_size], image_size)
            for i in range(0, len(frames), batch_size)]
