"""The config schema: every key a config may set, with its default value and type.

A config file (see :mod:`pce.engine.config`) is merged into a clone of :data:`_C`; a key that is not here
is an error, and so is a value whose type differs from the default's (yacs' rules: equal types, list <->
tuple, anything <-> ``None``; ints are accepted where a float is expected). Nodes created with
``new_allowed=True`` are open: free-form keyword arguments (backbone overrides, dataset / transform kwargs,
head options) go there and are checked by the code that receives them.

Sections::

    task        a registered task name (pce.tasks.list_tasks(): classification, detection, segmentation, ...)
    model       backbone preset, num_classes, backbone_overrides{}, head{}, router_loss_weights, convert[], ...
    data        train / val / test: {name, kwargs{}, transform: {name, kwargs{}}}, batch sizes, workers
    optimizer   type (sgd | adamw | adam), lr, weight_decay, momentum, betas, grad_clip, ...
    schedule    epochs, lr_scheduler (fvcore param scheduler: warmup + cosine | multistep | constant)
    phases      list of {name, epochs, router_override, router_override_kwargs, keys_trainable, attention, lr_mult, upcycle}
    runtime     work_dir, seed, deterministic, amp, channels_last, ema, intervals, kmeans_init_batches
    eval        metric used to pick best.pth, its mode, topk
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from fvcore.common.config import CfgNode as CN

__all__ = ["get_default_config", "CHOICES"]

_C = CN()
_C.task = "classification"

# ---------------------------------------------------------------------------------------------- model
_C.model = CN()
_C.model.backbone = "pce_fmnist"          # a preset of pce.list_backbones()
_C.model.num_classes = 10
_C.model.backbone_overrides = CN(new_allowed=True)   # keyword overrides of the preset (PCEBackbone args)
_C.model.head = CN(new_allowed=True)      # task head options (classification: spp_levels, spp_mode, dropout)
_C.model.router_loss_weights = CN()
_C.model.router_loss_weights.entropy = 0.0
_C.model.router_loss_weights.balance = 0.01
_C.model.router_loss_weights.z = 0.001
_C.model.router_loss_weights.collapse = 0.0
_C.model.router_loss_weights.batch_entropy = 0.0
_C.model.label_smoothing = 0.0
_C.model.input_shape = [3, 224, 224]      # [C, H, W] of one input, for tools/analyze_model.py
_C.model.pretrained = ""                  # optional checkpoint whose model weights are loaded before training
# pce.convert on top of the task's model (any backbone, PCE or dense twin): each entry
# {target, num_experts, top_k, grid | patch_size, router, router_kwargs{}, balance, execution, noise, ...} puts an
# upcycled pce.PCEConv2d in place of the nn.Conv2d modules `target` selects (a module path of the built model, a
# glob, or a list of them); the other options are PCEConv2d's (pce.engine.validation.convert_options() lists them).
_C.model.convert = []
# timm's CondConv2d (per-image kernel mixing, pce.models.condconv) in place of the nn.Conv2d modules each entry
# {target, num_experts, init_std} selects: the outside baseline of a model.convert study at the same place.
_C.model.condconv = []

# ----------------------------------------------------------------------------------------------- data
_C.data = CN()


def _split() -> CN:
    s = CN()
    s.name = ""                            # registered dataset name ("" = no such split)
    s.kwargs = CN(new_allowed=True)        # keyword arguments of the dataset (root, split, size, ...)
    s.transform = CN()
    s.transform.name = ""                  # registered transform name ("" = none)
    s.transform.kwargs = CN(new_allowed=True)
    return s


_C.data.train = _split()
_C.data.val = _split()
_C.data.test = _split()                   # optional; tools/eval.py and the final test use val when empty
_C.data.root = ""                         # when set, passed as ``root`` to every split's dataset
_C.data.obtain_hint = ""                  # appended to "dataset not found" errors: how to get the data
_C.data.batch_size = 64                   # per process
_C.data.eval_batch_size = 0               # 0: 2 x batch_size
_C.data.num_workers = 2
_C.data.pin_memory = True                 # only used on CUDA
_C.data.drop_last = False
_C.data.max_input_size = 4096             # longest image side (px) tools/infer.py runs; larger inputs are refused
# Mixup / CutMix of the classification task's training batches (timm.data.Mixup, its arguments; the soft targets
# carry model.label_smoothing and are scored with timm.loss.SoftTargetCrossEntropy). Off while both alphas are 0
# (and cutmix_minmax is None); an odd batch (the last one without data.drop_last) is trained unmixed.
_C.data.mixup = CN()
_C.data.mixup.mixup_alpha = 0.0           # Beta(alpha, alpha) of the mixup lambda (0: no mixup)
_C.data.mixup.cutmix_alpha = 0.0          # Beta(alpha, alpha) of the cutmix lambda (0: no cutmix)
_C.data.mixup.cutmix_minmax = None        # [min, max] box side fraction instead of cutmix_alpha
_C.data.mixup.prob = 1.0                  # probability of mixing a batch (or element / pair)
_C.data.mixup.switch_prob = 0.5           # probability of cutmix instead of mixup when both are on
_C.data.mixup.mode = "batch"              # batch | pair | elem: one lambda per batch / pair / element
_C.data.mixup.correct_lam = True          # cutmix: lambda from the clipped box area

# ------------------------------------------------------------------------------------------ optimizer
_C.optimizer = CN()
_C.optimizer.type = "sgd"
_C.optimizer.lr = 0.1                     # base learning rate (before schedule and phase multipliers)
_C.optimizer.weight_decay = 1e-4
_C.optimizer.norm_bias_decay = False      # also decay 1-d parameters (norms, biases)
_C.optimizer.momentum = 0.9               # sgd
_C.optimizer.nesterov = False             # sgd
_C.optimizer.betas = (0.9, 0.999)         # adam / adamw
_C.optimizer.eps = 1e-8                   # adam / adamw
_C.optimizer.grad_clip = 0.0              # max global grad norm; 0 disables
# training at scale (docs/DISTRIBUTED.md): N micro-batches of data.batch_size per optimizer step (loss / N, DDP
# no_sync on all but the last); lr schedule, iteration counts, grad_clip and EMA step once per optimizer step
_C.optimizer.accumulate_steps = 1
# lr = optimizer.lr * total batch / base_batch_size, total batch = data.batch_size x world size x accumulate_steps
# (MMEngine's auto_scale_lr); logged once at start
_C.optimizer.auto_scale_lr = CN()
_C.optimizer.auto_scale_lr.enable = False
_C.optimizer.auto_scale_lr.base_batch_size = 0    # the total batch optimizer.lr was tuned for (> 0 when enabled)

# ------------------------------------------------------------------------------------------- schedule
_C.schedule = CN()
_C.schedule.epochs = 10
_C.schedule.iters_per_epoch = 0           # 0: full passes over the data; N: at most N iterations per epoch
_C.schedule.max_iters = 0                 # 0: no limit; N: stop after N iterations in total (smoke tests)
_C.schedule.lr_scheduler = CN()
_C.schedule.lr_scheduler.type = "cosine"  # cosine | multistep | constant | linear
_C.schedule.lr_scheduler.warmup_epochs = 0.0
_C.schedule.lr_scheduler.warmup_factor = 0.001   # lr multiplier at the first iteration of the warmup
_C.schedule.lr_scheduler.min_lr_factor = 0.0     # cosine / linear end value (x base lr)
_C.schedule.lr_scheduler.milestones = []         # multistep: epochs at which lr is multiplied by gamma
_C.schedule.lr_scheduler.gamma = 0.1

# --------------------------------------------------------------------------------------------- phases
# Each entry: {name, epochs, router_override, router_override_kwargs, keys_trainable, attention, lr_mult, upcycle}:
# the fields of pce.engine.phase.Phase, which validates them (router_override_kwargs, issue #26: the override
# router's arguments, e.g. dict(reduce="sum") for router_override="all_experts").
# Empty: one phase over all epochs that changes nothing. The phase epochs must add up to schedule.epochs;
# the last phase may say epochs=-1 ("the rest").
_C.phases = []

# -------------------------------------------------------------------------------------------- runtime
_C.runtime = CN()
_C.runtime.work_dir = ""                  # "": work_dirs/<config file stem>
_C.runtime.seed = 0
_C.runtime.deterministic = False
_C.runtime.device = "auto"                # auto | cpu | cuda
_C.runtime.num_threads = 0                # >0: torch (and K-Means) CPU threads per process; 0: library defaults
_C.runtime.amp = "none"                   # none | bf16 (CUDA or CPU autocast) | fp16 (CUDA only; fp32 on CPU)
_C.runtime.channels_last = False
_C.runtime.ema = 0.0                      # decay of an EMA of the weights (0: off); evaluation uses it
_C.runtime.log_interval = 20              # iterations between log lines / TensorBoard points
_C.runtime.eval_interval = 1              # epochs between evaluations (0: only at the end)
_C.runtime.checkpoint_interval = 1        # epochs between latest.pth writes (the last epoch always writes)
# lean checkpoints (issue #24; names of MMEngine's CheckpointHook where they fit): best.pth holds the model
# weights only (the EMA weights when runtime.ema > 0) with expert_structure / phase / epoch / best / config;
# latest.pth and epoch_N.pth hold the full resumable state
_C.runtime.best_weights_only = True       # False: best.pth is a full training state, as before issue #24
_C.runtime.save_epoch_ckpts = False       # True: each latest.pth write is also kept as epoch_N.pth (whole epochs)
_C.runtime.max_keep_ckpts = -1            # epoch_N.pth kept, the oldest deleted first (<= 0: all)
_C.runtime.kmeans_init_batches = 8        # training batches for the K-Means key initialisation (0: skip)
_C.runtime.final_test = True              # build data.test and score it after the last epoch (False: leave the
                                          # test split to tools/eval.py: training never reads it, e.g. Camelyon)
_C.runtime.tensorboard = True
_C.runtime.progress_bar = True            # tqdm bar (rank 0, interactive terminals)
_C.runtime.find_unused_parameters = True  # DDP: router overrides / top-k leave parameters unused
# MLflow tracking (optional dependency: pip install mlflow-skinny; pce.engine.tracking): rank 0 logs every scalar of
# metrics.jsonl / TensorBoard (same names and steps), the flattened config as params, tags, config.json and the
# routing-map pictures; a failed write is a warning, never a stopped training.
_C.runtime.mlflow = CN()
_C.runtime.mlflow.enable = False
_C.runtime.mlflow.tracking_uri = ""       # "": a local file store, WORK_DIR/mlruns
_C.runtime.mlflow.experiment = ""         # "": the task name
_C.runtime.mlflow.run_name = ""           # "": the work dir's folder name
_C.runtime.mlflow.log_checkpoint = False  # also upload best.pth (or latest.pth) at the end (large)
_C.runtime.mlflow.tags = CN(new_allowed=True)   # extra run tags {name: value}
# Routing-map pictures (pce.tasks.tracking_hooks.RoutingMapHook): the routing of the first num_images validation
# images drawn like tools/visualize_routing.py, every `interval` epochs and after the last one, into
# WORK_DIR/routing_maps/epoch_<N>/ and to TensorBoard (add_image) and MLflow (artifacts). interval 0: off.
_C.runtime.routing_maps = CN()
_C.runtime.routing_maps.interval = 0
_C.runtime.routing_maps.num_images = 4
_C.runtime.sync_bn = False                # DDP on CUDA: plain BatchNorm layers -> SyncBatchNorm (not experts' own)

# ----------------------------------------------------------------------------------------------- eval
_C.eval = CN()
_C.eval.metric = "top1"                   # key of the evaluator's results that selects best.pth
_C.eval.mode = "max"                      # max | min
_C.eval.topk = (1, 5)

# Allowed values of string options (checked after merging, errors name the key and the file).
CHOICES: Dict[str, Tuple[Any, ...]] = {
    "optimizer.type": ("sgd", "adamw", "adam"),
    "schedule.lr_scheduler.type": ("cosine", "multistep", "constant", "linear"),
    "runtime.amp": ("none", "bf16", "fp16"),
    "runtime.device": ("auto", "cpu", "cuda"),
    "eval.mode": ("max", "min"),
    "data.mixup.mode": ("batch", "pair", "elem"),
}

def get_default_config() -> CN:
    """A fresh, mutable copy of the schema with its defaults."""
    return _C.clone()
