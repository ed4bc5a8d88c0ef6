"""Models of MLFD: timm classifiers with multi-level features, the joint teacher T*, and students."""

from mlfd.models.features import LevelModel, check_arch, create_model, load_checkpoint
from mlfd.models.joint import JointTeacher, SpatialResize, pool_size
from mlfd.models.student import Student, make_adaptor

__all__ = [
    "JointTeacher",
    "LevelModel",
    "SpatialResize",
    "Student",
    "check_arch",
    "create_model",
    "load_checkpoint",
    "make_adaptor",
    "pool_size",
]
