"""Generation throughput: a naive per-prompt ``generate`` loop against the Ray Data pipeline.

Both paths answer the same HarmBench prompts greedily with the same model and token budget, one
after the other in this process, so the ratio is measured under the same machine conditions.

    .venv/bin/python benchmarks/generation.py                      # 64 prompts x 64 new tokens
    .venv/bin/python benchmarks/generation.py --prompts 16 --model tiny-random

Tokens/s counts generated tokens (up to and including EOS) over wall time. The pipeline's time
includes starting its actors and loading the model in them: that is what a user waits for.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def naive_loop(model: str, prompts: list[str], max_new_tokens: int) -> tuple[int, float]:
    """One prompt at a time, the way a first script calls ``generate``."""
    import torch

    from selfmoa_ray.sources.models import load_model_and_tokenizer

    lm, tok = load_model_and_tokenizer(model)
    start = time.perf_counter()
    tokens = 0
    with torch.inference_mode():
        for prompt in prompts:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True,
                return_tensors="pt", return_dict=True,
            )  # fmt: skip
            out = lm.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[0, ids["input_ids"].shape[1] :].tolist()
            tokens += new.index(tok.eos_token_id) + 1 if tok.eos_token_id in new else len(new)
    return tokens, time.perf_counter() - start


def ray_pipeline(
    model: str, prompts: list[str], max_new_tokens: int, batch_size: int, actors: int
) -> tuple[int, float]:
    """The project's path: Ray Data streaming rows through a pool of batched HF engines."""
    import ray

    from selfmoa_ray.config import EngineSection, ModelSection, RaySection
    from selfmoa_ray.engines.base import SamplingParams
    from selfmoa_ray.engines.pool import generate
    from selfmoa_ray.ray_runtime import init_ray

    init_ray(RaySection(num_cpus=4))
    engine = EngineSection(
        batch_size=batch_size, num_actors=actors, num_cpus_per_actor=(os.cpu_count() or 2) / actors
    )
    start = time.perf_counter()
    ds = ray.data.from_items([{"id": str(i), "text": p} for i, p in enumerate(prompts)])
    rows = generate(
        ds, ModelSection(source=model), engine, SamplingParams(max_new_tokens=max_new_tokens)
    ).take_all()
    elapsed = time.perf_counter() - start
    ray.shutdown()
    return sum(int(r["response_tokens"]) for r in rows), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--actors", type=int, default=1)
    args = parser.parse_args()

    from selfmoa_ray.sources.models import resolve_model
    from selfmoa_ray.sources.prompts import load_source

    resolve_model(args.model)  # convert once, outside both timings
    prompts = [r.text for r in load_source("harmbench")[: args.prompts]]
    naive_tokens, naive_s = naive_loop(args.model, prompts, args.max_new_tokens)
    ray_tokens, ray_s = ray_pipeline(
        args.model, prompts, args.max_new_tokens, args.batch_size, args.actors
    )
    naive_rate, ray_rate = naive_tokens / naive_s, ray_tokens / ray_s
    print(
        f"\nmodel {args.model}, {len(prompts)} prompts x {args.max_new_tokens} new tokens, greedy"
    )
    print(f"{'path':<44} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    print(
        f"{'naive loop (generate per prompt)':<44} {naive_tokens:>7} {naive_s:>8.1f} {naive_rate:>9.1f}"
    )
    label = f"Ray Data pipeline ({args.actors} actor, batch {args.batch_size})"
    print(f"{label:<44} {ray_tokens:>7} {ray_s:>8.1f} {ray_rate:>9.1f}")
    print(f"ratio pipeline / naive: {ray_rate / naive_rate:.2f}x")


if __name__ == "__main__":
    main()
