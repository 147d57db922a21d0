"""``selfmoa serve``: the policy and evaluator apps on Ray Serve, from one command.

    selfmoa serve --policy runs/demo                 # the run's final policy + the demo judge
    python -m serve_apps.launch --policy tiny-random --judge-config tiny --port 8001

It loads ``serve_apps/serve_config.yaml`` (or ``--config FILE``), applies the flags that were given
(``--policy``, ``--judge-config``, ``--host``, ``--port``...), checks both apps' arguments here
(a bad model, run folder or judge config fails now, with exit 2), then deploys the config as
``serve run CONFIG`` does, prints the URLs and serves until SIGINT/SIGTERM, when it shuts Serve
down and exits 0. Without ``--address`` it starts an embedded Ray (``--num-cpus`` logical CPUs,
docs/design.md 5.1); with ``--address auto`` it deploys to that cluster, where ``--no-block`` leaves
the apps running after this process exits (``jobs/serve.py``).

The cli wires it as ``add_serve_arguments(sub.add_parser("serve"))`` and ``serve_command(args)``.
"""

from __future__ import annotations

import argparse
import copy
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).with_name("serve_config.yaml")
POLICY_APP = "serve_apps.policy:build_app"
EVALUATOR_APP = "serve_apps.evaluator:build_app"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class LaunchError(RuntimeError):
    """The apps cannot be deployed (bad arguments, no key, a failed deployment)."""


# --------------------------------------------------------------------------- arguments


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's options (defaults come from the config file)."""
    parser.add_argument(
        "--policy", metavar="MODEL_OR_RUN_DIR",
        help="model spec (packaged:NAME, tiny-random, a Hugging Face folder) or a run folder, "
        "whose final policy is served (default: the config's, packaged:smollm2-135m-instruct)",
    )  # fmt: skip
    parser.add_argument("--served-model-name", help="the model name clients use")
    parser.add_argument(
        "--judge-config", help="preset or YAML whose judge the evaluator serves (default: demo)"
    )
    parser.add_argument("--host", help="HTTP host (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default: 8000)")
    parser.add_argument(
        "--config", type=Path,
        help=f"a Serve config file instead of {DEFAULT_CONFIG.name}; flags given still override it",
    )  # fmt: skip
    parser.add_argument(
        "--address", help="join this Ray cluster ('auto': this machine's); default: embedded Ray"
    )
    parser.add_argument(
        "--num-cpus", type=float, default=4.0,
        help="logical CPUs of the embedded Ray (default 4: above a small machine's cores, so the "
        "replicas' fractional CPUs fit; docs/design.md 5.1)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-unauthenticated", action="store_true",
        help="serve without API keys when none is configured (local development only)",
    )  # fmt: skip
    parser.add_argument(
        "--no-block", action="store_true",
        help="exit once deployed (with --address the apps keep running on the cluster)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=900.0,
        help="seconds to wait for the apps to run (a first packaged-model use converts it, ~40 s)",
    )  # fmt: skip


# --------------------------------------------------------------------------- the config


def load_serve_config(path: Path | None = None) -> dict[str, Any]:
    """A Serve config file as a dict (``serve_config.yaml`` by default)."""
    path = path or DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise LaunchError(f"cannot read the Serve config {path}: {err}") from None
    if not isinstance(raw, dict) or not raw.get("applications"):
        raise LaunchError(f"{path} is not a Serve config: it lists no applications")
    return raw


def _apps(config: dict[str, Any], import_path: str) -> list[dict[str, Any]]:
    return [a for a in config["applications"] if a.get("import_path") == import_path]


def _absolute_if_path(key: str, value: str) -> str:
    """Paths made absolute, so that the replicas (whose working folder is not ours) find them;
    model specs (``packaged:...``, ``tiny-random``) and preset names stay as they are."""
    if value.startswith(("packaged:", "tiny-random")):
        return value
    path = Path(value).expanduser()
    exists = path.is_file() if key == "judge_config" else path.exists()
    return str(path.resolve()) if exists else value


def apply_overrides(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A copy of ``config`` with the flags that were given applied."""
    config = copy.deepcopy(config)
    http = config.setdefault("http_options", {})
    if args.host is not None:
        http["host"] = args.host
    if args.port is not None:
        http["port"] = args.port
    wanted = {"policy": (POLICY_APP, "model", args.policy),
              "served-model-name": (POLICY_APP, "served_model_name", args.served_model_name),
              "judge-config": (EVALUATOR_APP, "judge_config", args.judge_config)}  # fmt: skip
    for flag, (import_path, key, value) in wanted.items():
        if value is None:
            continue
        apps = _apps(config, import_path)
        if not apps:
            raise LaunchError(f"--{flag} given, but the config has no {import_path} application")
        for app in apps:
            app["args"] = {**(app.get("args") or {}), key: value}
    for app in config["applications"]:
        params = app["args"] = dict(app.get("args") or {})
        if args.allow_unauthenticated and app.get("import_path") in (POLICY_APP, EVALUATOR_APP):
            params["allow_unauthenticated"] = True
        for key in ("model", "judge_config", "api_keys_file"):
            if isinstance(params.get(key), str):
                params[key] = _absolute_if_path(key, params[key])
    return config


def check_config(config: dict[str, Any]) -> Any:
    """The validated ``ServeDeploySchema``; each selfmoa app's arguments are resolved here too,
    so that a bad model, run folder or judge config fails before anything is deployed."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from serve_apps import evaluator, policy

    try:
        schema = ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        raise LaunchError(f"invalid Serve config: {err}") from None
    for app in schema.applications:
        try:
            if app.import_path == POLICY_APP:
                policy.resolve_args(app.args)
            elif app.import_path == EVALUATOR_APP:
                evaluator.resolve_args(app.args)
        except (ValueError, ValidationError) as err:  # ConfigError and PolicySourceError too
            raise LaunchError(f"application {app.name!r}: {err}") from None
    return schema


def check_keys(schema: Any) -> int:
    """How many API keys this process's environment holds (the embedded Ray's replicas get it).

    Raises ``LaunchError`` when none is configured and some selfmoa app requires keys.
    """
    from serve_apps.auth import ENV_KEYS, ENV_KEYS_FILE, AuthConfigError, load_api_keys

    ours = [a for a in schema.applications if a.import_path in (POLICY_APP, EVALUATOR_APP)]
    files = {a.args.get("api_keys_file") for a in ours} - {None}
    try:
        count = max((len(load_api_keys(keys_file=f)) for f in files | {None}), default=0)
    except AuthConfigError as err:
        raise LaunchError(str(err)) from None
    if count == 0 and any(not a.args.get("allow_unauthenticated") for a in ours):
        raise LaunchError(
            f"no API key configured: export {ENV_KEYS} (comma-separated keys of 16+ characters) "
            f"or {ENV_KEYS_FILE} (a file with one key per line); e.g.\n  export {ENV_KEYS}="
            "\"$(python -c 'import secrets; print(secrets.token_urlsafe(32))')\"\n"
            "or pass --allow-unauthenticated for local development only"
        )
    return count


# --------------------------------------------------------------------------- deploying


def _inherit_job_working_dir(config: dict[str, Any]) -> None:
    """Inside a Ray job (``ray job submit --working-dir .``): apps without a working_dir get the
    job's, so that the cluster imports this code even after the job's driver has exited."""
    import ray

    working_dir = (ray.get_runtime_context().runtime_env or {}).get("working_dir")
    if not working_dir:
        return
    for app in config["applications"]:
        runtime_env = app.setdefault("runtime_env", {})
        runtime_env.setdefault("working_dir", working_dir)


def deploy(schema: Any) -> None:
    """Start Serve with the config's HTTP options and apply the config, as ``serve run`` does."""
    # `serve run CONFIG` (ray/serve/scripts.py, ray 2.60) goes through these same two calls; the
    # public serve.run() takes built applications and cannot apply a config's `deployments`.
    from ray.serve._private.api import serve_start

    client = serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        global_logging_config=schema.logging_config,
    )
    client.deploy_apps(schema, _blocking=False)


def wait_running(names: list[str], timeout_s: float, stop: threading.Event | None = None) -> None:
    """Wait until every application runs; ``LaunchError`` with Serve's messages when one fails
    (or when ``stop`` is set first)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        if stop is not None and stop.is_set():
            raise LaunchError("interrupted before the applications were running")
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = [n for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            messages = []
            for name in failed:
                app = apps[name]
                details = [d.message for d in app.deployments.values() if d.message]
                messages.append(f"{name}: {app.message or ''} {' '.join(details)}".strip())
            raise LaunchError("deployment failed:\n" + "\n".join(messages))
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise LaunchError(f"applications not running after {timeout_s:g} s: {states}")
        time.sleep(0.5)


def describe(schema: Any) -> str:
    """The URLs to give users, one application per block."""
    host = schema.http_options.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    root = f"http://{host}:{schema.http_options.port}"
    lines = [f"serving on {root}"]
    for app in schema.applications:
        prefix = (app.route_prefix or "/").rstrip("/")
        if app.import_path == POLICY_APP:
            from serve_apps.policy import resolve_args

            settings, _ = resolve_args(app.args)
            lines += [f"  {app.name}: model {settings.served_model_name!r} ({settings.backend})",
                      f"    OpenAI base_url: {root}{prefix}/v1",
                      f"    chat:            POST {root}{prefix}/v1/chat/completions"]  # fmt: skip
        elif app.import_path == EVALUATOR_APP:
            lines += [f"  {app.name}: judge {app.args.get('judge_config', 'demo')!r}",
                      f"    OpenAI base_url: {root}{prefix}/v1 (moderations)",
                      f"    evaluate: POST {root}{prefix}/v1/evaluate",
                      f"    moderate: POST {root}{prefix}/v1/moderate"]  # fmt: skip
        else:
            lines.append(f"  {app.name}: {root}{prefix}")
        if app.import_path in (POLICY_APP, EVALUATOR_APP) and app.args.get("openapi", True):
            lines.append(f"    openapi:  {root}{prefix}/openapi.json")
            if app.args.get("docs", False):
                lines.append(f"    docs:     {root}{prefix}/docs")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def _stop_event() -> threading.Event:
    """Set by SIGINT or SIGTERM (installed after ray.init, so these handlers are the ones used)."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def serve_command(args: argparse.Namespace) -> int:
    """Deploy the apps and serve until a signal; 0 on a clean stop, 2 for bad input, 1 else."""
    embedded = args.address is None
    try:
        config = apply_overrides(load_serve_config(args.config), args)
        schema = check_config(config)
        # On a cluster the replicas read keys from the nodes' environment, not from ours (-1).
        keys = check_keys(schema) if embedded else -1
    except LaunchError as err:
        print(f"selfmoa serve: error: {err}", file=sys.stderr)
        return 2
    if args.allow_unauthenticated:
        print("selfmoa serve: WARNING: --allow-unauthenticated: apps without a configured key "
              "accept every request; local development only", file=sys.stderr)  # fmt: skip

    from selfmoa_ray.config import RaySection
    from selfmoa_ray.ray_runtime import init_ray

    host = schema.http_options.host
    # address="local": a new embedded Ray even when this machine runs a `ray start` cluster, which
    # a plain ray.init() would join (and num_cpus cannot be given to a cluster one joins).
    options: dict[str, Any] = {"address": "local"} if embedded else {}
    if embedded and host in LOOPBACK:
        options["_node_ip_address"] = "127.0.0.1"
    try:
        init_ray(RaySection(address=args.address, num_cpus=args.num_cpus if embedded else None),
                 **options)  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as err:
        hint = "" if embedded else " (a cluster with token auth needs RAY_AUTH_MODE=token here too)"
        print(f"selfmoa serve: error: cannot start or join Ray: {err}{hint}", file=sys.stderr)
        return 1
    stop = _stop_event()
    try:
        _inherit_job_working_dir(config)
        schema = check_config(config)
        deploy(schema)
        wait_running([app.name for app in schema.applications], args.timeout, stop)
    except LaunchError as err:
        print(f"selfmoa serve: error: {err}", file=sys.stderr)
        if embedded:
            _shutdown(embedded)
        else:
            print("selfmoa serve: the cluster keeps what was deployed: see `serve status`",
                  file=sys.stderr)  # fmt: skip
        return 1
    print(describe(schema), flush=True)
    if keys == 0:
        print("  API keys: none (unauthenticated)")
    elif keys > 0:
        print(f"  API keys: {keys} from the environment: send 'Authorization: Bearer <key>'")
    if args.no_block:
        if embedded:
            print("selfmoa serve: --no-block with an embedded Ray: serving stops as this process "
                  "exits; use --address to leave the apps on a cluster", file=sys.stderr)  # fmt: skip
        return 0
    print("Ctrl-C or SIGTERM stops serving.", flush=True)
    while not stop.wait(1.0):
        pass
    print("selfmoa serve: shutting down", flush=True)
    _shutdown(embedded, [app.name for app in schema.applications])
    return 0


def _shutdown(embedded: bool, names: list[str] | None = None) -> None:
    """Embedded: Serve and Ray go. On a cluster: only our applications (``names``) are deleted."""
    import ray
    from ray import serve

    if not embedded:
        for name in names or []:
            serve.delete(name)
        return
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve_apps.launch", description=__doc__.split("\n\n")[0]
    )
    add_serve_arguments(parser)
    return serve_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
