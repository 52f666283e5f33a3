"""Configs: the strict-YAML loader (`loader`), the sections several stages share (`sections`) and one
dataclass per stage (`stages`). Everything is importable from here: `from prism.config import SFTConfig`."""

from prism.config.loader import (
    ConfigError,
    FieldError,
    YamlMapping,
    check,
    check_choice,
    check_nonempty,
    check_range,
    check_types,
    config_hash,
    config_to_dict,
    deep_merge,
    describe_fields,
    load_config,
    parse_override,
    read_yaml,
    write_config_yaml,
)
from prism.config.sections import (
    HASH_IF_SET,
    ModelConfig,
    OptimConfig,
    PolicyUpdateConfig,
    RolloutConfig,
    StageConfig,
)
from prism.config.stages import (
    RLVR_ALGORITHM_PRESETS,
    AlignConfig,
    BaseConfig,
    DiscWarmupConfig,
    RLVRConfig,
    SFTConfig,
    apply_rlvr_preset,
)

__all__ = [
    "HASH_IF_SET", "ConfigError", "FieldError", "YamlMapping", "check", "check_choice", "check_nonempty",
    "check_range", "check_types", "config_hash", "config_to_dict", "deep_merge", "describe_fields", "load_config",
    "parse_override", "read_yaml", "write_config_yaml", "ModelConfig", "OptimConfig", "PolicyUpdateConfig",
    "RolloutConfig", "StageConfig", "RLVR_ALGORITHM_PRESETS", "AlignConfig", "BaseConfig", "DiscWarmupConfig",
    "RLVRConfig", "SFTConfig", "apply_rlvr_preset",
]
