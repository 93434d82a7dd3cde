"""``python -m embr_rl.eval MODEL --task ... --lengths ...``: the evaluation command line
(:mod:`embr_rl.evaluation.cli`; the library is :mod:`embr_rl.evaluation`)."""

from __future__ import annotations

import sys

from embr_rl.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
