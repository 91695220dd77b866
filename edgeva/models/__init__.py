"""Model zoo (torchvision, ultralytics) and the task post-processing that turns model
outputs into query results. Importing this package makes ultralytics offline-safe (see
`offline.py`) before anything imports it."""
from .offline import make_ultralytics_offline_safe

make_ultralytics_offline_safe()

from .base import ZooModel  # noqa: E402
from .coco import COCO_NAMES  # noqa: E402
from .device import resolve_device  # noqa: E402
from .errors import ModelLoadError, TaskError, UnknownModelError  # noqa: E402
from .outputs import ClassProbs, Detections, Output  # noqa: E402
from .tasks import Task, build_task  # noqa: E402
from .zoo import build_model, default_input_size, zoo_kind, zoo_names  # noqa: E402

__all__ = [
    "COCO_NAMES", "ClassProbs", "Detections", "ModelLoadError", "Output", "Task", "TaskError",
    "UnknownModelError", "ZooModel", "build_model", "build_task", "make_ultralytics_offline_safe",
    "default_input_size", "resolve_device", "zoo_kind", "zoo_names",
]
