"""Preset configs: YAML files under configs/quant/, exposed as dict constants.

A preset file holds `quant_cfg` and `algorithm`, plus `name` (the constant),
`qformat` (its short name on the command line), `description`, and
`exclusions` (a list in `_exclusions.yaml` appended to `quant_cfg`, so the
layers deployments keep in high precision stay unquantized). A user's YAML
file of the same shape works wherever a preset name does.

A preset with `kv_cache: <short name>` is a KV-cache add-on (FP8_KV_CFG,
NVFP4_KV_CFG; `PRESET_INFO[name]["kv_cache"]` and `KV_CACHE_QFORMATS` list
them): it sets only the attention's k/v quantizers and has no `default`
entry, so it composes with any weight/activation config through
`compose_configs` or `with_kv_cache`. Applied on its own like any other
config it leaves every other quantizer as it is; for the KV cache alone,
compose it with a config that turns the rest off:
``with_kv_cache({"quant_cfg": {"default": {"enable": False}}}, "fp8")``.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Dict, Optional, Union

import yaml

from .config import ConfigError, QuantizeConfig, validate_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "quant"
_META_KEYS = {"name", "qformat", "description", "exclusions", "kv_cache"}


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping with quant_cfg and algorithm")
    return data


@functools.lru_cache(maxsize=1)
def _exclusion_lists() -> Dict[str, Dict[str, Any]]:
    return _read_yaml(CONFIG_DIR / "_exclusions.yaml")


def load_config_file(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a YAML config into a plain dict {quant_cfg, algorithm} (validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    return _config_from_data(_read_yaml(path), path)


def _config_from_data(data: Dict[str, Any], path: Path) -> Dict[str, Any]:
    unknown = set(data) - _META_KEYS - {"quant_cfg", "algorithm"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; expected quant_cfg, algorithm, {sorted(_META_KEYS)}")
    if "quant_cfg" not in data:
        raise ConfigError(f"{path}: missing key 'quant_cfg'")
    quant_cfg = dict(data["quant_cfg"] or {})
    exclusions = data.get("exclusions")
    if exclusions:
        lists = _exclusion_lists()
        for name in [exclusions] if isinstance(exclusions, str) else exclusions:
            if name not in lists:
                raise ConfigError(f"{path}: exclusions = {name!r} is not one of {sorted(lists)}")
            for pattern, attrs in lists[name].items():
                quant_cfg.pop(pattern, None)  # re-insert so exclusions come last
                quant_cfg[pattern] = copy.deepcopy(attrs)  # presets must not share entries
    config = {"quant_cfg": quant_cfg, "algorithm": data.get("algorithm", "max")}
    try:
        validate_config(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return config


def _load_presets():
    by_name, by_qformat, info, kv_short = {}, {}, {}, {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        meta = _read_yaml(path)
        config = _config_from_data(meta, path)
        by_name[meta["name"]] = config
        by_qformat[meta["qformat"]] = meta["name"]
        info[meta["name"]] = {"qformat": meta["qformat"], "description": meta.get("description", ""), "path": path}
        if meta.get("kv_cache"):
            if "default" in config["quant_cfg"]:
                raise ConfigError(f"{path}: a KV-cache add-on must not have a 'default' entry (it would reset "
                                  "the config it is composed with)")
            kv_short[str(meta["kv_cache"])] = meta["name"]
            info[meta["name"]]["kv_cache"] = str(meta["kv_cache"])
    return by_name, by_qformat, info, kv_short


PRESETS, QFORMATS, PRESET_INFO, KV_CACHE_QFORMATS = _load_presets()
"""`PRESETS`: configs by constant name; `QFORMATS`: short name -> constant name; `PRESET_INFO`: qformat,
description, path (and `kv_cache` for the add-ons); `KV_CACHE_QFORMATS`: the KV-cache add-ons by the short
name `with_kv_cache` takes ("fp8" -> "FP8_KV_CFG", "nvfp4" -> "NVFP4_KV_CFG")."""


def is_kv_cache_preset(config) -> bool:
    """True when `config` names a KV-cache add-on preset, by constant name or qformat ("FP8_KV_CFG", "fp8_kv")."""
    if not isinstance(config, str):
        return False
    name = config if config in PRESETS else QFORMATS.get(config.lower())
    return name is not None and "kv_cache" in PRESET_INFO[name]


def get_config(config: Union[str, Path, Dict[str, Any], QuantizeConfig]) -> QuantizeConfig:
    """Resolve a preset name ("FP8_DEFAULT_CFG"), qformat ("fp8"), YAML path, dict or QuantizeConfig."""
    if isinstance(config, QuantizeConfig):
        return config
    if isinstance(config, dict):
        return validate_config(copy.deepcopy(config))
    key = str(config)
    if key in PRESETS:
        return validate_config(copy.deepcopy(PRESETS[key]))
    if key.lower() in QFORMATS:
        return validate_config(copy.deepcopy(PRESETS[QFORMATS[key.lower()]]))
    if key.endswith((".yaml", ".yml")) or Path(key).exists():
        return validate_config(load_config_file(key))
    raise ConfigError(
        f"unknown quantization config {key!r}: give a preset ({', '.join(sorted(PRESETS))}), "
        f"a qformat ({', '.join(sorted(QFORMATS))}) or a YAML file path"
    )


def compose_configs(base, *extras) -> QuantizeConfig:
    """`base` with the entries of each of `extras` applied after its own, as one QuantizeConfig.

    Every argument is anything `get_config` takes, e.g. a KV-cache add-on
    by name or qformat ("FP8_KV_CFG", "fp8_kv"). The extras'
    `quant_cfg` entries come after the base's (later entries override
    earlier ones; an extra's key that the base also has replaces it and
    moves to the end). An extra may not have a `default` entry, since
    `default` is applied before everything else and would reset the base.
    The algorithm is the base's; when the base has none (dynamic formats
    such as MX), the first extra's that has one, so static quantizers the
    extras add are calibrated. The arguments are not modified.
    """
    config = get_config(base)
    entries = dict(config.quant_cfg)
    algorithm = config.algorithm
    for i, extra in enumerate(extras):
        part = get_config(extra)
        if "default" in part.quant_cfg:
            shown = extra if isinstance(extra, str) else f"extra config #{i + 1}"
            raise ConfigError(f"compose_configs: {shown!r} has a 'default' entry, which would reset the base "
                              "config; remove it from the config being added")
        for key, value in part.quant_cfg.items():
            entries.pop(key, None)
            entries[key] = value
        if algorithm is None:
            algorithm = part.algorithm
    return QuantizeConfig(quant_cfg=copy.deepcopy(entries), algorithm=copy.deepcopy(algorithm))


def with_kv_cache(config, kv_cache: Optional[str]) -> QuantizeConfig:
    """`config` with its KV cache quantized: `kv_cache` is "fp8", "nvfp4", or "none"/None (config unchanged).

    The attention modules' ``k_bmm_quantizer`` / ``v_bmm_quantizer`` (the
    post-RoPE keys and values a KV cache stores) get the add-on's format;
    see `compose_configs` for how the two configs combine.
    """
    if kv_cache is None or str(kv_cache).lower() == "none":
        return get_config(config)
    key = str(kv_cache).lower()
    if key not in KV_CACHE_QFORMATS:
        raise ConfigError(f"unknown KV-cache format {kv_cache!r}: choose one of "
                          f"{', '.join(sorted(KV_CACHE_QFORMATS))} or none")
    return compose_configs(config, KV_CACHE_QFORMATS[key])
