"""The Ray Train worker loop (``TorchTrainer(train_loop_per_worker=...)``), top to bottom.

Each worker: loads the policy (LoRA through peft, or full fine-tuning), wraps it in the configured
strategy, resumes from Ray Train's latest checkpoint if there is one, streams its shard of the
pairs (or triples), runs the configured loss, and reports metrics through ``ray.train.report``,
with a checkpoint every ``train.checkpoint_every`` optimizer steps and at each epoch's end. Rank 0
finally reports the exported Hugging Face folder as the last checkpoint.

Resuming skips the batches the checkpoint had already trained on in its epoch. Every worker sees
the same number of batches (Ray Train splits datasets equally), so reports and collective calls
stay in step across workers.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

FINAL_DIR = "hf"  # inside the last checkpoint: the exported policy


def load_policy(model_path: str, cfg: Any, dtype: str) -> tuple[torch.nn.Module, Any]:
    """The policy to train: the full model, or the model under fresh LoRA adapters."""
    from selfmoa_ray.sources.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_path, dtype=dtype)
    model.config.use_cache = False  # no KV cache while training
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    return model, tokenizer


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from tqdm import tqdm

    from selfmoa_ray.config import TrainSection
    from selfmoa_ray.training.export import export_hf, gathered
    from selfmoa_ray.training.objective import compute_loss
    from selfmoa_ray.training.strategy import make_strategy

    cfg = TrainSection.model_validate(config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config["seed"] + rank)
    device = ray.train.torch.get_device()

    model, tokenizer = load_policy(config["model_path"], cfg, config.get("dtype", "float32"))
    strategy = make_strategy(model, cfg)

    state = {"epoch": 0, "batches_done": 0, "step": 0, "micro_steps": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            if (Path(directory) / FINAL_DIR).is_dir():  # finished before the driver collected it
                final = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
                ray.train.report({"final": 1, "resumed_from_step": -1}, checkpoint=final)
                return
            state.update(strategy.load(Path(directory)))
    resumed_from = state["step"]

    batches_per_epoch = config["rows"] // (world * cfg.batch_size)
    shard = ray.train.get_dataset_shard("train")
    progress = tqdm(
        total=batches_per_epoch * cfg.epochs,
        initial=state["epoch"] * batches_per_epoch + state["batches_done"],
        desc="train",
        disable=rank != 0,
    )

    def report(metrics: dict[str, float], save: bool) -> None:
        metrics = {**metrics, **state, "resumed_from_step": resumed_from}
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            # DeepSpeed: every rank writes its shard. DDP: rank 0's copy is the whole state.
            if cfg.strategy == "deepspeed" or rank == 0:
                strategy.save(Path(tmp), dict(state))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)

    metrics: dict[str, float] = {}
    for epoch in range(state["epoch"], cfg.epochs):
        skip = state["batches_done"]
        started = time.perf_counter()
        for i, batch in enumerate(
            shard.iter_batches(batch_size=cfg.batch_size, batch_format="pandas", drop_last=True)
        ):
            if i < skip:
                continue  # trained on before the checkpoint this run resumed from
            rows = batch.to_dict("records")
            with torch.autocast(device.type, torch.bfloat16, enabled=strategy.autocast):
                loss, metrics = compute_loss(strategy.model, tokenizer, rows, cfg, device)
            strategy.backward(loss)
            stepped = strategy.step()
            state["batches_done"] = i + 1
            state["micro_steps"] = getattr(strategy, "micro_steps", state["micro_steps"] + 1)
            progress.update(1)
            metrics = {"loss": float(loss.detach()), **metrics}
            if stepped:
                state["step"] += 1
                metrics["samples_per_s"] = (
                    (i + 1 - skip) * cfg.batch_size * world / (time.perf_counter() - started)
                )
                due = bool(cfg.checkpoint_every) and state["step"] % cfg.checkpoint_every == 0
                if due or state["step"] % cfg.report_every == 0:
                    report(metrics, save=due)  # each report waits for Ray's controller poll
        state["epoch"], state["batches_done"] = epoch + 1, 0
        report(metrics, save=True)
    progress.close()

    # The export: the merged policy in Hugging Face format, as the final checkpoint.
    zero_stage = cfg.zero_stage if cfg.strategy == "deepspeed" else None
    with gathered(strategy.unwrapped(), zero_stage), tempfile.TemporaryDirectory() as tmp:
        final = None
        if rank == 0:
            export_hf(strategy.unwrapped(), tokenizer, Path(tmp) / FINAL_DIR)
            final = ray.train.Checkpoint.from_directory(tmp)
        summary = {**metrics, **state, "resumed_from_step": resumed_from, "final": 1}
        ray.train.report(summary, checkpoint=final)
