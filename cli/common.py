"""Helpers every command shares: TOML config merging and printing project errors without a traceback."""

from __future__ import annotations

import functools
import sys
import tomllib
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from g2l_cache.errors import G2LError, G2LWarning

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def load_toml(path: Path | None, section: str | tuple[str, ...] | None = None) -> dict:
    """Options from a TOML file: its [section] table (several sections: their tables merged in
    order), or its top level when it has none of them; plain data, never evaluated."""
    if path is None:
        return {}
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise G2LError(f"config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise G2LError(f"config file {path} is not valid TOML: {exc}.") from None
    sections = [section] if isinstance(section, str) else list(section or [])
    tables = [data[s] for s in sections if isinstance(data.get(s), dict)]
    if tables:
        data = {k: v for table in tables for k, v in table.items()}
    return {k.replace("-", "_"): v for k, v in data.items()}


def handle_errors(fn):
    """Print G2LError as one red line and exit 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except G2LError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted; committed work is kept, re-run to resume.[/]")
            sys.exit(130)

    return wrapper


def data_wait_text(share: float) -> str:
    """A loop's share of time spent waiting for data, with the remedy when it is large."""
    return f"{100 * share:.1f}% of the loop" + (" — raise --num-workers" if share > 0.1 else "")


def print_g2l_warnings() -> None:
    """Show the library's G2LWarnings as one yellow line each, like errors (other warnings as Python does)."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, G2LWarning):
            err_console.print(f"[bold yellow]warning:[/] {escape(str(message))}")
        else:
            shown(message, category, filename, lineno, file, line)
    warnings.showwarning = show
