"""Entry point for ``ray job submit -- python jobs/train.py --config demo --pairs pairs.parquet``.

Trains the configured policy on a preference-pairs file (see ``selfmoa train --help``); runs on an
embedded local Ray when no cluster address is configured (``ray.address``).
"""

import sys

from selfmoa_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
