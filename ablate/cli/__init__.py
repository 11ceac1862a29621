"""The `ablate` command line (typer): thin commands over the layers below."""
from ablate.cli.main import app

__all__ = ["app"]
