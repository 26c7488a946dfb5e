"""Configuration: frozen dataclasses, strict validation, the precedence merge, hashing.

Precedence, lowest to highest:

1. the method's ``HParams`` defaults (balancemm/catalog/methods.py) and the dataclass defaults below;
2. the dataset protocol, ``balancemm/configs/datasets/<dataset>.yaml`` — identical for every method;
3. a user file (``--config my.yaml``);
4. ``--set a.b=value`` on the command line.

The merged tree is validated the nanoGPT way: an unknown key is an error with a close-match
suggestion, types must match, ranges are checked, and ``0`` / ``false`` are real values. The result
is a frozen :class:`RunConfig`; its canonical JSON is saved with each run and hashed into the run id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from balancemm.catalog import DATASET_OPTIONS, ENCODER_OPTIONS, FUSION_NAMES, METHOD_HPARAMS
from balancemm.errors import ConfigError
from balancemm.schema import coerce, parse, resolve_name, rng, show, to_dict

SECTIONS = ("run", "method", "data", "model", "train")
#: Bounds on what a YAML document may build (a config, a sweep spec, a --set value): mappings and lists
#: nested at most this deep (deeper, parsing and every recursive merge would exhaust the stack) ...
MAX_DEPTH = 32
#: ... and at most this many values once aliases are expanded (a few hundred bytes of nested aliases
#: expand to billions of values, and printing or merging them takes gigabytes of memory).
MAX_VALUES = 100_000

# ----------------------------------------------------------------------------------------------
# The fixed part of the schema: model, optimiser, schedule and training protocol


@dataclass(frozen=True)
class EncoderConfig:
    """One modality's encoder: a registered encoder name plus that encoder's own options."""

    name: str
    options: Any = None

    @classmethod
    def _parse(cls, data: Mapping[str, Any], path: str) -> EncoderConfig:
        if "name" not in data:
            raise ConfigError(f"{path}: missing key 'name'; valid encoders: {', '.join(ENCODER_OPTIONS.names())}")
        key = resolve_name(ENCODER_OPTIONS, coerce(data["name"], str, f"{path}.name"), f"{path}.name")
        options_cls = ENCODER_OPTIONS.get(key)
        rest = {k: v for k, v in data.items() if k != "name"}
        return cls(key, parse(options_cls, rest, path))

    def _to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **to_dict(self.options)}


def _parse_encoders(raw: Any, path: str) -> dict[str, EncoderConfig]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping modality -> encoder, got {show(raw)}")
    encoders = {}
    for m, v in raw.items():
        where = f"{path}.{str(m)[:100]}"
        if v is not None and not isinstance(v, Mapping):
            raise ConfigError(f"{where}: expected a mapping with the encoder's name and options, got {show(v)}")
        encoders[str(m)] = parse(EncoderConfig, v or {}, where)
    return encoders


def _parse_fusion(raw: Any, path: str) -> str:
    return resolve_name(FUSION_NAMES, coerce(raw, str, path), path)


@dataclass(frozen=True)
class ModelConfig:
    """How the multimodal classifier is composed: encoders, fusion head and unimodal heads."""

    encoders: dict[str, EncoderConfig] = field(default_factory=dict, metadata={"parse": _parse_encoders})
    fusion: str = field(default="concat", metadata={"parse": _parse_fusion})
    # Per-modality logits: "slice" = W_m·h_m + b/M from the fusion head (OGM-GE / BalanceMM
    # convention), "linear" = separate unimodal heads, "auto" = slice where the fusion allows it.
    unimodal_heads: Literal["auto", "slice", "linear"] = "auto"
    # How a masked modality is removed: zero its pooled feature (default; lets the Shapley metric
    # encode once per batch) or zero its input tensor (BalanceMM parity; encoders and BN still run).
    mask: Literal["feature", "input"] = "feature"


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = field(default=1e-3, metadata=rng(gt=0))
    momentum: float = field(default=0.9, metadata=rng(ge=0, lt=1))  # SGD only
    weight_decay: float = field(default=1e-4, metadata=rng(ge=0))


@dataclass(frozen=True)
class SchedulerConfig:
    name: Literal["step", "none"] = "step"
    step_size: int = field(default=30, metadata=rng(ge=1))  # epochs
    gamma: float = field(default=0.1, metadata=rng(gt=0))


@dataclass(frozen=True)
class TrainConfig:
    """The training protocol: identical for every method on a dataset (paper §5.2)."""

    epochs: int = field(default=70, metadata=rng(ge=1))
    batch_size: int = field(default=64, metadata=rng(ge=1))
    eval_batch_size: int = field(default=256, metadata=rng(ge=1))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    grad_clip: float = field(default=0.0, metadata=rng(ge=0))  # max grad norm; 0 = off
    select_metric: Literal["accuracy", "macro_f1"] = "accuracy"  # on the validation split
    # FLOP counting (metrics/flops.py): exact | sampled (first steps of each epoch counted, the rest
    # extrapolated per phase) | off. Recorded in every summary.
    flops: Literal["exact", "sampled", "off"] = "sampled"
    flops_sample_steps: int = field(default=3, metadata=rng(ge=1))
    num_workers: int = field(default=0, metadata=rng(ge=0))
    # Mixed precision (balancemm/precision.py): auto = bf16 on a GPU that computes in bf16, fp32
    # elsewhere; fp16 adds loss scaling. The precision actually used is in every summary.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # true: deterministic algorithms, no cuDNN autotuning, no TF32 (bitwise reruns on one machine);
    # false: cuDNN autotuning and TF32 matrix products on a GPU, for speed.
    deterministic: bool = True
    channels_last: bool = False  # 2-D convolution encoders in channels-last memory format (tensor cores)
    compile: bool = False  # torch.compile each encoder's forward
    sync_bn: bool = False  # data-parallel runs on GPUs: BatchNorm statistics over the global batch


@dataclass(frozen=True)
class RunSection:
    method: str = "baseline"
    dataset: str = "embedded"
    seed: int = field(default=0, metadata=rng(ge=0))


@dataclass(frozen=True)
class RunConfig:
    """The fully resolved configuration of one run; frozen, saved, hashed."""

    run: RunSection
    method: Any  # the method's HParams instance
    data: Any  # the dataset's Options instance
    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {name: to_dict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Rebuild a config saved by :meth:`to_dict` (e.g. a run directory's ``config.json``)."""
        # Read back from a file that may be damaged or edited: a missing section is an error, not a KeyError.
        missing = [s for s in SECTIONS if s not in data] if isinstance(data, Mapping) else list(SECTIONS)
        if missing:
            raise ConfigError(
                f"a saved config must hold the sections {', '.join(SECTIONS)}; missing: {', '.join(missing)}"
            )
        run = parse(RunSection, data["run"], "run")
        return cls(
            run=run,
            method=parse(METHOD_HPARAMS.get(run.method), data["method"], "method"),
            data=parse(DATASET_OPTIONS.get(run.dataset), data["data"], "data"),
            model=parse(ModelConfig, data["model"], "model"),
            train=parse(TrainConfig, data["train"], "train"),
        )

    def digest(self) -> str:
        """SHA-256 over the canonical JSON: the identity of the run (device and paths excluded)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Merging sources


class _TooBig(yaml.composer.ComposerError):
    """A YAML document beyond :data:`MAX_DEPTH` or :data:`MAX_VALUES` (or with an alias to itself)."""

    def __init__(self, problem: str, mark: yaml.Mark) -> None:
        super().__init__(None, None, problem, mark)
        self.problem, self.mark = problem, mark


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 scalars: only true/false are booleans, and 1e-3 is a number.

    PyYAML follows YAML 1.1, where ``off``, ``no`` and ``on`` are booleans (so ``train.flops=off``
    would arrive as False) and an exponent without a dot is a string.

    Documents are bounded (:data:`MAX_DEPTH`, :data:`MAX_VALUES`) before any value is built.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise _TooBig(f"nested deeper than {MAX_DEPTH} levels", mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _count_values(node, {}, set())
        return node


def _count_values(node: yaml.Node, counted: dict[int, int], open_: set[int]) -> int:
    """How many values ``node`` stands for once every alias in it is expanded (each shared node is
    counted once per use, computed once); raises :class:`_TooBig` past :data:`MAX_VALUES` or on a cycle."""
    key = id(node)
    if key in counted:
        return counted[key]
    if key in open_:
        raise _TooBig("an alias refers to the node that contains it", node.start_mark)
    open_.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_count_values(child, counted, open_) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_count_values(k, counted, open_) + _count_values(v, counted, open_) for k, v in node.value)
    if total > MAX_VALUES:
        raise _TooBig(f"expands to more than {MAX_VALUES:,} values (aliases)", node.start_mark)
    open_.discard(key)
    counted[key] = total
    return total


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+.0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects, bounded size


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``override`` wins, including falsy values like 0 and false."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path, sections: Iterable[str] | None = SECTIONS) -> dict[str, Any]:
    """Read a user YAML file holding a mapping; a missing or malformed file is one clear error.

    ``sections`` are the top-level keys allowed (a run config's by default; ``None``: any).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist or is not a file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path} ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    try:
        data = _yaml(text)
    except _TooBig as exc:
        line, column = exc.mark.line + 1, exc.mark.column + 1
        raise ConfigError(f"config file {path} is refused at line {line}, column {column}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    except ValueError as exc:  # a scalar YAML accepts that Python cannot hold, e.g. an integer of 5000 digits
        raise ConfigError(f"config file {path}: a value cannot be read ({str(exc)[:200]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {show(data)}")
    if sections is None:
        return data
    return check_sections(data, f"config file {path}", list(sections))


def check_sections(data: Mapping[Any, Any], where: str, allowed: list[str]) -> dict[str, Any]:
    """``data`` with every key an allowed section holding a mapping; an empty section (``train:``, None)
    means nothing set there and is left out, so it never replaces a section of a lower source."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown section {show(key)}; allowed: {', '.join(allowed)}")
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: section {key} must be a mapping of its keys, not {show(value)}")
        out[key] = value
    return out


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``["train.epochs=5", "method.alpha=0.5"]`` → nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {show(item)}: expected key=value, e.g. --set train.epochs=5")
        parts = key.strip().split(".")
        if parts[0] not in SECTIONS or len(parts) < 2:
            raise ConfigError(
                f"--set {show(item)}: the key must start with a section ({', '.join(SECTIONS)}), e.g. train.epochs"
            )
        if len(parts) > MAX_DEPTH:
            raise ConfigError(f"--set {show(item)}: the key is nested deeper than {MAX_DEPTH} levels")
        try:
            value = _yaml(raw) if raw.strip() else ""
        except _TooBig as exc:
            raise ConfigError(f"--set {show(item)}: the value is refused: {exc.problem}") from None
        except (yaml.YAMLError, ValueError):
            value = raw  # not YAML (or a number Python cannot hold): the text itself, as typed
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {show(item)}: {part} is set twice with different shapes")
        node[parts[-1]] = value
    return out


def protocol_yaml(dataset: str) -> dict[str, Any]:
    """A dataset's protocol (sections data, model, train): the packaged file of a built-in, or the mapping
    a dataset registered outside the package gave as ``protocol=`` (it has no file in the package)."""
    given = DATASET_OPTIONS.entry(dataset).meta.get("protocol")
    if given is not None:
        return check_sections(given, f"the protocol registered with dataset {dataset}", ["data", "model", "train"])
    text = (resources.files("balancemm") / "configs" / "datasets" / f"{dataset}.yaml").read_text()
    return _yaml(text) or {}


def resolve_config(
    method: str | None = None,
    dataset: str | None = None,
    *,
    config_file: str | Path | None = None,
    sets: Iterable[str] = (),
    overrides: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> RunConfig:
    """Merge every source into a validated :class:`RunConfig` (see the module docstring).

    ``overrides`` is the programmatic twin of ``sets``: a nested mapping merged last.
    """
    user = load_yaml(config_file) if config_file is not None else {}
    cli = deep_merge(parse_sets(sets), check_sections(overrides or {}, "overrides", list(SECTIONS)))
    run_raw = deep_merge(deep_merge({"dataset": "embedded", "seed": 0}, user.get("run", {})), cli.get("run", {}))
    if method is not None:
        run_raw["method"] = method
    if dataset is not None:
        run_raw["dataset"] = dataset
    if seed is not None:
        run_raw["seed"] = seed
    if "method" not in run_raw:
        raise ConfigError(f"no method given; use --method NAME, one of {', '.join(METHOD_HPARAMS.names())}")
    run = parse(RunSection, run_raw, "run")
    run = dataclasses.replace(
        run, method=resolve_name(METHOD_HPARAMS, run.method), dataset=resolve_name(DATASET_OPTIONS, run.dataset)
    )

    protocol = protocol_yaml(run.dataset)
    merged: dict[str, Any] = {}
    for source in (protocol, user, cli):
        merged = deep_merge(merged, {k: v for k, v in source.items() if k != "run"})

    hparams: Any = parse(METHOD_HPARAMS.get(run.method), merged.get("method", {}), "method")
    data: Any = parse(DATASET_OPTIONS.get(run.dataset), merged.get("data", {}), "data")
    model = parse(ModelConfig, merged.get("model", {}), "model")
    train = parse(TrainConfig, merged.get("train", {}), "train")
    modalities = DATASET_OPTIONS.entry(run.dataset).meta.get("modalities")
    if modalities is None:  # a dataset registered outside the package without declaring them
        raise ConfigError(f"dataset {run.dataset} was registered without modalities=(...) (its sorted modality names)")
    missing = [m for m in modalities if m not in model.encoders]
    extra = [m for m in model.encoders if m not in modalities]
    if missing or extra:
        raise ConfigError(
            f"model.encoders must name exactly the dataset's modalities ({', '.join(modalities)}); "
            + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(extra)}")
        )
    return RunConfig(run=run, method=hparams, data=data, model=model, train=train)
