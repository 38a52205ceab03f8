"""Training engine: Python configs, the task-agnostic trainer, phased PCE training, checkpoints, logging, DDP.

The engine depends on ``pce`` building blocks only; tasks (``pce.tasks``) and datasets (``pce.datasets``) are
passed in by the tools. See :mod:`pce.engine.trainer` for the task adapter protocol.
"""
from pce.engine.checkpoint import (CheckpointManager, atomic_save, capture_rng_state, load_checkpoint, load_model_weights,
                         restore_rng_state)
from pce.engine.config import ConfigError, config_to_dict, dump_config, format_config, load_config, parse_overrides
from pce.engine.defaults import get_default_config
from pce.engine.distributed import DistInfo, cleanup_distributed, get_rank, get_world_size, init_distributed, is_main_process
from pce.engine.ema import build_ema
from pce.engine.optim import build_lr_scheduler, build_optimizer, build_param_scheduler
from pce.engine.phases import Phase, PhaseController, build_phases
from pce.engine.scheduler import PCEScheduler
from pce.engine.trainer import NonFiniteLossError, Trainer, evaluate_checkpoint, evaluate_model, seed_everything

__all__ = [
    "CheckpointManager", "ConfigError", "DistInfo", "NonFiniteLossError", "PCEScheduler", "Phase", "PhaseController",
    "Trainer", "atomic_save", "build_ema", "build_lr_scheduler", "build_optimizer", "build_param_scheduler",
    "build_phases", "capture_rng_state", "cleanup_distributed", "config_to_dict", "dump_config", "evaluate_checkpoint",
    "evaluate_model", "format_config", "get_default_config", "get_rank", "get_world_size", "init_distributed",
    "is_main_process", "load_checkpoint", "load_config", "load_model_weights", "parse_overrides", "restore_rng_state",
    "seed_everything",
]
