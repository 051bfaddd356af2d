"""Console output for the CLI: human text and progress on stderr, the ``--json`` line on stdout.

Human lines go through :func:`say` (or :func:`error`): their text is printed verbatim (never read as rich
markup, so a path or message holding ``[x]`` prints as is) and never wrapped, whatever the terminal width or
whether stderr is a terminal: one message is one line, which scripts and logs can grep."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

# markup and emoji codes off: any str printed on it comes out as written. Progress bars and tables use it
# too (their own markup is explicit), so it keeps wrapping to the terminal width for them.
err_console = Console(stderr=True, markup=False, emoji=False)

Part = str | tuple[str, str]

# the ``--json`` flag of the commands that print one JSON object when done
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object as the last stdout line")]


def say(*parts: Part) -> None:
    """Print one human line on stderr: each ``str`` part verbatim, each ``(text, style)`` part styled
    (e.g. ``("done", "bold green")``); styles show on terminals only, and the line is never wrapped."""
    err_console.print(Text.assemble(*parts), soft_wrap=True)


def error(message: str) -> None:
    """Print ``error: <message>`` on one stderr line (the message verbatim)."""
    say(("error:", "bold red"), " ", message)


def emit_json(payload: dict[str, Any]) -> None:
    """Print ``payload`` as one JSON line on stdout (always the last stdout line of a ``--json`` run)."""
    sys.stdout.write(json.dumps(payload, default=str, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def write_err(text: str) -> None:
    """Write ``text`` to stderr as is (no rich: multi-line blocks and keys come out exactly)."""
    sys.stderr.write(text)
    sys.stderr.flush()
