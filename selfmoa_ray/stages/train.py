"""Stage ``train``: preference optimisation (or PT-ALIGN) on Ray Train, policy in, policy out.

pairs_ref.parquet (or triples.parquet) + the current policy -> ``out``, a Hugging Face folder of
the next policy. A ``TorchTrainer`` runs :func:`selfmoa_ray.training.loop.train_loop_per_worker`
on ``train.num_workers`` workers with fractional CPUs (or GPUs), each streaming its shard of the
rows. Ray Train keeps checkpoints under ``<run>/ray_train/<stage>``; running the stage again after
a kill resumes from the newest one (Ray Train restores a run of the same name and storage path).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from selfmoa_ray.config import ModelSection, TrainSection
from selfmoa_ray.rundir import TRAIN_STORAGE_DIR, RunDir, atomic_path
from selfmoa_ray.training.data import MalformedPairError
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


def fit(
    ds: ray.data.Dataset,
    *,
    model_path: str,
    cfg: TrainSection,
    storage: Path,
    name: str,
    seed: int = 0,
    dtype: str = "float32",
) -> ray.train.Result:
    """Train on ``ds`` and return Ray Train's result, whose last checkpoint holds ``hf/``."""
    check_columns(cfg, ds.schema().names)
    rows = ds.count()
    if rows < cfg.num_workers * cfg.batch_size:
        raise MalformedPairError(
            f"{rows} rows cannot fill one batch of {cfg.batch_size} on each of "
            f"{cfg.num_workers} workers; lower train.batch_size or train.num_workers"
        )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(),
            "model_path": model_path,
            "rows": rows,
            "seed": seed,
            "dtype": dtype,
        },
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage.resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": ds},
    )
    return trainer.fit()


def train(
    run: RunDir,
    *,
    stage: str,
    data: str,
    out: str,
    model: ModelSection,
    config: TrainSection,
    seed: int = 0,
) -> dict[str, Any]:
    """Run (or skip, if done) training on ``data`` into the policy folder ``out``."""

    def work() -> dict[str, Any]:
        ds = ray.data.read_parquet(str(run.path(data)))
        result = fit(
            ds,
            model_path=model.source,
            cfg=config,
            storage=run.path(TRAIN_STORAGE),
            name=stage,
            seed=seed,
            dtype=model.dtype,
        )
        with result.checkpoint.as_directory() as directory, atomic_path(run.path(out)) as tmp:
            shutil.copytree(Path(directory) / FINAL_DIR, tmp)
        keep = (
            "loss",
            "reward_margin",
            "preference_accuracy",
            "mle",
            "unlikelihood",
            "harmful_tokens",
        )
        return {
            "start_model": model.source,
            "steps": int(result.metrics.get("step", 0)),
            "resumed_from_step": int(result.metrics.get("resumed_from_step", 0)),
            **{k: float(v) for k, v in result.metrics.items() if k in keep},
        }

    return run.run_stage(stage, [out], work)
