"""`python -m trainer ...` is `python -m trainer.train ...` (see trainer/train.py)."""
import sys

from trainer.train import cli

sys.exit(cli())
