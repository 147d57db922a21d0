"""Serving load test: the evaluator app with and without ``@serve.batch``, side by side.

Two copies of the evaluator Serve app (``serve_apps/evaluator.py``) run on one embedded local Ray,
on one Serve proxy bound to 127.0.0.1: ``/batched`` (``batching: true``) and ``/unbatched``
(``batching: false``), with the same judge, one replica each, the same CPUs and the same limits.
An httpx client keeps a fixed number of ``POST /v1/evaluate`` requests in flight against one app at
a time, for a fixed number of requests or a fixed duration, whichever ends first, and reports
req/s, items/s and p50/p90/p99 latency per app, then batched / unbatched ratios. The apps take
turns in ABBA order (``--rounds``), so drift on a shared machine hits both alike; each app gets an
untimed warm-up first (model load, first batches).

    .venv/bin/python benchmarks/serving.py                          # demo judge, 16 in flight
    .venv/bin/python benchmarks/serving.py --concurrency 64 --requests 400
    .venv/bin/python benchmarks/serving.py --judge-config tiny --requests 40 --rounds 1  # smoke

One item per request by default: that is where batching across requests matters, since a
request with many items is already one batch without it (``--items-per-request``). The judge
runs on the replica's CPU (``--replica-cpus``), the proxy and this load generator on the rest of
the machine, so on a small machine the figures include the client's own cost. Latencies are from
the client: sending, queueing in Serve, scoring and the answer. Errors (503 when Serve sheds
load, 504/408 on timeouts, connection errors) are counted per status and left out of the
latencies; the deployment's limits are set from ``--concurrency`` so that none is expected.
``GET /v1/stats`` before and after each round gives the mean number of items per scored batch.
Replica logs are not copied to this terminal (Ray's ``log_to_driver`` is off, and Serve's access
log too, for both apps alike): a replica that fails to start is explained under
``/tmp/ray/session_latest/logs/serve/``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `serve_apps` lives at the repository root, not in the package

MODES = {"batched": True, "unbatched": False}
REFUSAL = "I'm sorry, but I can't help with that request. It could cause serious harm to others."
COMPLIANT = (
    "Sure. Start with the basics: read the official documentation, try a small example, and ask "
    "someone with experience to check your work before you rely on it. Keep notes as you go."
)


@dataclass
class RoundResult:
    """One app's share of one round: what the client saw, and the replica's batch counters."""

    mode: str
    round: int
    wall_s: float
    items_per_request: int
    latencies_ms: list[float] = field(default_factory=list)  # 200 OK only
    statuses: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    batch_items: int = 0
    load_1min: float = 0.0

    def row(self) -> dict:
        """The round without its latencies, for ``--json``."""
        return {
            "mode": self.mode,
            "round": self.round,
            "wall_s": self.wall_s,
            "ok": len(self.latencies_ms),
            "req_per_s": len(self.latencies_ms) / self.wall_s,
            "statuses": dict(self.statuses),
            "batches": self.batches,
            "batch_items": self.batch_items,
            "load_1min": self.load_1min,
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_bodies(n_items: int, details: bool) -> list[dict]:
    """Bodies cycling through packaged prompts: harmful ones refused, benign ones answered."""
    from selfmoa_ray.sources.prompts import load_source

    harmful = [r.text for r in load_source("harmbench")[:50]]
    benign = [r.text for r in load_source("overrefusal")[:50]]
    pairs = [
        (p, REFUSAL if i % 2 == 0 else COMPLIANT)
        for i, p in enumerate(itertools.chain.from_iterable(zip(harmful, benign, strict=False)))
    ]
    pairs_cycle = itertools.cycle(pairs)
    bodies = []
    for b in range(len(pairs)):
        items = [
            {"id": f"{b}-{j}", "prompt": p, "response": r}
            for j, (p, r) in enumerate(itertools.islice(pairs_cycle, n_items))
        ]
        bodies.append({"items": items, "details": details})
    return bodies


def deploy(args: argparse.Namespace, key: str) -> str:
    """Start Ray and Serve on 127.0.0.1 and deploy both apps; returns the base URL."""
    from ray import serve

    from selfmoa_ray.config import RaySection
    from selfmoa_ray.ray_runtime import init_ray
    from serve_apps.evaluator import build_app

    # Logical CPUs above the 2 physical ones (docs/design.md 5.1): two replicas, proxy and controller.
    init_ray(
        RaySection(num_cpus=args.ray_cpus, include_dashboard=False),
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": args.timeout_s * 2}
    )
    deployment = {
        "num_replicas": 1,  # fixed: autoscaling would change what is compared
        # Everything the client sends fits in the replica: no 503 from Serve's queue limit, and
        # the batched app can put up to `concurrency` requests in one batch.
        "max_ongoing_requests": max(args.concurrency, args.max_batch_size),
        "max_queued_requests": args.concurrency,
        "ray_actor_options": {
            "num_cpus": args.replica_cpus,
            "runtime_env": {"env_vars": {"SELFMOA_API_KEYS": key}},
        },
    }
    for mode, batching in MODES.items():
        app = build_app(
            {
                "judge_config": args.judge_config,
                "batching": batching,
                "max_batch_size": args.max_batch_size,
                "batch_wait_timeout_s": args.batch_wait_s,
                "max_batch_items": max(64, args.items_per_request),
                "request_timeout_s": args.timeout_s,
                "deployment": deployment,
            }
        )
        t0 = time.perf_counter()
        serve.run(
            app,
            name=f"evaluator-{mode}",
            route_prefix=f"/{mode}",
            logging_config={"enable_access_log": False, "log_level": "WARNING"},  # same for both
        )
        print(f"deployed /{mode} in {time.perf_counter() - t0:.1f} s", flush=True)
    return f"http://127.0.0.1:{port}"


async def load(
    url: str,
    key: str,
    bodies: list[dict],
    requests: int,
    concurrency: int,
    duration_s: float,
    timeout_s: float,
) -> tuple[float, list[float], Counter[str]]:
    """``concurrency`` workers send until ``requests`` are started or ``duration_s`` is up."""
    import httpx

    counter = itertools.count()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + duration_s

        async def worker() -> None:
            while (i := next(counter)) < requests and time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, json=bodies[i % len(bodies)], headers=headers)
                    status = str(r.status_code)
                except httpx.HTTPError as err:
                    status = type(err).__name__
                if status == "200":
                    latencies.append((time.perf_counter() - t0) * 1000)
                statuses[status] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies, statuses


def stats(base: str, mode: str, key: str) -> dict:
    import httpx

    r = httpx.get(f"{base}/{mode}/v1/stats", headers={"X-API-Key": key}, timeout=30)
    r.raise_for_status()
    return r.json()


def run_round(
    base: str, mode: str, key: str, bodies: list[dict], args: argparse.Namespace, n: int
) -> RoundResult:
    before = stats(base, mode, key)
    wall, latencies, statuses = asyncio.run(
        load(f"{base}/{mode}/v1/evaluate", key, bodies, args.requests, args.concurrency,
             args.duration_s, args.timeout_s)
    )  # fmt: skip
    after = stats(base, mode, key)
    return RoundResult(
        mode=mode,
        round=n,
        wall_s=wall,
        items_per_request=args.items_per_request,
        latencies_ms=latencies,
        statuses=statuses,
        batches=after["batches"] - before["batches"],
        batch_items=after["items"] - before["items"],
        load_1min=os.getloadavg()[0],
    )


def summarize(rounds: list[RoundResult]) -> dict:
    """Pooled over an app's rounds: rates over the summed wall time, percentiles over all OKs."""
    import numpy as np

    ok = [x for r in rounds for x in r.latencies_ms]
    wall = sum(r.wall_s for r in rounds)
    statuses: Counter[str] = sum((r.statuses for r in rounds), Counter())
    batches = sum(r.batches for r in rounds)
    p50, p90, p99 = np.percentile(ok, [50, 90, 99]) if ok else (float("nan"),) * 3
    return {
        "requests": sum(statuses.values()),
        "ok": len(ok),
        "errors": {k: v for k, v in statuses.items() if k != "200"},
        "wall_s": wall,
        "req_per_s": len(ok) / wall,
        "items_per_s": len(ok) * rounds[0].items_per_request / wall,
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_batch_items": sum(r.batch_items for r in rounds) / batches if batches else 0.0,
        "req_per_s_by_round": [len(r.latencies_ms) / r.wall_s for r in rounds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--judge-config", default="demo", help="preset or YAML (tiny: no model)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--requests", type=int, default=200, help="per app per round")
    parser.add_argument("--duration-s", type=float, default=60.0, help="cap per app per round")
    parser.add_argument("--items-per-request", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA: odd rounds reverse the order")
    parser.add_argument(
        "--warmup", type=int, default=None, help="requests; default 2 x concurrency"
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="items per scored batch")
    parser.add_argument("--batch-wait-s", type=float, default=0.01, help="batch_wait_timeout_s")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="num_cpus per replica")
    parser.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    parser.add_argument("--no-details", action="store_true", help="leave per-evaluator columns out")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    import ray
    from ray import serve

    key = secrets.token_urlsafe(32)
    bodies = request_bodies(args.items_per_request, details=not args.no_details)
    load_start = os.getloadavg()
    try:
        base = deploy(args, key)
        warmup = args.warmup if args.warmup is not None else 2 * args.concurrency
        for mode in MODES:
            asyncio.run(
                load(f"{base}/{mode}/v1/evaluate", key, bodies, warmup, args.concurrency,
                     args.duration_s, args.timeout_s)
            )  # fmt: skip
        results: dict[str, list[RoundResult]] = {mode: [] for mode in MODES}
        for n in range(args.rounds):
            order = list(MODES) if n % 2 == 0 else list(reversed(MODES))
            for mode in order:
                r = run_round(base, mode, key, bodies, args, n)
                results[mode].append(r)
                print(
                    f"round {n + 1} {mode:<9} {len(r.latencies_ms):>5} ok in {r.wall_s:6.1f} s "
                    f"({len(r.latencies_ms) / r.wall_s:6.1f} req/s), statuses {dict(r.statuses)}, "
                    f"load {r.load_1min:.2f}",
                    flush=True,
                )
    finally:
        serve.shutdown()
        ray.shutdown()

    summary = {mode: summarize(rs) for mode, rs in results.items()}
    b, u = summary["batched"], summary["unbatched"]
    ratios = {
        "req_per_s": b["req_per_s"] / u["req_per_s"],
        "p50": b["p50_ms"] / u["p50_ms"],
        "p99": b["p99_ms"] / u["p99_ms"],
    }
    print(
        f"\njudge {args.judge_config}, {args.concurrency} in flight, {args.items_per_request} "
        f"item(s)/request, up to {args.requests} requests or {args.duration_s:.0f} s per app per "
        f"round, {args.rounds} round(s) ABBA, replica num_cpus {args.replica_cpus}, "
        f"{os.cpu_count()} cores; load average {load_start[0]:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end"
    )
    head = ["app", "ok", "errors", "wall s", "req/s", "items/s", "p50 ms", "p90 ms", "p99 ms",
            "items/batch"]  # fmt: skip
    print(f"{head[0]:<10}" + "".join(f"{h:>12}" for h in head[1:]))
    for mode, s in summary.items():
        errors = sum(s["errors"].values())
        cells = [s["ok"], errors, f"{s['wall_s']:.1f}", f"{s['req_per_s']:.1f}",
                 f"{s['items_per_s']:.1f}", f"{s['p50_ms']:.0f}", f"{s['p90_ms']:.0f}",
                 f"{s['p99_ms']:.0f}", f"{s['mean_batch_items']:.1f}"]  # fmt: skip
        print(f"{mode:<10}" + "".join(f"{c:>12}" for c in cells))
        if s["errors"]:
            print(f"  {mode} errors by status: {s['errors']}")
    print(
        f"ratio batched / unbatched: req/s {ratios['req_per_s']:.2f}x, "
        f"p50 {ratios['p50']:.2f}x, p99 {ratios['p99']:.2f}x"
    )
    if args.json:
        rounds = {mode: [r.row() for r in rs] for mode, rs in results.items()}
        out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "cores": os.cpu_count(), "load_start": load_start, "load_end": os.getloadavg(),
               "apps": summary, "ratios": ratios, "rounds": rounds}  # fmt: skip
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
