"""Options are written once (config dataclasses) and the CLI, the TOML keys and the docs agree."""

import re
import shlex
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from cli.main import app
from cli.options import given_values, options_document
from g2l_cache import G2LError
from g2l_cache.build import BuildConfig
from g2l_cache.plan import PlanConfig
from g2l_cache.options import option_fields, shown_default
from g2l_student.config import FitConfig

REPO = Path(__file__).parent.parent
COMMAND = typer.main.get_command(app)


def _command(path: list[str]) -> click.Command:
    cmd = COMMAND
    for name in path:
        assert isinstance(cmd, click.Group) and name in cmd.commands, f"no command g2l {' '.join(path)}"
        cmd = cmd.commands[name]
    return cmd


def _flags(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", []))} | {"--help"}


@pytest.mark.parametrize("cls, path", [(BuildConfig, ["cache", "build"]), (PlanConfig, ["cache", "plan"]),
                                       (FitConfig, ["student", "fit"])])
def test_every_config_field_is_an_option_with_help_and_its_default_written_once(cls, path):
    cmd = _command(path)
    params = {p.name: p for p in cmd.params}
    for f in option_fields(cls, path[-1]):
        assert f.name in params, f"{cls.__name__}.{f.name} has no CLI option"
        assert f.metadata["help"].strip() and f.metadata["group"], f.name
        default = shown_default(f)
        # the default is shown from the field; a help text that restates it would drift
        assert default is None or f"default {default}" not in f.metadata["help"] and \
            f"default: {default}" not in f.metadata["help"], f.name
        if default and f.metadata["kind"] is None:
            assert f"[default: {default}]" in (params[f.name].help or ""), f.name
    assert set(params) - {f.name for f in option_fields(cls, path[-1])} == {"config", "set_"}
    # square brackets survive --help (no markup interpretation)
    assert "[build] table" in CliRunner().invoke(app, ["cache", "build", "--help"]).output


def test_docs_options_md_is_generated_from_the_configs():
    assert (REPO / "docs" / "options.md").read_text() == options_document(), \
        "docs/options.md is stale: python -m cli.options > docs/options.md"


def test_values_merge_defaults_file_set_then_options(tmp_path):
    toml = tmp_path / "fit.toml"
    toml.write_text('[fit]\nlr = 0.01\nsteps = 5\nloss = "mse"\nstudent_mean = [0.1, 0.2, 0.3]\n')
    values = given_values(FitConfig, {"cache": Path("c"), "out": "o", "steps": 9, "student_std": "0.5,0.5,0.5"},
                          "fit", toml, ["fit.lr=0.02", "loss=cosine", "early_stop_window=7"])
    cfg = FitConfig.from_dict(values)
    assert (cfg.lr, cfg.steps, cfg.loss, cfg.early_stop_window) == (0.02, 9, "cosine", 7)  # set > file, CLI > set
    assert cfg.student_mean == [0.1, 0.2, 0.3] and cfg.student_std == [0.5, 0.5, 0.5]
    assert cfg.batch_size == 32 and cfg.cache == "c"  # defaults stay the dataclass's
    with pytest.raises(G2LError, match=r"reads the \[fit\] section"):
        given_values(FitConfig, {}, "fit", None, ["build.views=3"])
    with pytest.raises(G2LError, match="KEY=VALUE"):
        given_values(FitConfig, {}, "fit", None, ["lr"])
    with pytest.raises(G2LError, match="CACHE is required"):
        FitConfig.from_dict({"out": "o"})
    res = CliRunner().invoke(app, ["student", "fit", "--out", str(tmp_path / "r"),
                                                 "--student-mean", "1,2"])
    assert res.exit_code == 2 and "three numbers" in res.output


def _documented_command_lines() -> list[tuple[str, str]]:
    """(file, command) for every `g2l ...` line in a code block and every inline `g2l ...` span."""
    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith("g2l "):
                    found.append((doc.name, line))
        found += [(doc.name, span) for span in re.findall(r"`(g2l [^`]+)`", text)]
    return found


def test_every_documented_command_line_names_real_commands_and_options():
    lines = _documented_command_lines()
    assert len(lines) > 30
    for doc, line in lines:
        tokens = [t for t in shlex.split(line.replace("…", "")) if t]
        path, cmd = [], COMMAND
        for token in tokens[1:]:
            if isinstance(cmd, click.Group) and token in cmd.commands:
                path.append(token)
                cmd = cmd.commands[token]
        assert not isinstance(cmd, click.Group), f"{doc}: `{line}` names no command"
        for token in tokens:
            if token.startswith("--"):
                assert token.split("=")[0] in _flags(cmd), f"{doc}: `{line}`: g2l {' '.join(path)} has no {token}"


def test_the_example_configs_are_valid():
    from cli.common import load_toml

    build = load_toml(REPO / "examples" / "h-optimus-0-brca.toml", "build")
    assert BuildConfig(**{"out": "o", **build}).teacher == "h-optimus-0"
    fit = FitConfig.from_dict({"cache": "c", "out": "o", **load_toml(REPO / "examples" / "g2l-student.toml", "fit")})
    assert fit.student_weights == "histai/hibou-L" and fit.early_stop == "g2l"


def test_the_dataset_csv_recipes_in_the_evaluation_docs_load_as_tile_sets(tmp_path):
    from g2l_student.evaluation.tileset import OPTIONAL_COLUMNS, load_tileset

    text = (REPO / "docs" / "evaluation.md").read_text()
    blocks = re.findall(r"```csv\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 6
    for i, block in enumerate(blocks):
        csv = tmp_path / f"recipe{i}.csv"
        csv.write_text(block)
        for line in block.strip().splitlines()[1:]:  # the files a real download would hold
            f = tmp_path / line.split(",")[0]
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"")
        table = load_tileset(csv).table
        assert set(table.columns) - {"path", "label"} <= set(OPTIONAL_COLUMNS), block
        assert table.height == len(block.strip().splitlines()) - 1


def test_plan_reads_the_build_table_of_a_config_so_one_file_serves_both(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[build]\nteacher = "uni"\nviews = 8\n[plan]\ngpu = "a100"\n')
    values = given_values(PlanConfig, {"out": "o", "views": None}, "plan", toml, ["plan.sample_tiles=9"],
                          also_reads=("build",))
    assert values == {"teacher": "uni", "views": 8, "gpu": "a100", "sample_tiles": 9, "out": "o"}
    only_build = given_values(BuildConfig, {}, "build", toml, None)
    assert only_build == {"teacher": "uni", "views": 8}
