"""What a newcomer meets first: config files the command line overrides, a named reference, one teacher
per name, a Python snippet that runs as a script, epochs that drop no tile, help that fits the command,
links that stay inside the repository, and hub errors that say what to do."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from cli.main import app
from cli.options import given_values
from g2l_cache import CacheReader, G2LError
from g2l_cache.build import BuildConfig, run_build
from g2l_cache.errors import G2LWarning
from g2l_student.config import FitConfig
from g2l_student.evaluation.embedder import write_embeddings
from g2l_student.sampler import RunSampler
from g2l_student.train import fit
from helpers import small_config

REPO = Path(__file__).parent.parent
runner = CliRunner()
TINY_FIT = ["--student", "vit_tiny_patch16_224", "--random-init", "--img-size", "32", "--batch-size", "8",
            "--num-workers", "0", "--val-fraction", "0.34", "--no-progress"]


# -- 1. config file vs command line -----------------------------------------------------------------
def test_the_command_line_overrides_the_shipped_configs_and_what_they_conflict_with(built_cache, tmp_path):
    # g2l-student.toml has student_weights = "histai/hibou-L" and epochs = 20
    res = runner.invoke(app, ["student", "fit", str(built_cache), "--out", str(tmp_path / "run"), "--config",
                              str(REPO / "examples" / "g2l-student.toml"), *TINY_FIT, "--steps", "2"])
    assert res.exit_code == 0, res.output
    assert "2 steps (finished)" in res.output
    file_values = given_values(FitConfig, {"random_init": True, "steps": 2}, "fit",
                               REPO / "examples" / "g2l-student.toml", None)
    assert "student_weights" not in file_values and "epochs" not in file_values
    assert file_values["lr"] == 1e-4 and file_values["early_stop"] == "g2l"  # the rest of the file stays
    # two conflicting options both on the command line are still refused
    with pytest.raises(G2LError, match="--steps or --epochs"):
        FitConfig.from_dict(given_values(FitConfig, {"cache": "c", "out": "o", "steps": 2, "epochs": 3}, "fit",
                                         None, None))
    build_values = given_values(BuildConfig, {"random_init": True}, "build",
                                REPO / "examples" / "h-optimus-0-brca.toml", ["teacher_weights='w.safetensors'"])
    assert "teacher_weights" not in build_values and build_values["teacher"] == "h-optimus-0"


# -- 2. which model is the reference ----------------------------------------------------------------
def _embeddings(folder: Path, names: dict[str, np.ndarray]) -> list[Path]:
    rng = np.random.default_rng(0)
    table = pl.DataFrame({"path": [f"t{i}.png" for i in range(40)], "label": ["a", "b"] * 20,
                          "split": ["train"] * 30 + ["test"] * 10, "group": [f"g{i // 2}" for i in range(40)]})
    paths = []
    for name, vectors in names.items():
        key = {"model": name, "model_fingerprint": name, "data": "tiles", "data_fingerprint": "d0",
               "data_mpp": None, "model_mpp": 0.5}
        write_embeddings(folder / f"{name}.parquet", table, vectors + rng.normal(0, 0.01, vectors.shape), key)
        paths.append(folder / f"{name}.parquet")
    return paths


def test_eval_compare_takes_the_named_reference_and_says_which(tmp_path):
    base = np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32)
    student, teacher = _embeddings(tmp_path, {"g2l-student": base, "teacher": base})
    globbed = sorted([str(teacher), str(student)])  # a shell glob: the student sorts first
    res = runner.invoke(app, ["eval", "compare", *globbed, "--out", str(tmp_path / "r1"), "--bootstrap", "10",
                              "--reference", "teacher"])
    assert res.exit_code == 0, res.output
    assert "measured against teacher" in res.output
    metrics = pl.read_csv(tmp_path / "r1" / "metrics.csv")
    assert set(metrics.filter(pl.col("metric").str.contains("_vs_"))["metric"]) == \
        {"cka_vs_teacher", "cka_debiased_vs_teacher", "knn10_overlap_vs_teacher"}
    assert "reference of the *_vs_ rows: teacher" in (tmp_path / "r1" / "report.md").read_text()
    plain = runner.invoke(app, ["eval", "compare", *globbed, "--out", str(tmp_path / "r2"), "--bootstrap", "10"])
    assert plain.exit_code == 0 and "measured against g2l-student" in plain.output  # the first, as before
    bad = runner.invoke(app, ["eval", "compare", *globbed, "--out", str(tmp_path / "r3"), "--reference", "uni"])
    assert bad.exit_code == 2 and "names no embedding file" in bad.output


# -- 3. two cached teachers of one name -------------------------------------------------------------
def test_a_name_two_cached_teachers_share_is_refused_with_their_fingerprints(built_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    second = run_build(small_config(cache, [], precision="bf16"))  # the same architecture, another precision
    teachers = CacheReader(str(cache)).manifest["teachers"]
    assert len(teachers) == 2 and second.teacher_fingerprint in teachers
    with pytest.raises(G2LError, match="2 teachers named 'vit_tiny_patch16_224'") as info:
        CacheReader(str(cache)).teacher("vit_tiny_patch16_224")
    assert all(fp in str(info.value) for fp in teachers) and "bf16" in str(info.value)
    res = runner.invoke(app, ["student", "fit", str(cache), "--out", str(tmp_path / "run"), *TINY_FIT, "--steps", "2",
                              "--teacher", "vit_tiny_patch16_224"])
    assert res.exit_code == 2 and "Name one by its fingerprint" in res.output
    res = runner.invoke(app, ["student", "fit", str(cache), "--out", str(tmp_path / "run"), *TINY_FIT, "--steps", "2",
                              "--teacher", second.teacher_fingerprint])
    assert res.exit_code == 0, res.output


# -- 4. the Python API snippet ----------------------------------------------------------------------
def _readme_python_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_readme_python_snippet_runs_as_a_script_with_the_stand_ins_it_names(demo_dir, tmp_path):
    snippet = _readme_python_snippet()
    assert 'if __name__ == "__main__":' in snippet
    stand_in_teacher = ('teacher="vit_small_patch16_224", random_init=True, precision="fp32", tile_size=64, '
                        'crop_size=48, views=2, max_tiles_per_slide=6')
    script = (snippet.replace('teacher="h-optimus-0"', stand_in_teacher)
              .replace('"/data/slides"', repr(str(demo_dir)))
              .replace('student="vit_large_patch14_reg4_dinov2",', 'student="vit_tiny_patch16_224",')
              .replace('student_weights="histai/hibou-L", epochs=20',
                       'random_init=True, img_size=32, steps=3, batch_size=8, val_fraction=0.34, progress=False'))
    assert script.count("vit_small_patch16_224") == 2 and "histai" not in script
    (tmp_path / "api.py").write_text(script)
    res = subprocess.run([sys.executable, "api.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "WARNING" not in res.stdout + res.stderr  # tiatoolbox's metadata notes stay quiet
    views, built, r2, reused = res.stdout.split()[-4:]
    assert int(views) == int(built) > 0 and float(reused) > 0


# -- 5. epochs that keep their promise --------------------------------------------------------------
def test_k_epochs_visit_all_k_views_of_every_tile_whatever_the_batch_size():
    k, n_tiles = 4, 42
    tiles = np.repeat(np.arange(n_tiles), k)
    views = np.arange(n_tiles * k)
    sampler = RunSampler(views, tiles, seed=0, mode="one", batch_size=32, start=0, stop=6)  # 192 >= 4 x 42
    drawn = np.array(list(sampler))[:k * n_tiles]
    for tile in range(n_tiles):
        mine = drawn[tiles[drawn] == tile]
        assert sorted(mine.tolist()) == list(range(tile * k, tile * k + k))
    # resuming at a micro-batch continues the same stream
    assert list(RunSampler(views, tiles, 0, "one", 32, start=2, stop=6)) == list(sampler)[64:]


def test_a_run_shorter_than_an_epoch_warns_that_tiles_are_never_visited(built_cache, tmp_path):
    with pytest.warns(G2LWarning, match="never visited"):
        fit(FitConfig(cache=str(built_cache), out=str(tmp_path / "run"), student="vit_tiny_patch16_224",
                      random_init=True, img_size=32, batch_size=8, num_workers=0, val_fraction=0.34, steps=1,
                      progress=False))


# -- 7. links -------------------------------------------------------------------------------------
def test_every_link_in_the_readme_and_docs_resolves_inside_the_repository():
    checked = 0
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "shared/" not in text, f"{doc.name} points outside the repository"
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            assert path.exists() and REPO.resolve() in path.parents, f"{doc.name}: link {target} does not resolve"
            checked += 1
    assert checked >= 5


# -- 8. help that fits the command ----------------------------------------------------------------
def test_plan_help_shows_only_what_a_plan_uses_and_defaults_read_one_way():
    plan = runner.invoke(app, ["cache", "plan", "--help"], terminal_width=200).output
    for gone in ("--strict", "--batch-size", "--random-init", "--teacher-weights", "--precision", "--cpu",
                 "--accept-changed-views"):
        assert not re.search(rf"^\s+{gone}\b", plan, flags=re.M), gone
    for wording in ("created, resumed, or extended", "May be omitted when resuming or adding a teacher"):
        assert wording not in plan
    assert re.search(r"^\s+--num-workers", plan, flags=re.M) and "--fit-batch-size" in plan
    for command in (["cache", "build"], ["cache", "plan"], ["student", "fit"], ["cache", "verify"], ["embed"]):
        text = runner.invoke(app, [*command, "--help"], terminal_width=200).output
        assert "[default: " in text and "(default:" not in text, command


# -- 9. an unreachable hub ------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["build", "embed"])
def test_an_unreachable_hub_names_the_preset_its_hub_id_and_what_to_do(command, demo_dir, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    if command == "build":
        args = ["cache", "build", str(demo_dir), "--out", str(tmp_path / "cache"), "--teacher", "h-optimus-0",
                "--no-progress"]
    else:
        from PIL import Image

        (tmp_path / "t" / "tumour").mkdir(parents=True)
        Image.new("RGB", (64, 64), (200, 120, 180)).save(tmp_path / "t" / "tumour" / "a.png")
        args = ["embed", "h-optimus-0", str(tmp_path / "t"), "--out", str(tmp_path / "e.parquet")]
    from helpers import run_cli

    res = run_cli(*args, env=env)
    message = " ".join(res.stderr.split())
    assert res.returncode == 2, res.stderr[-2000:]
    assert "teacher h-optimus-0 (hub id bioptimus/H-optimus-0)" in message and "cannot be reached" in message
    assert "HF_HUB_OFFLINE is set" in message and "--teacher-weights" in message and "--random-init" in message
    assert "Traceback" not in res.stderr


# -- every command of the real workflow, with the stand-ins the README names ----------------------
STAND_INS = [  # (documented text, what a machine without weights or slides runs instead)
    ("cache build /data/brca/slides", "cache build SLIDES"), ("cache plan /data/brca/slides", "cache plan SLIDES"),
    ("/data/g2l/brca-hopt0", "CACHE"),
    ("embed h-optimus-0", "embed vit_small_patch16_224 --random-init --img-size 48"),
    ("--teacher h-optimus-0 --mpp 0.5 --tile-size 256 --views 4 --max-tiles-per-slide 2000 --gpu h100",
     "--teacher vit_small_patch16_224 --mpp 0.5 --tile-size 64 --crop-size 48 --views 4 --max-tiles-per-slide 6 "
     "--gpu h100 --no-progress"),
    ("--teacher h-optimus-0 --mpp 0.5 --tile-size 256 --views 4 --max-tiles-per-slide 2000",
     "--teacher vit_small_patch16_224 --random-init --mpp 0.5 --tile-size 64 --crop-size 48 --views 4 "
     "--max-tiles-per-slide 6 --no-progress"),
    ("--student vit_large_patch14_reg4_dinov2 --student-weights histai/hibou-L",
     "--student vit_tiny_patch16_224 --random-init --img-size 32 --num-workers 0 --val-fraction 0.34 --no-progress"),
    ("--epochs 20 --batch-size 256", "--steps 3 --batch-size 8"),
    ("tiles.csv", "TILES"),
]


def _workflow_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## The real workflow"):text.index("## Performance")]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split(" #")[0].split())
            if line.startswith("g2l "):
                lines.append(line)
    return lines


def test_the_readmes_real_workflow_runs_as_written_with_the_stand_ins(demo_dir, tmp_path, monkeypatch):
    commands = _workflow_commands()
    assert len(commands) == 9
    made = runner.invoke(app, ["demo", "tiles", str(tmp_path / "tiles"), "--n-crops", "8", "--centers", "2",
                                "--tile-px", "64"])
    assert made.exit_code == 0, made.output
    monkeypatch.chdir(tmp_path)
    for documented in commands:
        line = documented
        for text, stand_in in STAND_INS:
            line = line.replace(text, stand_in)
        line = (line.replace("SLIDES", str(demo_dir)).replace("CACHE", str(tmp_path / "cache"))
                .replace("TILES", str(tmp_path / "tiles" / "tiles.csv")))
        assert "h-optimus-0" not in line and "/data/" not in line and "hibou" not in line, line
        res = runner.invoke(app, line.split()[1:])
        assert res.exit_code == 0, f"`{documented}` as `{line}`:\n{res.output[-3000:]}"
    assert (tmp_path / "reports" / "brca" / "metrics.csv").exists()


def test_the_readmes_cpu_benchmark_column_is_the_committed_make_bench_results():
    import json

    results = {name: json.loads((REPO / "benchmarks" / "results" / f"{name}.json").read_text())
               for name in ("cache_build", "student_fit", "cached_vs_online")}
    readme = (REPO / "README.md").read_text()
    rows = {row.split("|")[1].strip(): row.split("|")[3].strip() for row in readme.splitlines()
            if row.startswith("| ") and row.count("|") == 4}
    assert rows["cache build views/s ÷ bare teacher forward"] == f"{results['cache_build']['ratio']:.2f}"
    assert rows["student fit steps/s ÷ bare train step"] == f"{results['student_fit']['ratio']:.2f}"
    online = results["cached_vs_online"]
    assert rows["online-teacher epoch ÷ cached epoch"] == \
        f"{online['ratio']:.2f} (theory {online['flop_ratio_theory']:.2f})"
