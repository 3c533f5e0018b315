"""`g2l doctor`: will this run work? Checks before hours of GPU time, one line each with what to do.

Hub access to each weight (a missing repository, no access and no network are told apart; weights
already in the local hub cache pass offline), a local weights file's fit against the architecture
(read from the file's header onto the meta device: nothing is loaded), GPUs, free disk against a
plan's estimate, CPU cores against the workers per GPU the README recommends, the output folder
writable and the slide readers importable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from g2l_cache.cpus import usable_cores
from g2l_cache.errors import G2LError
from g2l_cache.weights import timm_hub_id
from g2l_student.doctor_config import DoctorConfig
from g2l_student.hf_dinov2 import convert_state_dict, timm_kwargs

WORKERS_PER_GPU = 4  # README "CPU workers": 3-4 per GPU for the teacher pass, 2 for a ViT-L fit
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


@dataclass
class Check:
    """One line of the doctor's answer."""

    what: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    fix: str = ""


@dataclass
class Diagnosis:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)


def hub_access(repo_id: str, what: str) -> Check:
    """Whether `repo_id`'s weights can be had: in the local hub cache, or on the hub for this account."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    from g2l_cache.hub import hub_failure

    label = f"hub access: {what}"
    if any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in WEIGHT_FILES):
        return Check(label, "ok", f"{repo_id} is in the local hub cache")
    try:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            from huggingface_hub.errors import OfflineModeIsEnabled

            raise OfflineModeIsEnabled("HF_HUB_OFFLINE is set")
        HfApi().auth_check(repo_id)
    except Exception as exc:  # each hub failure has its own answer
        kind = hub_failure(exc)
        url = f"https://huggingface.co/{repo_id}"
        answers = {
            "gated": ("the repository is gated and this account has no access",
                      f"request access on {url}, then `hf auth login` (or set HF_TOKEN)"),
            "missing": ("there is no such repository (or it is private to another account)",
                        f"check the name on {url}, or pass a local weights file"),
            "offline": ("the hub cannot be reached and the weights are not in the local hub cache",
                        f"`hf download {repo_id}` where there is network and copy the cache here "
                        "(HF_HOME), or pass a local weights file"),
        }
        detail, fix = answers.get(kind, (f"{type(exc).__name__}: {exc}", "retry, or pass a local weights file"))
        return Check(label, "fail", f"{repo_id}: {detail}", fix)
    return Check(label, "ok", f"{repo_id} is reachable with this account's access")


def header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file as meta tensors of their shapes, read from its header (safetensors)
    or memory-mapped (torch), never loaded."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
    return {k: torch.empty(v.shape, device="meta") for k, v in sd.items() if isinstance(v, torch.Tensor)}


def fit_against(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> str | None:
    """What does not fit between a model's state dict and a file's tensors (None when all fits);
    position embeddings may differ in length, as timm resamples them on loading."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # timm drops a checkpoint's classifier when the model is built without one (num_classes=0)
    classifier = getattr(getattr(model, "pretrained_cfg", None), "get", lambda k, d=None: d)("classifier") or "head"
    theirs = {k.removeprefix("module."): tuple(v.shape) for k, v in tensors.items()
              if not k.removeprefix("module.").startswith(classifier + ".")}
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    wrong = [f"{k} {theirs[k]} vs {own[k]}" for k in own if k in theirs and theirs[k] != own[k]
             and not k.endswith("pos_embed")]
    parts = [f"{len(missing)} missing ({', '.join(missing[:3])})" if missing else "",
             f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})" if unexpected else "",
             f"{len(wrong)} of another shape ({'; '.join(wrong[:3])})" if wrong else ""]
    parts = [p for p in parts if p]
    return ", ".join(parts) if parts else None


def weights_fit(path: str, arch: str, kwargs: dict, what: str, convert=None) -> Check:
    """Whether a local weights file fits the architecture, from its header alone."""
    import timm

    file = Path(path)
    label = f"weights fit: {what}"
    if not file.is_file():
        return Check(label, "fail", f"{file} does not exist", "give the path of the weights file")
    try:
        tensors = header_tensors(file)
        if convert is not None:
            tensors = convert(tensors)
    except G2LError as exc:
        return Check(label, "fail", str(exc), "pass the checkpoint the architecture was published with")
    except Exception as exc:
        return Check(label, "fail", f"{file} cannot be read ({type(exc).__name__}: {exc})",
                     "check the file is a .safetensors or torch state dict")
    with torch.device("meta"):
        model = timm.create_model(arch, **{"num_classes": 0, **kwargs})
    problem = fit_against(model, tensors)
    if problem:
        return Check(label, "fail", f"{file.name} does not fit {arch}: {problem}",
                     "pass the weights of this architecture, or the matching --teacher / --student")
    return Check(label, "ok", f"{file.name}: all {len(tensors)} tensors fit {arch}")


def teacher_checks(name: str, weights: str | None) -> list[Check]:
    """Hub access or local fit of one teacher's weights."""
    from g2l_cache.presets import get_preset, model_kwargs

    try:
        preset = get_preset(name)
    except G2LError as exc:
        return [Check(f"teacher {name}", "fail", str(exc), "use a preset name or a timm model name")]
    if weights:
        return [weights_fit(weights, preset.arch, model_kwargs(preset, preset.input_size), f"teacher {name}")]
    repo = preset.hf_hub_id or timm_hub_id(preset.arch)
    if repo is None:
        return [Check(f"teacher {name}", "fail", f"timm publishes no weights for {preset.arch}",
                      "pass --teacher-weights FILE")]
    return [hub_access(repo, f"teacher {name}")]


def student_checks(arch: str, weights: str | None) -> list[Check]:
    """Hub access or local fit of the student's starting weights."""
    if weights is None:
        repo = timm_hub_id(arch)
        if repo is None:
            return [Check(f"student {arch}", "warn", "timm publishes no weights for it",
                          "pass --student-weights, or train it from random weights (--random-init)")]
        return [hub_access(repo, f"student {arch}")]
    path = Path(weights)
    if not path.exists() and weights.count("/") == 1 and not weights.startswith((".", "/")):
        return [hub_access(weights, f"student {arch}")]
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    if config.is_file() and '"dinov2' in config.read_text():  # transformers DINOv2 (Hibou-L's format)
        import json

        cfg = json.loads(config.read_text())
        size = int(cfg.get("image_size", 224))
        file = path if path.is_file() else next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()),
                                                folder / "model.safetensors")

        def convert(tensors):
            tensors = {k.removeprefix("dinov2."): v for k, v in tensors.items()}
            return convert_state_dict(tensors, cfg, size // int(cfg.get("patch_size", 14)))

        try:
            kwargs = timm_kwargs(cfg, size)
        except G2LError as exc:
            return [Check(f"weights fit: student {arch}", "fail", str(exc), "use another student checkpoint")]
        return [weights_fit(str(file), arch, kwargs, f"student {arch}", convert)]
    return [weights_fit(weights, arch, {}, f"student {arch}")]


def gpu_check(wanted: int | None) -> Check:
    """GPUs visible and their type, against those the run will use."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
    if wanted and n < wanted:
        return Check("GPUs", "fail", f"{n} visible, the run wants {wanted}",
                     "check CUDA_VISIBLE_DEVICES and `nvidia-smi`, or lower --gpus")
    if n == 0:
        return Check("GPUs", "warn", "none visible: the teacher and the student would run on the CPU "
                     "(about 100x slower)", "run on a machine with a GPU and a CUDA build of torch")
    return Check("GPUs", "ok", f"{n} visible: {', '.join(names)}")


def disk_check(plan_file: str) -> Check:
    """Free disk where the cache will be written against what the plan says it still needs."""
    import json

    from g2l_cache.units import size

    path = Path(plan_file)
    if path.is_dir():
        path = path / "plan.json"
    try:
        plan = json.loads(path.read_text())
        disk = plan["disk_bytes"]
    except (OSError, ValueError, KeyError):
        return Check("free disk", "fail", f"{path} is not a `g2l cache plan` output (plan.json)",
                     "run `g2l cache plan SLIDES --teacher NAME --out OUT` and pass OUT/plan.json")
    # the plan already wrote the QC pictures and shard indexes it counts
    needed = disk["total"] - disk.get("qc_images", 0) - disk.get("shard_index", 0)
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        return Check("free disk", "fail", f"{size(free)} free at {path.parent}, the plan needs {size(needed)} more",
                     "free space, or plan the cache on a larger disk (--out)")
    return Check("free disk", "ok", f"{size(free)} free at {path.parent}; the plan needs {size(needed)} more")


def cpu_check(gpus: int) -> Check:
    """CPU cores against the data-loading workers per GPU the README recommends."""
    cores = usable_cores()
    want = WORKERS_PER_GPU * max(gpus, 1)
    if cores < want:
        return Check("CPU cores", "warn", f"{cores} for {max(gpus, 1)} GPU(s); the README recommends about "
                     f"{WORKERS_PER_GPU} data workers per GPU ({want})",
                     "expect the GPUs to wait for data (the build's 'waiting for data' share says how much)")
    return Check("CPU cores", "ok", f"{cores} for {max(gpus, 1)} GPU(s) ({WORKERS_PER_GPU} workers each fit)")


def writable_check(out: str) -> Check:
    """Whether the output folder (or the nearest folder above it that exists) takes a file."""
    folder = Path(out).resolve()
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        return Check("output folder", "fail", f"{out} is not a folder", "name a folder for --out")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".g2l-doctor-"):
            pass
    except OSError as exc:
        return Check("output folder", "fail", f"{existing} cannot be written ({exc.strerror})",
                     "choose a writable --out, or fix its permissions / mount")
    where = "" if existing == folder else f" (it will be made in {existing})"
    return Check("output folder", "ok", f"{folder} is writable{where}")


def reader_checks() -> list[Check]:
    """The slide readers the cache reads with."""
    checks = []
    from importlib.metadata import version

    for module, dist, what in (("openslide", "openslide-python", "OpenSlide (whole-slide formats, read in bands)"),
                               ("tiatoolbox.wsicore", "tiatoolbox", "tiatoolbox (tissue masks, other formats)"),
                               ("tifffile", "tifffile", "tifffile (pyramidal TIFF)")):
        try:
            mod = __import__(module, fromlist=["_"])
            library = getattr(mod, "__library_version__", None)
            checks.append(Check(f"reader: {module.split('.')[0]}", "ok", f"{what} {version(dist)}"
                                + (f", library {library}" if library else "")))
        except Exception as exc:  # a missing shared library raises OSError, not ImportError
            checks.append(Check(f"reader: {module.split('.')[0]}", "fail", f"{what} cannot be imported "
                                f"({type(exc).__name__}: {exc})", "run `make install` again (installs "
                                "openslide-bin), or `pip install openslide-python openslide-bin`"))
    return checks


def run_doctor(cfg: DoctorConfig) -> Diagnosis:
    """Every check `cfg` calls for, in the order a run needs them."""
    if cfg.teacher_weights and len(cfg.teacher_weights) != len(cfg.teacher):
        raise G2LError("give one --teacher-weights per --teacher, in the same order (or none).")
    if not cfg.teacher and not cfg.student and not cfg.plan:
        raise G2LError("nothing to check: give --teacher NAME (and --student, --plan OUT/plan.json).")
    checks: list[Check] = []
    weights = cfg.teacher_weights or [None] * len(cfg.teacher)
    for name, file in zip(cfg.teacher, weights):
        checks += teacher_checks(name, file)
    if cfg.student:
        checks += student_checks(cfg.student, cfg.student_weights)
    checks.append(gpu_check(cfg.gpus))
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    checks.append(cpu_check(cfg.gpus or visible))
    if cfg.plan:
        checks.append(disk_check(cfg.plan))
    out = cfg.out or (str(Path(cfg.plan).parent if cfg.plan.endswith(".json") else cfg.plan) if cfg.plan else None)
    if out:
        checks.append(writable_check(out))
    checks += reader_checks()
    return Diagnosis(checks)
