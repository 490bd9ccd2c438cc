"""Preset configs: YAML files under configs/quant/, exposed as dict constants.

A preset file holds `quant_cfg` and `algorithm`, plus `name` (the constant),
`qformat` (its short name on the command line), `description`, and
`exclusions` (a list in `_exclusions.yaml` appended to `quant_cfg`, so the
layers deployments keep in high precision stay unquantized). A user's YAML
file of the same shape works wherever a preset name does.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Dict, Union

import yaml

from .config import ConfigError, QuantizeConfig, validate_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "quant"
_META_KEYS = {"name", "qformat", "description", "exclusions"}


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
    by_name, by_qformat, info = {}, {}, {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        meta = _read_yaml(path)
        config = _config_from_data(meta, path)
        by_name[meta["name"]] = config
        by_qformat[meta["qformat"]] = meta["name"]
        info[meta["name"]] = {"qformat": meta["qformat"], "description": meta.get("description", ""), "path": path}
    return by_name, by_qformat, info


PRESETS, QFORMATS, PRESET_INFO = _load_presets()


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
