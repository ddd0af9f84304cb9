"""A synthetic audio-visual world: seeded scenes of shapes, printed text, tones and spoken words, written
as real mp4 clips plus a JSONL manifest of AVEB-like tasks with reference answers.

    scene.py    the event timeline of one clip (pure, seeded data)
    font.py     a built-in 5x7 bitmap font
    render.py   frames [T, H, W, 3] and audio [C, N] from a scene (numpy)
    speech.py   espeak-ng words, cached per phrase
    tasks.py    scene -> samples with reference answers
    windows.py  long scenes cut on the runtime's window grid -> stream_caption samples
    write.py    mp4 / PNG / WAV via PyAV
    manifest.py JSONL schema, writer and validating loader
    generate.py generate(...), generate_windows(...) and make_demo_clip(...)

CLI: ``python -m training.synth --out DIR --num-clips N --seed S [--split train|heldout] [--workers 2]``.
"""

from .generate import generate, generate_windows, make_demo_clip
from .manifest import load_manifest, write_manifest
from .scene import Scene, SceneOptions, make_scene
from .tasks import TASKS

__all__ = ["TASKS", "Scene", "SceneOptions", "generate", "generate_windows", "load_manifest", "make_demo_clip",
           "make_scene", "write_manifest"]
