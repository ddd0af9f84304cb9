"""``python -m export`` = ``favor-export``."""

from export.cli import app

app(prog_name="favor-export")
