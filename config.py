"""Sacred configuration shared by ``training.py`` and ``test.py``.

Every default follows the DMAP paper scripts (docs/method.md) and the public protocol (docs/protocol.md).
Relative paths in the config are relative to the repository root, so a run behaves the same whatever the
working directory.

Override from the command line, e.g.::

    python training.py with dataset=CHAOST2 setting=2 eval_fold=2 data_root=data
    python test.py with dataset=CHAOST2 eval_fold=2 reload_model_path=runs/.../final.pth
    python training.py with demo            # named configs: chaos sabs cmr synth setting2 demo smoke

Library code never sees Sacred: :func:`resolve_config` turns the Sacred dict (or one made by
:func:`build_config`) into a plain, validated dict that ``training.train`` and ``test.run_test`` take.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from sacred import SETTINGS, Experiment
from sacred.observers import FileStorageObserver

from dataloaders.dataset_specifics import DATASETS, DatasetSpec, get_dataset_spec
from dataloaders.episodes import EXCLUDE_MODES, SAMPLERS
from dataloaders.transforms import AUGMENT_PROFILES
from dataloaders.volume_io import supervoxel_dir
from models.components import METHOD_CLASS_WEIGHTS, resolve_components
from models.dmap import DMAP_MODES
from models.encoder import BACKBONES
from models.losses import LOSS_NORMALIZATIONS
from models.pretrained import WEIGHT_NAMES, WeightsUnavailable, resolve_named_weights, weights_url
from util.amp import AMP_MODES
from util.lr_schedule import LR_SCHEDULES
from util.distributed import is_main_process

REPO_ROOT = Path(__file__).resolve().parent
#: which weights of a checkpoint evaluation reads (config key eval_weights)
EVAL_WEIGHTS = ("auto", "averaged", "raw")
AUGMENT_PROFILE_NAMES = tuple(AUGMENT_PROFILES)

# tqdm and DataLoader workers do not mix with Sacred's stdout capture
SETTINGS.CAPTURE_MODE = "no"
SETTINGS.CONFIG.READ_ONLY_CONFIG = False


class ConfigError(ValueError):
    """A config value that cannot work, reported before any work starts."""


# errors caused by what the user gave (config, files, disk): one line at the entry points
USER_ERRORS = (ValueError, OSError)
DEBUG_ENV = "DMAP_DEBUG"


def debug_enabled() -> bool:
    """Whether ``DMAP_DEBUG`` is set (to anything but 0): entry points then show full tracebacks."""
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


@contextlib.contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Turn user errors (``ValueError``, ``OSError``) into ``SystemExit("<prog>: error: ...")``.

    Python prints that message alone on stderr and exits with status 1; ``DMAP_DEBUG=1`` re-raises the
    original exception with its traceback instead.
    """
    try:
        yield
    except USER_ERRORS as exc:
        if debug_enabled():
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise SystemExit(f"{prog}: error: {text} (DMAP_DEBUG=1 shows the traceback)") from None


def default_config() -> dict[str, Any]:
    """Default configuration: every key a run reads, with the paper's values."""
    return dict(
        seed=2025,  # fixes the initial weights and the episode stream (episode i depends on seed and i only)
        dataset="CHAOST2",  # a registry name: dataset_specifics.dataset_names()
        data_root="data",  # holds one folder per data set
        data_dir=None,  # None -> <data_root>/<dataset>
        n_sv=None,  # supervoxel min_size; None -> the data set's default (5000 abdominal, 1000 cardiac)
        supervoxel_dir=None,  # None -> <data_dir>/supervoxels_<n_sv>; set it when data_dir is read-only
        eval_fold=0,  # the fold held out for evaluation (0 .. the data set's folds - 1); the others train
        volumes=None,  # None -> the folder's volumes, which must be the registry's public ids; or a list of ids
        setting=1,  # 1: test organs may appear unlabelled in training; 2: slices with them are excluded
        test_label=None,  # None -> the data set's benchmark organs
        exclude_label=None,  # None -> test_label in setting 2, nothing in setting 1
        exclude_mode="any",  # "any" (correct setting 2) or "all" (peer-code behaviour)
        use_gt=False,  # supervised episodes from ground truth instead of supervoxels
        n_shot=1,  # support images per training episode
        augment=True,  # augment the training episodes (augment_profile); False: no augmentation
        min_fg_pixels=200,  # pixels in the larger of an episode's two masks (supervoxel or label episodes)
        image_size=None,  # None -> the data's slice size; else the model runs at image_size x image_size
        #                   (episodes and EP1 inputs resized; predictions resized back before scoring)
        # "public": draw a supervoxel uniformly, then a slice run and a start slice, redraw while the larger
        # mask has < min_fg_pixels (the public code's distribution); "valid_windows": draw uniformly among
        # supervoxels with at least one valid window (favours small supervoxels)
        sampler="public",
        # "public": independent coins for gamma and geometry, shear about the origin, zero-filled border,
        # 21-tap elastic blur (the public code's distribution, one interpolation); "compact": one coin, shear
        # about the centre, reflected border, 41-tap blur
        augment_profile="public",
        # training: each support mask grows by a radius drawn from 0..support_spill_px pixels, an annotation
        # that overshoots into the neighbouring tissue, so the de-biasing selection has pixels to discard
        # (docs/method.md); the query mask stays exact. 0: exact supervoxel / label masks
        support_spill_px=0,

        model={
            "backbone": "resnet101",  # resnet101 | resnet50 | resnet34 | resnet18 (torchvision ResNet)
            "weights_path": "",  # "coco" | "imagenet" (torch hub cache) | a local checkpoint | "" (random init)
            "dmap_mode": "learned",  # learned | learned_st | fixed | off (docs/method.md)
            "temperature": 0.05,  # soft selection sigmoid((s - xi) / temperature) in training
            "fixed_threshold": 0.9,  # xi of dmap_mode=fixed: support pixels with cosine >= this are kept
            "alpha": 10.0,  # cosine scale of the prediction p_fg = sigmoid(alpha * cos + tau / 2)
            "freeze_bn": False,  # batch-norm layers use running statistics in training
            "min_loaded_fraction": 0.9,  # weights_path must fill this share of the backbone's tensors; 0: any
            # training: layer4 (the tau head's input) sees support and query in one batch, as the public
            # code; False: the query only
            "bn_with_support": True,
            # the method (docs/methods.md): dmap | adnet | qnet | alpnet. Each component key below left at None
            # takes the method's published choice; a value switches that component alone (ablations)
            "method": "dmap",
            "pooling": None,  # map | dmap (de-biased, model.dmap_mode) | local (ALPNet's local prototypes)
            "head": None,  # tau (per-query offset) | threshold (one learned T, ADNet) | assign (ALPNet's scoring)
            "paths": None,  # layer3 | layer3+layer4 (Q-Net's two fused feature paths)
            "query_loss": None,  # focal (loss.gamma) | nll
            "align_weight": None,  # prototype alignment loss weight; 0: none
            "threshold_loss_weight": None,  # weight of ADNet's threshold loss T / 20 (head=threshold)
            "refine_iters": None,  # Adam steps of Q-Net's test-time prototype refinement; 0: none
            "refine_lr": 0.01,  # Adam learning rate of the test-time refinement (refine_iters)
            "fusion_weight": 0.9,  # a in a p_layer3 + (1 - a) p_layer4 (Q-Net; 0.6 in its Setting 2)
            "threshold_init": -10.0,  # initial T of head=threshold
            "assign_scale": 20.0,  # cosine scale of head=assign
            "local_window": 8,  # local pooling window in feature cells (stride 4: 32 px), training
            "local_window_eval": 4,  # the window in evaluation (16 px)
            "local_threshold": 0.95,  # a window is a local prototype when this share of it is in the mask
        },
        loss={
            "gamma": 0.7,  # gamma of the focal loss (query_loss=focal)
            # class weights (background, foreground); None: the method's own (0.1 / 1.0; alpnet 0.05 / 1.0)
            "class_weights": None,
            # the query loss's (focal or NLL) normalisation: "pixels": sum over pixels / summed weights (the
            # papers'); "classes": each class's mean over its own pixels, then weighted
            "normalize": "pixels",
        },
        optim={
            "lr": 1e-3,  # SGD base learning rate: lr_schedule starts from it, a warm-up ramps up to it
            "momentum": 0.9,  # SGD momentum
            "weight_decay": 5e-4,  # SGD weight decay (L2)
            "grad_clip": 0.0,  # the gradients' total norm is clipped to this before each update; 0: none
        },
        lr_schedule="step",  # "step": x lr_gamma every lr_step_size steps (the paper); "cosine": lr -> lr * lr_final_factor
        lr_step_size=3000,  # steps between the decays of the "step" schedule
        lr_gamma=0.98,  # factor of each decay of the "step" schedule
        lr_final_factor=0.01,  # the cosine schedule's last learning rate, as a fraction of optim.lr
        lr_warmup_steps=0,  # linear warm-up of the learning rate over these first steps (0: none)
        # exponential moving average of the weights (and batch-norm buffers), stored beside the raw weights in
        # every checkpoint and evaluated by default (eval_weights); 0: no average
        ema_decay=0.0,
        ema_warmup=True,  # the average's decay ramps up as min(ema_decay, (1 + n) / (10 + n)) over its n updates
        n_steps=33000,  # the public code: 11 x 3000 steps
        batch_size=1,  # episodes per step (per process under torchrun)
        save_snapshot_every=5000,  # steps between step snapshots (<run_dir>/snapshots/step_<n>.pth)
        keep_snapshots=2,  # step snapshots kept besides final.pth (and the eval_step snapshot)
        eval_step=30000,  # test.py evaluates this step's snapshot when it exists (the public protocol)
        log_every=20,  # steps between logged scalars (Sacred's metrics.json and TensorBoard)
        resume=False,  # continue from the newest snapshot in the run folder (same training config)
        time_limit_min=0,  # > 0: stop cleanly after this many minutes (weights saved; resume=True continues)

        device="auto",  # auto | cpu | cuda | cuda:N
        num_workers=2,  # DataLoader worker processes that draw the training episodes
        amp="auto",  # auto (bf16 where the device has native bf16, else fp32) | off | bf16 | fp16
        channels_last=False,  # store activations as [B, H, W, C] in memory (faster convolutions on GPUs)
        cudnn_benchmark=True,  # let cuDNN time and pick the fastest convolution algorithms (CUDA)
        num_threads=0,  # torch CPU threads; 0 -> torch default

        # evaluation (test.py)

        supp_idx=2,  # position of the support volume in the test fold (2, as the public evaluation script)
        rotate_support=False,  # evaluate with every fold member as support, report mean and spread
        n_part=3,  # EP1: chunks of each query volume, each segmented with the support slice at its position
        eval_batch=0,  # query slices per forward; 0 -> 16 on CUDA, 1 on CPU (batches were slower there)
        reload_model_path=None,  # None -> the eval_step snapshot if it exists, else <run_dir>/snapshots/final.pth
        eval_weights="auto",  # auto: the averaged weights when the checkpoint has them, else the raw | averaged | raw
        # the model and image_size come from the checkpoint; this changes them for one evaluation, e.g.
        # eval_override.model.fixed_threshold=0.8 or eval_override.image_size=128 (recorded in results.json)
        eval_override={},
        save_predictions=True,  # write the predicted label volumes (NIfTI) to <run_dir>/results/predictions
        n_overlays=3,  # PNG overlays per class and query volume

        tag="",  # appended to the experiment name
        path={"log_dir": "runs"},  # the folder that holds the run folders
        tensorboard=True,  # also write the logged scalars to <run_dir>/tensorboard (needs the tensorboard extra)
    )


NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # one per registered data set (chaos, sabs, cmr, synth)
    **{spec.config_name: {"dataset": name} for name, spec in DATASETS.items()},
    # Setting 2: training leaves out the slices that show a test organ (the key setting)
    "setting2": {"setting": 2},
    # the embedded synthetic demo: small backbone and phantoms so it trains on two CPU cores in minutes.
    # From random weights the paper's background weight 0.1 makes the model over-segment (measured on the
    # demo: recall 0.99, precision 0.33, Dice 0.48); 0.5 suits a backbone trained from scratch.
    "demo": {
        "dataset": "SYNTH",
        "data_root": "runs/demo/data",
        "path": {"log_dir": "runs/demo"},
        "model": {"backbone": "resnet18"},
        # 96 px costs about half the 128 px step: the demo must end within 10 minutes also on AVX2-only
        # CPUs (fp32 there runs ~1.7x slower); Dice scored on the phantoms' 128 px grid (0.711 vs 0.719 at
        # 128 px, measured)
        "image_size": 96,
        "n_steps": 1200,
        "loss": {"class_weights": [0.5, 1.0]},
        "save_snapshot_every": 400,
        "lr_step_size": 300,
        "optim": {"lr": 1e-2},
        "log_every": 10,
        "num_workers": 1,
        "supp_idx": 0,  # the first phantom of the fold: the support of the demo's measured Dice
        "amp": "off",  # fp32 on every CPU kind, so the demo's Dice compares across machines
    },
    # real data on a 2-core CPU within 45 minutes per fold (fp32 on every CPU kind), chosen by measurement on
    # CHAOS fold 0 (docs/results.md): ResNet-18 from random weights at 160 x 160 runs about 0.22 s
    # a step on 2 cores; background weight 0.5 beat 1.0 (Dice 0.59 vs 0.44 after 1445 steps) and the
    # paper's 0.1 over-segments from random weights; the learning rate decays x0.7 every 1200 steps. The
    # weight average (decay 0.999, warmed up) is what test.py evaluates: on CHAOS folds 0-2 its final Dice is
    # within 0.022 of the mean of its last three snapshots where the raw weights swing by up to 0.3
    # (docs/results.md).
    "cpu": {
        "model": {"backbone": "resnet18", "bn_with_support": False},
        # the valid-window sampler and compact augmentation, with which the cpu recipe's figures were measured
        "sampler": "valid_windows",
        "augment_profile": "compact",
        "image_size": 160,
        "n_steps": 3600,
        "optim": {"lr": 1e-2},
        "lr_step_size": 1200,
        "lr_gamma": 0.7,
        "ema_decay": 0.999,
        "loss": {"class_weights": [0.5, 1.0]},
        "amp": "off",
        "save_snapshot_every": 600,
        "keep_snapshots": 10,
        "num_workers": 1,
    },
    # the public DMAP code in every switchable point (docs/differences.md); the
    # remaining difference, the resampled size of pre-processing, is `--resample-size` of the pre-processing
    "public_code": {
        "model": {"dmap_mode": "fixed", "fixed_threshold": 0.9, "bn_with_support": True},
        "exclude_mode": "all",
        "sampler": "public",
        "augment_profile": "public",
        "supp_idx": 2,
        "n_steps": 33000,
        "eval_step": 30000,
    },
    # a few steps on tiny synthetic data: the end-to-end test
    "smoke": {
        "dataset": "SYNTH",
        "model": {"backbone": "resnet18"},
        "n_steps": 4,
        "save_snapshot_every": 2,
        "log_every": 1,
        "num_workers": 0,
        "eval_batch": 4,
        "supp_idx": 0,
        "amp": "off",
        "n_overlays": 1,
        "tensorboard": False,
    },
}


def make_experiment(name: str, validate: Callable[[dict[str, Any]], None] | None = None) -> Experiment:
    """A Sacred experiment with the shared config, the named configs and a file observer.

    The observer writes under ``<path.log_dir>/<experiment name>/<name>/<run id>/`` on the main process
    only, so ``torchrun`` workers do not each create a run folder. Before it is added, the config is
    resolved (and passed to ``validate``, for the entry point's own checks): a refused config ends the
    program with one line on stderr and leaves no run folder.
    """
    ex = Experiment(name, save_git_info=False)
    ex.add_config(default_config())
    for config_name, values in NAMED_CONFIGS.items():
        ex.add_named_config(config_name, copy.deepcopy(values))

    @ex.config_hook
    def add_observer(config, command_name, logger):  # noqa: ARG001 (Sacred passes these by name)
        # replace, not add: a process (a notebook, the tests) may run the experiment several times
        ex.observers[:] = [o for o in ex.observers if not isinstance(o, FileStorageObserver)]
        resolved = config
        if command_name == "main":
            with one_line_errors(name):
                resolved = resolve_config(config, need_supervoxels=name != "test")
                if validate is not None:
                    validate(resolved)
        if is_main_process():
            ex.observers.append(FileStorageObserver(str(run_dir(resolved) / name)))
        return {}

    return ex


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_config(named_configs: tuple[str, ...] | list[str] = (), updates: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config Sacred would build for ``with <named_configs> <updates>``, without Sacred.

    For notebooks and tests; nested dicts are merged key by key, as Sacred does.
    """
    cfg = default_config()
    for name in named_configs:
        if name not in NAMED_CONFIGS:
            raise ConfigError(f"unknown named config {name!r}; valid: {', '.join(NAMED_CONFIGS)}")
        cfg = _merge(cfg, NAMED_CONFIGS[name])
    return _merge(cfg, updates or {})


def repo_path(value: str | os.PathLike) -> Path:
    """Resolve a config path: absolute paths as given, relative ones against the repository root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


# Keys that do not change what a run learns: the evaluation protocol, where files are, and how a run is
# executed, logged and stopped. Every other key, at the top level or in a sub-dict (``model``, ``loss``,
# ``optim``, and any key added later), is training-relevant: it is part of the run folder's name, it must
# match when a run is resumed, and folds averaged together must agree on it. ``amp`` is here because it
# says how a run is computed, like ``device`` (``auto`` is bf16 on one machine and fp32 on another, and a
# run may be resumed elsewhere); the precision actually used is stored in each checkpoint and reported.
# ``test_label`` is training-relevant only with ``use_gt`` (the test classes are removed from the label
# episodes); otherwise its effect on training, the Setting 2 exclusion, is carried by ``exclude_label``.
NON_TRAINING_KEYS = frozenset({
    # evaluation protocol (test.py)
    "supp_idx", "rotate_support", "n_part", "eval_batch", "save_predictions", "n_overlays", "reload_model_path",
    "eval_override", "eval_step", "eval_weights",
    # locations
    "data_root", "data_dir", "supervoxel_dir", "path", "tag", "run_dir", "snapshot_dir",
    # execution, logging, stopping
    "device", "num_workers", "num_threads", "cudnn_benchmark", "channels_last", "amp", "resume", "time_limit_min",
    "log_every", "save_snapshot_every", "keep_snapshots", "tensorboard",
})
# training-relevant keys spelled out in the run folder's name itself: the data set, setting and fold, then
# for model.method=dmap its mode (the method left unsaid: ..._fold0_learned), for any other method the
# method (..._fold0_adnet; its model.dmap_mode then counts in the recipe digest when not the default)
RUN_NAME_KEYS = ("dataset", "setting", "eval_fold", "model.method", "model.dmap_mode")
DEFAULT_METHOD = "dmap"
DIGEST_LENGTH = 8


def flatten_keys(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"alpha": 10}}`` -> ``{"model.alpha": 10}`` (an empty sub-dict stays a value)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _plain(value: Any) -> Any:
    """Tuples as lists and mappings as dicts, so that equal values compare and serialise alike."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    """Equality of config values (1 and 1.0 agree; True and 1 do not)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def weights_identity(value: str, backbone: str | None) -> str:
    """How ``model.weights_path`` is compared between configs: the weights file's name, so that the same
    file read from another folder or machine counts as the same, and ``coco`` as the file it resolves to."""
    if not value:
        return ""
    if value in WEIGHT_NAMES and backbone:
        try:
            return Path(weights_url(value, backbone)).name
        except (ValueError, KeyError):
            return value
    return Path(str(value)).name


def _with_registry_values(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with ``dataset`` spelled as in the registry, the labels and ``n_sv`` it leaves to the registry
    and the method's components and class weights filled in (as :func:`resolve_config` does); unknown data
    sets are left as they are."""
    full = copy.deepcopy(dict(cfg))
    name = str(full.get("dataset", "")).upper()
    if name in DATASETS:
        full["dataset"] = name
        with contextlib.suppress(KeyError, ConfigError):
            _resolve_labels(full, get_dataset_spec(name))
    # the method's components and class weights, as resolve_config writes them into the config
    if isinstance(full.get("model"), dict) and isinstance(full.get("loss"), dict):
        with contextlib.suppress(KeyError, TypeError, ConfigError):
            _resolve_method(full)
    return full


def training_view(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The training-relevant entries of a config (resolved or not) as ``{dotted key: value}``.

    Everything but :data:`NON_TRAINING_KEYS`; labels and ``n_sv`` as the registry resolves them,
    ``model.weights_path`` as :func:`weights_identity`, ``test_label`` only with ``use_gt``.
    """
    flat = {key: _plain(value) for key, value in flatten_keys(_with_registry_values(cfg)).items()
            if key.split(".")[0] not in NON_TRAINING_KEYS}
    if not flat.get("use_gt"):
        flat.pop("test_label", None)
    if "model.weights_path" in flat:
        flat["model.weights_path"] = weights_identity(flat["model.weights_path"], flat.get("model.backbone"))
    return flat


def _name_values(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`RUN_NAME_KEYS` a config's folder name spells out: ``model.dmap_mode`` only for the DMAP
    method (a config without ``model.method`` is DMAP)."""
    view = flatten_keys(_with_registry_values(cfg))
    own = {key: view.get(key) for key in RUN_NAME_KEYS}
    own["model.method"] = own["model.method"] or DEFAULT_METHOD
    if own["model.method"] != DEFAULT_METHOD:
        del own["model.dmap_mode"]
    return own


def _name_slot(name_values: Mapping[str, Any]) -> str:
    """The word after ``fold<f>_`` in a folder name: the DMAP mode for DMAP, else the method."""
    return str(name_values.get("model.dmap_mode") or name_values["model.method"])


def _default_view(name_values: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`training_view` of the default config with the given run-name values."""
    updates: dict[str, Any] = {key: value for key, value in name_values.items() if "." not in key}
    updates["model"] = {key[len("model."):]: value for key, value in name_values.items() if key.startswith("model.")}
    return training_view(build_config((), updates))


def recipe_differences(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The training-relevant values of ``cfg`` that differ from the default config of the same data set,
    setting, fold and method (and ``model.dmap_mode`` for DMAP); the keys of the run folder's name left out."""
    own = _name_values(cfg)
    view, base = training_view(cfg), _default_view(own)
    return {key: value for key, value in view.items()
            if key not in own and (key not in base or not _same(value, base[key]))}


def _named_configs_of(cfg: Mapping[str, Any], differences: Mapping[str, Any]) -> list[str]:
    """Named configs whose training-relevant values ``cfg`` all has (the most specific ones, in order).

    A named config that sets a key of the folder's name (data set, setting, method, DMAP mode) to another
    value than ``cfg`` has, or that changes nothing training-relevant, does not match.
    """
    own = _name_values(cfg)
    matches: dict[str, dict[str, Any]] = {}
    for name in NAMED_CONFIGS:
        sets = flatten_keys(NAMED_CONFIGS[name])
        named = flatten_keys(_with_registry_values(build_config([name])))
        if any(key in sets and not _same(named.get(key), value) for key, value in own.items()):
            continue
        placed = build_config([name], {key: value for key, value in own.items() if "." not in key})
        for key, value in own.items():
            if key.startswith("model."):
                placed["model"][key[len("model."):]] = value
        wanted = recipe_differences(placed)
        if wanted and _contained(wanted, differences):
            matches[name] = wanted
    return [name for name, wanted in matches.items()
            if not any(other != name and len(wanted) < len(matches[other]) and _contained(wanted, matches[other])
                       for other in matches)]


def _contained(small: Mapping[str, Any], large: Mapping[str, Any]) -> bool:
    """Whether every entry of ``small`` is in ``large`` with the same value."""
    return all(key in large and _same(value, large[key]) for key, value in small.items())


def recipe_suffix(cfg: Mapping[str, Any]) -> str:
    """The part of the run folder's name that tells recipes apart: ``""`` for the default recipe, else the
    named configs it contains and a digest of :func:`recipe_differences`, e.g. ``cpu-3f2a9c1e``."""
    differences = recipe_differences(cfg)
    if not differences:
        return ""
    text = json.dumps({key: _digestable(value) for key, value in differences.items()}, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:DIGEST_LENGTH]
    return "-".join([*_named_configs_of(cfg, differences), digest])


def _digestable(value: Any) -> Any:
    """Numbers as floats (``lr_gamma=1`` and ``1.0`` are one recipe), booleans and the rest as they are."""
    if isinstance(value, list):
        return [_digestable(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def experiment_name(cfg: Mapping[str, Any]) -> str:
    """Folder name of a run: ``<dataset>_setting<s>_fold<f>_<mode or method>[_<recipe>][_<tag>]``.

    The word after the fold is ``model.dmap_mode`` for ``model.method=dmap`` (``learned``, ``off``, ...) and
    the method for any other (``adnet``, ``qnet``, ``alpnet``). ``<recipe>`` is :func:`recipe_suffix`: absent
    for the default recipe (``CHAOST2_setting1_fold0_learned``, ``CHAOST2_setting1_fold0_adnet``), else e.g.
    ``CHAOST2_setting1_fold0_learned_cpu-3f2a9c1e``; two configs that differ in a training-relevant key never
    share a name, and ``test.py`` with the training command's named configs and overrides finds the run.
    """
    own = _name_values(cfg)
    name = f"{own['dataset']}_setting{own['setting']}_fold{own['eval_fold']}_{_name_slot(own)}"
    parts = [name, recipe_suffix(cfg), str(cfg.get("tag") or "")]
    return "_".join(part for part in parts if part)


def run_dir(cfg: Mapping[str, Any]) -> Path:
    """Where a run writes: snapshots, Sacred runs, predictions."""
    return repo_path(cfg["path"]["log_dir"]) / experiment_name(cfg)


def training_differences(first: Mapping[str, Any], second: Mapping[str, Any],
                         ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """The training-relevant keys on which two configs disagree, as (key, first value, second value).

    A key one config lacks (a stored config written without that key) counts as the default's value.
    """
    views = []
    for cfg in (first, second):
        views.append({**_default_view(_name_values(cfg)), **training_view(cfg)})
    keys = sorted((set(views[0]) | set(views[1])) - set(ignore))
    return [(key, views[0].get(key), views[1].get(key)) for key in keys
            if not _same(views[0].get(key), views[1].get(key))]


def format_differences(differences: list[tuple[str, Any, Any]], first: str, second: str) -> str:
    """``key: a (first) vs b (second)`` for each difference, joined by ``; ``."""
    return "; ".join(f"{key}: {a!r} ({first}) vs {b!r} ({second})" for key, a, b in differences)


def evaluation_model_config(cfg: Mapping[str, Any], trained: Mapping[str, Any],
                            checkpoint: str | os.PathLike) -> tuple[dict[str, Any], int | None]:
    """The ``model`` sub-dict and ``image_size`` an evaluation uses: the checkpoint's, then ``eval_override``.

    A model key or ``image_size`` counts as given on the command line when its value is not the default
    (a named config or an override set it); a given value that differs from the checkpoint's is refused,
    so a checkpoint is never evaluated as another model than it was trained as. Every key of the ``model``
    sub-dict is compared, whatever keys it has.

    Args:
        cfg: the evaluation's resolved config.
        trained: the training config stored in the checkpoint.
        checkpoint: the checkpoint file, named in errors.

    Raises:
        ConfigError: one line naming the key, the command line's value and the checkpoint's, or an
            ``eval_override`` key that is not a key of the checkpoint's model or ``image_size``.
    """
    defaults = flatten_keys(default_config()["model"])
    given = [f"model.{key}" for key, value in flatten_keys(cfg["model"]).items()
             if not _same(_plain(value), _plain(defaults.get(key)))]
    given += ["image_size"] if cfg.get("image_size") is not None else []
    own = training_view(cfg)
    stored = {**_default_view(_name_values(trained)), **training_view(trained)}
    conflicts = [(key, stored.get(key), own.get(key)) for key in given if not _same(stored.get(key), own.get(key))]
    if conflicts:
        raise ConfigError(f"{checkpoint} was trained with other model settings than the command line gives: "
                          f"{format_differences(conflicts, 'checkpoint', 'command line')}; leave them out to "
                          "evaluate the checkpoint as trained, or change them on purpose with eval_override "
                          "(e.g. eval_override.model.fixed_threshold=0.8)")
    model, image_size = copy.deepcopy(dict(trained["model"])), trained.get("image_size")
    for key, value in flatten_keys(cfg.get("eval_override") or {}).items():
        if key == "image_size":
            _require(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 32),
                     f"config key 'eval_override.image_size' is {value!r}; expected None or an integer >= 32")
            image_size = value
        elif key.startswith("model.") and key[len("model."):] in flatten_keys(model):
            _set_dotted(model, key[len("model."):], value)
        else:
            raise ConfigError(f"config key 'eval_override.{key}': an evaluation can change only image_size and "
                              f"the keys of the checkpoint's model ({', '.join(sorted(flatten_keys(model)))})")
    return model, image_size


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree[part]
    tree[leaf] = value


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def resolve_config(config: dict[str, Any], need_data: bool = True, need_supervoxels: bool = True) -> dict[str, Any]:
    """Validate a config and fill the values derived from the data-set registry.

    Args:
        config: the Sacred config (or any dict with the keys of :func:`base_config`).
        need_data: check that the data folder exists.
        need_supervoxels: with ``need_data``, also check the supervoxel folder (training without use_gt).

    Returns:
        A new dict with ``data_dir`` (absolute), ``n_sv``, ``test_label``, ``exclude_label`` filled in and
        ``run_dir`` / ``snapshot_dir`` added.

    Raises:
        ConfigError: one line naming the config key and what was expected.
    """
    cfg = copy.deepcopy(dict(config))
    if str(cfg["dataset"]).upper() in DATASETS:  # names are case-insensitive: dataset=cmr is CMR
        cfg["dataset"] = str(cfg["dataset"]).upper()
    _require(cfg["dataset"] in DATASETS,
             f"config key 'dataset' is {cfg['dataset']!r}; valid data sets: {', '.join(sorted(DATASETS))}")
    spec = get_dataset_spec(cfg["dataset"])
    _check_choices(cfg, spec)
    _check_model(cfg["model"])
    _resolve_method(cfg)
    _check_runtime(cfg)
    _resolve_labels(cfg, spec)
    _resolve_paths(cfg, spec, need_data, need_supervoxels)
    return cfg


def _check_choices(cfg: dict[str, Any], spec: DatasetSpec) -> None:
    """The protocol and episode options: fold, setting, exclusion, sampler, augmentation, evaluated step."""
    _require(isinstance(cfg["eval_fold"], int) and 0 <= cfg["eval_fold"] < spec.n_folds,
             f"config key 'eval_fold' is {cfg['eval_fold']!r}; expected 0..{spec.n_folds - 1}")
    _require(cfg["setting"] in (1, 2), f"config key 'setting' is {cfg['setting']!r}; expected 1 or 2")
    _require(cfg["exclude_mode"] in EXCLUDE_MODES,
             f"config key 'exclude_mode' is {cfg['exclude_mode']!r}; expected 'any' or 'all'")
    _require(cfg["sampler"] in SAMPLERS, f"config key 'sampler' is {cfg['sampler']!r}; expected one of {SAMPLERS}")
    _require(cfg["augment_profile"] in AUGMENT_PROFILE_NAMES,
             f"config key 'augment_profile' is {cfg['augment_profile']!r}; expected one of {AUGMENT_PROFILE_NAMES}")
    _require(cfg["loss"]["normalize"] in LOSS_NORMALIZATIONS,
             f"config key 'loss.normalize' is {cfg['loss']['normalize']!r}; expected one of {LOSS_NORMALIZATIONS}")
    _require(cfg["lr_schedule"] in LR_SCHEDULES,
             f"config key 'lr_schedule' is {cfg['lr_schedule']!r}; expected one of {LR_SCHEDULES}")
    _require(cfg["eval_weights"] in EVAL_WEIGHTS,
             f"config key 'eval_weights' is {cfg['eval_weights']!r}; expected one of {EVAL_WEIGHTS}")
    _require(cfg["eval_step"] is None or (isinstance(cfg["eval_step"], int) and cfg["eval_step"] >= 0),
             f"config key 'eval_step' is {cfg['eval_step']!r}; expected an integer >= 0 (0 or None: final.pth)")


def _check_model(model: dict[str, Any]) -> None:
    """The ``model`` sub-dict's choices."""
    _require(isinstance(model["bn_with_support"], bool),
             f"config key 'model.bn_with_support' is {model['bn_with_support']!r}; expected True or False")
    _require(model["dmap_mode"] in DMAP_MODES,
             f"config key 'model.dmap_mode' is {model['dmap_mode']!r}; expected one of {DMAP_MODES}")
    _require(model["backbone"] in BACKBONES,
             f"config key 'model.backbone' is {model['backbone']!r}; expected one of {BACKBONES}")


def _resolve_method(cfg: dict[str, Any]) -> None:
    """The method's components written into ``model`` (so the checkpoint records them) and its class weights."""
    model = cfg["model"]
    try:
        components = resolve_components(model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    model.update(components.as_config())
    weights = cfg["loss"].get("class_weights")
    if weights is None:
        weights = list(METHOD_CLASS_WEIGHTS[components.method])
    _require(isinstance(weights, (list, tuple)) and len(weights) == 2 and all(
             isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights),
             f"config key 'loss.class_weights' is {weights!r}; expected None (the method's) or two numbers >= 0 "
             "(background, foreground)")
    cfg["loss"]["class_weights"] = [float(w) for w in weights]


def _check_runtime(cfg: dict[str, Any]) -> None:
    """Precision, volumes, device and the integer sizes and counts."""
    model = cfg["model"]
    _require(cfg["amp"] in AMP_MODES, f"config key 'amp' is {cfg['amp']!r}; expected one of {AMP_MODES}")
    fraction = model.get("min_loaded_fraction", 0.9)
    _require(isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 <= fraction <= 1,
             f"config key 'model.min_loaded_fraction' is {fraction!r}; expected a number in [0, 1]")
    _require(isinstance(cfg.get("eval_override", {}), Mapping),
             f"config key 'eval_override' is {cfg.get('eval_override')!r}; expected a dict such as "
             "{'model': {'fixed_threshold': 0.8}}")
    volumes = cfg.get("volumes")
    _require(volumes is None or (isinstance(volumes, (list, tuple)) and len(volumes) > 0 and all(
             isinstance(v, int) and not isinstance(v, bool) for v in volumes)),
             f"config key 'volumes' is {volumes!r}; expected None or a list of volume ids")
    device = str(cfg["device"])
    _require(device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", device) is not None,
             f"config key 'device' is {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.startswith("cuda"):
        import torch

        _require(torch.cuda.is_available(), f"config key 'device' is {device!r} but CUDA is not available on "
                                            "this machine; use device=cpu or device=auto")
    for key in ("n_steps", "batch_size", "n_shot", "save_snapshot_every", "lr_step_size", "n_part"):
        _require(isinstance(cfg[key], int) and cfg[key] >= 1, f"config key '{key}' is {cfg[key]!r}; expected an integer >= 1")
    _require(cfg["image_size"] is None or (isinstance(cfg["image_size"], int) and cfg["image_size"] >= 32),
             f"config key 'image_size' is {cfg['image_size']!r}; expected None (the data's size) or an integer >= 32")
    for key in ("num_workers", "eval_batch", "lr_warmup_steps", "support_spill_px"):
        _require(isinstance(cfg[key], int) and cfg[key] >= 0, f"config key '{key}' is {cfg[key]!r}; expected an integer >= 0")
    _require(cfg["lr_schedule"] != "cosine" or cfg["lr_warmup_steps"] < cfg["n_steps"],
             f"config key 'lr_warmup_steps' is {cfg['lr_warmup_steps']!r}; the cosine schedule needs fewer "
             f"warm-up steps than n_steps ({cfg['n_steps']})")
    for key, value, low, high in (("ema_decay", cfg["ema_decay"], 0.0, 1.0),
                                  ("lr_final_factor", cfg["lr_final_factor"], 0.0, 1.0)):
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value < high or
                 (key == "lr_final_factor" and value == 1.0),
                 f"config key '{key}' is {value!r}; expected a number in [{low}, {high})")
    _require(isinstance(cfg["ema_warmup"], bool), f"config key 'ema_warmup' is {cfg['ema_warmup']!r}; expected True or False")
    clip = cfg["optim"].get("grad_clip", 0.0)
    _require(isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip >= 0,
             f"config key 'optim.grad_clip' is {clip!r}; expected a number >= 0 (0: no clipping)")


def _resolve_labels(cfg: dict[str, Any], spec: DatasetSpec) -> None:
    """``test_label``, ``exclude_label`` (Setting 2: the test labels) and ``n_sv`` from the registry."""
    try:
        test_label = spec.test_labels if cfg["test_label"] is None else spec.check_labels(cfg["test_label"])
        if cfg["exclude_label"] is None:
            exclude_label = test_label if cfg["setting"] == 2 else ()
        else:
            exclude_label = spec.check_labels(cfg["exclude_label"])
    except ValueError as exc:
        raise ConfigError(f"config key 'test_label'/'exclude_label': {exc}") from None
    cfg["test_label"] = [int(x) for x in test_label]
    cfg["exclude_label"] = [int(x) for x in exclude_label]
    cfg["n_sv"] = int(spec.n_sv if cfg["n_sv"] is None else cfg["n_sv"])


def _resolve_paths(cfg: dict[str, Any], spec: DatasetSpec, need_data: bool, need_supervoxels: bool) -> None:
    """Data, supervoxel, weight and checkpoint paths made absolute (and checked); run folders added."""
    data_dir = repo_path(cfg["data_dir"]) if cfg["data_dir"] else repo_path(cfg["data_root"]) / spec.name
    if need_data:
        _require(data_dir.is_dir(), f"config key 'data_dir'/'data_root': data folder {data_dir} does not exist "
                                    f"(prepare it with script/prepare_data.sh or set data_root=...)")
    cfg["data_dir"] = str(data_dir)
    sv_dir = repo_path(cfg["supervoxel_dir"]) if cfg["supervoxel_dir"] else supervoxel_dir(data_dir, cfg["n_sv"])
    if need_data and need_supervoxels and not cfg["use_gt"]:
        _require(sv_dir.is_dir(), f"config key 'supervoxel_dir': {sv_dir} does not exist (generate it with "
                                  f"supervoxels/generate_supervoxels.py --data-dir {data_dir} --n-sv {cfg['n_sv']})")
    cfg["supervoxel_dir"] = str(sv_dir)
    model = cfg["model"]
    if model["weights_path"] in WEIGHT_NAMES:
        try:
            model["weights_path"] = str(resolve_named_weights(model["weights_path"], model["backbone"]))
        except WeightsUnavailable as exc:
            raise ConfigError(str(exc)) from None
    elif model["weights_path"]:
        weights = repo_path(model["weights_path"])
        _require(weights.is_file(), f"config key 'model.weights_path': {weights} is not a file")
        model["weights_path"] = str(weights)
    if cfg["reload_model_path"]:
        cfg["reload_model_path"] = str(repo_path(cfg["reload_model_path"]))
    cfg["run_dir"] = str(run_dir(cfg))
    cfg["snapshot_dir"] = str(run_dir(cfg) / "snapshots")


def configure_logging(level: int = logging.INFO) -> None:
    """Plain one-line log records for the command-line entry points."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
