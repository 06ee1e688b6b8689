"""Training and evaluation: a run's settings (`config`), the papers' training recipes (`recipes`), its data
(`pipeline`), the loop (`trainer`), whole-image prediction (`predict`), evaluation and metrics (`evaluate`,
`metrics`), atomic checkpoints and models loaded from them (`checkpoint`), torchrun/DDP helpers
(`distributed`) and the demo (`demo`)."""
from ..models import MODEL_NAMES, build_model
from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from .evaluate import EvaluationWriter, evaluate
from .metrics import MSE_NOTE, CountMetrics, game, grid_counts, grid_counts_from_points
from .pipeline import build_datasets, evaluation_dataset
from .predict import final_of, predict_density
from . import recipes
from .config import MODEL_DEFAULTS, PAPER_DEFAULTS, TrainConfig, TrainError, build_config
from .trainer import Trainer, build_run

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
