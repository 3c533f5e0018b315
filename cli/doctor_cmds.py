"""`g2l doctor`: check a run's weights, GPUs, disk, cores, output folder and slide readers first."""

from __future__ import annotations

import typer
from rich.markup import escape

from cli.common import console
from cli.options import config_command

MARKS = {"ok": "[green]ok  [/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]"}


def _doctor(values: dict) -> None:
    from g2l_student.doctor import DoctorConfig, run_doctor

    diagnosis = run_doctor(DoctorConfig(**values))
    for check in diagnosis.checks:
        line = f"{MARKS[check.status]} {escape(check.what)}: {escape(check.detail)}"
        if check.fix and check.status != "ok":
            line += f"\n     -> {escape(check.fix)}"
        console.print(line, soft_wrap=True, highlight=False)
    failed = sum(c.status == "fail" for c in diagnosis.checks)
    if failed:
        console.print(f"[bold red]{failed} check(s) block this run.[/]")
        raise typer.Exit(1)
    console.print("[green]nothing blocks this run.[/]")


def doctor_command():
    from g2l_student.doctor_config import DoctorConfig

    return config_command(DoctorConfig, "doctor", _doctor, """Will this run work? Check it before hours of GPU time.

    One line per check, with what to do: hub access to each teacher's and the student's weights
    (a missing repository, no access and no network are told apart; weights in the local hub cache
    pass offline), a local weights file's fit against its architecture (from the file's header,
    nothing loaded), GPUs and their type, free disk against a plan's estimate (--plan OUT/plan.json),
    CPU cores against 4 data workers per GPU, the output folder writable, the slide readers. Exits 1
    when something blocks the run.
    """)
