"""Evaluation of GLM-130B on the original's YAML tasks (see docs/evaluation-data.md)."""
from evaluation.configs import (BaseConfig, GenerationTaskConfig, LanguageModelTaskConfig, MultiChoiceTaskConfig,
                                TaskType, load_config)
from evaluation.dataset import (EvaluationDataset, GenerationTaskDataset, LanguageModelTaskDataset,
                                MultiChoiceTaskDataset)
from evaluation.metrics import DEFAULT_METRICS, qa_evaluate
from evaluation.model import ModelForEvaluation
from evaluation.tasks import (DEFAULT_CLASS, BaseTask, GenerationTask, LanguageModelTask, MultiChoiceTask,
                              RunOptions)
from evaluation.utils import print_rank_0

__all__ = [
    "BaseConfig", "GenerationTaskConfig", "LanguageModelTaskConfig", "MultiChoiceTaskConfig", "TaskType",
    "load_config", "EvaluationDataset", "GenerationTaskDataset", "LanguageModelTaskDataset",
    "MultiChoiceTaskDataset", "DEFAULT_METRICS", "qa_evaluate", "ModelForEvaluation", "DEFAULT_CLASS", "BaseTask",
    "GenerationTask", "LanguageModelTask", "MultiChoiceTask", "RunOptions", "print_rank_0",
]
