"""`g2l cache ...`: build, info, verify."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from cli.common import console, data_wait_text, handle_errors
from cli.options import config_command
from g2l_cache.store import RECOMPUTE_TOLERANCE

app = typer.Typer(help="Stage one: run the teacher once over tiled slides and cache its targets.",
                  no_args_is_help=True, rich_markup_mode=None)


def _build(values: dict) -> None:
    import os

    from g2l_cache.build import config_from_dict, run_build

    cfg = config_from_dict(values)
    summary = run_build(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary)
    if not summary.succeeded(cfg.strict):
        raise typer.Exit(1)


def _build_command():
    from g2l_cache.build_config import BuildConfig

    return config_command(BuildConfig, "build", _build, """Tile slides, make K augmented views per tile, run the teacher, and cache the targets.

    Re-running resumes; with another --teacher it adds that teacher's targets for the same views
    without reading slides again (SLIDES and the tiling/view options may then be left out: they
    default to the cache's). Works under torchrun / accelerate launch: slides are sharded across
    processes. Every option is also a key of --config FILE.toml ([build] table) and of --set.
    """)


app.command("build")(handle_errors(_build_command()))


def _plan(values: dict) -> None:
    from g2l_cache.build_config import config_from_dict
    from g2l_cache.plan import PlanConfig, run_plan

    plan = run_plan(config_from_dict(values, PlanConfig))
    console.print(plan_table(plan))
    if plan["slides"]["failed_slides"]:
        _print_failed(plan["slides"]["failed_slides"])
    console.print(f"plan: {Path(values['out']) / 'plan.json'}; `g2l cache build` with the same --out and "
                  "settings starts from it.", markup=False)
    console.print(f"report: {Path(values['out']) / 'report.html'} (every slide's QC picture; open it in a browser)",
                  markup=False)


def _plan_command():
    from g2l_cache.plan import PlanConfig

    return config_command(PlanConfig, "plan", _plan, """Estimate a build before paying for it: tiles, views, disk and GPU-hours.

    Runs tissue detection only (the build's own first phase, into --out: a later `g2l cache build`
    with the same --out and settings starts from it), measures the stored bytes of a sample of real
    tiles, counts the teacher's and student's FLOPs per view on the meta device, and writes
    OUT/plan.json. GPU-hours use the GPU's dense bf16 peak times the share g2l measured on an H100,
    or --views-per-second measured on yours. `g2l cache info` later shows the plan beside what was built.
    A --config file's [build] table is read too (then its [plan] table): one file serves both.
    """, also_reads=("build",))


app.command("plan")(handle_errors(_plan_command()))


def plan_table(plan: dict, built: dict | None = None) -> Table:
    """The plan's estimate, and beside it what was built when `built` (cache_info) is given."""
    from g2l_cache.plan import plan_rows

    table = Table(title="g2l cache plan" + (" vs built" if built else ""))
    table.add_column("")
    table.add_column("planned", justify="right")
    if built:
        table.add_column("built", justify="right")
    for name, planned, got in plan_rows(plan, built):
        table.add_row(name, planned, *([got or "-"] if built else []))
    return table


def _print_summary(summary) -> None:
    table = Table(title="g2l cache build", show_header=False)
    table.add_row("cache", summary.cache)
    table.add_row("teacher", summary.teacher_fingerprint)
    table.add_row("slides ok / failed", f"{summary.slides_ok} / {summary.slides_failed}")
    table.add_row("tiles / views", f"{summary.tiles} / {summary.views}")
    table.add_row("targets written now", f"{summary.targets_written} in the teacher pass of "
                  f"{summary.teacher_seconds:.1f} s ({summary.views_per_second:.1f} views/s)")
    table.add_row("whole command", f"{summary.seconds:.1f} s (with start-up and slide planning)")
    if summary.targets_written:
        table.add_row("teacher waiting for data", data_wait_text(summary.loader_wait_share))
    table.add_row("QC images", str(Path(summary.cache) / "qc") + " (pictures, and GeoJSON for QuPath)")
    table.add_row("report", str(Path(summary.cache) / "report.html"))
    console.print(table)
    if summary.failed:
        _print_failed(summary.failed)


def _print_failed(failed_slides: dict[str, str]) -> None:
    failed = Table(title="failed slides", show_header=True)
    failed.add_column("slide")
    failed.add_column("error")
    for slide_id, error in sorted(failed_slides.items()):
        failed.add_row(escape(slide_id), escape(error))
    console.print(failed)


@app.command("info")
@handle_errors
def info(cache: Path = typer.Argument(..., help="Cache folder."),
         run_folders: Optional[list[Path]] = typer.Argument(None, help="With --runs: student run folders "
                                                            "trained on this cache.", show_default=False),
         runs: bool = typer.Option(False, "--runs", help="Sum the cost ledger over the RUN_FOLDERS that follow: "
                                   "teacher inference paid once, and what each fit reused."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Slides ok/failed, tiles, views, teachers (with the teacher time paid), bytes on disk and per view;
    the plan beside what was built when `g2l cache plan` made one; with --runs RUN..., the ledger of reuse."""
    from g2l_cache.errors import G2LError
    from g2l_cache.inspect import cache_info
    from g2l_student.ledger import cache_ledger, hours

    if runs != bool(run_folders):
        raise G2LError("name run folders after --runs: g2l cache info CACHE --runs RUN [RUN ...].")
    data = cache_info(str(cache))
    ledger = cache_ledger(cache, run_folders) if runs else None
    if as_json:
        print(json.dumps({**data, **({"ledger": ledger} if ledger else {})}, indent=2))
        return
    table = Table(title=f"g2l cache {data['cache']}", show_header=False)
    for key in ("status", "slides_ok", "slides_failed", "tiles", "views", "n_shards", "bytes_on_disk"):
        table.add_row(key.replace("_", " "), str(data[key]))
    bpv = data["bytes_per_view"]
    table.add_row("bytes per view", f"{bpv:.0f}" if bpv else "-")
    for fp, t in data["teachers"].items():
        paid = f"; inference {hours(t['teacher_seconds'])} on {', '.join(t['devices'])}" if t["devices"] else ""
        table.add_row(f"teacher {fp}", f"{t['targets']} targets, dim {t['embed_dim']}+{t['patch_dim']}"
                      f"{'' if t['complete'] else ' (incomplete)'}{paid}")
    console.print(table)
    if data["plan"]:
        console.print(plan_table(data["plan"], data))
    if ledger:
        from cli.student_cmds import print_ledger

        print_ledger(ledger["runs"], ledger)


@app.command("report")
@handle_errors
def report(cache: Path = typer.Argument(..., help="Cache folder.")) -> None:
    """Write CACHE/report.html again: every slide's QC picture, status, failure reason, tissue, tiles and
    views (failed first), the plan beside what was built, the teachers and their cost. Plan and build
    write it themselves; this refreshes it (e.g. for a cache made by an older g2l)."""
    from g2l_cache.cache_report import write_cache_report
    from g2l_cache.layout import CacheLayout

    if not CacheLayout(cache).manifest.exists():
        from g2l_cache.errors import G2LError

        raise G2LError(f"{cache} is not a g2l cache (no manifest.json).")
    console.print(f"report: {write_cache_report(cache)}", markup=False)


@app.command("verify")
@handle_errors
def verify(cache: Path = typer.Argument(..., help="Cache folder."),
           recompute: int = typer.Option(0, help="Re-run each complete teacher on N random cached views and "
                                         "compare with the stored targets."),
           tolerance: float = typer.Option(RECOMPUTE_TOLERANCE, help="Largest difference --recompute accepts, as a "
                                           "share of the stored targets' largest magnitude."),
           checksums: Optional[bool] = typer.Option(None, "--checksums/--no-checksums",
                                                    help="Read the whole cache and check every checksum.  "
                                                    "[default: on; off when --recompute is given]"),
           seed: int = typer.Option(0, help="Seed for picking the views to recompute and the canaries."),
           cpu: bool = typer.Option(False, "--cpu", help="Recompute on CPU even if a GPU is present.")) -> None:
    """Check every checksum and that counts agree, replay canary views, or re-run the teacher on a
    sample; exit 1 if anything is wrong."""
    import torch

    from g2l_cache.inspect import verify_cache

    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    full = checksums if checksums is not None else recompute == 0
    report = verify_cache(str(cache), recompute=recompute, seed=seed, device=device, checksums=full,
                          tolerance=tolerance)
    if full:
        console.print(f"checked {report['values_checked']} index values and "
                      f"{report['data_bytes'] / 1e9:.2f} GB of tiles and targets in {report['cache']} "
                      f"({report['mb_per_second']:.0f} MB/s)", markup=False)
        for fp, n in report["target_counts"].items():
            console.print(f"  teacher {fp}: {n} targets", markup=False)
    canaries = report["canaries"]
    console.print(f"canary views replayed: {canaries['checked']}, changed: {len(canaries['changed'])}", markup=False)
    if report["recompute"]:
        console.print(recompute_table(report["recompute"]))
    if report["problems"]:
        for p in report["problems"]:
            console.print(f"problem: {p}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print("cache OK", style="green")


def recompute_table(results: dict) -> Table:
    """One row per teacher: views recomputed, largest difference (absolute and as a share of the
    targets' largest magnitude), min cosine, and whether that is within the tolerance."""
    tolerance = next((r["tolerance"] for r in results.values() if "tolerance" in r), None)
    table = Table(title="recomputed vs stored targets" + (f" (tolerance {tolerance:.0%})" if tolerance else ""))
    for column in ("teacher", "views", "max |diff|", "relative", "min cosine", "ok"):
        table.add_column(column, justify="left" if column == "teacher" else "right")
    for fp, r in results.items():
        if "views" not in r:
            table.add_row(fp, "-", "-", "-", "-", "no")
            continue
        diff = max(r["max_abs_diff_embedding"], r["max_abs_diff_patch"])
        table.add_row(fp, str(r["views"]), f"{diff:.4g}", f"{r['relative_max_diff']:.2%}", f"{r['min_cosine']:.5f}",
                      "no" if r.get("problem") else "yes")
    return table
