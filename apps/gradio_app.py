"""Launch the demo from a checkout: ``python apps/gradio_app.py --ckpt PATH [lumina demo options]``.

Same as ``lumina demo``; all logic lives in :mod:`lumina_lightning.app` and :mod:`lumina_lightning.serving`.
"""

import sys
from pathlib import Path

# A checkout that was not pip-installed still finds the package next to this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumina_lightning.app import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
