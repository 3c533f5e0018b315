"""A disk that fills during a build: every write is complete before anything points at it, the build
stops with one line naming the full folder and what is still needed, and once there is room the
same command resumes to the cache an uninterrupted build writes (checksums and all)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cache_content, committed_targets, run_cli, small_config
from g2l_cache.build import run_build
from g2l_cache.disk_full import write_fully

REPO = Path(__file__).parent.parent
# 224-px tiles: stored tiles and targets outweigh the index and tables, so the disk fills mid-pass
FILLING = dict(tile_size=224, crop_size=96, views=4, max_tiles_per_slide=16)


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


def _cli_args(slides: Path, out: Path) -> list[str]:
    args = ["cache", "build", str(slides), "--out", str(out), "--teacher", "vit_tiny_patch16_224", "--random-init",
            "--batch-size", "8", "--num-workers", "0", "--no-progress"]
    for key, value in FILLING.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.mark.skipif(not _can_mount(), reason="needs root and mount namespaces (unshare -m) for a small tmpfs")
def test_a_disk_that_fills_mid_build_stops_it_cleanly_and_a_resume_equals_an_uninterrupted_build(demo_dir, tmp_path):
    reference = tmp_path / "reference"
    run_build(small_config(reference, [demo_dir], **FILLING))
    data = sum(p.stat().st_size for p in reference.glob("shards/*/tiles.bin"))
    data += sum(p.stat().st_size for p in reference.glob("shards/*/targets/*.bin"))
    rest = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file()) - data
    small, kept = tmp_path / "small", tmp_path / "kept"
    small.mkdir()
    cli = " ".join([sys.executable, "-m", "cli", *_cli_args(demo_dir, small / "cache")])
    # room for the plan and half the tiles and targets; then the disk grows (space freed) and the same
    # command runs again; the cache is copied out of the private mount
    script = (f"mount -t tmpfs -o size={int(rest + data / 2) // 1024}k tmpfs {small} || exit 90\n"
              f"{cli} > {tmp_path}/first.out 2>&1; echo $? > {tmp_path}/first.rc\n"
              f"cp -a {small}/cache {tmp_path}/at-the-full-disk\n"
              f"mount -o remount,size=256m {small}\n"
              f"{cli} > {tmp_path}/second.out 2>&1; echo $? > {tmp_path}/second.rc\n"
              f"cp -a {small}/cache {kept}\n")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    first = (tmp_path / "first.out").read_text()
    assert (tmp_path / "first.rc").read_text().strip() != "0", first
    assert "Traceback" not in first
    (line,) = [ln for ln in first.splitlines() if ln.startswith("error:")]
    assert f"the disk holding {small / 'cache'} is full" in line and "still needs about" in line, line
    assert "run the same command again" in line
    partial = committed_targets(tmp_path / "at-the-full-disk")
    assert 0 < partial < committed_targets(reference)  # it filled during the teacher pass
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.out").read_text()
    assert cache_content(kept) == cache_content(reference)
    verify = run_cli("cache", "verify", str(kept))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_short_write_is_continued_and_a_write_that_stores_nothing_raises(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    calls = []
    real = os.pwrite

    def short(fd_, data, offset):  # what Python returns on a disk that fills: fewer bytes, no error
        calls.append(len(data))
        return real(fd_, bytes(data)[:max(1, len(data) // 3)], offset)

    monkeypatch.setattr(os, "pwrite", short)
    write_fully(fd, b"abcdefghij" * 100, 5)
    assert len(calls) > 1
    monkeypatch.setattr(os, "pwrite", lambda *a: 0)
    with pytest.raises(OSError) as raised:
        write_fully(fd, b"more", 2000)
    assert raised.value.errno == 28
    os.close(fd)
    assert path.read_bytes() == b"\0" * 5 + b"abcdefghij" * 100
