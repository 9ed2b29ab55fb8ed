"""Render the bundled synthetic compositional dataset (same as ``lumina data synth``).

    python data/make_synthetic.py --out data/synthetic --n 10000 --size 64 --seed 0

Generated images are build outputs: keep them out of git (write them outside the repo or to a
git-ignored folder).
"""

from __future__ import annotations

import sys

from lumina_lightning.data.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["synth", *sys.argv[1:]]))
