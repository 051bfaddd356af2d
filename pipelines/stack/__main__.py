"""``python -m pipelines.stack``: the child processes of ``depin up`` — the detached supervisor of
``depin up --background`` (its stderr is the log :data:`depin_core.paths.UP_LOG`) and the deployments
server. Not a user command: ``depin up`` starts them."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from depin_core.errors import DepinError
from pipelines.stack.up import UpOptions, ready_text, serve_deployments, supervise


def _write(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.stack")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--options-json", help="run the supervisor (the detached `depin up --background`)")
    group.add_argument("--serve-deployments", type=Path, help="serve the deployments; name them in this file")
    args = parser.parse_args(argv)
    if args.serve_deployments:
        # prefect's console handler logs through rich: load its emoji table now, else that lazy import can
        # race the SIGTERM handler's log line
        import rich._emoji_codes  # noqa: F401

        with contextlib.suppress(KeyboardInterrupt):
            serve_deployments(args.serve_deployments)
        return

    def ready(doc: dict[str, Any], notes: list[str]) -> None:
        _write(ready_text(doc, notes))

    try:
        supervise(
            UpOptions.model_validate_json(args.options_json),
            on_ready=ready,
            notify=lambda line: _write(line + "\n"),
        )
    except DepinError as exc:
        _write(f"error: {exc}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
