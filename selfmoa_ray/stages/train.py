"""Stage ``train``: preference optimisation (or PT-ALIGN) on Ray Train, policy in, policy out.

pairs_ref.parquet (or triples.parquet) + the current policy -> ``out``, a Hugging Face folder of
the next policy. A ``TorchTrainer`` runs :func:`selfmoa_ray.training.loop.train_loop_per_worker`
on ``train.num_workers`` workers with fractional CPUs (or GPUs), each streaming its shard of the
tokenised rows. Ray Train keeps checkpoints under ``<run>/ray_train/<stage>``; running the stage
again after a kill resumes from the newest one (Ray Train restores a run of the same name and
storage path). Once the policy is published the checkpoints are deleted: a finished stage never
runs again, so they would only fill the disk (1.6 GB of optimizer state for SmolLM2-135M). Rank 0
keeps every optimizer step's metrics in ``<stage>_history.jsonl`` (``iter_01/train_history.jsonl``,
named in the stage's summary as ``history``), for the experiment tracker's training curves.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray.data
import ray.train
from ray.data import ActorPoolStrategy, ExecutionOptions
from ray.train.torch import TorchTrainer

from selfmoa_ray.config import ModelSection, TrainSection
from selfmoa_ray.console import remote_progress
from selfmoa_ray.engines.pool import as_dataset
from selfmoa_ray.rundir import TRAIN_STORAGE_DIR, RunDir, atomic_path
from selfmoa_ray.training.data import (
    SCALAR_COLUMNS,
    MalformedPairError,
    TokenizeRows,
    in_training_order,
    kind_of,
    token_columns,
)
from selfmoa_ray.training.history import history_path
from selfmoa_ray.training.loop import FINAL_DIR, train_loop_per_worker
from selfmoa_ray.training.objective import check_columns

TRAIN_STORAGE = TRAIN_STORAGE_DIR  # run-relative folder of Ray Train's checkpoints


def scaling_config(cfg: TrainSection) -> ray.train.ScalingConfig:
    """Workers with fractional CPUs (so training can share a small machine) or GPUs."""
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker:
        resources["GPU"] = cfg.gpus_per_worker
    return ray.train.ScalingConfig(
        num_workers=cfg.num_workers,
        use_gpu=cfg.gpus_per_worker > 0,
        resources_per_worker=resources,
    )


def with_tokens(ds: ray.data.Dataset, model_path: str, cfg: TrainSection) -> ray.data.Dataset:
    """The training columns of ``ds``, tokenised once if the rows carry no token columns yet (the
    reference pass stores them for pairs; PT-ALIGN triples arrive without). Prompt and response
    texts stay behind: workers receive ids, masks and scalars only."""
    columns = ds.schema().names
    kind = kind_of(columns)
    tokens = list(token_columns(kind))
    if not set(tokens) <= set(columns):
        ds = ds.map_batches(
            TokenizeRows,
            fn_constructor_args=(model_path, kind, cfg.max_length),
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=1),
            num_cpus=0.25,
        ).materialize()
    keep = [c for c in (*SCALAR_COLUMNS, "harmful_spans") if c in columns]
    return ds.select_columns(tokens + keep)


def ordered() -> ExecutionOptions:
    """Ray Data's default execution options, but rows kept in order (Ray Data lets blocks
    overtake each other by default, which would make training depend on timing)."""
    options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = True
    return options


def fit(
    ds: ray.data.Dataset,
    *,
    model_path: str,
    cfg: TrainSection,
    storage: Path,
    name: str,
    seed: int = 0,
    validation: dict[str, list[str]] | None = None,
    history: Path | None = None,
) -> ray.train.Result:
    """Train on ``ds`` and return Ray Train's result, whose last checkpoint holds ``hf/``.
    ``validation``: attack and benign prompts on which the worker keeps its best epoch.
    ``history``: the file rank 0 writes each optimizer step's metrics to (training/history.py)."""
    check_columns(cfg, ds.schema().names)
    rows = ds.count()
    if rows < cfg.num_workers * cfg.batch_size:
        raise MalformedPairError(
            f"{rows} rows cannot fill one batch of {cfg.batch_size} on each of "
            f"{cfg.num_workers} workers; lower train.batch_size or train.num_workers"
        )
    storage = storage.resolve()
    steps = rows // (cfg.num_workers * cfg.batch_size) * cfg.epochs
    with remote_progress(name, total=steps, unit="batch") as progress:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "train": cfg.model_dump(),
                "model_path": model_path,
                "rows": rows,
                "seed": seed,
                "validation": validation,
                "history": str(history.resolve()) if history else None,
                # Ray Train's folder for this run, where workers write checkpoints in place.
                "checkpoint_root": str(storage / name),
                "progress": progress,  # the console's bar (None when none is drawn)
            },
            scaling_config=scaling_config(cfg),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=str(storage),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            ),
            datasets={"train": with_tokens(ds, model_path, cfg)},
            # Batches in file order, every time: the same pairs and seed train the same policy.
            dataset_config=ray.train.DataConfig(execution_options=ordered()),
        )
        return trainer.fit()


def publish(checkpoint: ray.train.Checkpoint, target: Path) -> None:
    """The exported policy inside ``checkpoint`` becomes ``target``, atomically. Hard links, not
    copies, where both live on one filesystem: the checkpoint is deleted right after (unless
    kept), and 0.5 GB of weights are not written twice."""
    with checkpoint.as_directory() as directory, atomic_path(target) as tmp:
        source = Path(directory) / FINAL_DIR
        try:
            shutil.copytree(source, tmp, copy_function=os.link)
        except OSError:  # another filesystem (or no hard links there): copy
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)


def train(
    run: RunDir,
    *,
    stage: str,
    data: str,
    out: str,
    model: ModelSection,
    config: TrainSection,
    seed: int = 0,
    validation: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Run (or skip, if done) training on ``data`` into the policy folder ``out``. Ray Train's
    checkpoints of a finished stage are deleted (they only serve to resume a killed training)
    unless ``train.keep_checkpoints``. ``validation``: see :func:`fit`."""

    history = history_path(stage)

    def work() -> dict[str, Any]:
        table = in_training_order(pq.read_table(run.path(data)), config.order, seed)
        ds = as_dataset(table, config.batch_size)
        result = fit(
            ds,
            model_path=model.source,
            cfg=config,
            storage=run.path(TRAIN_STORAGE),
            name=stage,
            seed=seed,
            validation=validation,
            history=run.path(history),
        )
        publish(result.checkpoint, run.path(out))
        keep = (
            "loss",
            "reward_margin",
            "preference_accuracy",
            "mle",
            "unlikelihood",
            "harmful_tokens",
            "samples_per_s",
            "pairs_accuracy",
            "pairs_reward_margin",
            "kept_epoch",
            "val_attack_refusal",
            "val_benign_refusal",
        )
        return {
            "start_model": model.source,
            "pairs": ds.count(),
            "steps": int(result.metrics.get("step", 0)),
            "resumed_from_step": int(result.metrics.get("resumed_from_step", 0)),
            **{k: float(v) for k, v in result.metrics.items() if k in keep},
            **(
                {"validation_trace": trace}
                if (trace := result.metrics.get("validation_trace"))
                else {}
            ),  # fmt: skip
            "history": history,  # last: the stage's terminal line cuts it first
        }

    entry = run.run_stage(stage, [out], work)
    if not config.keep_checkpoints:
        folder = run.path(TRAIN_STORAGE, stage)
        shutil.rmtree(folder, ignore_errors=True)
        for parent in folder.relative_to(run.root).parents[:-1]:  # iter_01/, then ray_train/
            with contextlib.suppress(OSError):  # kept while other stages' checkpoints are there
                run.path(parent).rmdir()
    return entry
