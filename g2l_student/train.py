"""`g2l student fit`: distil the cached teacher targets into a timm student with Accelerate.

`fit` reads top to bottom: set-up (run folder, data, model, optimiser), resume, the training loop,
then export and the fidelity report. Data, losses and models are built in their own modules.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler, Subset

from g2l_cache import CacheReader, G2LError
from g2l_cache.errors import G2LWarning
from g2l_cache.build import device_label
from g2l_cache.reader import resolve_teacher
from g2l_cache.canary import check_canaries
from g2l_cache.layout import now_iso, write_text_atomic
from g2l_cache.teachers import Teacher, TeacherSpec, load_teacher
from g2l_cache.timing import BatchClock, timed_iter
from g2l_cache.workers import loader_worker_init
from g2l_student.config import FitConfig
from g2l_student.data import (CachedViews, FreshViews, epoch_rows, fresh_item, whole_group_sample, patients_of_slides, samples_per_epoch, select_views,
                              split_by_slide, view_slides)
from g2l_student.losses import get_loss
from g2l_student.model import Student, build_student, init_heads_from_targets
from g2l_student.optim import build_optimizer
from g2l_student.rundir import RunDir, cache_fingerprint, metric_columns
from g2l_student.schedule import EMA, G2LEarlyStop, TrainState, cosine_with_warmup
from g2l_student.targets import HeadTarget, TeacherSlot, head_targets, select_targets, teacher_slots
from g2l_student.task import build_task


@dataclass
class FitResult:
    """What a fit did: steps run, why it stopped, final loss, fidelity before/after, export folder."""

    run: str
    steps: int
    stopped: str
    final_loss: float | None
    fidelity: dict
    export: str | None
    # This session's loop from the first batch on (worker start-up left out):
    steps_per_second: float = 0.0
    data_wait_share: float = 0.0  # share of that time spent waiting for the data loader


class RunSampler(Sampler):
    """Views (rows of views.parquet) of micro-batches [start, stop) of a whole run, epoch after epoch.

    The run reads one stream: epoch 0's draw (`epoch_rows(0)`: seeded view choice and order), then
    epoch 1's, and so on, cut into micro-batches; a batch may end one epoch and start the next, so no
    tile is ever dropped and K epochs in a row visit all K views of every tile, whatever the batch
    size. One sampler for the whole run means no pipeline stall at epoch boundaries, and a resumed run
    starts at its exact micro-batch without replaying the loader. With `record_to`, each epoch's
    draw is written to record_to/epoch_NNNNNN.parquet (column `view`) as it is made.

    With `fresh_from` = K, epoch e instead visits view K + e of every training tile, a view no
    cache holds (FreshViews items; recorded as columns `tile` and `k`).
    """

    def __init__(self, views: np.ndarray, tiles: np.ndarray, seed: int, mode: str, batch_size: int,
                 start: int, stop: int, record_to: Path | None = None, fresh_from: int | None = None):
        self.views, self.tiles, self.seed = views, tiles, seed
        self.mode = "one" if fresh_from is not None else mode
        self.batch_size, self.start, self.stop, self.record_to = batch_size, start, stop, record_to
        self.fresh_from = fresh_from
        self.per_epoch = samples_per_epoch(tiles, self.mode)

    def epoch_of(self, micro_batch: int) -> int:
        """The epoch the micro-batch's last sample belongs to."""
        return ((micro_batch + 1) * self.batch_size - 1) // self.per_epoch

    def _epoch(self, epoch: int) -> np.ndarray:
        rows = epoch_rows(self.tiles, epoch, self.seed, self.mode)
        if self.fresh_from is None:
            drawn, record = self.views[rows], {"view": self.views[rows]}
        else:
            k = self.fresh_from + epoch
            drawn, record = fresh_item(self.tiles[rows], k), {"tile": self.tiles[rows], "k": np.full(len(rows), k)}
        if self.record_to is not None:
            path = self.record_to / f"epoch_{epoch:06d}.parquet"
            if not path.exists():
                self.record_to.mkdir(parents=True, exist_ok=True)
                pl.DataFrame(record).write_parquet(path)
        return drawn

    def __iter__(self):
        epoch, drawn = None, None
        for position in range(self.start * self.batch_size, self.stop * self.batch_size):
            e, j = divmod(position, self.per_epoch)
            if e != epoch:
                epoch, drawn = e, self._epoch(e).tolist()
            yield drawn[j]

    def __len__(self) -> int:
        return (self.stop - self.start) * self.batch_size


@dataclass
class FitData:
    """The cache, the chosen teacher's targets and the train / validation views (rows of views.parquet)."""

    reader: CacheReader
    teachers: list[dict]  # the cached teachers whose targets train (in order); []: only live teachers
    train: np.ndarray
    val: np.ndarray
    val_slides: list[str]
    split_by: str = "slide"  # what the validation split keeps whole: "slide", or patients ("tcga", "csv")

    def tiles_of(self, views: np.ndarray) -> np.ndarray:
        return self.reader.view_index["tile"][views]

    @property
    def fingerprints(self) -> list[str]:
        return [t["fingerprint"] for t in self.teachers]


def load_fit_data(cfg: FitConfig) -> FitData:
    """Open the cache, pick the teacher(s), select views and split them by slide."""
    reader = CacheReader(cfg.cache)
    if cfg.online_teacher:  # cached targets of those teachers, if complete, only seed the heads
        cached = [_cached_online_teacher(cfg, reader, name) for name in cfg.online_teacher]
        teachers = cached if all(t is not None and t.get("complete") for t in cached) else []
    else:
        teachers = [reader.teacher(name) for name in cfg.teacher or [None]]
        fps = [t["fingerprint"] for t in teachers]
        if len(set(fps)) != len(fps):
            raise G2LError(f"--teacher names the same cached teacher twice ({', '.join(cfg.teacher)}).")
        for teacher in teachers:
            if not teacher.get("complete"):
                raise G2LError(partial_cache_message(reader, teacher))
    views = select_views(reader, cfg.slides, cfg.where)
    slide_of = view_slides(reader, views)
    names = reader.slides()["slide_id"].to_numpy()
    present = np.unique(slide_of)
    patients, split_by = patients_of_slides(names[present].tolist(), cfg.patient_of)
    train_ids, val_ids = split_by_slide(names[present].tolist(), cfg.val_fraction, cfg.seed,
                                        patients if split_by != "slide" else None)
    is_val = np.isin(slide_of, np.flatnonzero(np.isin(names, val_ids)))
    return FitData(reader, teachers, views[~is_val], views[is_val], val_ids, split_by)


def teacher_records(slots: list[TeacherSlot], cached: list[dict], live: list) -> list[dict]:
    """What run.json says of each teacher: label, name, dims, and for cached targets their
    fingerprint and the teacher time the cache paid for them (the ledger of reuse)."""
    from g2l_cache.inspect import teacher_devices, teacher_seconds, teacher_views_paid

    out = []
    for i, slot in enumerate(slots):
        record = {"label": slot.label, "embed_dim": slot.embed_dim, "patch_dim": slot.patch_dim}
        if cached:
            t = cached[i]
            record.update(name=t["spec"]["name"], fingerprint=t["fingerprint"], live=False,
                          cache_device_seconds=teacher_seconds(t), cache_views=teacher_views_paid(t),
                          devices=teacher_devices(t))
        else:
            record.update(name=live[i].preset.name, fingerprint=live[i].fingerprint(), live=True)
        out.append(record)
    return out


def cached_slots(cfg: FitConfig, data: FitData) -> list[TeacherSlot]:
    """Where each cached teacher's targets sit in a batch, labelled by the names the user gave."""
    labels = teacher_labels(cfg.teacher or [t["spec"]["name"] for t in data.teachers])
    return teacher_slots([(label, t["embed_dim"], t["patch_dim"]) for label, t in zip(labels, data.teachers)])


def teacher_labels(names: list[str]) -> list[str]:
    """Short labels for several teachers' heads and metrics: their names, made unique."""
    slugs = ["".join(c if c.isalnum() or c in "-_" else "-" for c in n) for n in names]
    return [s if slugs.count(s) == 1 else f"{s}-{i}" for i, s in enumerate(slugs)]


def partial_cache_message(reader: CacheReader, teacher: dict) -> str:
    """Which teacher lacks targets, for which slides, and the command that finishes them."""
    missing = teacher.get("missing_slides", [])
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    spec = teacher["spec"]
    extra = (f" --teacher-weights {spec['weights']}" if spec.get("weights") else "") + \
        (" --random-init" if spec.get("random_init") else "")
    return (f"teacher {teacher['fingerprint']} has targets for only {teacher.get('n_targets')} of "
            f"{reader.manifest['counts']['views']} views; slides without all their targets: "
            f"{shown or 'none recorded'}. Finish them with `g2l cache build --out {reader.layout.root} "
            f"--teacher {spec['name']}{extra}` (the slides and options default to the cache's).")


def fidelity_views(data: FitData, n_views: int, seed: int) -> tuple[np.ndarray, str]:
    """Up to n validation views, every cached view of each held-out tile (training views when
    there is no validation split); a seeded sample of whole tiles when there are more."""
    split, views = ("validation", data.val) if len(data.val) else ("training", data.train)
    if len(views) > n_views:
        tile_of = np.unique(data.tiles_of(views), return_inverse=True)[1]
        views = views[whole_group_sample(tile_of, n_views, np.random.default_rng([seed, 5]))]
    return views, split


def _cached_online_teacher(cfg: FitConfig, reader: CacheReader, name: str) -> dict | None:
    """The cache's entry of an --online-teacher (by fingerprint or name), unless other weights are given."""
    if cfg.online_teacher_weights:
        return None
    teachers = reader.manifest["teachers"]
    if name not in teachers and not any(info["spec"]["name"] == name for info in teachers.values()):
        return None
    return teachers[resolve_teacher(teachers, name)]


class LiveTeachers(torch.nn.Module):
    """Several teachers run live on the same views; targets concatenated in order, as cached ones are."""

    def __init__(self, teachers: list[Teacher]):
        super().__init__()
        self.members = torch.nn.ModuleList(teachers)
        self.embed_dim = sum(t.embed_dim for t in teachers)
        self.patch_dim = sum(t.patch_dim for t in teachers)

    def embed(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [t.embed(views) for t in self.members]
        return torch.cat([p[0] for p in pairs], dim=1), torch.cat([p[1] for p in pairs], dim=1)


def build_online_teacher(cfg: FitConfig, reader: CacheReader, device) -> list[Teacher]:
    """The teachers to run live: the cache's recorded spec when a NAME is one of its teachers."""
    teachers = []
    for name in cfg.online_teacher:
        info = _cached_online_teacher(cfg, reader, name)
        if info is not None:
            teachers.append(load_teacher(TeacherSpec.from_record(info["spec"]), img_size=info["input_size"], device=device))
        else:
            spec = TeacherSpec(name, cfg.online_teacher_weights, cfg.online_random_init, cfg.seed)
            teachers.append(load_teacher(spec, img_size=reader.policy.crop_size, device=device))
    return teachers


def head_target_sample(data: FitData, heads: dict[str, HeadTarget], teacher=None, seed: int = 0,
                       n_cached: int = 4096, n_live: int = 256) -> dict[str, torch.Tensor]:
    """A seeded sample of the training targets of each head: read from the cache, or computed by
    the live teacher(s) (when the cache has no targets of them) on fewer views."""
    n = min(len(data.train), n_cached if data.teachers else n_live)
    rows = np.sort(np.random.default_rng([seed, 11]).choice(data.train, n, replace=False))
    if data.teachers:
        items = CachedViews(data.reader, data.fingerprints)
        emb, patch = (torch.stack(x) for x in zip(*(items[int(r)][1:] for r in rows)))
    else:
        views = torch.stack([data.reader.replay(int(r)) for r in rows])
        with torch.no_grad():
            out = [teacher.embed(views[i:i + 64]) for i in range(0, n, 64)]
        emb, patch = (torch.cat([o[j].float().cpu() for o in out]) for j in (0, 1))
    return select_targets(heads, emb, patch)


def fit(cfg: FitConfig, student: Student | None = None, teacher: Teacher | list[Teacher] | None = None
        ) -> FitResult:
    """Train the student as configured; resumable from the run folder's last checkpoint.

    `student` / `teacher`: objects to use instead of building cfg.student / cfg.online_teacher
    by name (teacher objects, one or a list, are run live, as --online-teacher)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    # --- set-up -------------------------------------------------------------------------------
    if cfg.resume:  # the run's own options; differing ones are refused
        cfg = FitConfig.for_resume({k: v for k, v in cfg.to_dict().items() if v is not None})
    use_cpu = cfg.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="no" if use_cpu else "bf16",
                              gradient_accumulation_steps=cfg.grad_accum,
                              dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=not use_cpu),
                              step_scheduler_with_optimizer=False)
    if cfg.batch_size % accelerator.num_processes:
        raise G2LError(f"--batch-size {cfg.batch_size} must divide by the {accelerator.num_processes} processes.")
    main = accelerator.is_main_process
    data = load_fit_data(cfg)
    canaries = check_canaries(data.reader, seed=cfg.seed)
    if not canaries.ok and not cfg.accept_changed_views:
        raise G2LError(canaries.message)
    set_seed(cfg.seed)
    if teacher is not None:  # objects given: run live, as --online-teacher
        live = [t.to(accelerator.device) for t in (teacher if isinstance(teacher, (list, tuple)) else [teacher])]
        names = cfg.online_teacher or [t.preset.name for t in live]
    else:
        live = build_online_teacher(cfg, data.reader, accelerator.device)
        names = cfg.online_teacher
    teacher = (live[0] if len(live) == 1 else LiveTeachers(live)) if live else None
    if live:
        labels = teacher_labels(names)
        slots = teacher_slots([(label, t.embed_dim, t.patch_dim) for label, t in zip(labels, live)])
    else:
        slots = cached_slots(cfg, data)
        labels = [slot.label for slot in slots]
    heads = head_targets(cfg.target, slots)
    dims = {k: h.stop - h.start for k, h in heads.items()}
    weights = dict(zip(labels, cfg.teacher_weights().values())) if len(labels) > 1 else None
    cached_fps = data.fingerprints
    built_here = student is None
    if built_here:
        student = build_student(cfg.student, cfg.img_size, dims, cfg.student_weights, cfg.random_init,
                                cfg.head_weights, cfg.student_mean, cfg.student_std)
    elif {k: h[0].out_features for k, h in student.heads.items()} != dims:
        raise G2LError(f"the student's heads {sorted(student.heads)} do not match --target {cfg.target} "
                       f"and the teacher's dimensions {dims}.")
    cfg.student, cfg.img_size = student.arch, student.img_size
    if cfg.head_init == "targets" and built_here and not cfg.head_weights and not cfg.resume:
        init_heads_from_targets(student, head_target_sample(data, heads, teacher, cfg.seed))
    # Recorded in config.toml and the export: the normalisation this student was trained with.
    cfg.student_mean = [round(float(v), 6) for v in student.mean.flatten()]
    cfg.student_std = [round(float(v), 6) for v in student.std.flatten()]
    # The run folder is touched only once every input has been checked.
    run = RunDir(cfg.out)
    cache_fp = cache_fingerprint(data.reader.manifest, cached_fps)
    error = None
    if main:
        try:
            run.prepare(cfg.to_dict(), cache_fp, cfg.resume, cfg.overwrite)
        except G2LError as exc:
            error = exc
    accelerator.wait_for_everyone()
    if error is not None:
        raise error
    if not run.run_json.exists():
        raise G2LError(f"run folder {run.root} could not be prepared (see the main process).")
    session_started, session_clock = now_iso(), time.time()
    # A live teacher makes its own targets: reading cached ones would be wasted I/O.
    train_set = FreshViews(data.reader) if cfg.fresh_views else CachedViews(data.reader, None if teacher else cached_fps)
    # Fidelity reads cached targets when the cache has them (a live teacher's own, stored as fp16),
    # so cached and online runs are measured against the same numbers; else the live teacher.
    fid_base, live_fidelity = CachedViews(data.reader, cached_fps), not cached_fps
    train_tiles = data.tiles_of(data.train)
    if main:  # what the model card and the ledger report
        run.update_info(teachers=teacher_records(slots, data.teachers if not live else [], live),
                        data={"train_slides": len(np.unique(view_slides(data.reader, data.train))),
                              "val_slides": len(data.val_slides), "train_tiles": len(np.unique(train_tiles)),
                              "train_views": int(len(data.train)), "val_views": int(len(data.val))})
    per_epoch = samples_per_epoch(train_tiles, "one" if cfg.fresh_views else cfg.views_per_epoch)
    if per_epoch < cfg.batch_size * cfg.grad_accum:
        raise G2LError(f"the training split has {per_epoch} samples per epoch, fewer than one step "
                       f"of {cfg.batch_size * cfg.grad_accum}; lower --batch-size or --grad-accum.")
    # --epochs: enough steps that every sample of those epochs is read (a step may reach into the next)
    total = cfg.steps or -(-(cfg.epochs or 1) * per_epoch // (cfg.batch_size * cfg.grad_accum))
    reading = describe_reading(cfg.batch_size, cfg.grad_accum, accelerator.num_processes, total, per_epoch,
                               len(data.train), data.reader.views_per_tile, accelerator.device.type == "cuda")
    if main:
        run.update_info(reading=reading, **({"views_changed": {"slides": canaries.changed, "accepted": True}}
                                            if not canaries.ok else {}))
        if cfg.progress:
            from rich.console import Console

            Console(stderr=True).print(reading["text"], markup=False, highlight=False, soft_wrap=True)
        for warning in [reading["warning"], None if canaries.ok else canaries.message]:
            if warning:
                warnings.warn(warning, G2LWarning, stacklevel=2)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 20)
    optimizer = build_optimizer(student, cfg.lr, cfg.weight_decay, accelerator.device)
    state = TrainState()
    early_stop = G2LEarlyStop(cfg.early_stop_window, cfg.early_stop_patience, cfg.early_stop_smoothing,
                              min_step=math.ceil(cfg.early_stop_min_fraction * total),
                              cooldown=cfg.early_stop_cooldown if cfg.early_stop_cooldown is not None
                              else max(1, round(0.02 * total)))
    scheduler = cosine_with_warmup(optimizer, warmup, total, early_stop)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    ema = EMA(accelerator.unwrap_model(student), cfg.ema_decay) if cfg.ema_decay else None
    # the task holds the plain student; each step passes the prepared (DDP-wrapped) one to run
    task = build_task(accelerator.unwrap_model(student), cfg.target, get_loss(cfg.loss, cfg.alpha, cfg.logsum_over),
                      cfg.cls_weight, cfg.patch_weight, teacher, slots, weights)
    columns = metric_columns(labels if len(labels) > 1 else [])
    fid_views, fid_split = fidelity_views(data, cfg.fidelity_views, cfg.seed)
    fid_set = Subset(fid_base, fid_views.tolist())

    # --- resume or start ----------------------------------------------------------------------
    checkpoint = run.last_checkpoint() if cfg.resume else None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        _load_loop_state(checkpoint, state, early_stop, ema)
        if main:
            run.truncate_metrics(state.step)
    elif main:
        before = task.fidelity(fid_set, accelerator.device, accelerator.unwrap_model(student), live_fidelity)
        _write_fidelity(run, {"split": fid_split, "split_by": data.split_by, "val_slides": data.val_slides,
                              "before": before})
    accelerator.wait_for_everyone()

    # --- the training loop --------------------------------------------------------------------
    sampler = RunSampler(data.train, train_tiles, cfg.seed, cfg.views_per_epoch, cfg.batch_size,
                         start=state.micro_batch, stop=total * cfg.grad_accum,
                         record_to=run.epochs if main else None,
                         fresh_from=data.reader.views_per_tile if cfg.fresh_views else None)
    loader = accelerator.prepare(DataLoader(
        train_set, batch_sampler=BatchSampler(sampler, cfg.batch_size, drop_last=True),
        **_worker_kwargs(cfg.num_workers, use_cpu)))
    started, stopped, last_loss = time.time(), "steps", None
    progress = _progress(main and cfg.progress, total, state.step)
    pending: list[torch.Tensor] = []
    pending_parts: list[dict[str, torch.Tensor]] = []  # several teachers: each one's loss
    unlogged, data_wait, clock, first_step = None, 0.0, BatchClock(), state.step
    for waited, (views, t_cls, t_patch) in timed_iter(loader):
        clock.arrived(len(views), waited)
        data_wait += waited
        with accelerator.accumulate(student):
            losses = task.head_losses(views, t_cls, t_patch, model=student)
            loss = task.total(losses)
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients and cfg.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
        state.micro_batch += 1
        pending.append(loss.detach())
        if len(labels) > 1:
            pending_parts.append({t: v.detach() for t, v in task.per_teacher(losses).items()})
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        step = {"step": state.step, "epoch": sampler.epoch_of(state.micro_batch - 1),
                "loss": accelerator.reduce(torch.stack(pending).mean(), "mean"),
                "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "seconds": time.time() - started, "data_seconds": data_wait,
                **{f"loss_{t}": accelerator.reduce(torch.stack([p[t] for p in pending_parts]).mean(), "mean")
                   for t in (labels if pending_parts else [])}}
        pending, pending_parts, data_wait = [], [], 0.0
        if ema is not None:
            ema.update(accelerator.unwrap_model(student))
        if cfg.val_every and state.step % cfg.val_every == 0 and main:
            measured = task.fidelity(fid_set, accelerator.device, accelerator.unwrap_model(student), live_fidelity)
            step.update({f"val_{k}": v for k, v in measured.items() if v is not None and k != "views"})
        # Reading the loss waits for the GPU. Without early stopping, step N is read after step
        # N+1 is queued, so the host never leaves the device idle; the rule needs it at once.
        to_log, unlogged = (step, None) if cfg.early_stop else (unlogged, step)
        stop = False
        if to_log is not None:
            last_loss = _log_step(run, progress, to_log, main, columns)
            stop = cfg.early_stop == "g2l" and early_stop.update(last_loss)
        if stop or state.step % cfg.checkpoint_every == 0 or state.step == total:
            if unlogged is not None:  # a checkpoint's metrics must be on disk with it
                last_loss, unlogged = _log_step(run, progress, unlogged, main, columns), None
            _save_checkpoint(accelerator, run, state, early_stop, cfg.keep_checkpoints, ema)
        if stop:
            stopped = "early-stop"
            break
    if unlogged is not None:
        last_loss = _log_step(run, progress, unlogged, main, columns)
    progress.close()
    clock.finished()

    # --- export and report --------------------------------------------------------------------
    result_fidelity, export_dir = {}, None
    accelerator.wait_for_everyone()
    if main:
        from g2l_student.export import export_run

        model = accelerator.unwrap_model(student)
        if ema is not None:
            model.load_state_dict({**model.state_dict(), **ema.shadow}, strict=False)
        after = task.fidelity(fid_set, accelerator.device, model, live_fidelity)
        result_fidelity = {**_read_fidelity(run), "after": after, "after_step": state.step}
        _write_fidelity(run, result_fidelity)
        run.plot_loss()
        session = {"started": session_started, "finished": now_iso(), "wall_seconds": time.time() - session_clock,
                   "processes": accelerator.num_processes, "device": device_label(accelerator.device),
                   "steps": [first_step, state.step], "views": (state.step - first_step) * cfg.batch_size * cfg.grad_accum}
        run.update_info(status="finished", steps=state.step, stopped=stopped,
                        ledger=[*run.info().get("ledger", []), session])
        export_dir = str(export_run(run.root))  # last: its model card reads the fidelity and the ledger
    accelerator.wait_for_everyone()
    steps_per_second = (state.step - first_step) / clock.seconds() if clock.seconds() else 0.0
    return FitResult(str(run.root), state.step, stopped, last_loss, result_fidelity, export_dir,
                     steps_per_second, clock.wait_share())


def describe_reading(batch_size: int, grad_accum: int, processes: int, steps: int, per_epoch: int,
                     cached_views: int, views_per_tile: int, on_gpu: bool = False) -> dict:
    """What a run reads: the batch each process gets, views read over the steps, epochs, and the share
    of the cached training views that is (`--batch-size` is global: split over the processes)."""
    read = steps * batch_size * grad_accum
    per_process = batch_size // processes
    text = (f"batch {batch_size} = {per_process} per process x {processes} process(es)"
            + (f" x {grad_accum} micro-batches" if grad_accum > 1 else "")
            + f"; {steps} steps read {read} views = {read / per_epoch:.2f} epochs of {per_epoch} samples, "
            f"{min(1.0, read / cached_views):.1%} of the {cached_views} cached training views "
            f"({views_per_tile} per tile)")
    warning = None
    if read < per_epoch:
        warning = (f"the run ends before one epoch: {1 - read / per_epoch:.0%} of the {per_epoch} training samples "
                   "(one view per tile) are never visited; give more --steps or --epochs 1")
    elif per_process < 8 and on_gpu:
        warning = (f"{per_process} views per process leaves a GPU mostly idle: raise --batch-size (the global "
                   "batch, split over the processes)")
    return {"batch_size": batch_size, "warning": warning, "per_process": per_process, "processes": processes, "grad_accum": grad_accum,
            "steps": steps, "views_read": read, "epochs": read / per_epoch,
            "share_of_cached_views": min(1.0, read / cached_views), "text": text}


def _log_step(run: RunDir, progress, step: dict, main: bool, columns: list[str]) -> float:
    """Read one step's loss off the device, write its metrics row; return the loss.

    A non-finite loss or gradient norm stops the run here, before any checkpoint of that step is
    written, so the run folder keeps its last good checkpoint."""
    loss = float(step["loss"].item())
    grad_norm = None if step["grad_norm"] is None else float(step["grad_norm"])
    if main:
        run.log({"step": step["step"], "epoch": step["epoch"], "loss": f"{loss:.7g}",
                 "lr": f"{step['lr']:.6g}", "grad_norm": "" if grad_norm is None else f"{grad_norm:.5g}",
                 "seconds": f"{step['seconds']:.3f}", "data_seconds": f"{step['data_seconds']:.4f}",
                 **{k: f"{float(v):.5g}" for k, v in step.items() if k.startswith(("val_", "loss_"))}},
                columns)
        progress.update(step["step"], loss)
    if not math.isfinite(loss) or grad_norm is not None and not math.isfinite(grad_norm):
        last = run.last_checkpoint()
        if main:
            progress.close()
            run.update_info(status="failed", stopped=f"non-finite loss at step {step['step']}")
        raise G2LError(f"step {step['step']} gave loss {loss} and gradient norm {grad_norm}; the run "
                       f"stopped and keeps its last good checkpoint ({last.name if last else 'none yet'}). "
                       "Lower --lr or raise --warmup-steps, check the cache with `g2l cache verify`, and "
                       "start again (or --resume from that checkpoint).")
    return loss


def _worker_kwargs(num_workers: int, use_cpu: bool) -> dict:
    if num_workers == 0:
        return {"num_workers": 0, "pin_memory": not use_cpu}
    # forkserver: workers never inherit the parent's threads or handles; persistent: no restart
    # per epoch; the init makes them exit with the main process.
    return {"num_workers": num_workers, "pin_memory": not use_cpu, "persistent_workers": True,
            "multiprocessing_context": "forkserver", "prefetch_factor": 4,
            "worker_init_fn": loader_worker_init()}


def _save_checkpoint(accelerator, run: RunDir, state: TrainState, early_stop: G2LEarlyStop, keep: int,
                     ema: EMA | None) -> None:
    """Accelerate state (weights as safetensors) into a temp folder, renamed when complete.

    The loop's own state goes to loop_state.json and, with an EMA, ema.safetensors (which `export`
    prefers): nothing of ours is pickled, so resuming never unpickles a run folder's files.
    """
    final = run.checkpoint_dir(state.step)
    tmp = final.with_name(final.name + ".tmp")
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomic(tmp / LOOP_STATE, json.dumps({"train": state.state_dict(),
                                                        "early_stop": early_stop.state_dict()}))
        if ema is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
        if final.exists():
            import shutil

            shutil.rmtree(final)
        os.replace(tmp, final)
        run.prune_checkpoints(keep)
    accelerator.wait_for_everyone()


LOOP_STATE = "loop_state.json"


def _load_loop_state(checkpoint: Path, state: TrainState, early_stop: G2LEarlyStop, ema: EMA | None) -> None:
    """Step counters, early-stop history and EMA weights of a checkpoint (JSON and safetensors)."""
    path = checkpoint / LOOP_STATE
    if not path.is_file():
        raise G2LError(f"checkpoint {checkpoint} has no {LOOP_STATE} (written by an older g2l); "
                       "start the run again with --overwrite.")
    saved = json.loads(path.read_text())
    state.load_state_dict(saved["train"])
    early_stop.load_state_dict(saved["early_stop"])
    if ema is not None:
        from safetensors.torch import load_file

        try:
            ema.load_shadow(load_file(str(checkpoint / "ema.safetensors")))
        except (OSError, ValueError) as exc:
            raise G2LError(f"checkpoint {checkpoint} has no usable ema.safetensors ({exc}); resume from another "
                           "checkpoint or start the run again with --overwrite.") from None


def _write_fidelity(run: RunDir, data: dict) -> None:
    write_text_atomic(run.fidelity, json.dumps(data, indent=2))


def _read_fidelity(run: RunDir) -> dict:
    return json.loads(run.fidelity.read_text()) if run.fidelity.exists() else {}


class _progress:
    """A rich progress bar of optimiser steps with the latest loss (or nothing)."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("fit"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("fit", total=total, completed=start, loss="-")

    def update(self, step: int, loss: float) -> None:
        if self.bar:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
