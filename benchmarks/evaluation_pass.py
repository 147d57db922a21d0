"""The evaluation pass of a loop iteration, before and after issue 17's wall-time work, and the
judges' calibration, side by side in one Ray session.

1. **Evaluation + vault.** Before: the held-out sets answered and judged (two judge actor pools:
   the training judge, then the audit judge, each with its own MiniLM), then the vault's attacks
   in a pass of their own. After (stages/evaluate.py): one pass over both, the judges in one
   actor sharing one set of MiniLM vectors (``JudgePanel``). Same policy, prompts and sampling;
   ABBA order; the answers and every judge column must agree.
2. **Calibration.** Each judge on its 400 held-back human rows: one after the other (before)
   against both at once (stages/calibrate.py); the accuracies must agree.

    .venv/bin/python benchmarks/evaluation_pass.py
    .venv/bin/python benchmarks/evaluation_pass.py --policy runs/demo/iter_01/policy --vault 40
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray.data

from selfmoa_ray.config import Config, load_config
from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.pool import generate
from selfmoa_ray.evaluators.audit import TRAINING_JUDGE, answer_and_judge, held_out_prompts
from selfmoa_ray.evaluators.pool import judge_dataset
from selfmoa_ray.ray_runtime import ray_for_run
from selfmoa_ray.sources.prompts import load_prompts
from selfmoa_ray.stages.calibrate import accuracy, held_back_rows

COMPARED = ("response", "safety", "refusal", "helpfulness", "training_judge_safety")


def answered_before(prompts: list[dict[str, Any]], config: Config, model: Any) -> list[dict]:
    """The evaluation as it was: generate, then one judge pool after the other."""
    sampling = SamplingParams(
        n=1,
        temperature=config.evaluate.temperature,
        max_new_tokens=config.evaluate.max_new_tokens,
        seed=config.run.seed,
    )
    ds = generate(ray.data.from_items(prompts), model, config.engine, sampling)
    ds = judge_dataset(ds, config.judge, model.dtype, prefix=TRAINING_JUDGE)
    ds = judge_dataset(ds, config.evaluate.judge, model.dtype)
    rows = [
        r for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) for r in b.to_pylist()
    ]
    return sorted(rows, key=lambda r: r["id"])


def before(held_out: list[dict], vault: list[dict], config: Config, model: Any) -> list[dict]:
    return answered_before(held_out, config, model) + answered_before(vault, config, model)


def after(held_out: list[dict], vault: list[dict], config: Config, model: Any) -> list[dict]:
    return answer_and_judge(held_out + vault, config, model, "evaluate")


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def compare_answers(a: list[dict], b: list[dict]) -> str:
    by_id = {r["id"]: r for r in b}
    same = {c: sum(r[c] == by_id[r["id"]][c] for r in a) for c in COMPARED}
    return ", ".join(f"{c} {n}/{len(a)}" for c, n in same.items())


def calibration(config: Config, together: bool) -> dict[str, Any]:
    def score(judge: Any, split: str) -> float:
        ds = judge_dataset(ray.data.from_items(held_back_rows(split)), judge, config.policy.dtype)
        rows = [r for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)
                for r in b.to_pylist()]  # fmt: skip
        return accuracy(rows, judge.unsafe_threshold)["safety"]["accuracy"]

    jobs = [(config.judge, "audit"), (config.evaluate.judge, "train")]
    if not together:
        return {split: score(judge, split) for judge, split in jobs}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {split: pool.submit(score, judge, split) for judge, split in jobs}
        return {split: future.result() for split, future in futures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--policy", help="policy folder (default: the config's policy)")
    parser.add_argument("--vault", type=int, default=40, help="vault attacks (AdvBench prompts)")
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds of the evaluation")
    args = parser.parse_args()
    config = load_config(args.config)
    model = config.policy
    if args.policy:
        model = model.model_copy(update={"source": args.policy})
    held_out = [p.to_dict() for p in held_out_prompts(config.data, config.run.seed)]
    vault = [
        {"id": f"vault-{i:03d}", "text": p.text, "category": p.category, "split": "vault"}
        for i, p in enumerate(load_prompts("advbench")[-args.vault :])
    ]
    with ray_for_run(config.ray):
        seconds: dict[str, list[float]] = {"before": [], "after": []}
        answers: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            for name in ("before", "after", "after", "before"):
                fn = before if name == "before" else after
                took, answers[name] = timed(fn, held_out, vault, config, model)
                seconds[name].append(took)
                print(f"evaluation + vault, {name}: {took:.1f} s", flush=True)
        b, a = (min(seconds[k]) for k in ("before", "after"))
        print(f"evaluation + vault ({len(held_out)} held-out prompts + {len(vault)} vault attacks): "
              f"before {b:.1f} s, after {a:.1f} s ({b / a:.2f}x); same values: "
              f"{compare_answers(answers['after'], answers['before'])}")  # fmt: skip
        took_b, acc_b = timed(calibration, config, False)
        took_a, acc_a = timed(calibration, config, True)
        print(f"calibration (2 judges x 400 rows): one after the other {took_b:.1f} s, side by "
              f"side {took_a:.1f} s ({took_b / took_a:.2f}x); accuracies {acc_b} / {acc_a}")  # fmt: skip


if __name__ == "__main__":
    main()
