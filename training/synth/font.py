"""A built-in 5x7 bitmap font, so printed digits and words never depend on system fonts.

Notation:
    GH, GW  glyph height / width in font pixels (7, 5)
    s       integer scale: one font pixel becomes an s x s block of frame pixels
"""

from __future__ import annotations

import numpy as np

GLYPH_H, GLYPH_W = 7, 5
GAP = 1  # blank font columns between glyphs

# Each glyph is 7 rows of 5 bits, '#' = ink. Classic HD44780-style shapes: digits stay distinct even
# after H.264 chroma subsampling because they differ in whole strokes, not single pixels.
_ROWS = {
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# #...# ##### #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# #...# .#.#. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    " ": "..... ..... ..... ..... ..... ..... .....",
}


def _parse(rows: str) -> np.ndarray:
    glyph = np.array([[c == "#" for c in row] for row in rows.split()], dtype=bool)
    assert glyph.shape == (GLYPH_H, GLYPH_W), rows
    return glyph


GLYPHS: dict[str, np.ndarray] = {ch: _parse(rows) for ch, rows in _ROWS.items()}


def text_bitmap(text: str) -> np.ndarray:
    """Ink mask of ``text`` at font resolution: [GH, n*(GW+GAP)-GAP] bool. Case-insensitive."""
    text = text.upper()
    missing = sorted({ch for ch in text if ch not in GLYPHS})
    if missing:
        raise ValueError(f"text {text!r} has characters the built-in font lacks: {missing}")
    if not text:
        return np.zeros((GLYPH_H, 0), dtype=bool)
    cols = []
    for i, ch in enumerate(text):
        if i:
            cols.append(np.zeros((GLYPH_H, GAP), dtype=bool))
        cols.append(GLYPHS[ch])
    return np.concatenate(cols, axis=1)


def text_size(text: str, scale: int) -> tuple[int, int]:
    """(height, width) in frame pixels of ``text`` drawn at ``scale``."""
    n = len(text)
    return GLYPH_H * scale, max(0, n * (GLYPH_W + GAP) - GAP) * scale


def draw_text(frame: np.ndarray, text: str, top: int, left: int, scale: int,
              colour: tuple[int, int, int]) -> None:
    """Paint ``text`` into ``frame`` [H, W, 3] uint8 in place; ink outside the frame is clipped."""
    if scale < 1:
        raise ValueError(f"scale ({scale}) must be >= 1")
    # mask: [GH*s, width*s], each font pixel repeated into an s x s block
    mask = text_bitmap(text).repeat(scale, axis=0).repeat(scale, axis=1)
    h, w = frame.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + mask.shape[0], h), min(left + mask.shape[1], w)
    if y1 <= y0 or x1 <= x0:
        return
    sub = mask[y0 - top:y1 - top, x0 - left:x1 - left]
    frame[y0:y1, x0:x1][sub] = colour
