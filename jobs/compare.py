"""Entry point for ``ray job submit --working-dir . -- python jobs/compare.py --config demo``.

Runs the recipes (Self-MOA, PT-ALIGN, combined; ``--recipes`` to choose) from the same start
model with the same budget and writes comparison.md/.csv/.json beside their run folders; see
``selfmoa compare --help``. Runs on an embedded local Ray when no cluster address is configured.
"""

import sys

from selfmoa_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
