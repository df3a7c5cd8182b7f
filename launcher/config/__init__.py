"""`lalo.yaml`: found in a fixed lookup order, parsed once into frozen, validated models.

Every problem is a ConfigError naming the YAML path (and line when known), e.g.
`lalo.yaml:7: models.qwen.ctx_size: must be >= 128, got 0`.

- `fields`: name patterns, literal types, the frozen section base;
- `sections`: proxy, API keys, activity, resources, engines, supervisor, peers;
- `model`: one entry of `models`;
- `request_params`: a model's request rules (`defaults`, `set`, `limits`, `strip`);
- `server_args`: what a model's `args` and `env` mean to the plan (which are refused);
- `load`: the lookup order, parsing and the checks across sections.
"""

from launcher.config.fields import CONFIG_NAME, EngineKind, KvCacheType
from launcher.config.load import (
    Config,
    LoadedConfig,
    check_model_files,
    find_config_file,
    load_config,
    parse_config,
    resolve_path,
    validate,
)
from launcher.config.model import ModelConfig
from launcher.config.sections import (
    ActivityConfig,
    ApiKey,
    EnginesConfig,
    PeerConfig,
    ProxyConfig,
    ResourcesConfig,
    SupervisorConfig,
    check_peer_url,
)

__all__ = [
    "CONFIG_NAME", "ActivityConfig", "ApiKey", "Config", "EngineKind", "EnginesConfig",
    "KvCacheType", "LoadedConfig", "ModelConfig", "PeerConfig", "ProxyConfig", "ResourcesConfig",
    "SupervisorConfig", "check_model_files", "check_peer_url", "find_config_file", "load_config",
    "parse_config", "resolve_path", "validate",
]
