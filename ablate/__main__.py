"""`python -m ablate ...` — the same CLI as the `ablate` console script (ablate.cli.main)."""
from ablate.cli.main import app

if __name__ == "__main__":
    app(prog_name="ablate")
