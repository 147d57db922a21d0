"""Entry point for ``ray job submit -- python jobs/audit.py --config demo``: audit a policy.

Runs on an embedded local Ray when no cluster address is configured (``ray.address``).
"""

import sys

from selfmoa_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
