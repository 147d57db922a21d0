"""Entry point for ``ray job submit --working-dir . -- python jobs/align.py --config demo``.

Runs (or, with ``--resume``, continues) the Self-MOA closed loop and writes its report; see
``selfmoa run --help``. Runs on an embedded local Ray when no cluster address is configured
(``ray.address``).
"""

import sys

from selfmoa_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
