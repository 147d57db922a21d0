"""Scaling of the sampling stage: 1 node against 2 simulated nodes of the same size, in one run.

Each configuration gets a fresh multi-node Ray on this machine (``ray.cluster_utils.Cluster``, as
tests/jobs/multinode_driver.py does): a head with ``num_cpus=0``, so that no work lands on it, and
worker nodes of ``--cpus-per-node`` CPUs each. The engine pool has one actor per node
(``engine.num_actors`` = nodes, ``engine.num_cpus_per_actor`` = ``--cpus-per-node``, which also sets
torch's thread count in the actor: engines/pool.py), and every configuration does the same work:
the sampling stage's, ``--prompts`` red-team seed prompts (AdvBench) answered ``--n`` times each at
the ``demo`` preset's temperature, through ``selfmoa_ray.engines.pool.generate`` on the ``demo``
config (``ray.address`` pointed at the simulated cluster).

    .venv/bin/python benchmarks/scaling.py                  # SmolLM2-135M, 3 configurations, ~2 min
    .venv/bin/python benchmarks/scaling.py --configs 1-node,2-nodes --rounds 2   # ABBA, ~2.5 min
    .venv/bin/python benchmarks/scaling.py --model tiny-random                   # smoke, ~1 min

(Times on an idle 2-core machine; under other load they double or more.)

Configurations (``--configs``): ``1-node`` (1 node x C CPUs, 1 actor), ``2-nodes`` (2 nodes x C
CPUs, 1 actor on each), and the control ``1-node-2-actors`` (1 node x 2C CPUs, 2 actors of C
CPUs): the same actors and cores as ``2-nodes`` on one node, so that the reader can tell what
spreading over nodes costs or gives from what a second core gives. ``1-node-2-threads`` (1 node x
2C CPUs, 1 actor of 2C CPUs and threads) is optional. With ``--rounds`` > 1 the order alternates
(ABC CBA ...), so that drift on a shared machine hits every configuration alike.

Per configuration: the wall time of ``generate(...).take_all()`` (end to end: actor start and model
load, generation, collecting the rows), and the generation span (first batch started to last batch
finished in any actor), from timestamps that the engine adds to its rows. To get those, the
benchmark swaps the engine class that ``generate`` builds its pool from
(``pool.engine_class_and_kwargs``) for a subclass of ``HFChatEngine`` that times each batch and
records its node, process and torch thread count; ``generate`` itself, its batch size, actor pool
and resources are unchanged. One setting differs from a run's: Ray Data's
``wait_for_min_actors_s`` is set, so that batches are handed out once every actor is up
(``--no-wait``: Ray Data's default, the first ready actor starts alone and may take most batches
of a small workload). Start-up is wall minus span. Tokens are generated tokens (the rows'
``response_tokens``, up to and including EOS). The load average is printed before and after each
configuration: this machine is shared. Two views that its other load disturbs less: tokens per
CPU-second of the engine actors (``time.process_time`` around each batch: does spreading the work
add work?) and the CPU share, the actors' CPU time over their span times their CPUs (1.0 = every
actor had the CPUs it asked for to itself).

On one machine, "nodes" share its cores: 2 nodes of 1 CPU can at best use 2 cores, so the ratio
measures what the pool gains from a second node's CPUs with Ray's scheduling, object transfer and
per-node processes in the way, not the network between real machines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import numpy as np  # noqa: E402

from selfmoa_ray.engines.hf import HFChatEngine  # noqa: E402

OBJECT_STORE_BYTES = 256 * 2**20  # per node; the default (30% of RAM) x 3 nodes is far too much


class TimedEngine(HFChatEngine):
    """``HFChatEngine`` that stamps each output row with its batch's start and end (epoch seconds,
    one clock on one machine), the CPU time its process used on it, and the actor's ready time,
    node, pid and torch threads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import ray
        import torch

        self._stamp = {
            "t_ready": time.time(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "threads": torch.get_num_threads(),
        }

    def __call__(self, batch):
        start, cpu = time.time(), time.process_time()
        out = super().__call__(batch)
        rows = len(out["response_tokens"])
        stamp = {"t_start": start, "t_end": time.time(), "cpu_s": time.process_time() - cpu,
                 **self._stamp}  # fmt: skip
        for key, value in stamp.items():
            out[key] = np.array([value] * rows, dtype=object if key == "node_id" else None)
        return out


@dataclass(frozen=True)
class Setup:
    name: str
    nodes: int
    cpus_per_node: float
    actors: int
    cpus_per_actor: float


def setups(cpus: float) -> dict[str, Setup]:
    return {
        s.name: s
        for s in (
            Setup("1-node", 1, cpus, 1, cpus),
            Setup("2-nodes", 2, cpus, 2, cpus),
            Setup("1-node-2-actors", 1, 2 * cpus, 2, cpus),
            Setup("1-node-2-threads", 1, 2 * cpus, 1, 2 * cpus),
        )
    }


def load() -> float:
    return os.getloadavg()[0]


def run_once(setup: Setup, args, prompts: list[str]) -> dict:
    """One fresh simulated cluster, the sampling workload once; figures as a dict."""
    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    from selfmoa_ray.config import load_config
    from selfmoa_ray.engines import pool
    from selfmoa_ray.engines.base import SamplingParams
    from selfmoa_ray.ray_runtime import init_ray

    load_before = load()
    t_cluster = time.perf_counter()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES},
    )
    try:
        nodes = [
            cluster.add_node(num_cpus=setup.cpus_per_node, object_store_memory=OBJECT_STORE_BYTES)
            for _ in range(setup.nodes)
        ]
        cluster.wait_for_nodes()
        cluster_s = time.perf_counter() - t_cluster
        config = load_config("demo", [
            f"ray.address={cluster.address}", f"policy.source={args.model}",
            f"engine.num_actors={setup.actors}",
            f"engine.num_cpus_per_actor={setup.cpus_per_actor}",
            f"engine.batch_size={args.batch_size}", f"sampling.n={args.n}",
            f"sampling.max_new_tokens={args.max_new_tokens}",
        ])  # fmt: skip
        init_ray(config.ray, log_to_driver=False)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        # Hand out batches only once every actor of the pool is up (Ray Data's default starts on
        # the first ready actor), so that the span compares N working actors, not load skew.
        context.wait_for_min_actors_s = 0 if args.no_wait else 600
        sampling = SamplingParams(
            n=config.sampling.n, temperature=config.sampling.temperature,
            top_p=config.sampling.top_p, max_new_tokens=config.sampling.max_new_tokens,
            seed=config.run.seed,
        )  # fmt: skip
        items = [{"id": f"p{i}", "text": t} for i, t in enumerate(prompts)]
        blocks = math.ceil(len(items) / config.engine.batch_size)  # one block per batch
        real = pool.engine_class_and_kwargs

        def timed(model, engine):
            cls, kwargs = real(model, engine)
            assert cls is HFChatEngine, f"--model needs the hf backend, got {cls.__name__}"
            return TimedEngine, kwargs

        with mock.patch.object(pool, "engine_class_and_kwargs", timed):
            t0 = time.time()
            ds = ray.data.from_items(items, override_num_blocks=blocks)
            rows = pool.generate(ds, config.policy, config.engine, sampling).take_all()
            t1 = time.time()
    finally:
        ray.shutdown()
        cluster.shutdown()
    worker_ids = {n.node_id for n in nodes}
    t_start = min(r["t_start"] for r in rows)
    t_end = max(r["t_end"] for r in rows)
    batches = {(r["pid"], r["t_start"], r["t_end"], r["cpu_s"]) for r in rows}
    actors: dict[int, dict] = {}
    for r in rows:
        a = actors.setdefault(
            int(r["pid"]),
            {"node": r["node_id"][:8], "threads": int(r["threads"]),
             "ready_s": round(r["t_ready"] - t0, 1), "rows": 0, "tokens": 0},
        )  # fmt: skip
        a["rows"] += 1
        a["tokens"] += int(r["response_tokens"])
    for pid, a in actors.items():
        own = [(s, e, c) for p, s, e, c in batches if p == pid]
        a["batches"] = len(own)
        a["busy_s"] = round(sum(e - s for s, e, _ in own), 1)
        a["cpu_s"] = round(sum(c for _, _, c in own), 1)
    assert all(r["node_id"] in worker_ids for r in rows), "an engine ran outside the worker nodes"
    wall, span = t1 - t0, t_end - t_start
    tokens = sum(int(r["response_tokens"]) for r in rows)
    return {
        **asdict(setup),
        "answers": len(rows),
        "tokens": tokens,
        "wall_s": wall,
        "span_s": span,
        "startup_s": wall - span,
        "first_batch_s": t_start - t0,
        "cluster_start_s": cluster_s,
        "cpu_s": sum(a["cpu_s"] for a in actors.values()),
        "nodes_used": len({a["node"] for a in actors.values()}),
        "actor_stats": list(actors.values()),
        "load_before": load_before,
        "load_after": load(),
    }


def summarise(results: list[dict]) -> dict[str, dict]:
    """Totals per configuration over all rounds: rates are sums over sums."""
    out: dict[str, dict] = {}
    for r in results:
        s = out.setdefault(r["name"], {"answers": 0, "tokens": 0, "wall_s": 0.0, "span_s": 0.0,
                                       "cpu_s": 0.0, "actor_s": 0.0, "startup_s": [],
                                       "rounds": []})  # fmt: skip
        for key in ("answers", "tokens", "wall_s", "span_s", "cpu_s"):
            s[key] += r[key]
        s["actor_s"] += r["span_s"] * r["actors"] * r["cpus_per_actor"]
        s["startup_s"].append(r["startup_s"])
        s["rounds"].append(r["tokens"] / r["span_s"])
    for s in out.values():
        s["answers_per_s"] = s["answers"] / s["span_s"]
        s["tokens_per_s"] = s["tokens"] / s["span_s"]
        s["e2e_answers_per_s"] = s["answers"] / s["wall_s"]
        s["e2e_tokens_per_s"] = s["tokens"] / s["wall_s"]
        # Noise-robust views: work per token (does spreading add work?) and the share of a core
        # each actor got while generating (how much the machine's other load took).
        s["tokens_per_cpu_s"] = s["tokens"] / s["cpu_s"]
        s["cpu_share"] = s["cpu_s"] / s["actor_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=2, help="answers per prompt (sampling.n)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per engine batch")
    parser.add_argument("--cpus-per-node", type=float, default=1.0)
    parser.add_argument("--configs", default="1-node,2-nodes,1-node-2-actors",
                        help=f"comma-separated, from: {', '.join(setups(1))}")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-wait", action="store_true",
                        help="Ray Data's default: dispatch as soon as one actor is up")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    args = parser.parse_args()

    from selfmoa_ray.sources.models import resolve_model
    from selfmoa_ray.sources.prompts import load_source

    resolve_model(args.model)  # convert/build once, outside every timing
    prompts = [r.text for r in load_source("advbench")[: args.prompts]]
    table = setups(args.cpus_per_node)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {', '.join(table)}")
    print(f"model {args.model}, {len(prompts)} prompts x {args.n} answers x <= "
          f"{args.max_new_tokens} new tokens, batch {args.batch_size}, {os.cpu_count()} cores, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)  # fmt: skip
    # `timeout` and job schedulers send SIGTERM: exit through the `finally` that shuts the
    # simulated cluster down, and keep what was measured (--json is rewritten after every run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: list[dict] = []
    for rnd in range(args.rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            s = table[name]
            r = run_once(s, args, prompts)
            results.append(r)
            if args.json:
                save(args, results)
            print(f"round {rnd + 1} {name:<17} {s.nodes} node(s) x {s.cpus_per_node:g} CPU, "
                  f"{s.actors} actor(s) x {s.cpus_per_actor:g}: {r['answers']} answers, "
                  f"{r['tokens']} tokens, wall {r['wall_s']:.1f} s, span {r['span_s']:.1f} s, "
                  f"start-up {r['startup_s']:.1f} s (cluster {r['cluster_start_s']:.1f} s "
                  f"before), load {r['load_before']:.2f} -> {r['load_after']:.2f}",
                  flush=True)  # fmt: skip
            for a in r["actor_stats"]:
                print(f"    actor on node {a['node']}: {a['threads']} torch thread(s), ready at "
                      f"{a['ready_s']} s, {a['batches']} batches, {a['rows']} answers, busy "
                      f"{a['busy_s']} s, CPU {a['cpu_s']} s", flush=True)  # fmt: skip
    summary = summarise(results)
    print(f"\n{'configuration':<17} {'answers':>7} {'tokens':>7} {'span s':>7} {'ans/s':>6} "
          f"{'tok/s':>6} {'wall s':>7} {'e2e tok/s':>9} {'start-up s':>10} {'tok/CPU-s':>9} "
          f"{'CPU share':>9}  tok/s per round")  # fmt: skip
    for name, s in summary.items():
        startup = "/".join(f"{x:.1f}" for x in s["startup_s"])
        per_round = ", ".join(f"{x:.1f}" for x in s["rounds"])
        print(f"{name:<17} {s['answers']:>7} {s['tokens']:>7} {s['span_s']:>7.1f} "
              f"{s['answers_per_s']:>6.2f} {s['tokens_per_s']:>6.1f} {s['wall_s']:>7.1f} "
              f"{s['e2e_tokens_per_s']:>9.1f} {startup:>10} {s['tokens_per_cpu_s']:>9.1f} "
              f"{s['cpu_share']:>9.2f}  {per_round}")  # fmt: skip
    pairs = [(n, "1-node") for n in ("2-nodes", "1-node-2-actors", "1-node-2-threads")]
    ratios = {}
    for top, bottom in [*pairs, ("2-nodes", "1-node-2-actors")]:
        if top in summary and bottom in summary:
            a, b = summary[top], summary[bottom]
            ratios[f"{top} / {bottom}"] = {
                "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
                "e2e_tokens_per_s": a["e2e_tokens_per_s"] / b["e2e_tokens_per_s"],
                "tokens_per_cpu_s": a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"],
                "per_round": [x / y for x, y in zip(a["rounds"], b["rounds"], strict=True)],
            }
    print()
    for name, r in ratios.items():
        per_round = ", ".join(f"{x:.2f}" for x in r["per_round"])
        print(f"ratio {name:<28} generation {r['tokens_per_s']:.2f}x ({per_round}), "
              f"end to end {r['e2e_tokens_per_s']:.2f}x, tokens per CPU-s "
              f"{r['tokens_per_cpu_s']:.2f}x")  # fmt: skip
    if args.json:
        save(args, results, summary=summary, ratios=ratios)


def save(args, results: list[dict], **extra) -> None:
    data = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": results, **extra}
    args.json.write_text(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    main()
