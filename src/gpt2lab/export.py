"""Interoperability with ``transformers`` and PEFT, exact or refused.

- :func:`export_peft`: a LoRA classifier folder -> a PEFT adapter for ``GPT2ForSequenceClassification``
  (``adapter_config.json`` + ``adapter_model.safetensors`` under PEFT's key names).
- :func:`export_hf`: a classifier folder (any ``train.mode``) -> a merged
  ``GPT2ForSequenceClassification`` folder; a base checkpoint -> a ``GPT2LMHeadModel`` folder. Both
  with GPT-2's tokenizer files, so ``transformers.pipeline`` / ``from_pretrained`` load them offline.
- :func:`import_peft`: a PEFT adapter trained on GPT-2 sequence classification -> a classifier
  folder that :class:`gpt2lab.Classifier`, the evaluate stage and the MLflow model use.

Names and layouts come from :mod:`gpt2lab.convert`'s tables (``HF_TABLE`` inverted for the body,
``PEFT_LORA_TABLE`` for the adapters). Every tensor is carried over unchanged (fp32) or merged in
fp32, so probabilities agree to float rounding (well within 1e-5); whatever the target has no
place for (a head bias: ``score`` has none; a PEFT adapter without LoRA layers; DoRA, per-layer
ranks, trained biases, ...) raises :class:`ExportError` with one line saying what and what to do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2lab.checkpoint import CONFIG_FILE, MODEL_FILE, CheckpointError, expected_shapes, load_model, read_config
from gpt2lab.classifier import SpamClassifier
from gpt2lab.classifier_io import META_FILE, load_classifier, read_classifier_meta, save_classifier
from gpt2lab.convert import HF_PREFIX, PEFT_LORA_TABLE, PROJECTIONS, from_hf, rename_key, to_hf
from gpt2lab.dataset import CLASS_NAMES
from gpt2lab.errors import Gpt2labError
from gpt2lab.fileio import atomic_dir, write_manifest
from gpt2lab.lora import (
    ADAPTER_FILE,
    LoRAConfig,
    apply_lora,
    is_lora_param,
    lora_state_dict,
    mark_trainable,
    read_adapter_meta,
)
from gpt2lab.model import GPT2Config
from gpt2lab.presets import HF_REPOS, PRESETS
from gpt2lab.tokenizer import EOT_TOKEN, write_hf_tokenizer

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> its LoraModel -> the transformers model
SCORE_KEY = "score.weight"  # GPT2ForSequenceClassification's head: nn.Linear(n_embd, num_labels, bias=False)
# PEFT features gpt2lab's LoRALinear has no counterpart for: refused when on (true, non-empty).
PEFT_MUST_BE_OFF = (
    "use_dora", "lora_bias", "layer_replication", "trainable_token_indices", "target_parameters",
    "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config", "monteclora_config", "kasa_config",
    "velora_config",
)  # fmt: skip
# Initialisations that leave the base weights as they are (PiSSA, OLoRA, LoftQ, ... change them).
PEFT_PLAIN_INITS = (True, False, "gaussian")


class ExportError(Gpt2labError, ValueError):
    """A model cannot be represented exactly in the target format, or a folder is not what was expected."""


# --- small pure helpers -----------------------------------------------------------------------
def target_patterns(modules: list[str], n_layer: int) -> list[str]:
    """The adapted modules (``h.{i}.attn.c_attn``, ...) as LoRA target patterns, in both tools' syntax.

    A projection adapted in every layer is its suffix (``attn.c_attn``: each of the four names is
    unique in GPT-2, so PEFT's and gpt2lab's suffix matching pick exactly those layers); any
    other module is named in full.
    """
    chosen = set(modules)
    whole = [p for p in PROJECTIONS if all(f"h.{i}.{p}" in chosen for i in range(n_layer))]
    rest = sorted(chosen - {f"h.{i}.{p}" for p in whole for i in range(n_layer)})
    return whole + rest


def head_weight(head: Mapping[str, torch.Tensor], source: Path) -> torch.Tensor:
    """The head's weight (2, n_embd); a non-zero bias is refused: ``score`` has no bias."""
    bias = head.get("bias")
    if bias is not None and bool(bias.ne(0).any()):
        raise ExportError(
            f"{source}: the classifier's head has a bias {[round(b, 4) for b in bias.tolist()]}, which "
            "transformers' GPT2ForSequenceClassification (score, no bias) has no place for; "
            "retrain with train.head_bias: false (the default)"
        )
    return head["weight"].float().contiguous()


def module_of(key: str) -> str:
    """``h.1.ln_1.weight`` -> ``h.1.ln_1``."""
    return key.rsplit(".", 1)[0]


def hf_config(cfg: GPT2Config, architecture: str, **extra: Any) -> dict[str, Any]:
    """``config.json`` of a ``transformers`` GPT-2 (``GPT2LMHeadModel``, ...) of size ``cfg``."""
    return {
        "architectures": [architecture],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_ctx,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "tie_word_embeddings": True,
        "dtype": "float32",
        **extra,
    }


def classifier_config(cfg: GPT2Config, labels: list[str]) -> dict[str, Any]:
    """``config.json`` of the merged ``GPT2ForSequenceClassification``: labels, padding, single-label softmax."""
    return hf_config(
        cfg, "GPT2ForSequenceClassification",
        id2label={str(i): label for i, label in enumerate(labels)},
        label2id={label: i for i, label in enumerate(labels)},
        pad_token_id=EOT_TOKEN,  # HF pools the last token that is not this one, as gpt2lab reads the last real token
        problem_type="single_label_classification",
    )  # fmt: skip


def hub_name(base_meta: Mapping[str, Any]) -> str | None:
    """The Hugging Face repository of a pretrained base of a published size, else None."""
    if not base_meta.get("pretrained", False):
        return None
    cfg = GPT2Config.from_dict(base_meta["model"])
    size = (cfg.vocab_size, cfg.n_ctx, cfg.n_embd, cfg.n_layer, cfg.n_head)
    return next((HF_REPOS[n] for n, p in PRESETS.items() if (p.vocab_size, p.n_ctx, p.n_embd, p.n_layer, p.n_head) == size),
                None)  # fmt: skip


def _check_out_dir(out_dir: Path, sources: tuple[Path, ...], marker: str) -> None:
    """Refuse to replace a source, a folder holding one, or a non-empty folder that is not a previous export."""
    out = out_dir.resolve()
    for src in sources:
        if out == src.resolve() or out in src.resolve().parents:
            raise ExportError(f"{out_dir}: that is (or holds) the input {src}; give a new output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / marker).is_file():
        raise ExportError(f"{out_dir}: exists and holds other files (no {marker}); give a new or empty folder")


def _load(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise ExportError(f"{file}: missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{file}: unreadable ({err})") from err


def _save(state: Mapping[str, torch.Tensor], file: Path) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(file), metadata={"format": "pt"})


# --- export -----------------------------------------------------------------------------------
def export_peft(classifier_dir: str | Path, out_dir: str | Path, *, base_model: str | None = None) -> Path:
    """Write a PEFT LoRA adapter for ``GPT2ForSequenceClassification`` from a ``lora`` classifier folder.

    ``adapter_model.safetensors`` holds the LoRA matrices (A (r, in), B (out, r)), ``score.weight``
    (2, n_embd) and any other trained module (``modules_to_save``); ``adapter_config.json`` says
    ``r``, ``lora_alpha``, ``target_modules`` and ``fan_in_fan_out: true`` (GPT-2's Conv1D layers).
    ``base_model`` goes to ``base_model_name_or_path`` (default: ``openai-community/<size>`` for a
    pretrained base of a published size, else unset: export the base with :func:`export_hf`).
    Nothing is merged and the base is not needed. ``last_block`` and ``full`` classifiers train no
    adapters and are refused (:func:`export_hf` represents them).
    """
    src, out_dir = Path(classifier_dir), Path(out_dir)
    meta = read_classifier_meta(src)
    if meta["mode"] != "lora":
        raise ExportError(
            f"{src}: trained with train.mode {meta['mode']}, without LoRA adapters; a PEFT LoRA adapter needs "
            f"LoRA layers: use `gpt2lab export hf {src} OUT_DIR` for a merged transformers model"
        )
    _check_out_dir(out_dir, (src,), PEFT_CONFIG)
    cfg = GPT2Config.from_dict(meta["model"])
    adapter = read_adapter_meta(src)
    lora = _load(src / meta["files"].get("adapter", ADAPTER_FILE))
    trained = _load(src / meta["files"]["trained"]) if "trained" in meta["files"] else {}
    head = head_weight(_load(src / meta["files"]["head"]), src)

    lora = _without_lm_head(lora, src)
    lora_modules = sorted({module_of(k) for k in lora})
    state = {}
    for key, tensor in lora.items():
        try:
            state[PEFT_PREFIX + HF_PREFIX + rename_key(key, PEFT_LORA_TABLE, inverse=True)] = tensor.float()
        except CheckpointError as err:
            raise ExportError(
                f"{src}: LoRA on {module_of(key)!r}, which GPT2ForSequenceClassification has no place for "
                f"(PEFT adapts the blocks' projections {', '.join(PROJECTIONS)})"
            ) from err
    saved = _modules_to_save(trained, cfg, src, lora_modules)
    state.update({PEFT_PREFIX + k: v for k, v in to_hf(trained).items()})
    state[PEFT_PREFIX + SCORE_KEY] = head
    alpha = float(adapter["alpha"])
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_model or hub_name({**meta["base"], "model": meta["model"]}),
        "revision": None,
        "r": int(adapter["rank"]),
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(adapter.get("dropout", 0.0)),
        "target_modules": [
            p if p in PROJECTIONS else HF_PREFIX + p for p in target_patterns(lora_modules, cfg.n_layer)
        ],
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores (in, out); PEFT merges with a transpose
        "modules_to_save": ["score", *(HF_PREFIX + m for m in saved)],
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    with atomic_dir(out_dir) as tmp:
        _save(state, tmp / PEFT_WEIGHTS)
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        write_manifest(tmp)  # last: the export's bytes can be verified like any model folder's
    return out_dir


def _without_lm_head(lora: Mapping[str, torch.Tensor], src: Path) -> dict[str, torch.Tensor]:
    """The adapters without ``lm_head``'s (a ``*`` target adapts it too) when it is zero, else refused.

    The classifier never computes ``lm_head``, so training never moves its B from zero: such an
    adapter changes nothing, and GPT2ForSequenceClassification has no LM head to put it on.
    """
    if "lm_head.lora_b" in lora and bool(lora["lm_head.lora_b"].ne(0).any()):
        raise ExportError(
            f"{src}: a non-zero LoRA update on 'lm_head', which GPT2ForSequenceClassification has no place for"
        )
    return {k: v for k, v in lora.items() if module_of(k) != "lm_head"}


def _modules_to_save(
    trained: Mapping[str, torch.Tensor], cfg: GPT2Config, src: Path, lora_modules: list[str]
) -> list[str]:
    """The whole modules the trained tensors make up; PEFT saves a module to save whole, without LoRA."""
    modules = sorted({module_of(k) for k in trained})
    shapes = expected_shapes(cfg)
    for module in modules:
        needed = {k for k in shapes if module_of(k) == module}
        if not needed <= set(trained):
            raise ExportError(f"{src}: only part of {module!r} was trained; PEFT saves whole modules")
        if module in lora_modules:
            raise ExportError(f"{src}: {module!r} is both trained and LoRA-adapted; PEFT does one or the other")
    return modules


def export_hf(path: str | Path, out_dir: str | Path, *, base_dir: str | Path | None = None) -> Path:
    """Write a ``transformers`` model folder: a classifier merged, or a base checkpoint as a language model.

    A classifier folder (``classifier.json``; rebuilt on ``base_dir``, default the base it records)
    becomes ``GPT2ForSequenceClassification`` with LoRA merged, ``id2label`` from its labels and
    ``pad_token_id`` 50256. A base checkpoint folder (gpt2lab's ``config.json``) becomes
    ``GPT2LMHeadModel`` (``lm_head`` tied to ``wte``, so not stored). Both get ``config.json``,
    ``model.safetensors`` and GPT-2's tokenizer files.
    """
    path, out_dir = Path(path), Path(out_dir)
    if (path / META_FILE).is_file():
        meta = read_classifier_meta(path)
        model = load_classifier(path, base_dir, merged=True)
        body = {k: v for k, v in model.body.state_dict().items() if k != "lm_head.weight" and not is_lora_param(k)}
        state = {**to_hf(body), SCORE_KEY: head_weight(model.head.state_dict(), path)}
        config = classifier_config(model.body.config, meta["labels"])
        max_length, sources = model.max_length, (path, Path(base_dir or meta["base"]["path"]))
    elif (path / CONFIG_FILE).is_file() and "model" in read_config(path):
        body_model = load_model(path)
        state = to_hf({k: v for k, v in body_model.state_dict().items() if k != "lm_head.weight"})
        config = hf_config(body_model.config, "GPT2LMHeadModel")
        max_length, sources = body_model.config.n_ctx, (path,)
    else:
        raise ExportError(
            f"{path}: neither a classifier folder ({META_FILE}) nor a gpt2lab base checkpoint ({CONFIG_FILE} "
            "with a model section); give the folder the train stage or `gpt2lab convert` wrote"
        )
    _check_out_dir(out_dir, sources, CONFIG_FILE)
    with atomic_dir(out_dir) as tmp:
        _save(state, tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        write_hf_tokenizer(tmp, model_max_length=max_length)
        write_manifest(tmp)  # last: the export's bytes can be verified like any model folder's
    return out_dir


# --- import -----------------------------------------------------------------------------------
def read_peft_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``adapter_config.json`` and the tensors of a PEFT adapter folder (names without PEFT's prefix)."""
    folder = Path(adapter_dir)
    if not (folder / PEFT_CONFIG).is_file():
        raise ExportError(
            f"{folder}: no {PEFT_CONFIG}; not a PEFT adapter folder (PeftModel.save_pretrained writes one)"
        )
    if not (folder / PEFT_WEIGHTS).is_file():
        why = "; not a PEFT adapter folder"
        if (folder / "adapter_model.bin").is_file():
            why = "; only adapter_model.bin (pickle), which gpt2lab never loads: save it with safe_serialization=True"
        raise ExportError(f"{folder}: no {PEFT_WEIGHTS}{why}")
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{folder / PEFT_CONFIG}: not valid JSON ({err})") from err
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in _load(folder / PEFT_WEIGHTS).items()}
    return config, state


def check_peft_config(config: Mapping[str, Any], folder: Path) -> tuple[int, float]:
    """Refuse what gpt2lab's LoRA cannot represent; return (rank, alpha) with ``alpha / rank`` PEFT's scaling."""
    if config.get("peft_type") != "LORA":
        raise ExportError(f"{folder}: peft_type {config.get('peft_type')!r}; gpt2lab imports LoRA adapters only")
    if config.get("task_type") not in ("SEQ_CLS", None):  # None: checked by the score head it must hold
        raise ExportError(
            f"{folder}: task_type {config.get('task_type')!r}; gpt2lab imports sequence-classification adapters "
            "(SEQ_CLS, GPT2ForSequenceClassification) only"
        )
    if config.get("bias", "none") != "none":
        raise ExportError(
            f"{folder}: bias {config['bias']!r} trains the base's biases; gpt2lab imports bias 'none' only"
        )
    for key in PEFT_MUST_BE_OFF:
        if config.get(key):
            raise ExportError(f"{folder}: {key} = {config[key]!r}: gpt2lab's LoRA has no counterpart; train without it")
    if config.get("init_lora_weights", True) not in PEFT_PLAIN_INITS:
        raise ExportError(
            f"{folder}: init_lora_weights {config['init_lora_weights']!r} changes the base weights; convert the "
            "adapter to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)"
        )
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    for key, value in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        other = {k: v for k, v in (config.get(key) or {}).items() if v != value}
        if other:
            raise ExportError(f"{folder}: {key} {other}: gpt2lab's adapters share one rank and alpha")
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r); gpt2lab by alpha / r
    return rank, alpha


def split_peft_state(
    state: Mapping[str, torch.Tensor], folder: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """PEFT tensors -> (canonical LoRA matrices, canonical trained body tensors, score weight)."""
    lora, body, score = {}, {}, None
    for key, tensor in state.items():
        if key == SCORE_KEY:
            score = tensor.float()
        elif ".lora_" in key:
            try:
                lora[rename_key(key.removeprefix(HF_PREFIX), PEFT_LORA_TABLE)] = tensor.float()
            except CheckpointError as err:
                raise ExportError(f"{folder}: {key}: gpt2lab's LoRA adapts only the blocks' projections") from err
        elif key.startswith(HF_PREFIX):
            try:
                body.update(from_hf({key: tensor}))
            except CheckpointError as err:
                raise ExportError(f"{folder}: {key}: not a GPT-2 tensor") from err
        else:
            raise ExportError(f"{folder}: tensor {key!r}: not part of GPT2ForSequenceClassification")
    if score is None:
        raise ExportError(
            f"{folder}: no trained head (score.weight): the adapter was saved without it, so the classifier "
            "would be random; train with task_type SEQ_CLS (or modules_to_save=['score']) and save again"
        )
    if not lora:
        raise ExportError(f"{folder}: no LoRA matrices (lora_A/lora_B) in {PEFT_WEIGHTS}")
    return lora, body, score


def import_peft(adapter_dir: str | Path, base_dir: str | Path, out_dir: str | Path) -> Path:
    """Turn a PEFT LoRA adapter for ``GPT2ForSequenceClassification`` into a gpt2lab classifier folder.

    ``base_dir`` is the gpt2lab base checkpoint of the GPT-2 the adapter was trained on (convert a
    transformers model with ``gpt2lab convert``); the classifier folder records it as its base.
    LoRA matrices become a ``lora`` adapter (targets from :func:`target_patterns`), ``score`` the
    head (no bias) and any other module PEFT saved (``modules_to_save``) trained body tensors.
    Messages are read up to the base's context length.
    """
    folder, base_dir, out_dir = Path(adapter_dir), Path(base_dir), Path(out_dir)
    config, state = read_peft_adapter(folder)
    rank, alpha = check_peft_config(config, folder)
    lora, trained, score = split_peft_state(state, folder)
    _check_out_dir(out_dir, (folder, base_dir), META_FILE)
    body = load_model(base_dir)
    cfg = body.config
    if tuple(score.shape) != (len(CLASS_NAMES), cfg.n_embd):
        raise ExportError(
            f"{folder}: score.weight has shape {tuple(score.shape)}; gpt2lab's classifier needs "
            f"({len(CLASS_NAMES)}, {cfg.n_embd}): two labels ({', '.join(CLASS_NAMES)}) on this base's width"
        )
    modules = sorted({module_of(k) for k in lora})
    lora_cfg = LoRAConfig(
        rank, alpha, float(config.get("lora_dropout", 0.0)), tuple(target_patterns(modules, cfg.n_layer))
    )
    try:
        apply_lora(body, lora_cfg)
    except Gpt2labError as err:
        raise ExportError(f"{folder}: the adapter does not fit the base {base_dir} ({err})") from err
    _fit(body.state_dict(), {**lora, **trained}, folder, base_dir)
    if set(lora_state_dict(body)) != set(lora):  # a safety net: target_patterns names exactly these modules
        raise ExportError(f"{folder}: gpt2lab's LoRA targets {lora_cfg.targets} do not reproduce the adapter")
    model = SpamClassifier(body, len(CLASS_NAMES), head_bias=False)
    with torch.no_grad():
        model.load_state_dict({f"body.{k}": v for k, v in {**lora, **trained}.items()}, strict=False)
        model.head.weight.copy_(score)
    # Trainable as PEFT trained it: the adapters, the head and its other modules to save (saved as trained tensors).
    mark_trainable(model, lora=True, prefixes=("head", *sorted({f"body.{module_of(k)}" for k in trained})))
    extra = {"imported_from": {"format": "peft", "path": str(folder),
                               "base_model_name_or_path": config.get("base_model_name_or_path")}}  # fmt: skip
    return save_classifier(model, out_dir, mode="lora", base_dir=base_dir, lora=lora_cfg, extra=extra)


def _fit(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], folder: Path, base_dir: Path) -> None:
    for key, tensor in state.items():
        if key not in own or tuple(own[key].shape) != tuple(tensor.shape):
            want = tuple(own[key].shape) if key in own else "no such tensor"
            raise ExportError(
                f"{folder}: {key} has shape {tuple(tensor.shape)}, the base {base_dir} needs {want}; "
                "import it on the GPT-2 it was trained on"
            )
