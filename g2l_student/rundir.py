"""A run folder: config, cache fingerprint, metrics CSV, loss curve, checkpoints, export."""

from __future__ import annotations

import csv
import io
import hashlib
import json
import shutil
from pathlib import Path

from g2l_cache.errors import G2LError
from g2l_cache.layout import now_iso, write_text_atomic

RUN_FORMAT = "g2l-run"
# seconds: since the loop started; data_seconds: time this step waited for the data loader.
# val_*: fidelity on the held-out views (g2l_student.fidelity), on the rows of --val-every steps.
FIDELITY_SUMMARY = ("projected_cosine", "projected_r2", "projected_cka_debiased", "backbone_cka_debiased",
                    "backbone_knn10_overlap")  # the fidelity keys metrics.csv and the model card show
VAL_COLUMNS = [f"val_{k}" for k in FIDELITY_SUMMARY]
METRIC_COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "seconds", "data_seconds", *VAL_COLUMNS]


def metric_columns(teachers: list[str]) -> list[str]:
    """metrics.csv's columns: with several teachers, each one's loss and held-out fidelity too."""
    if len(teachers) < 2:
        return METRIC_COLUMNS
    return [*METRIC_COLUMNS[:7], *(f"loss_{t}" for t in teachers),
            *(f"val_{t}:{c.removeprefix('val_')}" for t in teachers for c in VAL_COLUMNS)]


def cache_fingerprint(manifest: dict, teacher_fp: str | list[str] | None) -> str:
    """What the run depends on in the cache: settings, the teachers' targets (None: a live teacher
    reads none), and the counts."""
    fps = [teacher_fp] if isinstance(teacher_fp, str) else list(teacher_fp or [])
    if len(fps) > 1:
        teacher: object = fps
        targets: object = [manifest["teachers"][fp].get("n_targets") for fp in fps]
    else:  # one teacher: the same blob as before several could be distilled (old runs resume)
        teacher = fps[0] if fps else None
        targets = manifest["teachers"][teacher].get("n_targets") if teacher else None
    blob = json.dumps({"settings": manifest["settings"], "teacher": teacher, "targets": targets,
                       "counts": manifest.get("counts")}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=10).hexdigest()


def to_toml(values: dict) -> str:
    """Flat mapping of scalars/lists to TOML (None values are left out)."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return json.dumps(str(v))
    return "".join(f"{k} = {fmt(v)}\n" for k, v in values.items() if v is not None)


class RunDir:
    """Paths and bookkeeping of one student run."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.run_json = self.root / "run.json"
        self.config = self.root / "config.toml"
        self.metrics = self.root / "metrics.csv"
        self.loss_png = self.root / "loss.png"
        self.checkpoints = self.root / "checkpoints"
        self.epochs = self.root / "epochs"
        self.export = self.root / "export"
        self.fidelity = self.root / "fidelity.json"

    def prepare(self, config: dict, cache_fp: str, resume: bool, overwrite: bool) -> dict:
        """Create a new run, or check one for resuming; refuse to clobber anything else."""
        if self.root.exists() and not self.root.is_dir():
            raise G2LError(f"--out {self.root} is a file; pass a folder for the run.")
        if self.run_json.exists():
            info = self.info()
            if resume:
                if info["cache_fingerprint"] != cache_fp:
                    raise G2LError(f"the cache changed since run {self.root} started (fingerprint "
                                   f"{info['cache_fingerprint']} -> {cache_fp}); start a new run.")
                return info
            if not overwrite:
                raise G2LError(f"{self.root} holds another run; pass --resume to continue it or "
                               "--overwrite to replace it.")
            shutil.rmtree(self.root)
        elif self.root.is_dir() and any(self.root.iterdir()):
            raise G2LError(f"--out {self.root} exists and is not a g2l run; choose a new or empty folder.")
        elif resume:
            raise G2LError(f"nothing to resume in {self.root}; start the run without --resume.")
        self.root.mkdir(parents=True, exist_ok=True)
        info = {"format": RUN_FORMAT, "created": now_iso(), "cache": config["cache"],
                "cache_fingerprint": cache_fp, "status": "running"}
        self._write_json(self.run_json, info)
        self.config.write_text(to_toml(config))
        return info

    def info(self) -> dict:
        if not self.run_json.is_file():
            raise G2LError(f"{self.root} is not a g2l run folder (no run.json).")
        info = json.loads(self.run_json.read_text())
        if info.get("format") != RUN_FORMAT:
            raise G2LError(f"{self.run_json} is not a g2l run's.")
        return info

    def update_info(self, **values) -> None:
        self._write_json(self.run_json, {**self.info(), **values})

    def read_fidelity(self) -> dict:
        """fidelity.json: the fidelity measured before and after training (empty before the first)."""
        return json.loads(self.fidelity.read_text()) if self.fidelity.exists() else {}

    def write_fidelity(self, data: dict) -> None:
        self._write_json(self.fidelity, data)

    def read_config(self) -> dict:
        """The run's resolved options (config.toml, plain TOML data)."""
        import tomllib

        if not self.config.is_file():
            raise G2LError(f"nothing to resume in {self.root} (no config.toml); start the run without --resume.")
        return tomllib.loads(self.config.read_text())

    @staticmethod
    def _write_json(path: Path, data: dict) -> None:
        write_text_atomic(path, json.dumps(data, indent=2))

    # -- metrics -------------------------------------------------------------------------------
    def truncate_metrics(self, last_step: int) -> None:
        """Drop metric rows after a checkpoint's step: a resumed run writes them again."""
        if not self.metrics.exists():
            return
        with self.metrics.open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= last_step]
        self._write_metrics(rows)

    def clear_metrics(self) -> None:
        """Drop every metric row: a run that starts over (no checkpoint yet) writes its own."""
        self.metrics.unlink(missing_ok=True)

    def metric_columns(self, default: list[str] = METRIC_COLUMNS) -> list[str]:
        """The columns of the run's metrics.csv (its header once written, else `default`)."""
        if self.metrics.exists():
            with self.metrics.open(newline="") as fh:
                header = next(csv.reader(fh), None)
            if header:
                return header
        return default

    def _write_metrics(self, rows: list[dict]) -> None:
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=self.metric_columns(), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.metrics, buf.getvalue())

    def log(self, row: dict, columns: list[str] = METRIC_COLUMNS) -> None:
        """Append one step's row; `columns` make the header of a new metrics.csv."""
        new = not self.metrics.exists()
        columns = columns if new else self.metric_columns()
        with self.metrics.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        with self.metrics.open(newline="") as fh:
            return list(csv.DictReader(fh))

    def plot_loss(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read_metrics()
        if not rows:
            return
        steps = [int(r["step"]) for r in rows]
        loss = [float(r["loss"]) for r in rows]
        val = [r for r in rows if r.get("val_projected_r2")]
        fig, axes = plt.subplots(1, 2 if val else 1, figsize=(11 if val else 6, 3.5), dpi=100, squeeze=False)
        ax = axes[0, 0]
        ax.plot(steps, loss, lw=0.8, label="train loss")
        for column in [c for c in rows[0] if c.startswith("loss_")]:  # several teachers: each one's share
            ax.plot(steps, [float(r[column]) for r in rows], lw=0.8, label=column.replace("_", " ", 1))
        if len(loss) >= 20:
            w = max(5, len(loss) // 50)
            smooth = [sum(loss[max(0, i - w + 1):i + 1]) / len(loss[max(0, i - w + 1):i + 1])
                      for i in range(len(loss))]
            ax.plot(steps, smooth, lw=1.5, label=f"mean of {w}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(self.root.name)
        ax.legend()
        if val:
            vx = axes[0, 1]
            for column in VAL_COLUMNS:
                vx.plot([int(r["step"]) for r in val], [float(r[column]) for r in val], marker="o", ms=3,
                        label=column.removeprefix("val_").replace("_", " "))
            vx.set_xlabel("step")
            vx.set_ylim(min(-0.05, min(float(r["val_projected_r2"]) for r in val)), 1.02)
            vx.set_title("held-out fidelity")
            vx.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(self.loss_png)
        plt.close(fig)

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"

    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoints.exists():
            return []
        return sorted(p for p in self.checkpoints.iterdir()
                      if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp"))

    def last_checkpoint(self) -> Path | None:
        found = self.list_checkpoints()
        return found[-1] if found else None

    def prune_checkpoints(self, keep: int) -> None:
        for old in self.list_checkpoints()[:-keep]:
            shutil.rmtree(old)
        for tmp in self.checkpoints.glob("*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
