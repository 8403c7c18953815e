"""Tasks: what a kind of target means for the head, the loss, the metrics and the outputs (see ``base``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ftlab.tasks.base import IGNORE_INDEX, Evaluator, Task
from ftlab.tasks.causal_lm import CausalLMTask, GenerativeTask
from ftlab.tasks.classification import ClassificationTask, RegressionTask
from ftlab.tasks.masked_lm import MaskedLMTask
from ftlab.tasks.multilabel import MultiLabelTask
from ftlab.tasks.token import TokenClassificationTask
from ftlab.utils.errors import ConfigError

# name -> class; the token-classification and multi-label tasks register themselves below when present
TASKS: dict[str, type[Task]] = {
    ClassificationTask.name: ClassificationTask,
    RegressionTask.name: RegressionTask,
    MultiLabelTask.name: MultiLabelTask,
    TokenClassificationTask.name: TokenClassificationTask,
    CausalLMTask.name: CausalLMTask,
    MaskedLMTask.name: MaskedLMTask,
}


def register(cls: type[Task]) -> type[Task]:
    """Add a task class under its ``name`` (a user's own task can be registered the same way)."""
    TASKS[cls.name] = cls
    return cls


def build_task(
    name: str,
    num_labels: int,
    label_names: Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
    class_counts: Sequence[int] | None = None,
) -> Task:
    """The task ``name`` (``data.task``) with the module's options (``module.*``) that it accepts."""
    if name not in TASKS:
        raise ConfigError(f"data.task={name!r} is not a task; use one of {', '.join(sorted(TASKS))}.")
    import inspect

    cls = TASKS[name]
    accepted = inspect.signature(cls.__init__).parameters
    # unset options (null, or label smoothing 0) are the task's defaults; a set one the task lacks is an error
    given = {
        k: v
        for k, v in (options or {}).items()
        if v is not None and not (k == "label_smoothing" and v == 0.0)
    }
    ignored = sorted(k for k in given if k not in accepted)
    if ignored:
        raise ConfigError(
            f"module.{ignored[0]}={given[ignored[0]]!r} does not apply to data.task={name} (its options: "
            f"{', '.join(k for k in accepted if k not in ('self', 'num_labels', 'label_names', 'class_counts'))})."
        )
    kwargs = {k: v for k, v in given.items() if k in accepted}
    if "class_counts" in accepted:
        kwargs["class_counts"] = class_counts
    return cls(num_labels, label_names, **kwargs)


__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "CausalLMTask",
    "ClassificationTask",
    "Evaluator",
    "GenerativeTask",
    "MaskedLMTask",
    "MultiLabelTask",
    "RegressionTask",
    "Task",
    "TokenClassificationTask",
    "build_task",
    "register",
]
