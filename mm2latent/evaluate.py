"""``python -m mm2latent.evaluate``: an alias of ``python -m mm2latent.training.evaluate`` (Table 1 / Table 2)."""

from .training.evaluate import main

if __name__ == "__main__":
    main()
