"""``python -m training ...`` (what torchrun launches): the same CLI as ``favor-train``."""

from training.cli import app

if __name__ == "__main__":
    app(prog_name="favor-train")
