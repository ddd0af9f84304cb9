"""``python -m runtime`` = the ``favor-rt`` console script."""

from runtime.cli import app

if __name__ == "__main__":
    app(prog_name="favor-rt")
