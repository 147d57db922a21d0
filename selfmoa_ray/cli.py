"""The ``selfmoa`` console script. Thin: parse arguments, load the config, call the library.

selfmoa config show --config demo train.beta=0.2   # the resolved config as YAML
selfmoa models prepare packaged:smollm2-135m-instruct
selfmoa prompts list                               # packaged prompt sources and their counts
selfmoa run --config demo                          # the Self-MOA loop (make demo)
selfmoa run --config demo --recipe pt-align        # PT-ALIGN (or: --recipe combined)
selfmoa compare --config demo                      # the recipes side by side, one table
selfmoa evaluate --config demo --model runs/demo/iter_02/policy --prompts mine.jsonl
selfmoa evaluate --endpoint http://127.0.0.1:8000/policy/v1 --endpoint-model NAME  # no weights
selfmoa redteam --config demo --endpoint URL --endpoint-model NAME  # attack rounds, no training
selfmoa serve --policy runs/demo                   # the aligned model and the judge over HTTP
selfmoa train --config demo --pairs pairs.parquet  # one preference-optimisation step on your pairs
selfmoa report runs/demo                           # rebuild report.html / metrics.json / metrics.csv

Before a run folder is written or Ray starts, the command checks what the config names
(preflight.py). Bad input ends in one ``selfmoa: error: ...`` message and exit code 2
(``--debug`` or ``SELFMOA_DEBUG=1`` adds the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

from selfmoa_ray.config import Config, ConfigError, list_presets, load_config
from selfmoa_ray.console import VERBOSE_ENV
from selfmoa_ray.preflight import Check, check_config, judge_checks, run_checks
from selfmoa_ray.rundir import RunDir, RunDirError, check_creatable, default_run_root

RECIPE_CHOICES = ["selfmoa", "pt-align", "pt_align", "combined"]
DEBUG_ENV = "SELFMOA_DEBUG"
EXIT_BAD_INPUT = 2  # as argparse's own usage errors


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default="demo", help=f"preset ({', '.join(list_presets())}) or YAML path"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.beta=0.2")


def _run_args(parser: argparse.ArgumentParser) -> None:
    _config_args(parser)
    parser.add_argument("--output-dir", help="run folder (default: run.output_dir/run.name)")
    parser.add_argument("--resume", action="store_true", help="continue the run in that folder")
    parser.add_argument(
        "--verbose", action="store_true",
        help="show Ray's logs and workers' output here too (default: only in <run>/logs/run.log; "
        f"also ${VERBOSE_ENV}=1)",
    )  # fmt: skip


def _target_args(parser: argparse.ArgumentParser) -> None:
    """The model under test: local weights (``--model``) or an OpenAI-compatible endpoint."""
    parser.add_argument("--model", help="model to test (default: policy.source)")
    parser.add_argument(
        "--endpoint", metavar="BASE_URL",
        help="an OpenAI-compatible API root instead of weights, e.g. http://host:8000/policy/v1",
    )  # fmt: skip
    parser.add_argument("--endpoint-model", help="the model name the endpoint serves")
    parser.add_argument(
        "--api-key-env", default=None,
        help="environment variable holding the endpoint's key (default: OPENAI_API_KEY)",
    )  # fmt: skip


def _target_overrides(args: argparse.Namespace) -> list[str]:
    overrides = []
    if args.model:
        overrides.append(f"policy.source={args.model}")
    if args.endpoint or args.endpoint_model:
        if not (args.endpoint and args.endpoint_model):
            raise ValueError("--endpoint and --endpoint-model go together")
        overrides += [f"policy.endpoint.base_url={args.endpoint}",
                      f"policy.endpoint.model={args.endpoint_model}"]  # fmt: skip
    if args.api_key_env:
        overrides.append(f"policy.endpoint.api_key_env={args.api_key_env}")
    return overrides


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    # serve_apps/ pulls in Ray Serve; only its argument list is read here.
    from serve_apps.launch import add_serve_arguments

    add_serve_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfmoa", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--debug", action="store_true",
        help=f"show the traceback of an input error too (also ${DEBUG_ENV}=1)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="show presets and resolved configs")
    config_sub = config.add_subparsers(dest="action", required=True)
    _config_args(config_sub.add_parser("show", help="print the resolved config as YAML"))
    config_sub.add_parser("presets", help="list the shipped presets")

    models = sub.add_parser("models", help="resolve and cache models")
    models_sub = models.add_subparsers(dest="action", required=True)
    prepare = models_sub.add_parser("prepare", help="convert/cache a model and print its folder")
    prepare.add_argument(
        "spec", help="packaged:smollm2-135m-instruct, tiny-random, folder or hub id"
    )

    prompts = sub.add_parser("prompts", help="inspect prompt sources")
    prompts_sub = prompts.add_subparsers(dest="action", required=True)
    prompts_sub.add_parser("list", help="packaged sources with counts and categories")

    evaluators = sub.add_parser("evaluators", help="train and inspect the CPU judges")
    evaluators_sub = evaluators.add_subparsers(dest="action", required=True)
    train = evaluators_sub.add_parser("train", help="train the MiniLM probe; print its model card")
    train.add_argument(
        "--split", default="train", choices=("train", "audit"),
        help="half of the labelled rows: train (the training judge's probe) or audit "
        "(evaluate.judge's); default %(default)s",
    )  # fmt: skip
    train.add_argument("--out", help="folder (default: the cache's evaluators/probe-v2-<split>)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--folds", type=int, default=5)

    run = sub.add_parser("run", help="run (or --resume) the Self-MOA closed loop")
    _run_args(run)
    run.add_argument(
        "--recipe",
        choices=RECIPE_CHOICES,
        help="sets run.recipe (default: the config's, selfmoa unless it says otherwise). selfmoa: "
        "the closed loop; pt-align: PT-ALIGN from the human-seed file; combined: Self-MOA pairs "
        "plus unlikelihood on the harmful tokens of unsafe rejected answers",
    )

    compare = sub.add_parser("compare", help="run recipes side by side from one config")
    _run_args(compare)
    compare.add_argument(
        "--recipes", default="selfmoa,pt-align,combined",
        help=f"comma-separated, from {', '.join(RECIPE_CHOICES)} (default: %(default)s)",
    )  # fmt: skip

    for name in ("evaluate", "audit"):  # "audit": the name of earlier releases
        evaluate = sub.add_parser(name, help="evaluate a model on the held-out sets (and yours)")
        _run_args(evaluate)
        _target_args(evaluate)
        evaluate.add_argument(
            "--prompts", action="append", default=[], metavar="FILE",
            help="a prompt file (.jsonl/.csv/.parquet) evaluated beside the held-out sets",
        )  # fmt: skip

    redteam = sub.add_parser(
        "redteam", help="red-team a model (weights or endpoint) in rounds; no training"
    )
    _run_args(redteam)
    _target_args(redteam)
    redteam.add_argument("--rounds", type=int, help="attack rounds (default: redteam.rounds)")

    serve = sub.add_parser(
        "serve", help="serve a policy (OpenAI-compatible) and the judge over HTTP (Ray Serve)"
    )
    _serve_arguments(serve)

    report = sub.add_parser("report", help="rebuild a run's report.html and metrics files")
    report.add_argument("run_dir", help="the run folder (holds manifest.json)")
    train = sub.add_parser("train", help="train the policy on a pairs (or triples) file")
    _run_args(train)
    train.add_argument("--pairs", required=True, help="Parquet or JSONL, TRL preference format")
    return parser


def _version() -> str:
    try:
        return metadata.version("selfmoa-ray")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _input_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input (a config, file, model or missing package), reported in one
    line; any other exception is a bug and keeps its traceback. Imported only once one is caught."""
    from selfmoa_ray.report.collect import ReportError
    from selfmoa_ray.report.tracking import TrackingError
    from selfmoa_ray.sources.models import ModelSourceError
    from selfmoa_ray.sources.packages import MissingDataPackageError

    return (ConfigError, ValueError, FileNotFoundError, RunDirError, ModelSourceError,
            MissingDataPackageError, TrackingError, ReportError)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except Exception as err:
        if not isinstance(err, _input_errors()):
            raise
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        print(f"selfmoa: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        if args.action == "presets":
            print("\n".join(list_presets()))
        else:
            print(load_config(args.config, args.overrides).to_yaml(), end="")
        return 0
    if args.command == "models":
        from selfmoa_ray.sources.models import prepare_model

        print(prepare_model(args.spec))
        return 0
    if args.command == "prompts":
        return _list_prompts()
    if args.command == "evaluators":
        return _train_probe(args.out, args.split, args.seed, args.folds)
    if args.command == "run":
        recipe = [f"run.recipe={args.recipe}"] if args.recipe else []
        config = load_config(args.config, [*args.overrides, *recipe])
        return _run(config, args.output_dir, args.resume, verbose=args.verbose)
    if args.command == "compare":
        config = load_config(args.config, args.overrides)
        recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
        return _compare(config, args.output_dir, args.resume, recipes, verbose=args.verbose)
    if args.command in ("evaluate", "audit"):
        overrides = [*args.overrides, *_target_overrides(args)]
        if args.prompts:
            overrides.append(f"data.eval_files={[_absolute_spec(p) for p in args.prompts]}")
        config = load_config(args.config, overrides)
        return _evaluate(config, args.output_dir, args.resume, verbose=args.verbose)
    if args.command == "redteam":
        overrides = [*args.overrides, *_target_overrides(args)]
        if args.rounds is not None:
            overrides.append(f"redteam.rounds={args.rounds}")
        config = load_config(args.config, overrides)
        return _redteam(config, args.output_dir, args.resume, verbose=args.verbose)
    if args.command == "serve":
        from serve_apps.launch import serve_command

        _check_serve(args)
        return serve_command(args)
    if args.command == "report":
        return _report(Path(args.run_dir))
    if args.command == "train":
        config = load_config(args.config, args.overrides)
        return _train(config, Path(args.pairs), args.output_dir, args.resume, verbose=args.verbose)
    raise AssertionError(args.command)


def _absolute_spec(spec: str) -> str:
    """A prompt spec whose path part is absolute (Ray workers do not share the CLI's directory);
    an ``hf:`` repo id stays as it is."""
    prefix, rest = "", spec
    if spec.startswith(("file:", "hf:")):
        prefix, rest = spec.split(":", 1)[0] + ":", spec.split(":", 1)[1]
        if prefix == "hf:" and not rest.startswith((".", "/", "~")):
            return spec
    return prefix + str(Path(rest).expanduser().resolve())


def _list_prompts() -> int:
    from collections import Counter

    from selfmoa_ray.sources.prompts import SOURCES, load_source

    for name, spec in SOURCES.items():
        rows = load_source(name)
        categories = Counter(r.category for r in rows)
        print(f"{name:<14} {len(rows):>5} prompts  split={rows[0].split:<13} {spec.description}")
        print(f"{'':<14} {len(categories)} categories: {', '.join(sorted(categories))[:110]}")
    return 0


def _train_probe(out: str | None, split: str, seed: int, folds: int) -> int:
    from selfmoa_ray.evaluators.probe_training import train_probe

    card = train_probe(Path(out) if out else None, split=split, seed=seed, folds=folds)
    print(f"probe ({split} split) saved to {card.path} ({card.embedder}, {card.feature_dim} dims)")
    for head, info in card.heads.items():
        grouped = info.get("cv_grouped", info)
        shown = {k: v for k, v in grouped.items() if isinstance(v, (int, float))}
        print(
            f"  {head:<10} grouped CV: "
            + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
            )
            + f"; on the other half: accuracy {card.heldback[head]['accuracy']:.3f}"
        )
    return 0


def _run_dir(config: Config, output_dir: str | None, resume: bool) -> RunDir:
    return RunDir.create(
        Path(output_dir) if output_dir else default_run_root(config), config, resume=resume
    )


@contextlib.contextmanager
def _session(config: Config, root: Path, verbose: bool) -> Iterator[None]:
    """The run's console (Ray's output to ``<root>/logs/run.log``, our lines to the terminal) and
    its Ray, shut down inside the console when it was started here."""
    from selfmoa_ray.console import session
    from selfmoa_ray.ray_runtime import ray_for_run

    with session(root, verbose=verbose or None), ray_for_run(config.ray):
        yield


def _run(
    config: Config,
    output_dir: str | None,
    resume: bool,
    *,
    verbose: bool = False,
) -> int:
    check_config(config, "run")  # before the recipes' imports (torch, Ray: seconds)
    from selfmoa_ray.recipes.compare import RECIPES, check_recipes
    from selfmoa_ray.report.tables import print_before_after

    name = config.run.recipe
    check_recipes(config, [name])  # a bad config or seed file fails before a run folder exists
    run = _run_dir(config, output_dir, resume)
    with _session(config, run.root, verbose):
        collected = RECIPES[name](config, run)
    print()
    print_before_after(collected)
    loop = collected["loop"]
    if loop.get("stop_reason"):
        print(f"\nstopped: {loop['stop_reason']}")
    print(f"\nfinal policy: {loop['final_policy']} ({loop['final_policy_path']})")
    print(f"report: {run.path('report.html')}\nrun folder: {run.root}")
    return 0


def _compare(
    config: Config,
    output_dir: str | None,
    resume: bool,
    recipes: list[str],
    *,
    verbose: bool = False,
) -> int:
    check_config(config, "compare")  # before the recipes' imports (torch, Ray: seconds)
    from selfmoa_ray.recipes.compare import (
        check_recipes,
        comparison_table,
        recipe_name,
        run_comparison,
        with_recipe,
    )

    check_recipes(config, recipes)
    root = Path(output_dir) if output_dir else default_run_root(config).with_name(
        f"{config.run.name}-compare"
    )  # fmt: skip
    for name in recipes:  # the recipes' run folders are made inside Ray: check them before it
        check_creatable(root / recipe_name(name), with_recipe(config, name), resume=resume)
    with _session(config, root, verbose):
        rows = run_comparison(config, root, recipes, resume=resume)
    print("\n" + comparison_table(rows))
    print(f"\ncomparison: {root / 'comparison.md'} (.csv, .json)")
    return 0


def _check_target(config: Config, command: str) -> None:
    """What the config names (preflight.py), then an endpoint that cannot answer, fail here,
    before a run folder or Ray exists."""
    check_config(config, command)
    if config.policy.endpoint:
        from selfmoa_ray.engines.endpoint import check_endpoint

        check_endpoint(config.policy.endpoint)


def _evaluate(
    config: Config, output_dir: str | None, resume: bool, *, verbose: bool = False
) -> int:
    _check_target(config, "evaluate")  # before the stages' imports (torch, Ray: seconds)
    import pyarrow.parquet as pq

    from selfmoa_ray.report.tables import print_examples, print_metrics
    from selfmoa_ray.stages.evaluate import evaluate_policy

    run = _run_dir(config, output_dir, resume)
    with _session(config, run.root, verbose):
        summary = evaluate_policy(run, config, config.policy, name="baseline")["summary"]
    print_metrics({"baseline": summary["splits"]})
    rows = pq.read_table(run.path("baseline/eval_responses.parquet")).to_pylist()
    print_examples(rows, "eval_harmful")
    print(f"\nrun folder: {run.root}")
    return 0


def _redteam(config: Config, output_dir: str | None, resume: bool, *, verbose: bool = False) -> int:
    _check_target(config, "redteam")  # before the recipe's imports (torch, Ray: seconds)
    from selfmoa_ray.recipes.redteam import SUMMARY, run_redteam, summary_lines

    run = _run_dir(config, output_dir, resume)
    with _session(config, run.root, verbose):
        summary = run_redteam(config, run)
    print("\n" + "\n".join(summary_lines(summary)))
    print(f"\nsummary: {run.path(SUMMARY)}\nrun folder: {run.root}")
    return 0


def _check_serve(args: argparse.Namespace) -> None:
    """The served policy's model and the judge's models (preflight.py), before Ray starts. What
    the Serve config or an app's arguments get wrong is left to ``serve_command``, which reports
    it as before."""
    from selfmoa_ray.sources.models import check_model
    from serve_apps import evaluator, policy
    from serve_apps.launch import (
        EVALUATOR_APP,
        POLICY_APP,
        LaunchError,
        apply_overrides,
        load_serve_config,
    )

    try:
        serve_config = apply_overrides(load_serve_config(args.config), args)
    except LaunchError:
        return
    checks: list[Check] = []
    for app in serve_config["applications"]:
        where = f"serve application {app.get('name')!r}"
        try:
            if app.get("import_path") == POLICY_APP:
                spec = policy.resolve_args(app.get("args"))[1].spec
                checks.append((f"{where} model", lambda spec=spec: check_model(spec)))
            elif app.get("import_path") == EVALUATOR_APP:
                checks += judge_checks(evaluator.resolve_args(app.get("args"))[1], f"{where} judge")
        except ValueError:  # ConfigError, PolicySourceError, pydantic's ValidationError
            continue
    run_checks(checks)


def _report(root: Path) -> int:
    from selfmoa_ray.report.html import write_report
    from selfmoa_ray.report.tables import print_before_after

    RunDir.open(root)  # a clear error when it is not a run folder
    print_before_after(write_report(root))
    print(f"report: {root / 'report.html'}")
    return 0


def _train(
    config: Config, pairs: Path, output_dir: str | None, resume: bool, *, verbose: bool = False
) -> int:
    check_config(config, "train")  # before the training imports (torch, Ray: seconds)
    from selfmoa_ray.recipes.train_file import POLICY, train_on_file, validate_pairs_file

    if not resume:
        validate_pairs_file(config, pairs)  # a bad file fails here, before a run folder or Ray
    run = _run_dir(config, output_dir, resume)
    with _session(config, run.root, verbose):
        entry = train_on_file(config, pairs, run)
    print(f"trained: {entry['summary']}")
    print(f"policy (Hugging Face folder): {run.path(POLICY)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
