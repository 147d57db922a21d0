"""Entry point for ``ray job submit -- python jobs/evaluate.py --config demo [--model PATH]``.

Evaluates a model (default: the configured policy) on the held-out harmful and benign sets, plus
any ``--prompts FILE``; see ``selfmoa evaluate --help``. Runs on an embedded local Ray when no
cluster address is configured (``ray.address``).
"""

import sys

from selfmoa_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
