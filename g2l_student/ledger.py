"""The cost ledger on the run side: what a fit spent, and the teacher inference it reused.

The cache records each teacher pass (device-seconds, device, views) in its manifest; a fit never
writes into the cache (it may be read-only), so the fit records its own sessions and, when it
starts, the cache's teacher cost in its run.json. Device-seconds are wall seconds times processes.
A cache built by a g2l older than the ledger has targets but no recorded teacher time: such
teachers are listed as unrecorded and left out of the sums, never counted as 0 s.
"""

from __future__ import annotations

from pathlib import Path

from g2l_cache.errors import G2LError
from g2l_cache.units import hours  # noqa: F401  (the ledger's unit, also for its callers)
from g2l_student.rundir import RunDir


def run_ledger(run_root: str | Path) -> dict:
    """A run's own time, the views it trained on, and per teacher the inference it reused: the
    cache's teacher time for its targets (paid once), and what the run's views would have cost
    a teacher run online."""
    run = RunDir(run_root)
    info = run.info()
    sessions = info.get("ledger", [])
    views = sum(s["views"] for s in sessions)
    teachers, unrecorded = [], []
    for t in info.get("teachers", []):
        row = dict(t)
        if not t.get("live") and t.get("cache_views"):
            row["online_equivalent_seconds"] = views * t["cache_device_seconds"] / t["cache_views"]
        elif not t.get("live"):
            unrecorded.append(t.get("name") or t.get("label"))
        teachers.append(row)
    return {"run": str(run.root), "cache": info.get("cache"), "status": info.get("status"),
            "steps": info.get("steps"), "views_trained": views,
            "fit_device_seconds": sum(s["wall_seconds"] * s["processes"] for s in sessions),
            "fit_devices": sorted({s["device"] for s in sessions}), "sessions": len(sessions),
            "teachers": teachers, "teachers_unrecorded": unrecorded,
            "teacher_seconds_reused": sum(t.get("cache_device_seconds", 0.0) for t in teachers if not t.get("live")),
            "online_equivalent_seconds": sum(t.get("online_equivalent_seconds", 0.0) for t in teachers)}


def cache_ledger(cache_root: str | Path, runs: list[str | Path]) -> dict:
    """The teacher time a cache paid once, and what the given runs trained on it reused."""
    from g2l_cache.inspect import teacher_devices, teacher_seconds, teacher_views_paid
    from g2l_cache.layout import read_manifest

    manifest = read_manifest(cache_root)
    teachers = {fp: {"name": t["spec"]["name"], "device_seconds": teacher_seconds(t),
                     "views": teacher_views_paid(t), "devices": teacher_devices(t)}
                for fp, t in manifest["teachers"].items()}
    rows = []
    for run in runs:
        ledger = run_ledger(run)
        cached = [t for t in ledger["teachers"] if not t.get("live")]
        foreign = [t["fingerprint"] for t in cached if t["fingerprint"] not in teachers]
        if foreign or not cached:
            raise G2LError(f"run {run} did not train on the targets of {cache_root} "
                           f"({'its teachers ' + ', '.join(foreign) if foreign else 'a live teacher'}); "
                           "give runs of this cache.")
        rows.append(ledger)
    used = sorted({t["fingerprint"] for r in rows for t in r["teachers"]})
    unrecorded = sorted({teachers[fp]["name"] for fp in used if not teachers[fp]["views"]}
                        | {name for r in rows for name in r["teachers_unrecorded"]})
    return {"cache": str(cache_root), "teachers": teachers, "runs": rows, "teachers_unrecorded": unrecorded,
            "teacher_seconds_paid": sum(teachers[fp]["device_seconds"] for fp in used),
            "teacher_seconds_reused": sum(r["teacher_seconds_reused"] for r in rows),
            "online_equivalent_seconds": sum(r["online_equivalent_seconds"] for r in rows),
            "fit_device_seconds": sum(r["fit_device_seconds"] for r in rows)}


def unrecorded_note(names: list[str]) -> str:
    """Why a ledger leaves teachers out: their cache predates the ledger. "" when none is."""
    if not names:
        return ""
    return (f"teacher time not recorded for {', '.join(names)}: the cache was built by a g2l older than the "
            "cost ledger, so the sums leave it out (rebuilding would not record it either: every view is done).")


def reused_text(seconds: float, unrecorded: list[str]) -> str:
    """A run's reused teacher time, saying so where some of it was never recorded."""
    if not unrecorded:
        return hours(seconds)
    return f"{hours(seconds)} + not recorded" if seconds else "not recorded"
