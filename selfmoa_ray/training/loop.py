"""The Ray Train worker loop (``TorchTrainer(train_loop_per_worker=...)``), top to bottom.

Each worker: loads the policy (LoRA through peft, or full fine-tuning), wraps it in the configured
strategy, resumes from Ray Train's latest checkpoint if there is one, streams its shard of the
pairs (or triples), runs the configured loss, and reports metrics through ``ray.train.report``,
with a checkpoint every ``train.checkpoint_every`` optimizer steps and at the end of each epoch
but the last. Rank 0 finally reports the exported Hugging Face folder as the last checkpoint, and
writes every optimizer step's metrics to the stage's history file (training/history.py), the
tracker's training curves.
Checkpoints are written once, in place, into Ray Train's storage folder (``NO_UPLOAD``); the stage
deletes them when it is done (``train.keep_checkpoints``).

With validation prompts (preference losses in the loop), the worker answers them before training,
after each epoch and ``train.validations_per_epoch - 1`` times within it, and keeps the point on
the safety/over-refusal frontier
(training/selection.py); the summary also carries the preference accuracy of the kept policy on
all its training pairs (one forward pass after training), the honest "did it learn its pairs".

Resuming skips the batches the checkpoint had already trained on in its epoch. Every worker sees
the same number of batches (Ray Train splits datasets equally), so reports and collective calls
stay in step across workers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import CheckpointUploadMode

from selfmoa_ray.training.data import collate, to_device
from selfmoa_ray.training.history import StepHistory
from selfmoa_ray.training.selection import ValidationPoint, best_point, validation_point

FINAL_DIR = "hf"  # inside the last checkpoint: the exported policy
NO_UPLOAD = CheckpointUploadMode.NO_UPLOAD  # checkpoints are written in place (see report())


def load_policy(model_path: str, cfg: Any, dtype: str) -> tuple[torch.nn.Module, Any]:
    """The policy to train: the full model, or the model under fresh LoRA adapters (which peft
    keeps in float32 over a bf16 base)."""
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


class PadBatch(NumpyBatchCollateFn):
    """Ray Data collate function: the shard's token columns -> one padded forward batch. Runs in
    Ray Data's prefetch thread, so padding overlaps the previous step's compute."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return collate(batch, pad_token_id=self.pad_token_id)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from selfmoa_ray.config import TrainSection
    from selfmoa_ray.precision import resolve_precision
    from selfmoa_ray.training.export import export_hf, gathered
    from selfmoa_ray.training.objective import compute_loss
    from selfmoa_ray.training.strategy import forward_numerics, make_strategy

    cfg = TrainSection.model_validate(config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config["seed"] + rank)
    device = ray.train.torch.get_device()
    cfg = cfg.model_copy(update={"precision": resolve_precision(cfg.precision, device.type)})

    model, tokenizer = load_policy(config["model_path"], cfg, forward_numerics(cfg, device.type)[0])
    strategy = make_strategy(model, cfg)
    checkpoints = Path(config["checkpoint_root"])

    state = {"epoch": 0, "batches_done": 0, "step": 0, "micro_steps": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            if (Path(directory) / FINAL_DIR).is_dir():  # finished before the driver collected it
                final = checkpoint if rank == 0 else None
                ray.train.report({"final": 1, "resumed_from_step": -1}, checkpoint=final,
                                 checkpoint_upload_mode=NO_UPLOAD)  # fmt: skip
                return
            state.update(strategy.load(Path(directory)))
    resumed_from = state["step"]

    batches_per_epoch = config["rows"] // (world * cfg.batch_size)
    shard = ray.train.get_dataset_shard("train")
    # The driver's progress bar (console.remote_progress), moved by rank 0; None when none is drawn.
    progress = config.get("progress") if rank == 0 else None
    history = StepHistory(config.get("history") if rank == 0 else None, state["step"])

    def report(metrics: dict[str, float], save: bool) -> None:
        """Metrics, with a checkpoint when ``save``. Checkpoints are written straight into Ray
        Train's storage folder and registered as they are (no upload, so no second copy)."""
        metrics = {**metrics, **scalars(state), "resumed_from_step": resumed_from}
        if not save:
            ray.train.report(metrics)
            return
        # DeepSpeed: every rank writes its shard. DDP: rank 0's copy is the whole state.
        writes = cfg.strategy == "deepspeed" or rank == 0
        path = checkpoints / f"checkpoint_step{state['step']:06d}_batch{state['batches_done']:06d}"
        if writes:
            path.mkdir(parents=True, exist_ok=True)
            strategy.save(path, dict(state))
        saved = ray.train.Checkpoint.from_directory(path) if writes else None
        ray.train.report(metrics, checkpoint=saved, checkpoint_upload_mode=NO_UPLOAD)

    metrics: dict[str, float] = {}
    pad = PadBatch(tokenizer.pad_token_id)
    chooser = EpochChooser(config.get("validation"), cfg, tokenizer, state)
    if state["epoch"] == 0 and state["batches_done"] == 0:
        chooser.observe(strategy.unwrapped(), epoch=0)
    # Mid-epoch validation points: after these batches of each epoch (the epoch's end is one too).
    mid_epoch = validation_batches(batches_per_epoch, cfg.validations_per_epoch, cfg.grad_accum)
    for epoch in range(state["epoch"], cfg.epochs):
        skip = state["batches_done"]
        started = time.perf_counter()
        batches = shard.iter_torch_batches(
            batch_size=cfg.batch_size, collate_fn=pad, drop_last=True
        )
        for i, batch in enumerate(batches):
            if i < skip:
                continue  # trained on before the checkpoint this run resumed from
            with torch.autocast(device.type, torch.bfloat16, enabled=strategy.autocast):
                loss, metrics = compute_loss(strategy.model, to_device(batch, device), cfg)
            strategy.backward(loss)
            stepped = strategy.step()
            state["batches_done"] = i + 1
            state["micro_steps"] = getattr(strategy, "micro_steps", state["micro_steps"] + 1)
            metrics = {"loss": float(loss.detach()), **metrics}
            if progress is not None:
                done = epoch * batches_per_epoch + i + 1
                progress.report(
                    done, batches_per_epoch * cfg.epochs, loss=round(metrics["loss"], 4)
                )
            if stepped:
                state["step"] += 1
                metrics["samples_per_s"] = (
                    (i + 1 - skip) * cfg.batch_size * world / (time.perf_counter() - started)
                )
                history.write(state["step"], epoch + (i + 1) / batches_per_epoch, metrics)
                due = bool(cfg.checkpoint_every) and state["step"] % cfg.checkpoint_every == 0
                if due or state["step"] % cfg.report_every == 0:
                    report(metrics, save=due)  # each report waits for Ray's controller poll
                if i + 1 in mid_epoch:
                    at = epoch + (i + 1) / batches_per_epoch
                    chooser.observe(strategy.unwrapped(), epoch=round(at, 3))
        state["epoch"], state["batches_done"] = epoch + 1, 0
        chooser.observe(strategy.unwrapped(), epoch=epoch + 1)
        # The last epoch needs no checkpoint of its own: the export below is the final one.
        if epoch + 1 < cfg.epochs:
            report(metrics, save=cfg.checkpoint_epochs)
    history.close()

    # The export: the kept epoch's policy in Hugging Face format, as the final checkpoint.
    zero_stage = cfg.zero_stage if cfg.strategy == "deepspeed" else None
    path = checkpoints / "checkpoint_final"
    with gathered(strategy.unwrapped(), zero_stage):
        kept = chooser.restore(strategy.unwrapped())
        learned = pairs_accuracy(strategy.unwrapped(), shard, pad, cfg, device, strategy.autocast)
        final = None
        if rank == 0:
            export_hf(strategy.unwrapped(), tokenizer, path / FINAL_DIR)
            final = ray.train.Checkpoint.from_directory(path)
        summary = {**metrics, **scalars(state), **kept, **learned, "resumed_from_step": resumed_from,
                   "final": 1}  # fmt: skip
        ray.train.report(summary, checkpoint=final, checkpoint_upload_mode=NO_UPLOAD)


def validation_batches(batches_per_epoch: int, per_epoch: int, grad_accum: int = 1) -> set[int]:
    """Batch counts within an epoch after which to validate, besides the epoch's end: ``per_epoch``
    points an epoch, evenly spaced on optimizer steps (fewer when the epoch has fewer steps)."""
    steps = batches_per_epoch // grad_accum
    marks = {round(steps * k / per_epoch) * grad_accum for k in range(1, per_epoch)}
    return {m for m in marks if 0 < m < batches_per_epoch}


def scalars(state: dict[str, Any]) -> dict[str, Any]:
    """The loop state's numbers, for ``ray.train.report`` (the validation points stay behind)."""
    return {k: v for k, v in state.items() if isinstance(v, (int, float))}


class EpochChooser:
    """Validation points before training and after each epoch, and the weights of the best one
    so far (training/selection.py). The points live in the checkpointed ``state``; weights only in
    memory, so after a resume the choice is among the epochs this process saw (and the start's
    benign refusal rate, stored, still anchors the score). Does nothing without validation."""

    def __init__(
        self, validation: dict[str, list[str]] | None, cfg: Any, tokenizer: Any, state: dict
    ):
        self.validation, self.cfg, self.tokenizer = validation, cfg, tokenizer
        self.points: list[dict[str, float]] = state.setdefault("validation", [])
        self.seen: list[ValidationPoint] = []
        self.best: tuple[float, dict[str, torch.Tensor]] | None = None

    def observe(self, model: torch.nn.Module, *, epoch: float) -> None:
        if not self.validation:
            return
        point = validation_point(
            model, self.tokenizer, self.validation["attacks"], self.validation["benign"],
            epoch=epoch, max_new_tokens=self.cfg.validation_max_new_tokens,
        )  # fmt: skip
        self.points.append(vars(point))
        self.seen.append(point)
        start = min(self.points, key=lambda p: p["epoch"])  # stored: anchors after a resume too
        chosen = best_point(self.seen, self.cfg.over_refusal_weight, start["benign_refusal"])
        if chosen.epoch == point.epoch:
            self.best = (epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})

    def restore(self, model: torch.nn.Module) -> dict[str, float]:
        """Load the best epoch's weights into ``model``; its epoch and validation rates."""
        if not self.validation or self.best is None:
            return {}
        epoch, weights = self.best
        if epoch != self.seen[-1].epoch:
            model.load_state_dict(weights)
        point = next(p for p in self.seen if p.epoch == epoch)
        return {
            "kept_epoch": float(epoch),
            "val_attack_refusal": point.attack_refusal,
            "val_benign_refusal": point.benign_refusal,
            # Every epoch's refusal rates, "epoch:attacks/benign", for the manifest and a reader.
            "validation_trace": " ".join(
                f"{p['epoch']:g}:{p['attack_refusal']:.2f}/{p['benign_refusal']:.2f}"
                for p in self.points
            ),
        }


@torch.no_grad()
def pairs_accuracy(
    model: torch.nn.Module,
    shard: Any,
    pad: PadBatch,
    cfg: Any,
    device: torch.device,
    autocast: bool,
) -> dict[str, float]:
    """Share of this worker's training pairs whose implicit reward prefers the chosen response
    under ``model`` (the policy being exported), and their mean reward margin."""
    from selfmoa_ray.training.objective import compute_loss, is_preference

    if not is_preference(cfg):
        return {}
    was_training = model.training
    model.eval()
    right = margin = total = 0.0
    for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, collate_fn=pad):
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            _, metrics = compute_loss(model, to_device(batch, device), cfg)
        n = batch["input_ids"].shape[0] // 2
        right += metrics["preference_accuracy"] * n
        margin += metrics["reward_margin"] * n
        total += n
    model.train(was_training)
    if not total:
        return {}
    return {"pairs_accuracy": right / total, "pairs_reward_margin": margin / total}
