"""`python -m ablate ...` — the same CLI as the `ablate` console script (ablate.cli)."""
from ablate.cli import app

if __name__ == "__main__":
    app(prog_name="ablate")
