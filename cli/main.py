"""The `g2l` command: a thin layer that parses options into configs and calls the library."""

from __future__ import annotations

import typer

from cli import cache_cmds, demo_cmds, eval_cmds, student_cmds

app = typer.Typer(help="g2l: distil a giga-scale pathology foundation model into a cancer-specific "
                  "ViT-L student (G2L). Stage one: `g2l cache build`; stage two: `g2l student fit`.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(cache_cmds.app, name="cache")
app.add_typer(student_cmds.app, name="student")
app.add_typer(eval_cmds.app, name="eval")
app.command("embed")(eval_cmds.embed)
app.add_typer(demo_cmds.app, name="demo")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
