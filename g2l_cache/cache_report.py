"""CACHE/report.html: every slide (QC picture, status, why it failed, tissue, tiles, views), the plan
beside what was built, the teachers and their cost, on one page that opens from disk.

Written by `g2l cache plan` and by a build when it finalises, and again by `g2l cache report`.
Failed slides come first; pictures load as they scroll into view, so 1,000 slides stay light.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from g2l_cache.errors import G2LError
from g2l_cache.html_page import esc, link, linked_image, page, table
from g2l_cache.inspect import cache_info
from g2l_cache.layout import CacheLayout, read_manifest, write_text_atomic
from g2l_cache.plan import plan_rows, read_plan
from g2l_cache.store import close_env, index_path, iter_prefix, shared_env, unpack
from g2l_cache.units import hours, size


def write_cache_report(root: str | Path, records: list[dict] | None = None) -> Path:
    """Write CACHE/report.html from `records` (slide records), or from the cache's own tables."""
    layout = CacheLayout(root)
    manifest = read_manifest(layout.root)
    records = records if records is not None else slide_records(layout, manifest)
    info = cache_info(str(layout.root))
    plan = read_plan(layout.root)
    k = manifest["settings"]["views"]["per_tile"]
    body = [_summary(info, manifest), _plan_section(plan, info), _teachers(manifest),
            _slides(layout, records, plan, k)]
    failed = sum(r["status"] != "ok" for r in records)
    # the folder's name, not its path, and no time of the last write: the page moves with the cache,
    # and a resume that changes nothing rewrites it byte for byte
    subtitle = (f"{layout.root.name} · {info['status']} · {len(records) - failed} slides ok, {failed} failed · "
                f"created {manifest.get('created', '-')}")
    try:
        write_text_atomic(layout.report, page("g2l cache report", subtitle, "\n".join(body)))
        return layout.report
    except OSError as exc:
        raise G2LError(f"cannot write {layout.report} ({exc.strerror}); is the cache folder read-only? "
                       "Copy the cache somewhere writable to make its report.") from None


def try_cache_report(root: str | Path) -> Path | None:
    """`write_cache_report`, warning instead of failing: a build or plan that has finished its work
    never fails on its report page (`g2l cache report` writes it again)."""
    import warnings

    from g2l_cache.errors import G2LWarning

    try:
        return write_cache_report(root)
    except Exception as exc:  # noqa: BLE001  the page is a view of the cache, never its content
        warnings.warn(f"the report page of {root} could not be written ({type(exc).__name__}: {exc}); "
                      "run `g2l cache report` to try again.", G2LWarning, stacklevel=2)
        return None


def slide_records(layout: CacheLayout, manifest: dict) -> list[dict]:
    """Every slide's record: slides.parquet when the cache is finalised, else the shards' records
    (a plan, or a build that has not finished)."""
    if layout.slides.exists() and manifest.get("status") != "building":
        return pq.read_table(layout.slides).to_pylist()
    records = []
    for shard in range(manifest["n_shards"]):
        path = layout.shard(shard)
        if not index_path(path).exists():
            continue
        try:
            records += [json.loads(unpack(v, key)) for key, v in iter_prefix(shared_env(path), b"slide/")]
        finally:
            close_env(path)
    return records


def _summary(info: dict, manifest: dict) -> str:
    s = manifest["settings"]
    t = s["tiling"]
    regions = (f"annotated regions ({', '.join(t.get('annotation_classes') or []) or 'every class'})"
               if t.get("annotations") else "whole slides")
    rows = [["status", info["status"]], ["slides ok / failed", f"{info['slides_ok']} / {info['slides_failed']}"],
            ["tiles / views", f"{info['tiles']} / {info['views']}"],
            ["tiling", f"{t['tile_size']} px at {t['mpp']} µm/px, tissue ≥ {t['tissue_threshold']:.0%} "
                       f"({t['tissue_method']}), {regions}"],
            ["views per tile", s["views"]["per_tile"]], ["shards", info["n_shards"]],
            ["bytes on disk", size(info["bytes_on_disk"])]]
    return "<h2>Cache</h2>" + table(None, rows)


def _plan_section(plan: dict | None, info: dict) -> str:
    if plan is None:
        return "<h2>Plan</h2><p class=note>No plan.json: this cache was built without `g2l cache plan`.</p>"
    built = info if info["tiles"] else None
    rows = [[name, planned, got or "-"] if built else [name, planned] for name, planned, got in plan_rows(plan, built)]
    return "<h2>Plan" + (" beside what was built" if built else "") + "</h2>" + \
        table(["", "planned", "built"] if built else ["", "planned"], rows, numeric={1, 2})


def _teachers(manifest: dict) -> str:
    if not manifest["teachers"]:
        return "<h2>Teachers</h2><p class=note>No teacher has run on this cache yet.</p>"
    from g2l_cache.inspect import teacher_devices, teacher_seconds

    rows, passes = [], []
    for fp, t in manifest["teachers"].items():
        rows.append([t["spec"]["name"], fp, t.get("arch"), t.get("precision"), f"{t['embed_dim']} + {t['patch_dim']}",
                     t.get("n_targets", 0), "yes" if t.get("complete") else "no",
                     hours(teacher_seconds(t)) if t.get("spent") else "not recorded",
                     ", ".join(teacher_devices(t)) or "-"])
        passes += [[t["spec"]["name"], p.get("finished"), hours(p["device_seconds"]), p.get("processes"),
                    p.get("device"), p.get("views")] for p in t.get("ledger", [])]
    out = "<h2>Teachers</h2>" + table(["teacher", "fingerprint", "architecture", "precision", "dims (cls + patch)",
                                        "targets", "complete", "device time", "devices"], rows, numeric={5})
    out += "<h2>Cost ledger</h2>"
    out += table(["teacher", "finished", "device time", "processes", "device", "views"], passes, numeric={2, 3, 5}) \
        if passes else "<p class=note>No teacher pass has finished yet.</p>"
    return out


def _slides(layout: CacheLayout, records: list[dict], plan: dict | None, k: int) -> str:
    planned = (plan or {}).get("tiles", {}).get("per_slide", {})
    ordered = sorted(records, key=lambda r: (r["status"] == "ok", r["slide_id"]))  # failed first
    cards = [_card(layout, r, planned.get(r["slide_id"]), k) for r in ordered]
    return f"<h2>Slides ({len(records)}, failed first)</h2><div class=cards>{''.join(cards)}</div>"


def _card(layout: CacheLayout, r: dict, planned: int | None, k: int) -> str:
    sid, ok = r["slide_id"], r["status"] == "ok"
    picture = next((p for p in (layout.qc(sid), layout.qc(sid, ".png")) if p.exists()), None)
    contours = layout.qc(sid, ".geojson")
    links = [link(str(picture.relative_to(layout.root)), "picture")] if picture else []
    if contours.exists():
        links.append(link(str(contours.relative_to(layout.root)), "GeoJSON for QuPath"))
    annotation = r.get("annotation")
    if isinstance(annotation, dict):
        annotation = annotation.get("file")
    facts = [("size", f"{r['width']} × {r['height']} px at {r['mpp']} µm/px" if r.get("width") else None),
             ("tissue", f"{r['tissue_share']:.0%} of the slide" if r.get("tissue_share") is not None else None),
             ("tiles", f"{r['n_tiles']} of {r['n_candidates']} with tissue" if ok else None),
             ("planned", planned), ("views", r["n_tiles"] * k if ok else None),
             ("annotations", annotation), ("reader", r.get("reader"))]
    dl = "".join(f"<dt>{esc(name)}</dt><dd>{esc(value)}</dd>" for name, value in facts if value is not None)
    thumb = linked_image(str(picture.relative_to(layout.root)), sid) if picture else "<p class=note>no QC picture</p>"
    badge = '<span class="badge">ok</span>' if ok else '<span class="badge failed">failed</span>'
    error = f'<div class="err">{esc(r.get("error"))}</div>' if not ok else ""
    return (f'<div class="card{"" if ok else " failed"}" id="{esc(sid)}">{thumb}<div class=id>{esc(sid)} {badge}</div>'
            f"{error}<dl>{dl}</dl><div class=note>{' · '.join(links)}</div></div>")
