"""Ground-truth labels of one synthetic frame, for pretraining the demo's visual encoder.

The scene (training.synth.scene) knows what every frame shows; these are the labels a frame at time t
gets, all read off the scene, never off pixels:

    per cell (the 2 x 2 grid of the upper frame; each shape lives in its own cell)
        colour    0 = empty, 1 + index into COLOURS
        shape     0 = empty, 1 + index into SHAPES
        pulse     1 when the shape in the cell is sounding (drawn larger with a white outline), else 0
        centre    (x, y) of the shape's centre as fractions of the frame width / height (0 when empty)
    per frame
        text      0 = nothing printed, 1 + index into PRINTED

Motion direction is not a label: one frame does not show it (the causal Q-Former sees it across frames
from the centres).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.synth.render import shape_centre
from training.synth.scene import COLOURS, PRINTED, SHAPES, TEXT_BAND, Scene, Shape

GRID = 2  # cells per side (scene.py: "2 x 2 regions of the upper frame")
CELLS = GRID * GRID
COLOUR_NAMES = tuple(COLOURS)
NUM_COLOURS = len(COLOUR_NAMES) + 1  # + empty
NUM_SHAPES = len(SHAPES) + 1  # + empty
NUM_TEXTS = len(PRINTED) + 1  # + nothing printed
EMPTY = 0


@dataclass(frozen=True)
class FrameTargets:
    colour: np.ndarray  # [CELLS] int64
    shape: np.ndarray  # [CELLS] int64
    pulse: np.ndarray  # [CELLS] float32 in {0, 1}
    centre: np.ndarray  # [CELLS, 2] float32, fractions of (W, H)
    text: int


def cell_of(shape: Shape, width: int, height: int) -> int:
    """Row-major index of the grid cell a shape moves in (from the middle of its centre's bounds)."""
    x0, y0, x1, y1 = shape.cell
    shapes_h = round(height * (1 - TEXT_BAND))  # the shapes' area above the text band (scene._shapes)
    col = min(GRID - 1, int((x0 + x1) / 2 // (width / GRID)))
    row = min(GRID - 1, int((y0 + y1) / 2 // (shapes_h / GRID)))
    return row * GRID + col


def frame_targets(scene: Scene, k: int) -> FrameTargets:
    """Labels of frame ``k`` of the clip (time k / fps, as ``render.render_frame`` draws it)."""
    t = k / scene.fps
    colour = np.zeros(CELLS, dtype=np.int64)
    shape = np.zeros(CELLS, dtype=np.int64)
    pulse = np.zeros(CELLS, dtype=np.float32)
    centre = np.zeros((CELLS, 2), dtype=np.float32)
    sounding = {scene.sounds[i].source for i in scene.sounding(t)}
    for i in scene.visible(t):
        s = scene.shapes[i]
        c = cell_of(s, scene.width, scene.height)
        colour[c] = 1 + COLOUR_NAMES.index(s.colour)
        shape[c] = 1 + SHAPES.index(s.shape)
        pulse[c] = float(i in sounding)
        cx, cy = shape_centre(s, t)
        centre[c] = (cx / scene.width, cy / scene.height)
    shown = [x.text for x in scene.texts if x.start <= t < x.end]
    text = 1 + PRINTED.index(shown[0]) if shown else EMPTY
    return FrameTargets(colour, shape, pulse, centre, text)


def stack_targets(items: list[FrameTargets]) -> dict[str, np.ndarray]:
    """Batch of labels: colour / shape [B, CELLS], pulse [B, CELLS], centre [B, CELLS, 2], text [B]."""
    return {"colour": np.stack([x.colour for x in items]), "shape": np.stack([x.shape for x in items]),
            "pulse": np.stack([x.pulse for x in items]), "centre": np.stack([x.centre for x in items]),
            "text": np.array([x.text for x in items], dtype=np.int64)}


def region_pool(image_size: int, patch_size: int) -> np.ndarray:
    """[CELLS + 1, Np] mean-pooling weights from the ViT's patch grid to the grid cells and the text band
    (last row), by where each patch's centre falls in the frame. A region no patch centre falls in (tiny
    grids) gets a zero row: its pooled feature is 0."""
    g = image_size // patch_size  # patches per side
    centres = (np.arange(g) + 0.5) / g  # patch centres as fractions of the side
    pool = np.zeros((CELLS + 1, g * g), dtype=np.float32)
    shapes_h = 1 - TEXT_BAND  # fraction of the height above the text band
    for r, y in enumerate(centres):
        for c, x in enumerate(centres):
            if y >= shapes_h:
                region = CELLS
            else:
                region = min(GRID - 1, int(y / (shapes_h / GRID))) * GRID + min(GRID - 1, int(x * GRID))
            pool[region, r * g + c] = 1.0
    return pool / np.maximum(pool.sum(1, keepdims=True), 1.0)
