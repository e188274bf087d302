"""Shared command line of every job: ``--config FILE`` plus ``section.field=value`` overrides."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from feature_store.frames import EncoderIdentityError
from frame_dist.config import Config, ConfigError, load_config

# Exit codes shared by every job (documented in README).
EXIT_OK = 0
EXIT_FAILED = 1  # the stage ran and failed (bad data, crashed workers, ...)
EXIT_CONFIG = 2  # the configuration or the command line is invalid; nothing was run


def parse_config(description: str, argv: Sequence[str] | None = None) -> Config:
    """Parse ``--config FILE key=value ...``; print the error and exit 2 on a bad config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (defaults apply to missing fields)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. graph.n_clips=8")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from exc


def run_stage(stage: str, fn: Callable[[], object]) -> int:
    """Run one stage; on failure print ``stage <name> failed: <cause>`` and return EXIT_FAILED."""
    try:
        fn()
    except (ConfigError, EncoderIdentityError) as exc:
        print(f"stage {stage} refused its configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # noqa: BLE001 - the job's contract is a one-line cause + exit code
        print(f"stage {stage} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        import traceback

        traceback.print_exc()
        return EXIT_FAILED
    return EXIT_OK
