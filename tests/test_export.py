"""Export to transformers and PEFT, import from PEFT: checked by loading in the real libraries.

Every classifier here is a tiny random GPT-2 with random adapters and head (as if trained), so both
labels occur; probabilities are compared in fp32 within 1e-5.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2lab.checkpoint import MODEL_FILE, load_model, random_checkpoint
from gpt2lab.classifier import build_classifier
from gpt2lab.classifier_io import HEAD_FILE, META_FILE, save_classifier
from gpt2lab.convert import convert_checkpoint
from gpt2lab.export import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    ExportError,
    export_hf,
    export_peft,
    import_peft,
    target_patterns,
)
from gpt2lab.fileio import MANIFEST_FILE, verify_folder, write_manifest
from gpt2lab.inference import Classifier
from gpt2lab.lora import ADAPTER_FILE, ADAPTER_META, LoRAConfig
from gpt2lab.tokenizer import EOT_TOKEN, encode
from tests.conftest import TINY
from tests.helpers import adamw_step

# Texts gpt2lab and transformers read alike: not empty (HF has no token to pool) and no <|endoftext|>.
TEXTS = [
    "You won $1000! Claim now.",
    "see you at lunch?",
    "URGENT! Your mobile No. 07808726822 was awarded a £2,000 Bonus Caller Prize",
    "😀😂 party tonight? 🎉",
    "Привет, как дела? 你好",
    "ok",
]
ALL = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
ATOL = 1e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return random_checkpoint(TINY, 11, tmp_path_factory.mktemp("export") / "base")


@pytest.fixture(scope="module")
def hf_base(base, tmp_path_factory):
    """The base as a transformers GPT2LMHeadModel folder, written by export_hf."""
    return export_hf(base, tmp_path_factory.mktemp("export") / "hf-base")


def make(folder, base, mode="lora", targets=ALL, *, head_bias=False, seed=0):
    """A classifier folder with every trained tensor moved away from its init (adapters, head, blocks)."""
    torch.manual_seed(seed)
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=targets)
    model = build_classifier(base, mode, lora, head_bias=head_bias)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0.0, 0.3)
        model.head.weight.normal_(0.0, 0.2)
    if mode != "lora":
        adamw_step(model)
    return save_classifier(model, folder, mode=mode, base_dir=base, lora=lora if mode == "lora" else None)


def gpt2lab_probs(clf_dir, base=None) -> np.ndarray:
    return Classifier.load(clf_dir, base).predict_proba(TEXTS)


@torch.inference_mode()
def hf_probs(model) -> np.ndarray:
    """Spam probability of each text, one at a time (no padding), from a transformers/peft classifier."""
    model.eval()
    logits = [model(input_ids=torch.tensor([encode(t)])).logits[0] for t in TEXTS]
    return torch.softmax(torch.stack(logits).float(), -1)[:, 1].numpy()


def hf_classifier(hf_base):
    from transformers import GPT2ForSequenceClassification

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "some weights were newly initialized": score, replaced by the adapter
        return GPT2ForSequenceClassification.from_pretrained(hf_base, num_labels=2, pad_token_id=EOT_TOKEN)


def peft_model(hf_base, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_classifier(hf_base), adapter_dir)


# --- target patterns ----------------------------------------------------------------------------
def test_target_patterns_name_projections_of_every_layer_by_suffix_and_the_rest_in_full():
    every = [f"h.{i}.{p}" for i in range(2) for p in ALL]
    assert target_patterns(every, 2) == list(ALL)
    assert target_patterns(["h.0.attn.c_attn", "h.1.attn.c_attn", "h.1.mlp.c_fc"], 2) == ["attn.c_attn", "h.1.mlp.c_fc"]
    assert target_patterns(["h.1.mlp.c_proj"], 2) == ["h.1.mlp.c_proj"]


# --- export peft --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "targets",
    [ALL, ("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",), ("c_proj",), ("h.1.*",),
     ("h.0.attn.c_attn", "h.1.mlp.c_fc")],
)  # fmt: skip
def test_peft_export_loads_in_peft_with_equal_probabilities_and_imports_back_identical(
    tmp_path, base, hf_base, targets
):
    clf = make(tmp_path / "clf", base, targets=targets)
    out = export_peft(clf, tmp_path / "peft")
    assert sorted(p.name for p in out.iterdir()) == [PEFT_CONFIG, PEFT_WEIGHTS, MANIFEST_FILE]
    verify_folder(out)  # an export's bytes can be verified like any model folder's
    config = json.loads((out / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS" and config["fan_in_fan_out"] is True
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["modules_to_save"] == ["score"] and config["base_model_name_or_path"] is None  # random base
    keys = set(load_file(str(out / PEFT_WEIGHTS)))
    assert "base_model.model.score.weight" in keys
    assert all(k.startswith("base_model.model.transformer.h.") for k in keys - {"base_model.model.score.weight"})

    model = peft_model(hf_base, out)
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")
                     and "default" in m.lora_A)  # fmt: skip
    ours = json.loads((clf / ADAPTER_META).read_text())["modules"]
    assert adapted == [f"transformer.{m}" for m in ours]  # PEFT adapts exactly the layers gpt2lab did
    want = gpt2lab_probs(clf)
    np.testing.assert_allclose(hf_probs(model), want, atol=ATOL, rtol=0)
    assert np.ptp(want) > 0.05  # the texts get different answers: the comparison means something

    back = import_peft(out, base, tmp_path / "back")  # gpt2lab -> peft -> gpt2lab: identical tensors
    for file in (ADAPTER_FILE, HEAD_FILE):
        a, b = load_file(str(clf / file)), load_file(str(back / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    meta, again = (json.loads((d / META_FILE).read_text()) for d in (clf, back))
    assert {k: again[k] for k in ("mode", "lora", "labels", "head_bias", "trainable_params", "total_params")} == {
        "mode": "lora", "labels": ["ham", "spam"], "head_bias": False,
        "lora": {**meta["lora"], "targets": target_patterns(ours, TINY.n_layer)},
        "trainable_params": meta["trainable_params"], "total_params": meta["total_params"],
    }  # fmt: skip
    np.testing.assert_array_equal(gpt2lab_probs(back), want)


@pytest.mark.parametrize("mode", ["last_block", "full"])
def test_peft_export_refuses_modes_without_adapters(tmp_path, base, mode):
    clf = make(tmp_path / "clf", base, mode)
    with pytest.raises(ExportError, match=f"train.mode {mode}, without LoRA adapters.*export hf"):
        export_peft(clf, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_lora_on_lm_head_is_left_out_while_zero_and_refused_once_it_moved(tmp_path, base, hf_base):
    """A `*` target adapts lm_head too; training never moves it (the classifier never computes lm_head)."""
    clf = make(tmp_path / "clf", base, targets=("*",))
    lora = load_file(str(clf / ADAPTER_FILE))
    assert "lm_head.lora_b" in lora
    with pytest.raises(ExportError, match="non-zero LoRA update on 'lm_head', which GPT2ForSequenceClassification"):
        export_peft(clf, tmp_path / "peft")
    save_file({**lora, "lm_head.lora_b": torch.zeros_like(lora["lm_head.lora_b"])}, str(clf / ADAPTER_FILE))
    write_manifest(clf)  # a folder made so on purpose, vouched for
    out = export_peft(clf, tmp_path / "peft")
    assert json.loads((out / PEFT_CONFIG).read_text())["target_modules"] == list(ALL)
    np.testing.assert_allclose(hf_probs(peft_model(hf_base, out)), gpt2lab_probs(clf), atol=ATOL, rtol=0)


def test_a_head_bias_is_refused_and_a_zero_one_exported(tmp_path, base, hf_base):
    clf = make(tmp_path / "clf", base, head_bias=True)
    for export in (export_peft, export_hf):
        with pytest.raises(ExportError, match=r"head has a bias .* no place for; retrain with train.head_bias: false"):
            export(clf, tmp_path / export.__name__)
    head = load_file(str(clf / HEAD_FILE))
    save_file({"weight": head["weight"], "bias": torch.zeros(2)}, str(clf / HEAD_FILE))
    write_manifest(clf)  # a folder made so on purpose, vouched for
    np.testing.assert_allclose(hf_probs(peft_model(hf_base, export_peft(clf, tmp_path / "p"))), gpt2lab_probs(clf),
                               atol=ATOL, rtol=0)  # fmt: skip


def test_peft_export_refuses_to_replace_another_folder(tmp_path, base):
    clf = make(tmp_path / "clf", base)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="holds other files"):
        export_peft(clf, tmp_path / "busy")
    with pytest.raises(ExportError, match="is \\(or holds\\) the input"):
        export_peft(clf, tmp_path)
    export_peft(clf, tmp_path / "peft")
    export_peft(clf, tmp_path / "peft")  # a previous export is replaced


# --- export hf ----------------------------------------------------------------------------------
def test_base_exports_as_a_gpt2_lm_head_model_through_the_inverted_table(tmp_path, base, hf_base):
    from transformers import GPT2LMHeadModel

    assert json.loads((hf_base / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    hf = GPT2LMHeadModel.from_pretrained(hf_base).eval()
    ids = torch.tensor([encode("Every effort moves you")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, load_model(base)(ids), atol=1e-4, rtol=0)
    back = convert_checkpoint(hf_base, tmp_path / "back")  # HF -> canonical: the table forwards again
    a, b = load_file(str(base / MODEL_FILE)), load_file(str(back / MODEL_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["lora", "last_block", "full"])
def test_merged_classifier_runs_in_a_transformers_pipeline_offline(tmp_path, base, monkeypatch, mode):
    from transformers import pipeline

    clf = make(tmp_path / "clf", base, mode)
    out = export_hf(clf, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["pad_token_id"] == EOT_TOKEN
    assert config["id2label"] == {"0": "ham", "1": "spam"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    classify = pipeline("text-classification", model=str(out), top_k=None)
    texts = [*TEXTS, "FREE entry into our weekly competition, text WIN to 80086 now " * 10]  # > 64 tokens: cut
    got = classify(texts, truncation=True)  # to the classifier's max_length, its first tokens, as gpt2lab reads it
    probs = np.array([{r["label"]: r["score"] for r in rows}["spam"] for rows in got])
    want = Classifier.load(clf).classify(texts)
    np.testing.assert_allclose(probs, [w["spam_probability"] for w in want], atol=ATOL, rtol=0)
    assert [max(rows, key=lambda r: r["score"])["label"] for rows in got] == [w["label"] for w in want]


def test_export_hf_says_what_it_was_given_when_it_is_neither(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ExportError, match="neither a classifier folder"):
        export_hf(tmp_path / "x", tmp_path / "out")


# --- import peft --------------------------------------------------------------------------------
def train_peft(hf_base, folder, steps=4, **lora_kwargs):
    """A PEFT adapter trained for a few AdamW steps on GPT2ForSequenceClassification, saved to ``folder``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out is set to True for Conv1D layers
        model = get_peft_model(hf_classifier(hf_base), LoraConfig(**{"r": 4, "lora_alpha": 8, **lora_kwargs}))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    texts, labels = TEXTS[:4], torch.tensor([1, 0, 1, 0])
    tok = [encode(t) for t in texts]
    width = max(map(len, tok))
    ids = torch.tensor([t + [EOT_TOKEN] * (width - len(t)) for t in tok])  # right-padded, as HF pools
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=(ids != EOT_TOKEN).long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        {"task_type": "SEQ_CLS", "target_modules": ["c_attn"]},
        {"task_type": "SEQ_CLS", "target_modules": ["c_attn", "c_proj", "c_fc"], "use_rslora": True,
         "modules_to_save": ["transformer.ln_f"], "layers_to_transform": [1]},
    ],
    ids=["c_attn", "rslora+ln_f+layer1"],
)  # fmt: skip
def test_a_peft_adapter_trained_in_transformers_imports_with_equal_probabilities(
    tmp_path, base, hf_base, lora_kwargs
):
    trained = train_peft(hf_base, tmp_path / "adapter", **lora_kwargs)
    want = hf_probs(trained)
    out = import_peft(tmp_path / "adapter", base, tmp_path / "clf")
    meta = json.loads((out / META_FILE).read_text())
    assert meta["mode"] == "lora" and meta["head_bias"] is False and meta["imported_from"]["format"] == "peft"
    assert meta["trainable_params"] == sum(p.numel() for p in trained.parameters() if p.requires_grad)
    got = gpt2lab_probs(out)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    if "modules_to_save" in lora_kwargs:  # ln_f came along as a trained tensor; LoRA only on layer 1
        assert set(load_file(str(out / "trained.safetensors"))) == {"ln_f.weight", "ln_f.bias"}
        assert meta["lora"]["targets"] == ["h.1.attn.c_attn", "h.1.attn.c_proj", "h.1.mlp.c_fc", "h.1.mlp.c_proj"]
        again = import_peft(export_peft(out, tmp_path / "peft"), base, tmp_path / "again")
        np.testing.assert_array_equal(gpt2lab_probs(again), got)  # modules_to_save survive the round trip
    else:
        assert meta["lora"]["targets"] == ["attn.c_attn"]


@pytest.mark.slow
def test_an_imported_adapter_is_evaluated_and_served_like_a_trained_one(tmp_path, base, hf_base, train_inputs):
    import mlflow
    import pandas as pd

    from gpt2lab.evaluate import evaluate_classifier
    from gpt2lab.serving import log_model

    train_peft(hf_base, tmp_path / "adapter", task_type="SEQ_CLS", target_modules=["c_attn"])
    out = import_peft(tmp_path / "adapter", base, tmp_path / "clf")
    _, data = train_inputs
    (data / "test.csv").write_bytes((data / "validation.csv").read_bytes())
    result = evaluate_classifier(out, data, precision="fp32")
    assert set(result["metrics"]["test"]) >= {"accuracy", "f1"}
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run():
        info = log_model(out)
    served = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"text": TEXTS}))
    np.testing.assert_allclose(served.spam_probability, gpt2lab_probs(out), atol=1e-9, rtol=0)


def test_an_adapter_saved_without_its_head_is_refused(tmp_path, hf_base, base):
    train_peft(hf_base, tmp_path / "adapter", steps=1, target_modules=["c_attn"])  # no task_type: no score saved
    with pytest.raises(ExportError, match=r"no trained head \(score.weight\).*modules_to_save=\['score'\]"):
        import_peft(tmp_path / "adapter", base, tmp_path / "clf")
    assert not (tmp_path / "clf").exists()


@pytest.mark.parametrize(
    "change,says",
    [
        ({"task_type": "CAUSAL_LM"}, "task_type 'CAUSAL_LM'; gpt2lab imports sequence-classification"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'; gpt2lab imports LoRA adapters only"),
        ({"use_dora": True}, "use_dora = True: gpt2lab's LoRA has no counterpart"),
        ({"bias": "all"}, "bias 'all' trains the base's biases"),
        ({"rank_pattern": {"c_attn": 8}}, "rank_pattern {'c_attn': 8}: gpt2lab's adapters share one rank"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights 'pissa' changes the base weights"),
    ],
)
def test_what_gpt2lab_cannot_represent_is_refused_in_one_line(tmp_path, base, change, says):
    clf = make(tmp_path / "clf", base)
    adapter = export_peft(clf, tmp_path / "peft")
    config = json.loads((adapter / PEFT_CONFIG).read_text())
    (adapter / PEFT_CONFIG).write_text(json.dumps({**config, **change}))
    with pytest.raises(ExportError, match=says) as err:
        import_peft(adapter, base, tmp_path / "out")
    assert "\n" not in str(err.value)


def test_import_refuses_a_pickled_adapter_and_another_base(tmp_path, base):
    adapter = export_peft(make(tmp_path / "clf", base), tmp_path / "peft")
    other = random_checkpoint(TINY.__class__(**{**TINY.to_dict(), "n_embd": 64}), 1, tmp_path / "wide")
    with pytest.raises(ExportError, match=r"score.weight has shape \(2, 32\); .* needs \(2, 64\)"):
        import_peft(adapter, other, tmp_path / "out")
    (adapter / PEFT_WEIGHTS).rename(adapter / "adapter_model.bin")
    with pytest.raises(ExportError, match="only adapter_model.bin \\(pickle\\), which gpt2lab never loads"):
        import_peft(adapter, base, tmp_path / "out")
