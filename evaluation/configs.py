"""Task YAML files -> config dataclasses (the original's schema, defaults and field order).

The dataclasses have exactly the original's fields, in its order, so `print(config)` gives the same repr line as
the original's log. Keys may be written snake_case or kebab-case (`micro-batch-size`), as dataclass_wizard
accepted. Unknown keys give one warning per file. Anything else wrong stops with one line naming the file and the
field (a `model.errors.UserError`).
"""
import dataclasses
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional, Type, Union

import yaml

from model.errors import UserError

SAMPLING_STRATEGIES = ("BaseStrategy", "BeamSearchStrategy")


class TaskType(Enum):
    MULTICHOICE = "mul"
    GENERATION = "gen"
    LANGUAGE_MODEL = "lm"
    OTHER = "other"


@dataclass
class BaseConfig:
    name: str  # Task name
    type: TaskType  # Task type
    path: str  # Task data path relative to the data path given on the command line
    module: Optional[str] = None  # Custom task class: "package.module.ClassName"
    metrics: List[str] = field(default_factory=list)  # Metric names, looked up in DEFAULT_METRICS
    use_task_mask: bool = False  # [gMASK] instead of [MASK]
    use_multitask_encoding: bool = False  # Multiple-choice positions of the multi-task encoding
    unidirectional: bool = False  # Causal attention over the context
    max_seq_length: int = 2048  # Tokens per sample
    file_pattern: Union[str, Dict[str, str]] = "**/*.json*"  # A glob, or {group name: glob}
    micro_batch_size: int = 1  # Samples per forward pass

    def __post_init__(self):
        if self.unidirectional and not self.use_task_mask:
            raise ValueError("[MASK] doesn't support unidirectional attention")


@dataclass
class MultiChoiceTaskConfig(BaseConfig):
    metrics: List[str] = field(default_factory=lambda: ["Accuracy"])


@dataclass
class GenerationTaskConfig(BaseConfig):
    metrics: List[str] = field(default_factory=lambda: ["EM", "F1"])
    sampling_strategy: str = "BaseStrategy"
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    min_gen_length: int = 0
    max_gen_length: int = 128


@dataclass
class LanguageModelTaskConfig(BaseConfig):
    metrics: List[str] = field(default_factory=lambda: ["PPL"])
    generation_length: int = 256  # Tokens newly scored in each window


CONFIG_CLASSES = {
    TaskType.MULTICHOICE: MultiChoiceTaskConfig,
    TaskType.GENERATION: GenerationTaskConfig,
    TaskType.LANGUAGE_MODEL: LanguageModelTaskConfig,
    TaskType.OTHER: BaseConfig,
}

# Lower bounds of the integer fields.
_MINIMUM = {"max_seq_length": 4, "micro_batch_size": 1, "num_beams": 1, "no_repeat_ngram_size": 0,
            "min_gen_length": 0, "max_gen_length": 1, "generation_length": 1}


def read_yaml(path: str) -> Dict[str, Any]:
    """The task file as a dict with snake_case keys (a UserError naming the file when it is not one)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"cannot read task config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: malformed YAML: not UTF-8 text ({e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a task config must be a YAML mapping of fields (name, type, path, ...), "
                        f"got {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        name = str(key).strip().replace("-", "_")
        if name in out:
            raise UserError(f"{path}: field '{name}' is given twice (as '{key}' and another spelling)")
        out[name] = value
    return out


def task_type_of(raw: Dict[str, Any], path: str) -> TaskType:
    if "type" not in raw:
        raise UserError(f"{path}: field 'type' is required (mul, gen or lm)")
    value = raw["type"]
    for t in TaskType:
        if value == t.value:
            return t
    raise UserError(f"{path}: field 'type' has unknown task type {value!r}; expected 'mul', 'gen' or 'lm'")


def _check_value(path: str, name: str, value: Any, annotation) -> Any:
    """The field's value converted to its declared type, or a UserError naming the file and field."""
    def fail(expected):
        raise UserError(f"{path}: field '{name}' must be {expected}, got {value!r}")

    if annotation is TaskType:
        return value  # already checked by task_type_of
    if annotation is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        if value < _MINIMUM.get(name, value):
            fail(f"at least {_MINIMUM[name]}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str) or not value:
            fail("a non-empty string")
        return value
    if annotation == Optional[str]:
        if value is not None and (not isinstance(value, str) or not value):
            fail("a dotted class path such as tasks.mmlu.task.MMLU")
        return value
    if annotation == List[str]:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail("a list of metric names")
        return list(value)
    if annotation == Union[str, Dict[str, str]]:
        if isinstance(value, str) and value:
            return value
        if (isinstance(value, dict) and value
                and all(isinstance(k, str) and isinstance(v, str) and v for k, v in value.items())):
            return dict(value)
        fail("a glob string or a mapping of group name to glob")
    raise TypeError(f"unhandled annotation {annotation} for {name}")  # a bug in this module, not user input


def build_config(raw: Dict[str, Any], config_class: Type[BaseConfig], path: str) -> BaseConfig:
    """Validate `raw` (from read_yaml) against `config_class`; warn once about unknown keys."""
    task_type = task_type_of(raw, path)
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        warnings.warn(f"{path}: ignoring unknown field(s) {', '.join(unknown)} "
                      f"(not used by {config_class.__name__})", stacklevel=2)
    kwargs = {"type": task_type}
    for name, f in fields.items():
        if name == "type":
            continue
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{path}: field '{name}' is required")
            continue
        kwargs[name] = _check_value(path, name, raw[name], f.type)
    if kwargs.get("unidirectional") and not kwargs.get("use_task_mask"):
        raise UserError(f"{path}: field 'unidirectional' needs use_task_mask: true "
                        f"([MASK] doesn't support unidirectional attention)")
    config = config_class(**kwargs)
    _check_task_fields(config, path)
    return config


def _check_task_fields(config: BaseConfig, path: str) -> None:
    strategy = getattr(config, "sampling_strategy", None)
    if strategy is not None and strategy not in SAMPLING_STRATEGIES:
        raise UserError(f"{path}: field 'sampling_strategy' must be BaseStrategy or BeamSearchStrategy, "
                        f"got {strategy!r}")
    max_len = config.max_seq_length
    for name, limit in (("max_gen_length", max_len - 3), ("generation_length", max_len - 1)):
        value = getattr(config, name, None)
        if value is not None and value > limit:
            raise UserError(f"{path}: field '{name}' ({value}) must be at most {limit} "
                            f"with max_seq_length {max_len}")


def default_config_class(path: str) -> Type[BaseConfig]:
    return CONFIG_CLASSES[task_type_of(read_yaml(path), path)]


def load_config(path: str, config_class: Optional[Type[BaseConfig]] = None) -> BaseConfig:
    """Read and validate one task YAML; the config class defaults to the one of its `type`."""
    raw = read_yaml(path)
    if config_class is None:
        config_class = CONFIG_CLASSES[task_type_of(raw, path)]
    return build_config(raw, config_class, path)
