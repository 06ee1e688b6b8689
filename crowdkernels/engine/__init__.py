"""Training and evaluation: the loop and the run's settings (`train`), the papers' training recipes
(`recipes`), full-image inference and metrics (`evaluate`, `metrics`), atomic checkpoints (`checkpoint`),
torchrun/DDP helpers (`distributed`) and the demo (`demo`)."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .evaluate import EvaluationWriter, evaluate, evaluation_dataset, final_of, predict_density
from .metrics import MSE_NOTE, CountMetrics, game, grid_counts, grid_counts_from_points
from . import recipes
from .train import (MODEL_DEFAULTS, MODEL_NAMES, PAPER_DEFAULTS, TrainConfig, Trainer, TrainError, build_config,
                    build_datasets, build_model, build_run, model_from_checkpoint)

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
    "evaluate",
    "evaluation_dataset",
    "EvaluationWriter",
    "final_of",
    "predict_density",
    "MSE_NOTE",
    "CountMetrics",
    "game",
    "grid_counts",
    "grid_counts_from_points",
    "MODEL_DEFAULTS",
    "MODEL_NAMES",
    "PAPER_DEFAULTS",
    "recipes",
    "TrainConfig",
    "Trainer",
    "TrainError",
    "build_config",
    "build_datasets",
    "build_model",
    "build_run",
    "model_from_checkpoint",
]
