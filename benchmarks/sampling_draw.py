"""The next-token draw: torch.multinomial (what ``generate(do_sample=True)`` calls) against the
inverse-CDF draw of ``engines/sampler.py``, alone and inside ``HFChatEngine.generate``.

1. The draw alone, on softmax probabilities of shape (sequences, vocabulary), median of 20 calls.
2. The engine on the same prompts and sampling settings, once with transformers' own sampling
   (``do_sample=True``: temperature and top-p warpers, then ``torch.multinomial``) and once with
   ours (the same warpers, then the inverse-CDF draw), in ABBA order; tokens/s of each.

    .venv/bin/python benchmarks/sampling_draw.py
    .venv/bin/python benchmarks/sampling_draw.py --prompts 32 --n 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from selfmoa_ray.engines import hf
from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.hf import HFChatEngine
from selfmoa_ray.engines.sampler import InverseCdfDraw
from selfmoa_ray.sources.prompts import load_prompts


def _median_ms(fn: Any, calls: int = 20) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def draw_alone(rows: int, vocab: int) -> None:
    probs = torch.softmax(torch.randn(rows, vocab) / 0.8, dim=-1)
    scores = torch.log(probs)
    draw = InverseCdfDraw()
    ids = torch.zeros(rows, 1, dtype=torch.long)
    multinomial = _median_ms(lambda: torch.multinomial(probs, 1))
    ours = _median_ms(lambda: draw(ids, scores))
    print(f"draw alone, {rows} sequences x {vocab} tokens: torch.multinomial {multinomial:.1f} ms, "
          f"inverse CDF {ours:.1f} ms ({multinomial / ours:.1f}x)")  # fmt: skip


def transformers_decoding(greedy: bool, temperature: float, top_p: float) -> dict[str, Any]:
    """``generate`` keywords for transformers' own sampling (the engine before the draw)."""
    if greedy:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}


def engine_rounds(args: argparse.Namespace) -> None:
    sampling = SamplingParams(n=args.n, temperature=0.8, max_new_tokens=args.max_new_tokens)
    engine = HFChatEngine(args.model, sampling, num_threads=args.threads)
    texts = [p.text for p in load_prompts("advbench")[: args.prompts]]
    chats = [[{"role": "user", "content": t}] for t in texts]
    prompts = [
        engine.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
        for c in chats
    ]
    ours = hf.decoding
    rates: dict[str, list[float]] = {"transformers": [], "inverse CDF": []}
    for name in ("transformers", "inverse CDF", "inverse CDF", "transformers"):
        hf.decoding = ours if name == "inverse CDF" else transformers_decoding
        try:
            start = time.perf_counter()
            out = engine.generate(prompts)
            seconds = time.perf_counter() - start
        finally:
            hf.decoding = ours
        tokens = sum(s["response_tokens"] for samples in out for s in samples)
        rates[name].append(tokens / seconds)
    shown = {k: statistics.mean(v) for k, v in rates.items()}
    print(
        f"engine, {args.prompts} prompts x {args.n} samples x <= {args.max_new_tokens} tokens, "
        f"{args.threads} threads: transformers {shown['transformers']:.1f} tok/s, inverse CDF "
        f"{shown['inverse CDF']:.1f} tok/s ({shown['inverse CDF'] / shown['transformers']:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    draw_alone(args.prompts * args.n, 49152)
    engine_rounds(args)


if __name__ == "__main__":
    main()
