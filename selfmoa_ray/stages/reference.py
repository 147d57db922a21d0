"""Stage ``reference``: the reference model's log-probabilities of every pair, stored beside it.

pairs.parquet -> pairs_ref.parquet (same rows, plus ``ref_chosen_logps``, ``ref_rejected_logps``
and their length-averaged ``*_avg`` twins for IPO). Computed once in a Ray Data pass through an
actor pool, so that the trainer holds a single model (design.md 3). Responses are tokenised by the
same function the trainer uses (:mod:`selfmoa_ray.training.data`), so the numbers line up.
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
from selfmoa_ray.stages.sample import write_dataset
from selfmoa_ray.training.data import encode_pairs
from selfmoa_ray.training.losses import sequence_logps
from selfmoa_ray.training.objective import check_columns, response_token_logps

REFERENCE_COLUMNS = (
    "ref_chosen_logps",
    "ref_rejected_logps",
    "ref_chosen_logps_avg",
    "ref_rejected_logps_avg",
)


class ReferenceScorer:
    """Callable class for ``map_batches``: loads the reference model once per actor."""

    def __init__(self, model: str, max_length: int, *, dtype: str = "float32"):
        from selfmoa_ray.sources.models import load_model_and_tokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_model_and_tokenizer(
            model, dtype=dtype, device=self.device
        )
        self.model.eval()
        self.max_length = max_length

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        """Arrow in, Arrow out: the pair columns (chat messages included) pass through untouched."""
        rows = batch.to_pylist()
        n = len(rows)
        encoded = encode_pairs(self.tokenizer, rows, max_length=self.max_length)
        encoded = {k: v.to(self.device) for k, v in encoded.items()}
        token_logps = response_token_logps(self.model, encoded).float()
        mask = encoded["response_mask"]
        total = sequence_logps(token_logps, mask).cpu().numpy()
        mean = sequence_logps(token_logps, mask, average=True).cpu().numpy()
        columns = {
            "ref_chosen_logps": total[:n],
            "ref_rejected_logps": total[n:],
            "ref_chosen_logps_avg": mean[:n],
            "ref_rejected_logps_avg": mean[n:],
        }
        for name, values in columns.items():
            if name in batch.column_names:  # recomputed under a new reference model
                batch = batch.drop_columns([name])
            batch = batch.append_column(name, pa.array(values, type=pa.float64()))
        return batch


def reference_dataset(
    ds: ray.data.Dataset, model: ModelSection, engine: EngineSection, train: TrainSection
) -> ray.data.Dataset:
    """Add the reference columns to a dataset of pairs."""
    return ds.map_batches(
        ReferenceScorer,
        fn_constructor_args=(model.source, train.max_length),
        fn_constructor_kwargs={"dtype": model.dtype},
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
        ds = ray.data.read_parquet(str(run.path(pairs)))
        dpo = train.model_copy(update={"loss": "dpo"})  # the pair columns, minus the new ones
        check_columns(dpo, ds.schema().names + list(REFERENCE_COLUMNS))
        write_dataset(reference_dataset(ds, model, engine, train), run, out)
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
