"""A probe on disk: the folder's format, its version checks, and where each split's folder lives.

``weights.npz`` (plain float arrays) + ``card.json`` (the model card), never pickle; ``load_probe``
refuses any folder it did not write. Kept apart from training so that loading a probe (every
judge does) needs neither scikit-learn nor the training rows, and below the judge so that
training and the judge both save, load and name folders the same way. The folder name carries
``FORMAT_VERSION``, so the split names (``SPLITS``) and the default folders live here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from selfmoa_ray.evaluators.embeddings import EMBEDDER_NAME
from selfmoa_ray.evaluators.probe_model import (
    FEATURE_DIM,
    FEATURE_RECIPE,
    HEAD_MODELS,
    HEADS,
    LinearHead,
    Probe,
    ProbeCard,
)

FORMAT = "selfmoa-ray/probe"
FORMAT_VERSION = 2  # 2: each probe trains on one split of the rows (SPLITS)
CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.npz"
ARRAY_SUFFIXES = ("coef", "intercept", "mean", "scale")
# Two probes from disjoint halves of the labelled rows: ``train`` scores the loop's answers for
# training, ``audit`` scores held-out answers and decides acceptance (evaluate.judge), so the loop
# is not graded by the judge it learnt from. Rows split by prompt (every row of one prompt, or one
# twin pair, falls in the same half); each probe's card reports it on the other half.
SPLITS = ("train", "audit")


def default_probe_dir(split: str = "train") -> Path:
    """The cached probe of ``split``: versioned, so a new format never loads an old folder."""
    from selfmoa_ray.paths import cache_root

    return cache_root() / "evaluators" / f"probe-v{FORMAT_VERSION}-{checked_split(split)}"


def checked_split(split: str) -> str:
    """``split`` if it names one of ``SPLITS``, else a ``ValueError``."""
    if split not in SPLITS:
        raise ValueError(f"probe split must be one of {list(SPLITS)}, got {split!r}")
    return split


def probe_source(model: str | None) -> tuple[str | None, str]:
    """A probe evaluator's ``model`` setting as (a folder, or None for the cached probe, and the
    split): ``None`` and ``train`` name the training probe, ``audit`` the audit probe, anything
    else a folder written by ``train_probe``."""
    if model is None or model in SPLITS:
        return None, model or "train"
    return model, "train"


def probe_folder(model: str | None) -> Path:
    """Where the probe named by ``model`` (``probe_source``) lives, trained or not."""
    folder, split = probe_source(model)
    return Path(folder) if folder is not None else default_probe_dir(split)


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"coef": (FEATURE_DIM,), "intercept": (), "mean": (FEATURE_DIM,)}
    shapes["scale"] = (FEATURE_DIM,)
    return {f"{h}_{s}": shapes[s] for h in HEADS for s in ARRAY_SUFFIXES}


def save_probe(probe: Probe, out_dir: str | Path) -> Path:
    """Write ``weights.npz`` + ``card.json`` to ``out_dir`` atomically (replacing it)."""
    from selfmoa_ray.rundir import atomic_path

    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        np.savez(tmp / WEIGHTS_FILE, **probe.arrays())
        (tmp / CARD_FILE).write_text(json.dumps(probe.card.to_json(), indent=2) + "\n")
    probe.card.path = str(out_dir)
    return out_dir


def load_probe(path: str | Path) -> Probe:
    """Load a probe written by ``save_probe``; refuse anything else with a ``ValueError``.

    Checks: the folder holds exactly ``card.json`` and ``weights.npz``; the card carries our
    ``format`` marker, version, embedder and feature recipe; the npz (read with
    ``allow_pickle=False``) holds exactly the expected float arrays with the expected shapes.
    A missing folder raises ``FileNotFoundError``.
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"no trained probe at {folder}")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a probe folder (expected {CARD_FILE} + {WEIGHTS_FILE})")
    names = {p.name for p in folder.iterdir()}
    if names != {CARD_FILE, WEIGHTS_FILE}:
        raise ValueError(
            f"{folder} is not a probe folder written by selfmoa-ray: expected exactly "
            f"{CARD_FILE} and {WEIGHTS_FILE}, found {sorted(names)}"
        )
    try:
        data = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{folder / CARD_FILE} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{folder / CARD_FILE}: format {got!r} is not {FORMAT!r}")
    for key, want in (
        ("version", FORMAT_VERSION),
        ("embedder", EMBEDDER_NAME),
        ("features", FEATURE_RECIPE),
        ("feature_dim", FEATURE_DIM),
    ):
        if data.get(key) != want:
            raise ValueError(f"{folder / CARD_FILE}: {key} {data.get(key)!r}, expected {want!r}")
    if not isinstance(data.get("heads"), dict) or set(data["heads"]) != set(HEADS):
        raise ValueError(f"{folder / CARD_FILE}: heads must be {list(HEADS)}")
    card = ProbeCard.from_json(data, path=str(folder))

    expected = _expected_shapes()
    try:
        loaded = np.load(folder / WEIGHTS_FILE, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"an {type(loaded).__name__}, not an npz archive")
        with loaded as npz:
            if set(npz.files) != set(expected):
                raise ValueError(
                    f"arrays {sorted(npz.files)} differ from the expected {sorted(expected)}"
                )
            arrays = {name: npz[name] for name in expected}
    except Exception as exc:  # numpy's refusal of pickled data/objects, bad zips, ...
        raise ValueError(f"{folder / WEIGHTS_FILE} refused: {exc}") from None
    for name, shape in expected.items():
        arr = arrays[name]
        if arr.dtype.kind != "f" or arr.shape != shape or not np.all(np.isfinite(arr)):
            raise ValueError(
                f"{folder / WEIGHTS_FILE}: {name} is {arr.dtype}{list(arr.shape)}, expected "
                f"finite float{list(shape)}"
            )
    if any(np.any(arrays[f"{h}_scale"] <= 0) for h in HEADS):
        raise ValueError(f"{folder / WEIGHTS_FILE}: scales must be positive")
    heads = {
        h: LinearHead(
            HEAD_MODELS[h][0],
            arrays[f"{h}_coef"],
            float(arrays[f"{h}_intercept"]),
            arrays[f"{h}_mean"],
            arrays[f"{h}_scale"],
        )
        for h in HEADS
    }
    return Probe(heads, card)
