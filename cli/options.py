"""Typer options made from a config dataclass's fields (g2l_cache/options.py), so an option's name,
default and help are written once. Values merge as: defaults < --config TOML < --set < options given.
"""

from __future__ import annotations

import inspect
import tomllib
import types
import typing
from pathlib import Path
from typing import Callable, Optional

import typer

from cli.common import load_toml
from g2l_cache.errors import G2LError
from g2l_cache.options import flag_name, option_fields, option_help, shown_default


def _base_type(hint) -> type:
    """int for `int | None`, list for `list[str]`, ..."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = args[0]
    return typing.get_origin(hint) or hint


def option_parameters(cls, command: str | None = None) -> list[inspect.Parameter]:
    """One typer parameter per option field `command` offers of `cls`; every default is None ("not
    given"), the field's default is shown as typer shows defaults: [default: X]."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in option_fields(cls, command):
        meta, base = f.metadata, _base_type(hints[f.name])
        default = shown_default(f)
        # written as typer writes the defaults of the other commands' options
        text = option_help(f, command) + (f"  [default: {default}]" if default else "")
        if meta["kind"] == "arguments":
            info, annotation = typer.Argument(None, help=text, show_default=False), Optional[list[Path]]
        elif meta["kind"] == "argument":
            info, annotation = typer.Argument(None, help=text, show_default=False), Optional[Path]
        else:
            flag = flag_name(f)
            if base is bool:
                decls = [f"{flag}/--no-{flag[2:]}" if f.default is True else flag]
                annotation = Optional[bool]
            else:
                decls = [flag] + ([meta["short"]] if meta["short"] else [])
                if meta["kind"] == "repeat":
                    annotation = Optional[list[str]]
                else:
                    annotation = Optional[str] if meta["kind"] == "triple" or base is list else Optional[base]
            info = typer.Option(None, *decls, help=text, show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=annotation))
    return params


def _triple(text: str, option: str) -> list[float]:
    """'0.7,0.58,0.7' -> [0.7, 0.58, 0.7]."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise G2LError(f"{option} takes three numbers separated by commas, got {text!r}.") from None
    if len(values) != 3:
        raise G2LError(f"{option} takes three numbers (R,G,B), got {len(values)}.")
    return values


def parse_set(items: list[str] | None, section: str) -> dict:
    """`--set key=value` / `--set section.key=value` pairs; values read as TOML (text if not)."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise G2LError(f"--set takes KEY=VALUE, got {item!r}.")
        head, dot, name = key.strip().rpartition(".")
        if dot and head != section:
            raise G2LError(f"--set {item!r}: this command reads the [{section}] section, not [{head}].")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[name.replace("-", "_")] = value
    return out


def given_values(cls, kwargs: dict, section: str, config: Path | None, sets: list[str] | None,
                 also_reads: tuple[str, ...] = ()) -> dict:
    """Defaults left to the dataclass; the TOML file (tables `also_reads`, then `section`), then
    --set, then the options given on top. An option given on the command line also clears what the
    file or --set gave for the options it excludes (`cls.EXCLUSIVE`: a CLI --steps clears the
    file's epochs); two excluding options both on the command line stay, for the config to refuse."""
    values = {**load_toml(config, (*also_reads, section)), **parse_set(sets, section)}
    given = {name for name, value in kwargs.items() if value is not None and value != []}
    for group in getattr(cls, "EXCLUSIVE", ()):
        for name in given & set(group):
            for other in set(group) - given:
                values.pop(other, None)
    kinds = {f.name: f.metadata["kind"] for f in option_fields(cls)}
    for name, value in kwargs.items():
        if value is None or (kinds.get(name) in ("arguments", "repeat") and not value):
            continue
        if kinds.get(name) == "triple":
            value = _triple(value, "--" + name.replace("_", "-"))
        elif kinds.get(name) == "repeat":
            value = [str(v) for v in value]
        elif kinds.get(name) in ("argument", "arguments"):
            value = [str(v) for v in value] if isinstance(value, list) else str(value)
        elif isinstance(value, Path):
            value = str(value)
        values[name] = value
    return values


def config_command(cls, section: str, run: Callable[[dict], None], doc: str,
                   also_reads: tuple[str, ...] = ()) -> Callable:
    """A typer command whose options are `cls`'s fields plus --config and --set; it calls
    run(values) with the merged values the user gave (defaults stay the dataclass's). `also_reads`:
    other TOML tables the command takes options from first (`cache plan` reads [build])."""
    extra = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", help=f"TOML file with any of these options, "
                                               f"as keys of a {' / '.join(f'[{t}]' for t in (*also_reads, section))} "
                                               "table or at the top level.")),
        inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
                          default=typer.Option(None, "--set", help=f"KEY=VALUE or {section}.KEY=VALUE "
                                               "(repeatable): one option as a TOML value, over --config.")),
    ]

    def command(**kwargs) -> None:
        config, sets = kwargs.pop("config"), kwargs.pop("set_")
        run(given_values(cls, kwargs, section, config, sets, also_reads))

    command.__signature__ = inspect.Signature(option_parameters(cls, section) + extra)
    command.__doc__ = doc
    return command


def options_document() -> str:
    """docs/options.md: every option of `g2l cache build` and `g2l student fit`, from the configs."""
    from g2l_cache.build_config import BuildConfig
    from g2l_cache.options import options_markdown
    from g2l_cache.plan import PlanConfig
    from g2l_student.config import FitConfig
    from g2l_student.doctor_config import DoctorConfig

    return "\n".join([
        "# Options", "",
        "Generated from the config dataclasses (`python -m cli.options > docs/options.md`); a test fails",
        "when this file is stale. Every option is also a key of a `--config` TOML file (in a `[build]`,",
        "`[plan]` or `[fit]` table, or at the top level) and can be set with `--set KEY=VALUE`; values given",
        "on the command line win over `--set`, which wins over the file, which wins over the defaults. An",
        "option given on the command line also clears the file's value of an option it excludes (`--steps`",
        "clears `epochs`, `--random-init` clears `student_weights` / `teacher_weights`).", "",
        options_markdown(BuildConfig, "g2l cache build", "build"),
        "## g2l cache plan", "",
        "The options of `g2l cache build` that decide the tiles (the same settings give the same tiles), plus",
        "the costing. A config file's `[build]` table is read too; its build-only keys (teacher weights,",
        "precision, batch size, ...) are ignored by the plan.", "",
        options_markdown(PlanConfig, "g2l cache plan", "plan").split("\n", 2)[2],
        options_markdown(FitConfig, "g2l student fit", "fit"),
        options_markdown(DoctorConfig, "g2l doctor", "doctor"),
    ])


if __name__ == "__main__":
    print(options_document(), end="")
