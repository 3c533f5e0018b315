"""Everything a fit needs before its first step, built from a FitConfig by small helpers with one job each.

`set_up_fit` checks every input before the run folder is touched: the cache and its canary views,
the teachers (cached targets or live), the student and its heads, then prepares the run folder and
builds the optimiser, schedule, early stop, EMA, the distillation task and the fidelity set.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Subset

from g2l_cache import G2LError
from g2l_cache.canary import CanaryCheck, check_canaries
from g2l_cache.errors import G2LWarning
from g2l_cache.layout import now_iso
from g2l_cache.teachers import Teacher
from g2l_cache.workers import loader_worker_init, share_worker_imports
from g2l_student.checkpoint import Snapshot, StagingBuffers, load_checkpoint, take_snapshot
from g2l_student.config import FitConfig
from g2l_student.data import CachedViews, FreshViews, samples_per_epoch, view_slides
from g2l_student.live_teachers import LiveTeachers, build_online_teacher
from g2l_student.losses import get_loss
from g2l_student.model import Student, build_student, init_heads_from_targets
from g2l_student.optim import build_optimizer
from g2l_student.run_data import (FitData, cached_slots, fidelity_views, load_fit_data, teacher_labels,
                                  teacher_records)
from g2l_student.rundir import RunDir, cache_fingerprint, metric_columns
from g2l_student.sampler import RunSampler
from g2l_student.schedule import EMA, G2LEarlyStop, TrainState, cosine_with_warmup
from g2l_student.targets import HeadTarget, TeacherSlot, head_targets, select_targets, teacher_slots
from g2l_student.task import DistillTask, build_task


@dataclass
class RunTeachers:
    """Whose targets the student learns: the live teacher module (None: cached targets), each
    teacher's slot in a batch, their labels and their loss weights (several teachers only)."""

    live: torch.nn.Module | None
    members: list[Teacher]
    slots: list[TeacherSlot]
    labels: list[str]
    weights: dict[str, float] | None


@dataclass
class FitRun:
    """What `set_up_fit` builds and the resume, the loop and the finish share."""

    cfg: FitConfig
    accelerator: object  # accelerate.Accelerator
    data: FitData
    run: RunDir
    teachers: RunTeachers
    student: torch.nn.Module  # as Accelerate prepared it (DDP-wrapped under several processes)
    optimizer: torch.optim.Optimizer
    scheduler: object
    early_stop: G2LEarlyStop
    ema: EMA | None
    state: TrainState
    task: DistillTask
    train_set: Dataset
    fidelity_set: Subset
    fidelity_split: str
    live_fidelity: bool  # fidelity against the live teacher (the cache has none of its targets)
    total_steps: int
    session_started: str
    session_clock: float
    buffers: StagingBuffers = field(default_factory=StagingBuffers)  # CPU copies of the state between saves

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def plain_student(self) -> Student:
        return self.accelerator.unwrap_model(self.student)

    def measure_fidelity(self, model: Student | None = None) -> dict:
        """Fidelity of the student (or `model`) on the held-out views."""
        return self.task.fidelity(self.fidelity_set, self.accelerator.device, model or self.plain_student,
                                  self.live_fidelity)

    def snapshot(self) -> Snapshot | None:
        """This step's state copied off the training path (main process; None on the others)."""
        return take_snapshot(self.accelerator, self.student, self.optimizer, self.scheduler, self.ema, self.state,
                             self.early_stop, self.buffers)

    def load(self, checkpoint: Path) -> None:
        """Every piece of the run as a checkpoint saved it."""
        load_checkpoint(checkpoint, self.accelerator, self.student, self.optimizer, self.scheduler, self.ema,
                        self.state, self.early_stop)


def set_up_fit(cfg: FitConfig, student: Student | None = None,
               teacher: Teacher | list[Teacher] | None = None) -> FitRun:
    """Check the inputs, prepare the run folder and build every object a fit needs (see the module)."""
    from accelerate.utils import set_seed

    if cfg.resume or cfg.auto_resume:  # a resume runs with the run's own options; differing ones are refused
        cfg = FitConfig.resolved({k: v for k, v in cfg.to_dict().items() if v is not None})
    accelerator = build_accelerator(cfg)
    data = load_fit_data(cfg)
    canaries = checked_canaries(cfg, data)
    set_seed(cfg.seed)
    teachers = resolve_teachers(cfg, data, accelerator.device, teacher)
    student = student_for_run(cfg, data, teachers, student)
    run = prepare_run_folder(cfg, data, accelerator)
    session_started, session_clock = now_iso(), time.time()
    total = size_run(cfg, data, accelerator, run, teachers, canaries, student)
    optimizer, scheduler, early_stop = build_optimisation(cfg, student, accelerator, total)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    plain = accelerator.unwrap_model(student)
    ema = EMA(plain, cfg.ema_decay) if cfg.ema_decay else None
    # the task holds the plain student; each step passes the prepared (DDP-wrapped) one to run
    task = build_task(plain, cfg.target, get_loss(cfg.loss, cfg.alpha, cfg.logsum_over), cfg.cls_weight,
                      cfg.patch_weight, teachers.live, teachers.slots, teachers.weights)
    fid_views, fid_split = fidelity_views(data, cfg.fidelity_views, cfg.seed)
    # Fidelity reads cached targets when the cache has them (a live teacher's own, stored as fp16),
    # so cached and online runs are measured against the same numbers; else the live teacher.
    fid_set = Subset(CachedViews(data.reader, data.fingerprints), fid_views.tolist())
    return FitRun(cfg, accelerator, data, run, teachers, student, optimizer, scheduler, early_stop, ema,
                  TrainState(), task, training_set(cfg, data, teachers), fid_set, fid_split,
                  not data.fingerprints, total, session_started, session_clock)


def build_accelerator(cfg: FitConfig):
    """Accelerate for this machine: bf16 on a GPU, the global batch split over the processes."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    use_cpu = cfg.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="no" if use_cpu else "bf16",
                              gradient_accumulation_steps=cfg.grad_accum,
                              dataloader_config=DataLoaderConfiguration(split_batches=True,
                                                                        non_blocking=not use_cpu),
                              step_scheduler_with_optimizer=False)
    if cfg.batch_size % accelerator.num_processes:
        raise G2LError(f"--batch-size {cfg.batch_size} must divide by the {accelerator.num_processes} processes.")
    return accelerator


def checked_canaries(cfg: FitConfig, data: FitData) -> CanaryCheck:
    """The cache's canary views replayed: a changed replay is refused unless --accept-changed-views."""
    canaries = check_canaries(data.reader, seed=cfg.seed)
    if not canaries.ok and not cfg.accept_changed_views:
        raise G2LError(canaries.message)
    return canaries


def resolve_teachers(cfg: FitConfig, data: FitData, device, given: Teacher | list[Teacher] | None) -> RunTeachers:
    """The teachers whose targets train: objects given (run live), --online-teacher, or the cache's."""
    if given is not None:  # objects given: run live, as --online-teacher
        members = [t.to(device) for t in (given if isinstance(given, (list, tuple)) else [given])]
        names = cfg.online_teacher or [t.preset.name for t in members]
    else:
        members = build_online_teacher(cfg, data.reader, device)
        names = cfg.online_teacher
    if members:
        labels = teacher_labels(names)
        slots = teacher_slots([(label, t.embed_dim, t.patch_dim) for label, t in zip(labels, members)])
    else:
        slots = cached_slots(cfg, data)
        labels = [slot.label for slot in slots]
    live = (members[0] if len(members) == 1 else LiveTeachers(members)) if members else None
    weights = dict(zip(labels, cfg.teacher_weights().values())) if len(labels) > 1 else None
    return RunTeachers(live, members, slots, labels, weights)


def student_for_run(cfg: FitConfig, data: FitData, teachers: RunTeachers, student: Student | None) -> Student:
    """The student built from the config (heads started at the targets' statistics) or the one given,
    checked against the heads the targets need; the config records its architecture and normalisation."""
    heads = head_targets(cfg.target, teachers.slots)
    dims = {k: h.stop - h.start for k, h in heads.items()}
    built_here = student is None
    if built_here:
        student = build_student(cfg.student, cfg.img_size, dims, cfg.student_weights, cfg.random_init,
                                cfg.head_weights, cfg.student_mean, cfg.student_std)
    elif {k: h[0].out_features for k, h in student.heads.items()} != dims:
        raise G2LError(f"the student's heads {sorted(student.heads)} do not match --target {cfg.target} "
                       f"and the teacher's dimensions {dims}.")
    cfg.student, cfg.img_size = student.arch, student.img_size
    # a resume loads the heads from its checkpoint; one with no checkpoint yet starts as a new run
    from_checkpoint = cfg.resume and RunDir(cfg.out).last_checkpoint() is not None
    if cfg.head_init == "targets" and built_here and not cfg.head_weights and not from_checkpoint:
        init_heads_from_targets(student, head_target_sample(data, heads, teachers.live, cfg.seed))
    # Recorded in config.toml and the export: the normalisation this student was trained with.
    cfg.student_mean = [round(float(v), 6) for v in student.mean.flatten()]
    cfg.student_std = [round(float(v), 6) for v in student.std.flatten()]
    return student


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


def prepare_run_folder(cfg: FitConfig, data: FitData, accelerator) -> RunDir:
    """The run folder, created or checked for a resume by the main process once every input is checked."""
    run = RunDir(cfg.out)
    error = None
    if accelerator.is_main_process:
        try:
            run.prepare(cfg.to_dict(), cache_fingerprint(data.reader.manifest, data.fingerprints), cfg.resume,
                        cfg.overwrite)
        except G2LError as exc:
            error = exc
    accelerator.wait_for_everyone()
    if error is not None:
        raise error
    if not run.run_json.exists():
        raise G2LError(f"run folder {run.root} could not be prepared (see the main process).")
    return run


def size_run(cfg: FitConfig, data: FitData, accelerator, run: RunDir, teachers: RunTeachers,
             canaries: CanaryCheck, student: Student) -> int:
    """The run's steps; run.json records its teachers, data, student and what it reads, and the main process
    says it (and warns when tiles go unvisited or views changed)."""
    train_tiles = data.tiles_of(data.train)
    per_epoch = samples_per_epoch(train_tiles, "one" if cfg.fresh_views else cfg.views_per_epoch)
    if per_epoch < cfg.batch_size * cfg.grad_accum:
        raise G2LError(f"the training split has {per_epoch} samples per epoch, fewer than one step "
                       f"of {cfg.batch_size * cfg.grad_accum}; lower --batch-size or --grad-accum.")
    # --epochs: enough steps that every sample of those epochs is read (a step may reach into the next)
    total = cfg.steps or -(-(cfg.epochs or 1) * per_epoch // (cfg.batch_size * cfg.grad_accum))
    reading = describe_reading(cfg.batch_size, cfg.grad_accum, accelerator.num_processes, total, per_epoch,
                               len(data.train), data.reader.views_per_tile, accelerator.device.type == "cuda")
    if accelerator.is_main_process:  # what the model card and the ledger report
        run.update_info(teachers=teacher_records(teachers.slots, data.teachers if not teachers.members else [],
                                                 teachers.members),
                        data={"train_slides": len(np.unique(view_slides(data.reader, data.train))),
                              "val_slides": len(data.val_slides), "train_tiles": len(np.unique(train_tiles)),
                              "train_views": int(len(data.train)), "val_views": int(len(data.val))},
                        reading=reading, student_model_args=getattr(student, "model_args", None),
                        **({"views_changed": {"slides": canaries.changed, "accepted": True}}
                                            if not canaries.ok else {}))
        if cfg.progress:
            from rich.console import Console

            Console(stderr=True).print(reading["text"], markup=False, highlight=False, soft_wrap=True)
        for warning in [reading["warning"], None if canaries.ok else canaries.message]:
            if warning:
                warnings.warn(warning, G2LWarning, stacklevel=3)
    return total


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
    return {"batch_size": batch_size, "warning": warning, "per_process": per_process, "processes": processes,
            "grad_accum": grad_accum, "steps": steps, "views_read": read, "epochs": read / per_epoch,
            "share_of_cached_views": min(1.0, read / cached_views), "text": text}


def build_optimisation(cfg: FitConfig, student: Student, accelerator, total: int):
    """AdamW, the G2L early stop and the cosine schedule (with the early stop's cool-down)."""
    optimizer = build_optimizer(student, cfg.lr, cfg.weight_decay, accelerator.device)
    early_stop = G2LEarlyStop(cfg.early_stop_window, cfg.early_stop_patience, cfg.early_stop_smoothing,
                              min_step=math.ceil(cfg.early_stop_min_fraction * total),
                              cooldown=cfg.early_stop_cooldown if cfg.early_stop_cooldown is not None
                              else max(1, round(0.02 * total)))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 20)
    return optimizer, cosine_with_warmup(optimizer, warmup, total, early_stop), early_stop


def training_set(cfg: FitConfig, data: FitData, teachers: RunTeachers) -> Dataset:
    """Cached views with their targets; views only when a live teacher makes the targets (reading
    cached ones would be wasted I/O); fresh views for the online baseline."""
    if cfg.fresh_views:
        return FreshViews(data.reader)
    return CachedViews(data.reader, None if teachers.live is not None else data.fingerprints)


def build_loader(fit: FitRun) -> tuple[DataLoader, RunSampler]:
    """The run's data loader from its current micro-batch to the end, and its sampler."""
    cfg, data = fit.cfg, fit.data
    sampler = RunSampler(data.train, data.tiles_of(data.train), cfg.seed, cfg.views_per_epoch, cfg.batch_size,
                         start=fit.state.micro_batch, stop=fit.total_steps * cfg.grad_accum,
                         record_to=fit.run.epochs if fit.main else None,
                         fresh_from=data.reader.views_per_tile if cfg.fresh_views else None)
    loader = DataLoader(fit.train_set, batch_sampler=BatchSampler(sampler, cfg.batch_size, drop_last=True),
                        **worker_kwargs(cfg.num_workers, fit.accelerator.device.type != "cuda"))
    return fit.accelerator.prepare(loader), sampler


def worker_kwargs(num_workers: int, use_cpu: bool) -> dict:
    """DataLoader arguments: forkserver workers (no inherited threads or handles), persistent (no
    restart per epoch), exiting with the main process."""
    if num_workers == 0:
        return {"num_workers": 0, "pin_memory": not use_cpu}
    share_worker_imports("torch", "g2l_student.data")
    return {"num_workers": num_workers, "pin_memory": not use_cpu, "persistent_workers": True,
            "multiprocessing_context": "forkserver", "prefetch_factor": 4,
            "worker_init_fn": loader_worker_init()}


def metric_columns_of(fit: FitRun) -> list[str]:
    """metrics.csv's columns for this run (each teacher's loss with several teachers)."""
    return metric_columns(fit.teachers.labels if len(fit.teachers.labels) > 1 else [])
