"""Self-contained HTML pages (the cache's and the evaluation's report): one file, inline CSS, relative
links only, so a page opens from disk, from a copied folder, or over any web server."""

from __future__ import annotations

import html

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d2330;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d9dee7;padding-bottom:4px}
.sub{color:#5b6475;margin:0 0 16px}
table{border-collapse:collapse;margin:6px 0 14px;background:#fff}
.wide{max-width:100%;overflow-x:auto}
th,td{border:1px solid #d9dee7;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f6;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#5b6475;font-size:13px;margin:4px 0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.card{background:#fff;border:1px solid #d9dee7;border-radius:6px;padding:8px}
.card.failed{border-color:#d64545;background:#fff6f6}
.card img{width:100%;height:220px;object-fit:contain;background:#f0f2f5;border-radius:4px}
.card .id{font-weight:600;word-break:break-all}
.card .err{color:#a02020;font-size:13px;margin-top:4px}
.card dl{display:grid;grid-template-columns:auto 1fr;gap:0 10px;margin:6px 0 0;font-size:13px}
.card dt{color:#5b6475} .card dd{margin:0}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px;background:#e4f3e6;color:#1f6b2a}
.badge.failed{background:#fbe3e3;color:#a02020}
figure{display:inline-block;margin:6px 12px 12px 0} figure img{max-width:640px;border:1px solid #d9dee7;background:#fff}
figcaption{color:#5b6475;font-size:13px}
"""


def esc(value) -> str:
    """Text made safe for HTML ('-' for None)."""
    return "-" if value is None else html.escape(str(value))


def table(header: list[str] | None, rows: list[list], numeric: set[int] = frozenset()) -> str:
    """An HTML table (no header row when `header` is None); cells are escaped, columns in `numeric`
    right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header or [])
    body = "".join("<tr>" + "".join(f'<td class="num">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if header else ""
    # wide tables (a metric per column) scroll inside the page instead of running off its edge
    return f'<div class="wide"><table>{thead}<tbody>{body}</tbody></table></div>'


def link(href: str, text: str) -> str:
    return f'<a href="{html.escape(href, quote=True)}">{esc(text)}</a>'


def image(src: str, alt: str, lazy: bool = True) -> str:
    """An image loaded when it scrolls into view (a page of 1,000 slides loads a screenful)."""
    loading = ' loading="lazy" decoding="async"' if lazy else ""
    return f'<img src="{html.escape(src, quote=True)}" alt="{html.escape(alt, quote=True)}"{loading}>'


def linked_image(href: str, alt: str) -> str:
    """A lazily loaded image that links to itself (open the full picture)."""
    return f'<a href="{html.escape(href, quote=True)}">{image(href, alt)}</a>'


def page(title: str, subtitle: str, body: str) -> str:
    """A whole page: title, one line under it, and the body."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body><h1>{esc(title)}</h1>"
            f'<p class="sub">{esc(subtitle)}</p>\n{body}\n</body></html>\n')
