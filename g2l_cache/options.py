"""Options as config-dataclass fields: the one place an option's default, help and group are written.

The CLI builds its options from these fields (cli/options.py), TOML files use the field names as
keys, and docs/options.md is generated from them; a test checks all three agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str, group: str, default_factory: Callable | None = None,
           short: str | None = None, kind: str | None = None, default_text: str | None = None,
           commands: tuple[str, ...] | None = None, help_in: dict[str, str] | None = None) -> Any:
    """A config field that is also an option. `help` says what it does (not its default, which is
    shown from the field); `group` orders --help and the docs; `kind`: "triple" (R,G,B text),
    "argument" / "arguments" (the command's positional argument(s)), "repeat" (an option given once
    per value); `default_text`: how to show a computed default. A config shared by commands (build and
    plan) offers a field only in `commands` (default: all), with `help_in[command]` where it differs."""
    meta = {"help": help, "group": group, "short": short, "kind": kind, "default_text": default_text,
            "commands": commands, "help_in": help_in or {}}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_fields(cls, command: str | None = None) -> list[dataclasses.Field]:
    """The fields of a config class that are options (of `command`, when given), in declaration order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata
            and (command is None or f.metadata.get("commands") is None or command in f.metadata["commands"])]


def option_help(f: dataclasses.Field, command: str | None = None) -> str:
    """What the option does, as `command` uses it."""
    return f.metadata.get("help_in", {}).get(command) or f.metadata["help"]


def shown_default(f: dataclasses.Field) -> str | None:
    """The default as --help and the docs show it (None: required, or nothing to show)."""
    if f.metadata.get("default_text"):
        return f.metadata["default_text"]
    if f.default is _MISSING or f.default is None or f.default is False:
        return None
    if isinstance(f.default, (list, tuple)):
        return ",".join(str(v) for v in f.default)
    return str(f.default).lower() if isinstance(f.default, bool) else str(f.default)


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def options_markdown(cls, title: str, command: str, only: set[str] | None = None) -> str:
    """A Markdown table per group of the options `command` offers of `cls` (or those named in `only`);
    docs/options.md is made of these."""
    lines = [f"## {title}", ""]
    groups: dict[str, list[dataclasses.Field]] = {}
    for f in option_fields(cls, command):
        if only is not None and f.name not in only:
            continue
        groups.setdefault(f.metadata["group"], []).append(f)
    for group, members in groups.items():
        lines += [f"### {group}", "", "| option | TOML key | default | what it does |", "|---|---|---|---|"]
        for f in members:
            positional = f.metadata["kind"] in ("argument", "arguments")
            flag = f.name.upper() + " (argument)" if positional else flag_name(f)
            default = shown_default(f)
            lines.append(f"| `{flag}` | `{f.name}` | {f'`{default}`' if default else '-'} | "
                         f"{option_help(f, command).replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)
