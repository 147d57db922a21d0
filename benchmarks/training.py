"""Training throughput: DDP on 1 and 2 Ray Train workers, and DeepSpeed ZeRO against DDP.

Every configuration trains on the same synthetic preference pairs (one sample = one pair), one
after the other in this process, so that the ratios are measured under the same machine conditions.

    .venv/bin/python benchmarks/training.py          # tiny-random, then SmolLM2-135M + LoRA, ~8 min
    .venv/bin/python benchmarks/training.py --quick  # tiny-random only
    .venv/bin/python benchmarks/training.py --pairs 64 --rounds 2

Two figures per run:

* in-loop samples/s: rank 0's ``samples_per_s``, pairs per second across all workers over the
  epoch, from the first batch request to the last optimizer step (model load, worker start-up,
  checkpoints and the final export excluded);
* end-to-end pairs/s: pairs over the wall time of the whole ``fit`` call, which adds starting the
  worker group, loading the model in every worker, the end-of-epoch checkpoint and the export.

The CPUs are split the same way on both sides of a comparison: 1 worker gets both cores
(``cpus_per_worker=2``, so Ray gives it ``OMP_NUM_THREADS=2``), 2 workers get one each. The tiny
model also has a 1-worker, 1-CPU row, to tell threads from workers.

The reference pass (``ref_*`` columns) runs once per model, outside every timing. DeepSpeed on CPU
JIT-builds its ``shm_comm`` op on first use (cached under ``~/.cache/torch_extensions``); an
untimed warm-up fit (tiny model, DeepSpeed, 2 workers, one step) runs before any timed one, so
neither that build nor the first import of DeepSpeed and Ray Train lands in a measured row.

The worker loop reports every ``train.report_every`` optimizer steps (it reported after every step
when the README's figures were taken). Under Ray Train v2 (the
default in the Ray 2.60 installed here) that call blocks until the controller has collected the
previous report, and the controller polls the workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``
(2 s by default): a worker cannot step faster than once per poll. ``--poll-interval`` (default
0.1 s) sets that variable for this run so that the figures measure training, not the poll;
``--poll-interval 0`` keeps Ray's default, to see the cap.

Runs alternate in ABBA order: round 1 goes through a model's configurations in order, round 2 in
reverse (``--rounds``), so compared configurations run back to back and drift hits both sides;
the table gives the mean over rounds.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

TINY = "tiny-random"
SMOL = "packaged:smollm2-135m-instruct"

WORDS = " ".join(
    (
        "the a model answer question safe request user policy help explain data system people",
        "because should would could never always please careful risk harm law advice instead",
        "information general public resource contact professional support reason example case",
        "first then after before about around through between within without against toward",
    )
).split()


@dataclass(frozen=True)
class Setup:
    """One configuration to time: a label and its ``train.*`` overrides."""

    label: str
    workers: int
    cpus: float
    strategy: str = "ddp"
    zero_stage: int = 2

    def overrides(self) -> list[str]:
        return [
            f"train.num_workers={self.workers}",
            f"train.cpus_per_worker={self.cpus}",
            f"train.strategy={self.strategy}",
            f"train.zero_stage={self.zero_stage}",
        ]


@dataclass
class Timing:
    """Results of one configuration over the rounds."""

    setup: Setup
    in_loop: list[float] = field(default_factory=list)  # samples/s, rank 0's measure
    wall: list[float] = field(default_factory=list)  # seconds of the whole fit call
    steps: int = 0
    pairs: int = 0

    @property
    def in_loop_mean(self) -> float:
        return statistics.mean(self.in_loop)

    @property
    def end_to_end_mean(self) -> float:
        return statistics.mean(self.pairs / w for w in self.wall)


DDP_1W_1CPU = Setup("DDP, 1 worker x 1 CPU", 1, 1)
DDP_1W = Setup("DDP, 1 worker x 2 CPU", 1, 2)
DDP_2W = Setup("DDP, 2 workers x 1 CPU", 2, 1)
ZERO2_2W = Setup("DeepSpeed ZeRO-2, 2 workers x 1 CPU", 2, 1, "deepspeed", 2)
ZERO1_2W = Setup("DeepSpeed ZeRO-1, 2 workers x 1 CPU", 2, 1, "deepspeed", 1)

# In the order of round 1; neighbours are the compared pairs.
TINY_SETUPS = [DDP_1W_1CPU, DDP_1W, DDP_2W, ZERO2_2W, ZERO1_2W]
SMOL_SETUPS = [DDP_1W, DDP_2W, ZERO2_2W]


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """TRL-format preference pairs: a user turn, 30-60 word responses and a safety margin."""
    rng = random.Random(seed)
    return [
        {
            "prompt": [{"role": "user", "content": words(rng, 10, 20)}],
            "chosen": words(rng, 30, 60),
            "rejected": words(rng, 30, 60),
            "safety_delta": round(rng.uniform(0.0, 1.0), 3),
        }
        for _ in range(n)
    ]


def config(model: str, args: argparse.Namespace, setup: Setup | None = None, lora: bool = False):
    from selfmoa_ray.config import load_config

    overrides = [
        f"policy.source={model}",
        f"train.max_length={args.max_length}",
        f"train.batch_size={args.batch_size}",
        "train.epochs=1",
        "train.loss=modpo",
        "train.learning_rate=5e-6",  # the TrainSection default; the tiny preset has 1e-3
        f"train.lora.enabled={str(lora).lower()}",
    ]
    return load_config("tiny", overrides + (setup.overrides() if setup else []))


def reference_pass(model: str, rows: list[dict], args: argparse.Namespace, lora: bool):
    """The pairs with their reference log-probabilities, computed once and held in memory."""
    import ray

    from selfmoa_ray.stages.reference import reference_dataset

    cfg = config(model, args, lora=lora)
    start = time.perf_counter()
    ds = reference_dataset(ray.data.from_items(rows), cfg.policy, cfg.engine, cfg.train)
    ds = ds.materialize()
    print(f"reference pass {model}: {ds.count()} pairs in {time.perf_counter() - start:.1f} s")
    return ds


def run_fit(ds, model: str, args: argparse.Namespace, setup: Setup, lora: bool):
    """One ``fit``; returns (rank 0's last metrics, wall seconds of the call)."""
    from selfmoa_ray.stages.train import fit

    cfg = config(model, args, setup, lora)
    name = f"bench-{setup.strategy}-{setup.workers}w-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="selfmoa-bench-") as tmp:
        start = time.perf_counter()
        result = fit(ds, model_path=model, cfg=cfg.train, storage=Path(tmp), name=name, seed=0)
        wall = time.perf_counter() - start
    if result.error is not None:
        raise RuntimeError(f"{setup.label} failed") from result.error
    return dict(result.metrics), wall


def time_model(
    title: str, model: str, setups: list[Setup], args: argparse.Namespace, lora: bool
) -> list[Timing]:
    rows = synthetic_pairs(args.pairs)
    ds = reference_pass(model, rows, args, lora)
    timings = {s: Timing(s, pairs=len(rows)) for s in setups}
    for r in range(args.rounds):
        order = setups if r % 2 == 0 else list(reversed(setups))
        for setup in order:
            metrics, wall = run_fit(ds, model, args, setup, lora)
            t = timings[setup]
            t.in_loop.append(float(metrics["samples_per_s"]))
            t.wall.append(wall)
            t.steps = int(metrics["step"])
            print(
                f"[{title}] round {r + 1} {setup.label}: {t.in_loop[-1]:.2f} samples/s in loop, "
                f"fit {wall:.1f} s, {t.steps} steps, loss {float(metrics['loss']):.4f}",
                flush=True,
            )
    return [timings[s] for s in setups]


def print_table(title: str, timings: list[Timing], args: argparse.Namespace) -> None:
    poll = f"{args.poll_interval} s" if args.poll_interval > 0 else "Ray's default"
    print(f"\n{title}: {timings[0].pairs} pairs, max_length {args.max_length}, "
          f"batch {args.batch_size} per worker, 1 epoch, {args.rounds} round(s), "
          f"controller poll {poll}")  # fmt: skip
    print(f"{'configuration':<38} {'steps':>5} {'in-loop samples/s (range)':>26} {'fit s':>7} "
          f"{'e2e pairs/s':>12}")  # fmt: skip
    for t in timings:
        spread = f" ({min(t.in_loop):.2f}-{max(t.in_loop):.2f})" if len(t.in_loop) > 1 else ""
        print(
            f"{t.setup.label:<38} {t.steps:>5} {t.in_loop_mean:>10.2f}{spread:<16} "
            f"{statistics.mean(t.wall):>7.1f} {t.end_to_end_mean:>12.2f}"
        )
    by = {t.setup: t for t in timings}

    def ratio(label: str, a: Setup, b: Setup) -> None:
        if a in by and b in by:
            loop = by[a].in_loop_mean / by[b].in_loop_mean
            e2e = by[a].end_to_end_mean / by[b].end_to_end_mean
            print(f"ratio {label:<32} in loop {loop:.2f}x, end to end {e2e:.2f}x")

    ratio("2 workers / 1 worker (2 CPU)", DDP_2W, DDP_1W)
    ratio("2 workers / 1 worker (1 CPU)", DDP_2W, DDP_1W_1CPU)
    ratio("ZeRO-2 / DDP (2 workers)", ZERO2_2W, DDP_2W)
    ratio("ZeRO-1 / DDP (2 workers)", ZERO1_2W, DDP_2W)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-random only")
    parser.add_argument("--pairs", type=int, default=32, help="preference pairs per model")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2, help="per worker")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds per model")
    parser.add_argument(
        "--poll-interval", type=float, default=0.1,
        help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, seconds; 0 keeps Ray's default (2 s)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.poll_interval > 0:  # read by the Train controller, which inherits this environment
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.poll_interval)

    import ray

    from selfmoa_ray.config import RaySection
    from selfmoa_ray.ray_runtime import init_ray
    from selfmoa_ray.sources.models import resolve_model

    began = time.perf_counter()
    models = [(TINY, "tiny-random", TINY_SETUPS, False)]
    if not args.quick:
        models.append((SMOL, "SmolLM2-135M + LoRA", SMOL_SETUPS, True))
    for model, *_ in models:
        resolve_model(model)  # build or convert once, outside every timing
    init_ray(RaySection(num_cpus=4))

    warm_rows = synthetic_pairs(2 * args.batch_size, seed=1)
    warm = reference_pass(TINY, warm_rows, args, lora=False)
    start = time.perf_counter()
    run_fit(warm, TINY, args, ZERO2_2W, lora=False)
    print(f"warm-up (untimed): DeepSpeed fit in {time.perf_counter() - start:.1f} s", flush=True)

    results = [
        (title, time_model(title, model, setups, args, lora))
        for model, title, setups, lora in models
    ]
    ray.shutdown()
    for title, timings in results:
        print_table(title, timings, args)
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
