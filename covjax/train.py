"""Entry point: python -m covjax.train (the trainer issue makes it real)."""

import sys

if __name__ == "__main__":
    sys.exit("covjax.train: the RL trainer is not implemented yet (see the trainer issue).")
