"""Prompts from Hugging Face datasets already on this machine: ``hf:<repo>[:<config>][@<split>]
[#<column>]``, or ``hf:<folder>`` for a folder written by ``Dataset.save_to_disk``.

Never the network, whatever ``HF_HUB_OFFLINE`` says: our machines reach no hub, and a run must
not depend on one. A hub dataset is read from the hub cache (``hf download --repo-type dataset``,
or an earlier ``datasets.load_dataset``) or from the ``datasets`` library's own cache; otherwise
the error says how to cache it. Rows follow the prompt-file rules (prompt_files.py): the prompt is
a text column or a single-turn ``messages`` chat; ``id`` and ``category`` columns are used if
present.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfmoa_ray.sources.packages import snake
from selfmoa_ray.sources.prompt_files import (
    MESSAGES,
    PromptFileError,
    chat_prompt,
    make_row,
    plain_prompt,
    unique_rows,
)
from selfmoa_ray.sources.schema import PromptRow

if TYPE_CHECKING:
    from datasets import Dataset

HF_PREFIX = "hf:"
PROMPT_COLUMNS = ("text", "prompt", MESSAGES)  # looked for, in this order, when none is named
_FOLDER_STARTS = ("/", ".", "~")  # a repo id never starts with these, so folders cannot clash
_OFFLINE_LOCK = threading.Lock()


class HFDatasetError(PromptFileError):
    """A Hugging Face dataset spec that cannot be read; ``path`` is the spec, ``line`` the row."""

    def __init__(self, spec: str, row: int | None, reason: str):
        super().__init__(spec, row, reason, unit="row")


@dataclasses.dataclass(frozen=True)
class HFSpec:
    """A parsed ``hf:`` spec: a repo id or folder, and optional config, split and column."""

    source: str
    config: str | None = None
    split: str | None = None
    column: str | None = None

    @property
    def is_folder(self) -> bool:
        return self.source.startswith(_FOLDER_STARTS)

    def render(self) -> str:
        """The spec as written (``parse_hf_spec`` reads it back)."""
        parts = [(":", self.config), ("@", self.split), ("#", self.column)]
        return HF_PREFIX + self.source + "".join(mark + v for mark, v in parts if v)

    def hint(self, **missing: str) -> str:
        """This spec with a placeholder where a part is missing, for error messages."""
        return dataclasses.replace(self, **{k: f"<{v}>" for k, v in missing.items()}).render()


def parse_hf_spec(spec: str) -> HFSpec:
    """``hf:<repo>[:<config>][@<split>][#<column>]``; a folder starts with ``/``, ``.`` or ``~``.

    Checks the syntax only (no file or cache is read), so a config can be validated cheaply.
    """
    if not spec.startswith(HF_PREFIX):
        raise HFDatasetError(spec, None, f"not a Hugging Face dataset spec (no {HF_PREFIX!r})")
    rest, hash_, column = spec.removeprefix(HF_PREFIX).rpartition("#")
    if not hash_:
        rest, column = column, ""
    rest, at, split = rest.rpartition("@")
    if not at:
        rest, split = split, ""
    head, colon, config = rest.rpartition(":")
    if colon and "/" not in config:
        rest = head
    else:  # no colon, or one inside a folder path
        colon, config = "", ""
    for mark, value, used in (("#", column, hash_), ("@", split, at), (":", config, colon)):
        if used and not value:
            raise HFDatasetError(spec, None, f"nothing after {mark!r}; {_SYNTAX}")
    if not rest:
        raise HFDatasetError(spec, None, f"no dataset named; {_SYNTAX}")
    parsed = HFSpec(rest, config or None, split or None, column or None)
    if not parsed.is_folder:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(rest)
        except HFValidationError as exc:
            raise HFDatasetError(
                spec, None, f"{rest!r} is not a repo id ({exc}); write a folder as ./path or /path"
            ) from None
    return parsed


_SYNTAX = (
    "expected hf:<org>/<name>[:<config>][@<split>][#<column>] or hf:<folder> "
    "(a folder starts with /, ./ or ~)"
)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """No network and no progress bars for the duration: ``datasets`` and ``huggingface_hub`` read
    ``HF_HUB_OFFLINE`` once, at import, so their flags are set here (and put back after)."""
    import datasets
    import huggingface_hub.constants as hub

    with _OFFLINE_LOCK:
        saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
        saved_hub, bars = hub.HF_HUB_OFFLINE, datasets.is_progress_bar_enabled()
        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
        hub.HF_HUB_OFFLINE = True
        datasets.disable_progress_bars()
        try:
            yield
        finally:
            datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
            hub.HF_HUB_OFFLINE = saved_hub
            if bars:
                datasets.enable_progress_bars()


def _not_cached(spec: str, parsed: HFSpec) -> HFDatasetError:
    import datasets
    import huggingface_hub.constants as hub

    args = repr(parsed.source) + (f", {parsed.config!r}" if parsed.config else "")
    return HFDatasetError(
        spec,
        None,
        f"dataset {parsed.source!r} is not in the local Hugging Face cache ({hub.HF_HUB_CACHE} "
        f"or {datasets.config.HF_DATASETS_CACHE}), and prompts are never downloaded. Cache it "
        f"once where the Hub is reachable, with the same HF_HOME: "
        f'python -c "import datasets; datasets.load_dataset({args})" '
        f"(or: hf download --repo-type dataset {parsed.source}); or save it with "
        "Dataset.save_to_disk and use hf:/path/to/folder",
    )


def _load_folder_builder(folder: str, spec: str, parsed: HFSpec) -> dict[str, Dataset]:
    """A folder of data files (a hub snapshot, or a copy of a dataset repo), config checked."""
    import datasets

    configs = datasets.get_dataset_config_names(folder)
    if parsed.config is None and len(configs) > 1:
        raise HFDatasetError(
            spec,
            None,
            f"has configs {', '.join(configs)}; name one: {parsed.hint(config='config')}",
        )
    if parsed.config is not None and parsed.config not in configs:
        raise HFDatasetError(
            spec, None, f"unknown config {parsed.config!r}; available: {', '.join(configs)}"
        )
    return dict(datasets.load_dataset(folder, parsed.config))


def _load_saved(folder: Path, spec: str, parsed: HFSpec) -> dict[str, Dataset]:
    """A folder written by ``save_to_disk``: a DatasetDict (its splits) or one Dataset."""
    import datasets

    if parsed.config:
        raise HFDatasetError(
            spec, None, f"a save_to_disk folder has no configs; drop ':{parsed.config}'"
        )
    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
    return {str(loaded.split) if loaded.split else "": loaded}


def _load_splits(spec: str, parsed: HFSpec) -> dict[str, Dataset]:
    """Every split of the dataset, from a folder or the local caches, never the network."""
    import datasets
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if parsed.is_folder:
        folder = Path(parsed.source).expanduser()
        if not folder.is_dir():
            raise HFDatasetError(spec, None, f"no such folder {str(folder.absolute())!r}")
        saved = (
            datasets.config.DATASETDICT_JSON_FILENAME,
            datasets.config.DATASET_STATE_JSON_FILENAME,
        )
        if any((folder / name).is_file() for name in saved):
            return _load_saved(folder, spec, parsed)
        return _load_folder_builder(str(folder), spec, parsed)
    try:
        snapshot = snapshot_download(parsed.source, repo_type="dataset", local_files_only=True)
    except LocalEntryNotFoundError:
        pass  # not in the hub cache; perhaps in the datasets library's own cache
    else:
        return _load_folder_builder(snapshot, spec, parsed)
    try:
        return dict(datasets.load_dataset(parsed.source, parsed.config))
    except (ConnectionError, FileNotFoundError):
        raise _not_cached(spec, parsed) from None


def _pick_split(splits: dict[str, Dataset], spec: str, parsed: HFSpec) -> str:
    if parsed.split is None and len(splits) == 1:
        return next(iter(splits))
    names = ", ".join(splits)
    if list(splits) == [""]:  # one saved Dataset that was never given a split name
        raise HFDatasetError(
            spec, None, f"holds one Dataset without splits; drop '@{parsed.split}'"
        )
    if parsed.split is None:
        raise HFDatasetError(
            spec, None, f"has splits {names}; name one: {parsed.hint(split='split')}"
        )
    if parsed.split not in splits:
        raise HFDatasetError(spec, None, f"unknown split {parsed.split!r}; available: {names}")
    return parsed.split


def _pick_column(ds: Dataset, spec: str, parsed: HFSpec) -> tuple[str, bool]:
    """The prompt column and whether it holds chats (lists of turns) rather than text."""
    import datasets

    columns = ds.column_names
    if parsed.column is not None:
        if parsed.column not in columns:
            raise HFDatasetError(
                spec, None, f"unknown column {parsed.column!r}; columns are {columns}"
            )
        column = parsed.column
    else:
        found = [name for name in PROMPT_COLUMNS if name in columns]
        if len(found) != 1:
            what = "no prompt column" if not found else f"several prompt columns {found}"
            raise HFDatasetError(
                spec,
                None,
                f"{what} (looked for {', '.join(PROMPT_COLUMNS)}); columns are {columns}; "
                f"name one: {parsed.hint(column='column')}",
            )
        column = found[0]
    feature = ds.features[column]
    if isinstance(feature, datasets.List | datasets.LargeList | datasets.Sequence | list):
        return column, True
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return column, False
    raise HFDatasetError(
        spec, None, f"column {column!r} holds {feature}, neither text nor a list of chat turns"
    )


def _category(value: Any, feature: Any) -> Any:
    """Class labels by name (-1, "no label", as none), integers as text; anything else is left
    for the row check."""
    import datasets

    if isinstance(feature, datasets.ClassLabel) and isinstance(value, int):
        return feature.int2str(value) if value >= 0 else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def load_hf_prompts(
    spec: str, *, default_split: str = "user", default_category: str = "user"
) -> list[PromptRow]:
    """Prompts from a locally cached Hugging Face dataset or a ``save_to_disk`` folder.

    The spec picks the split (required when there are several), the prompt column (default: the
    one of ``text``, ``prompt``, ``messages`` present) and the config; ``id`` and ``category``
    columns are used if present. Any problem raises :class:`HFDatasetError` (a ``ValueError``).
    """
    parsed = parse_hf_spec(spec)
    with _offline():
        try:
            splits = _load_splits(spec, parsed)
        except HFDatasetError:
            raise
        except Exception as exc:  # datasets raises many types for unreadable data
            raise HFDatasetError(spec, None, f"cannot load ({type(exc).__name__}: {exc})") from exc
    split = _pick_split(splits, spec, parsed)
    ds = splits[split]
    column, chat = _pick_column(ds, spec, parsed)
    category_feature = ds.features.get("category")
    name = Path(parsed.source).name if parsed.is_folder else parsed.source.split("/")[-1]
    defaults = {
        "split": default_split,
        "category": snake(default_category) or "user",
        "source": dataclasses.replace(parsed, split=split or None, column=None).render(),
        "prefix": snake(name) or "hf",
    }

    def fail_at(row: int, reason: str) -> HFDatasetError:
        return HFDatasetError(spec, row, reason)

    def numbered() -> Iterator[tuple[int, PromptRow]]:
        keep = [c for c in dict.fromkeys([column, "id", "category"]) if c in ds.column_names]
        for i, record in enumerate(ds.select_columns(keep), start=1):
            fail = functools.partial(fail_at, i)
            value = record[column]
            text = chat_prompt(value, fail, column) if chat else plain_prompt(value, column, fail)
            extra = {
                "id": record.get("id"),
                "category": _category(record.get("category"), category_feature),
            }
            yield i, make_row(text, extra, fail, defaults)

    rows = unique_rows(numbered(), fail_at, "row")
    if not rows:
        raise HFDatasetError(spec, None, f"split {split!r} is empty (no prompts)")
    return rows
