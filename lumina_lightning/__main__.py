"""``python -m lumina_lightning VERB ...`` is the same as ``lumina VERB ...``."""

from lumina_lightning.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
