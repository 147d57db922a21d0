"""Entry point for ``ray job submit -- python jobs/redteam.py --config demo --endpoint URL ...``.

Red-teams a model in rounds, each aimed at the last round's successful attacks, and trains
nothing: an audit. The target is the configured policy, ``--model PATH``, or any OpenAI-compatible
endpoint (``--endpoint BASE_URL --endpoint-model NAME``; its key from ``$OPENAI_API_KEY`` or
``--api-key-env``). See ``selfmoa redteam --help``.
"""

import sys

from selfmoa_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["redteam", *sys.argv[1:]]))
