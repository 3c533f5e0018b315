"""The README's demo blocks, made from a `make demo` output folder, so they cannot go stale.

Each block sits between `<!-- demo:NAME -->` and `<!-- /demo:NAME -->` in README.md and is rendered
here from the demo's files (plan.json, cache info, fidelity.json, the evaluation report, the model
card). `test_readme_demo_blocks_are_what_make_demo_produces` compares them with a fresh demo; after a
change that moves the figures, refresh the README with

    python tests/readme_demo.py demo_out --write
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- demo:(?P<name>[\w-]+) -->)(?P<body>.*?)(<!-- /demo:(?P=name) -->)", flags=re.S)
# Wall-clock times of a run (the cost ledger) differ between runs; everything else is deterministic.
TIME = re.compile(r"\d+(?:\.\d+)? (?:s|min|h)\b")
NUMBER = re.compile(r"(?<![\w.])[-−]?\d[\d,]*(?:\.\d+)?(?![\w])")


def _signed(value: float, digits: int) -> str:
    return f"{value:.{digits}f}".replace("-", "−")


def _plan_table(plan: dict) -> str:
    from rich.console import Console

    from cli.cache_cmds import plan_table

    buffer = io.StringIO()
    Console(file=buffer, width=80, color_system=None).print(plan_table(plan))
    return buffer.getvalue()


def render_blocks(demo: Path) -> dict[str, str]:
    """Every README demo block's body, from the output folder of `make demo`."""
    import polars as pl

    from g2l_cache.inspect import cache_info

    plan = json.loads((demo / "cache" / "plan.json").read_text())
    info = cache_info(str(demo / "cache"))
    fidelity = json.loads((demo / "run" / "fidelity.json").read_text())
    before, after = fidelity["before"], fidelity["after"]
    metrics = pl.read_csv(demo / "report" / "metrics.csv")

    def metric(model: str, name: str) -> float:
        return metrics.filter((pl.col("model") == model) & (pl.col("metric") == name))["value"][0]

    student = metric("student", "cka_debiased_vs_teacher"), metric("student", "knn10_overlap_vs_teacher")
    untrained = metric("untrained-student", "cka_debiased_vs_teacher"), \
        metric("untrained-student", "knn10_overlap_vs_teacher")
    closer = "closer to" if student[0] > untrained[0] and student[1] > untrained[1] else "not closer to"
    per_tile, planned = info["bytes_per_tile"], plan["bytes_per_tile"]
    # the card names the cache as the fit was given it: the README shows the Makefile's own folder
    card = (demo / "run" / "export" / "README.md").read_text().replace(str(demo), "demo_out")
    return {
        "fidelity": (f"Measured: the projected student's centred R² to the teacher goes from "
                     f"{_signed(before['projected_r2'], 2)} to {_signed(after['projected_r2'], 2)} (1 is a perfect fit, "
                     "0 is no better than predicting the teacher's mean embedding), debiased CKA from "
                     f"{before['projected_cka_debiased']:.2f} to {after['projected_cka_debiased']:.2f}, the backbone's "
                     f"10-NN overlap with the teacher from {before['backbone_knn10_overlap']:.2f} to "
                     f"{after['backbone_knn10_overlap']:.2f}"),
        "evaluation": (f"Measured: the trained backbone is {closer} the teacher than the untrained one (debiased "
                       f"CKA {student[0]:.3f} vs {untrained[0]:.3f}, 10-NN overlap {student[1]:.2f} vs "
                       f"{untrained[1]:.2f}"),
        "untrained": f"the untrained student starts at debiased CKA {before['projected_cka_debiased']:.2f}",
        "plan-table": f"\n```\n{_plan_table(plan)}```\n",
        "plan-vs-built": (f"the same {info['tiles']:,} tiles and {info['views']:,} views, {per_tile:,.0f} stored bytes "
                          f"per tile against {planned:,.0f} estimated from the {plan['tiles_measured']}-tile sample "
                          f"({_signed(100 * (per_tile / planned - 1), 2)} %), and {info['bytes_on_disk'] / 1e6:.2f} MB "
                          f"on disk against {plan['disk_bytes']['total'] / 1e6:.2f} MB planned"),
        "model-card": f"\n````markdown\n{card}````\n",
    }


def readme_blocks(text: str) -> dict[str, str]:
    return {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}


def write_blocks(text: str, blocks: dict[str, str]) -> str:
    return BLOCK.sub(lambda m: m.group(1) + blocks.get(m.group("name"), m.group("body")) + m.group(4), text)


def _mask_speed(text: str) -> str:
    """The model card's speed section with what this machine measured (images per second, their
    ratio, the device's name) masked; parameters and GFLOPs stay checked."""
    if "## Speed" not in text:
        return text
    head, rest = text.split("## Speed", 1)
    section, sep, tail = rest.partition("## Cost ledger")
    section = re.sub(r"\| [\d.e+]+( \(estimated\))? \| (\d+) \|$", r"| <rate> | \2 |", section, flags=re.M)
    section = re.sub(r"on [^,]+, (fp32|bf16), random input", r"on <device>, \1, random input", section)
    section = re.sub(r"embeds [\d.e+]+x", "embeds <ratio>x", section)
    return head + "## Speed" + section + sep + tail


def differences(written: str, produced: str) -> list[str]:
    """Where two renderings of a block differ: text exactly, decimals within one unit of their last
    printed digit (another CPU's float rounding), wall-clock times not at all."""
    a, b = (_mask_speed(TIME.sub("<time>", t)) for t in (written, produced))
    if NUMBER.split(a) != NUMBER.split(b):
        return [f"text differs:\n--- README\n{a}\n--- demo\n{b}"]
    out = []
    for x, y in zip(NUMBER.findall(a), NUMBER.findall(b)):
        fx, fy = (float(v.replace(",", "").replace("−", "-")) for v in (x, y))
        unit = 10.0 ** -len(x.split(".")[1]) if "." in x else 0.0
        if abs(fx - fy) > unit * 1.01:
            out.append(f"{x} in the README, {y} from the demo")
    return out


def main(argv: list[str]) -> int:
    demo = Path(argv[0])
    blocks = render_blocks(demo)
    text = README.read_text()
    if "--write" in argv:
        README.write_text(write_blocks(text, blocks))
        print(f"updated {len(blocks)} demo blocks of {README}")
        return 0
    stale = {name: d for name, body in readme_blocks(text).items() if (d := differences(body, blocks[name]))}
    for name, d in stale.items():
        print(f"{name}: {'; '.join(d)}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent.parent))
    raise SystemExit(main(sys.argv[1:]))
