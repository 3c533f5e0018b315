"""The `g2l` command: a thin layer that parses options into configs and calls the library."""

from __future__ import annotations

import logging

import typer

# tiatoolbox installs INFO/WARNING handlers on the root logger at import when it has none, which
# floods a progress display with per-slide metadata notes. The command (not the library, which
# leaves a user's logging set-up alone) gives the root logger a NullHandler first.
if not logging.getLogger().hasHandlers():
    logging.getLogger().addHandler(logging.NullHandler())

from cli import cache_cmds, demo_cmds, doctor_cmds, eval_cmds, student_cmds  # noqa: E402
from cli.common import handle_errors, print_g2l_warnings  # noqa: E402

print_g2l_warnings()

app = typer.Typer(help="g2l: distil a giga-scale pathology foundation model into a cancer-specific "
                  "ViT-L student (G2L). Stage one: `g2l cache build`; stage two: `g2l student fit`.",
                  no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)
app.add_typer(cache_cmds.app, name="cache")
app.add_typer(student_cmds.app, name="student")
app.add_typer(eval_cmds.app, name="eval")
app.command("embed")(eval_cmds.embed)
app.add_typer(demo_cmds.app, name="demo")
app.command("doctor")(handle_errors(doctor_cmds.doctor_command()))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
