"""Training engine: Python configs, the task-agnostic trainer, phased PCE training, checkpoints, logging, DDP.

The engine depends on ``pce`` building blocks only; tasks (``pce.tasks``) and datasets (``pce.datasets``) are
passed in by the tools. The task contract: :class:`pce.engine.task.Task`; trainer hooks: :mod:`pce.engine.hooks`.
"""
from pce.engine.checkpoint import CheckpointManager, atomic_save, capture_rng_state, load_checkpoint, restore_rng_state
from pce.engine.config import (ConfigError, config_to_dict, dump_config, format_config, load_config, load_saved_config,
                               parse_overrides)
from pce.engine.defaults import get_default_config
from pce.engine.distributed import (DistInfo, cleanup_distributed, get_rank, get_world_size, init_distributed,
                                    is_main_process)
from pce.engine.ema import build_ema
from pce.engine.evaluation import evaluate_checkpoint, evaluate_model, evaluation_config
from pce.engine.hooks import HookBase
from pce.engine.optim import build_lr_scheduler, build_optimizer, build_param_scheduler
from pce.engine.phase import Phase, build_phases
from pce.engine.phases import PhaseController
from pce.engine.runtime import NonFiniteLossError, seed_everything
from pce.engine.scheduler import PCEScheduler
from pce.engine.trainer import Trainer
from pce.engine.weights import load_model_weights

__all__ = [
    "CheckpointManager", "ConfigError", "DistInfo", "HookBase", "NonFiniteLossError", "PCEScheduler", "Phase",
    "PhaseController", "Trainer", "atomic_save", "build_ema", "build_lr_scheduler", "build_optimizer",
    "build_param_scheduler", "build_phases", "capture_rng_state", "cleanup_distributed", "config_to_dict",
    "dump_config", "evaluate_checkpoint", "evaluate_model", "evaluation_config", "format_config", "get_default_config", "get_rank",
    "get_world_size", "init_distributed", "is_main_process", "load_checkpoint", "load_config", "load_model_weights",
    "load_saved_config",
    "parse_overrides", "restore_rng_state", "seed_everything",
]
