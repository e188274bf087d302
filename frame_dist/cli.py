"""Shared command line of every job: ``--config FILE`` plus ``section.field=value`` overrides."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from feature_store.frames import EncoderIdentityError
from frame_dist.config import Config, ConfigError, load_config

# Exit codes shared by every job (documented in README).
EXIT_OK = 0
EXIT_FAILED = 1  # the stage ran and failed (bad data, crashed workers, ...)
EXIT_CONFIG = 2  # the configuration or the command line is invalid; nothing was run


def parse_config(description: str, argv: Sequence[str] | None = None,
                 tracked: bool = False) -> Config:
    """Parse ``--config FILE key=value ...``; print the error and exit 2 on a bad config.

    ``tracked``: the job logs to MLflow when tracking is on (``frame_dist.tracking``); tracking
    asked for without the ``mlflow`` extra is a bad config too.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (defaults apply to missing fields)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. graph.n_clips=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if tracked:
            from frame_dist.tracking import require_mlflow

            require_mlflow(cfg)
        return cfg
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from exc


def run_stage(stage: str, fn: Callable[[], object], cfg: Config | None = None) -> int:
    """Run one stage; on failure print ``stage <name> failed: <cause>`` and where the full
    traceback was written (``<store>/logs/<stage>/`` of ``cfg``), and return EXIT_FAILED.

    Meanwhile what the libraries print goes to the stage's output log next to it
    (:func:`frame_dist.console.stage_output`); the console keeps the job's own lines.
    """
    from frame_dist.console import stage_output

    messages: list[str] = []  # printed once the console is the console again
    rc = EXIT_OK
    with stage_output(stage, _store_or_none(cfg)) as output:
        try:
            fn()
        except (ConfigError, EncoderIdentityError) as exc:
            messages.append(f"stage {stage} refused its configuration: {exc}")
            rc = EXIT_CONFIG
        except Exception as exc:  # noqa: BLE001 - the job's contract: a one-line cause + exit code
            messages += [f"stage {stage} failed: {type(exc).__name__}: {exc}",
                         f"stage {stage}: full traceback in {failure_log(stage, cfg, output)}"]
            rc = EXIT_FAILED
    for message in messages:
        print(message, file=sys.stderr)
    return rc


def _store_or_none(cfg: Config | None) -> object | None:
    if cfg is None:
        return None
    try:
        from feature_store.store import Store

        return Store.from_config(cfg.store)
    except Exception:  # noqa: BLE001 - no output log then; failure_log says why the store failed
        return None


def failure_log(stage: str, cfg: Config | None, output: str | None = None) -> str:
    """Write the current exception's traceback to the stage's log file; return its location.

    In the store (``logs/<stage>/<time>-<host>-<pid>.log``) when ``cfg`` names one and it can
    be written, else in this machine's temporary directory (the store may be the cause).
    ``output``: the stage's output log, named in the file.
    """
    import socket
    import time
    import traceback

    from frame_dist.console import stage_log

    rel, path = stage_log(stage, ".log")
    text = (f"stage {stage} failed at {time.strftime('%Y-%m-%d %H:%M:%S %z')} on "
            f"{socket.gethostname()} (pid {os.getpid()})\ncommand: {' '.join(sys.argv)}\n"
            + (f"output of the stage's libraries and workers: {output}\n" if output else "")
            + "\n" + traceback.format_exc())
    problem = ""
    if cfg is not None:
        try:
            from feature_store.store import Store

            store = Store.from_config(cfg.store)
            store.write_text(rel, text)
            return store.uri(rel)
        except Exception as exc:  # noqa: BLE001 - fall back to a local file, say why
            problem = f" (the store could not take it: {type(exc).__name__})"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path + problem
