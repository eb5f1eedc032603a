"""Training: the centralized recipe (``train``, ``resume``), one step (``loop``), checkpoints (``state``) and
the mapping from ``train.method`` to mixtures (``methods``)."""

from mixroute.train.centralized import load_run, resume, train
from mixroute.train.loop import TrainingDiverged

__all__ = ["train", "resume", "load_run", "TrainingDiverged"]
