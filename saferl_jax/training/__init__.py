"""Training loops over many seeds, one driver, safe checkpoints (floor 3).

Every loop (`opl.train`, `train_ranker`, `finetune`, `pretrain`, `train_classifier`) hands a
step function to the one driver (`driver.run`), which owns the seed axis, sharding, compiled
chunks of steps, evaluation, finiteness checks, progress, checkpoints (orbax) and resume.
"""

from saferl_jax.training.classifier import TrainedClassifier, train_classifier
from saferl_jax.training.driver import TrainResult, TrainState
from saferl_jax.training.finetuning import Sampling, finetune
from saferl_jax.training.opl import train as train_policy
from saferl_jax.training.pretraining import PretrainResult, pretrain
from saferl_jax.training.ranker import train_ranker

__all__ = ["PretrainResult", "Sampling", "TrainResult", "TrainState", "TrainedClassifier",
           "finetune", "pretrain", "train_classifier", "train_policy", "train_ranker"]
