"""``python -m mm2latent.train``: an alias of ``python -m mm2latent.training`` (training/cli.py)."""

from .training.cli import main

if __name__ == "__main__":
    main()
