"""Stage ``reference``: the reference model's log-probabilities of every pair, stored beside it.

pairs.parquet -> pairs_ref.parquet (same rows, plus ``ref_chosen_logps``, ``ref_rejected_logps``
and their length-averaged ``*_avg`` twins for IPO, and the token columns of
:func:`selfmoa_ray.training.data.tokenize`). Computed once in a Ray Data pass through an actor
pool, so that the trainer holds a single model (docs/design.md 3) and never tokenises: it pads the
stored ids. The forward pass is the trainer's (same layout, weights dtype and autocast), so the
numbers line up.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch
from ray.data import ActorPoolStrategy

from selfmoa_ray.config import EngineSection, ModelSection, TrainSection
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.stage_io import read_dataset, write_dataset
from selfmoa_ray.training.data import collate, to_device, token_arrays, tokenize
from selfmoa_ray.training.losses import sequence_logps
from selfmoa_ray.training.objective import require_columns, response_token_logps
from selfmoa_ray.training.objectives.base import PAIR_COLUMNS
from selfmoa_ray.training.strategy import forward_numerics, local_device

REFERENCE_COLUMNS = (
    "ref_chosen_logps",
    "ref_rejected_logps",
    "ref_chosen_logps_avg",
    "ref_rejected_logps_avg",
)


class ReferenceScorer:
    """Callable class for ``map_batches``: loads the reference model once per actor, tokenises each
    batch once (the token columns are stored for the trainer) and scores it as the trainer's
    forward pass would (same weights dtype and autocast: ``strategy.forward_numerics``)."""

    def __init__(self, model: str, train: dict[str, Any]):
        from selfmoa_ray.sources.models import load_model_and_tokenizer

        self.train = TrainSection.model_validate(train)
        self.device = local_device()
        dtype, self.autocast = forward_numerics(self.train, self.device)
        self.model, self.tokenizer = load_model_and_tokenizer(
            model, dtype=dtype, device=self.device
        )
        self.model.eval()

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        """Arrow in, Arrow out: the pair columns (chat messages included) pass through untouched."""
        rows = batch.to_pylist()
        n = len(rows)
        tokens = tokenize(self.tokenizer, rows, kind="pairs", max_length=self.train.max_length)
        encoded = to_device(collate(tokens, pad_token_id=self.tokenizer.pad_token_id), self.device)
        with torch.autocast(self.device, torch.bfloat16, enabled=self.autocast):
            token_logps = response_token_logps(self.model, encoded).float()
        mask = encoded["response_mask"]
        total = sequence_logps(token_logps, mask).cpu().numpy()
        mean = sequence_logps(token_logps, mask, average=True).cpu().numpy()
        columns = {
            "ref_chosen_logps": pa.array(total[:n], pa.float64()),
            "ref_rejected_logps": pa.array(total[n:], pa.float64()),
            "ref_chosen_logps_avg": pa.array(mean[:n], pa.float64()),
            "ref_rejected_logps_avg": pa.array(mean[n:], pa.float64()),
            **token_arrays(tokens, "pairs"),
        }
        for name, values in columns.items():
            if name in batch.column_names:  # recomputed under a new reference model
                batch = batch.drop_columns([name])
            batch = batch.append_column(name, values)
        return batch


def reference_dataset(
    ds: ray.data.Dataset, model: ModelSection, engine: EngineSection, train: TrainSection
) -> ray.data.Dataset:
    """Add the reference and token columns to a dataset of pairs."""
    return ds.map_batches(
        ReferenceScorer,
        fn_constructor_args=(model.source, train.model_dump()),
        batch_size=train.batch_size * 2,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=engine.num_actors),
        num_cpus=engine.num_cpus_per_actor,
        num_gpus=engine.num_gpus_per_actor or None,
    )


def reference(
    run: RunDir,
    *,
    stage: str,
    pairs: str,
    out: str,
    model: ModelSection,
    engine: EngineSection,
    train: TrainSection,
) -> dict[str, Any]:
    """Run (or skip, if done) the reference pass of ``pairs`` into ``out``; run-relative paths."""

    def work() -> dict[str, Any]:
        ds = read_dataset(run, pairs, rows_per_block=train.batch_size * 2)
        require_columns(PAIR_COLUMNS[:3], ds.schema().names, "the reference pass")
        write_dataset(
            reference_dataset(ds, model, engine, train), run, out, total=ds.count(), label=stage
        )
        table = pq.read_table(run.path(out), columns=list(REFERENCE_COLUMNS[:2]))
        chosen = np.asarray(table.column("ref_chosen_logps"))
        rejected = np.asarray(table.column("ref_rejected_logps"))
        return {
            "model": model.source,
            "pairs": table.num_rows,
            "ref_chosen_logps_mean": float(chosen.mean()) if len(chosen) else None,
            "ref_prefers_chosen": float((chosen > rejected).mean()) if len(chosen) else None,
        }

    return run.run_stage(stage, [out], work)
