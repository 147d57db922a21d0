"""Entry point for ``ray job submit --working-dir . -- python jobs/serve.py --policy runs/demo``.

Deploys the policy and evaluator apps (``serve_apps/serve_config.yaml``, or ``--config FILE``) to
the cluster the job runs on, waits until they run, prints their URLs and exits: Serve's controller
and replicas are detached actors, so the apps keep serving after this driver has gone (``serve
status`` shows them; ``serve shutdown`` or a later deploy replaces them). The apps get the job's
working_dir, so the cluster imports this checkout's ``serve_apps``. API keys must be in the
environment of the cluster's nodes (``SELFMOA_API_KEYS``). See ``selfmoa serve --help``.
"""

import sys
from pathlib import Path

# The job's working_dir is the repository root; this file runs from jobs/, so put the root first
# (serve_apps is a top-level folder there, not necessarily installed on the cluster's nodes).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_apps.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--address", "auto", "--no-block", *sys.argv[1:]]))
