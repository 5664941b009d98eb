"""A config from a file, a URL, a mapping or a value: read within bounds, parsed without
aliases, validated into `FederationConfig`, and any mistake one line naming the file and field."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fedlib.config.federation import FederationConfig
from fedlib.config.sections import ConfigError
from fedlib.redaction import REDACTED


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else ("." if parts else "") + str(item))
    return "".join(parts)


def _describe(source: str, loc: tuple[int | str, ...], msg: str, overridden: Mapping[str, str] | None = None) -> str:
    msg = msg.removeprefix("Value error, ")
    where = _field_path(loc)
    given = overridden or {}
    # An error in a field `--set` gave (or under a name it made up) is the flag's, not the file's.
    setting = next((f for f in given if loc and (f == where or f.startswith(where + ".") or where.startswith(f))), None)
    if setting is not None:
        if "valid tuple" in msg or "valid list" in msg:
            msg = "expected a list" + ("" if given[setting].lstrip().startswith("[") else f": --set '{setting}=[{given[setting]}]'")
        elif "Extra inputs are not permitted" in msg:
            msg = "no such field (check its spelling in the configuration reference)"
        return f"--set {setting}: {msg}" if where == setting else f"--set {setting}: {where}: {msg}"
    # Cross-field checks run on the whole model and start their message with the field they name.
    return f"{source}: {msg}" if not loc else f"{source}: {where}: {msg}"


def parse_config(raw: object, source: str = "<config>", overridden: Mapping[str, str] | None = None) -> FederationConfig:
    """Validate an already-parsed mapping; `source` names it in errors, and `overridden` (field →
    value, from `--set`) the flag instead where the error is in a field the flag set."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return FederationConfig.model_validate(raw)
    except ValidationError as err:
        errors = err.errors()
        # an error inside a list also fails the list's own length check: name only the inside one
        inner = [e for e in errors if not any(o["loc"][: len(e["loc"])] == e["loc"] and o["loc"] != e["loc"] for o in errors)]
        lines = [_describe(source, e["loc"], e["msg"], overridden) for e in inner]
        if len(lines) == 1:
            raise ConfigError(lines[0]) from None
        raise ConfigError(f"{len(lines)} mistakes in the configuration:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> FederationConfig:
    """Read and validate a YAML config, from a file or an fsspec URL (read with this machine's
    own credentials), with `overrides` (`field.path=value`, as `fedlib run --set` takes them)
    applied first; every error message starts with where it came from."""
    overridden = {field: value for field, _, value in (o.partition("=") for o in overrides)}
    return parse_config(raw_config(path, overrides), str(path), overridden)


def raw_config(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """The config's mapping as the file holds it, with `overrides` applied, not yet validated:
    what a flow's `config` parameter takes when the file alone is not the config."""
    if isinstance(path, str) and "://" in path:
        import fsspec

        try:
            with fsspec.open(path, "rb") as handle:
                data = handle.read(MAX_CONFIG_BYTES + 1)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: cannot read configuration ({err})") from None
    else:
        try:
            with Path(path).open("rb") as handle:
                data = handle.read(MAX_CONFIG_BYTES + 1)
        except OSError as err:
            raise ConfigError(f"{path}: cannot read configuration ({err.strerror})") from None
    raw = _read_yaml(data, str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for override in overrides:
        raw = with_override(raw, override)
    return raw


_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def with_override(raw: dict, override: str) -> dict:
    """`raw` with one `field.path=value` set: the path in the config's own dotted form
    (`clouds[0].storage`), the value as YAML (`3`, `null`, `[a, b]`); a copy, `raw` untouched."""
    field, sep, text = override.partition("=")
    steps = [(m.group(1), m.group(2)) for m in _STEP.finditer(field)]
    if not sep or not steps or not _whole(field):
        raise ConfigError(f"--set {override!r}: expected FIELD=VALUE, for example training.rounds=1 or clouds[0].storage=s3://bucket")
    value = _read_yaml(text.encode(), f"--set {field}") if text.strip() else ""
    root: Any = copy.deepcopy(raw)
    node = root
    for i, (key, index) in enumerate(steps):
        last = i == len(steps) - 1
        if key is not None:
            if not isinstance(node, dict):
                raise ConfigError(f"--set {field}: {key!r} is inside something that is not a section")
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {} if steps[i + 1][0] is not None else [])
        else:
            position = int(index)
            if not isinstance(node, list) or position >= len(node):
                raise ConfigError(
                    f"--set {field}: no item [{position}] there (the config has {len(node) if isinstance(node, list) else 0})"
                )
            if last:
                node[position] = value
            else:
                node = node[position]
    return root


def _whole(field: str) -> bool:
    """Whether `field` is nothing but dotted names and [n] indexes."""
    rebuilt = ""
    for m in _STEP.finditer(field):
        rebuilt += ("." if rebuilt and m.group(1) else "") + m.group(0)
    return rebuilt == field


def config_from(value: FederationConfig | dict | str | Path, source: str = "<parameter>") -> FederationConfig:
    """A deployment's `config` parameter: the validated config as data (what the federation
    passes its clients), or the path or fsspec URL of a YAML file. The test-only noise seed
    arrives redacted (`fedlib.redaction`) and is dropped: it never travels."""
    if isinstance(value, FederationConfig):
        return value
    if isinstance(value, dict):
        privacy = value.get("privacy")
        if isinstance(privacy, dict) and privacy.get("noise_seed") == REDACTED:
            value = {**value, "privacy": {k: v for k, v in privacy.items() if k != "noise_seed"}}
        return parse_config(value, source)
    if isinstance(value, str) and value.startswith("{{"):
        # prefect.yaml's `{{ $VAR }}` is filled in when `prefect deploy` runs, and left as written
        # when VAR was unset there: say so rather than look for a file of that name.
        raise ConfigError(
            f"{source}: config is {value!r}, a placeholder `prefect deploy` could not fill in; set the variable it names "
            "to the config's fsspec URL and deploy again"
        )
    return load_config(value)


# A config is a page of settings. Bounds that no real one comes near keep a hostile file (from a
# config URL, or a run's parameter) from costing the aggregator more than it costs to write.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_DEPTH = 32


class _ConfigShapeError(yaml.YAMLError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses aliases and counts nodes and depth while it composes.

    Aliases are where a 500-byte file becomes 10^9 leaves (each `*x` repeats a whole subtree
    without costing a byte), so none are accepted; a config has nothing to share that a few more
    lines cannot write out. Counting while composing stops a file before it is built."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _ConfigShapeError(
                f"line {mark.line + 1}: YAML aliases (*name, <<: *name) are not accepted in a config; write the value out where it is used"
            )
        self._nodes += 1
        if self._nodes > MAX_CONFIG_NODES:
            raise _ConfigShapeError(f"more than {MAX_CONFIG_NODES:,} values; a config is far smaller")
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise _ConfigShapeError(f"nested deeper than {MAX_CONFIG_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _read_yaml(data: bytes, path: str) -> object:
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a page of settings")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _ConfigShapeError as err:
        raise ConfigError(f"{path}: refused: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    finally:
        loader.dispose()
