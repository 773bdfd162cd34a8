"""LoRA with peft on Image GPT (image_gpt_hf.lora): a small share of the model trains, the adapter saves, reloads on
the base checkpoint and merges to the same numbers, and the merged model loads like any checkpoint, with the package
and (through remote code) without it.

Data: scikit-learn's digits, 8x8, each scan value 0..16 read as a color id (16 merged into 15: a 16-color palette).
The base is a tiny AR model pretrained here for a few hundred steps on the digits 0-4; the classifier is fine-tuned
on all ten classes, the causal model continues pretraining on the digits 5-9 (new images). LoRA and full fine-tuning
run the same steps on the same batches; run with `-s` to see both results.
"""

import json
import os

import numpy as np
import pytest
import torch
from conftest import run_without_package
from transformers import AutoModelForCausalLM, AutoModelForImageClassification

from image_gpt_hf import (
    LORA_TARGET_MODULES,
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    lora_config,
)

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow

DIMS = {"vocab_size": 17, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4}
# LoRA trains about 1.33 * r / n_embd of each block: r=2 keeps this tiny model under 5% (iGPT-S at r=8: 2.1%).
RANK, ALPHA = 2, 4
STEPS, BATCH = 60, 32
LR = {"lora": 1e-2, "full": 1e-3}
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small matrices train faster on one thread, and leave the other cores to other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    ids = torch.tensor(np.minimum(data.images, 15).reshape(-1, 64), dtype=torch.long)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return ids, labels, order[:1400], order[1400:]


def train(model, ids, targets, indices, lr, steps=STEPS, seed: int | None = 1):
    """AdamW on `steps` random batches of `indices` (seeded: the same batches for LoRA and full fine-tuning), on the
    model's loss for `targets`: class labels, or the ids themselves for the language model."""
    if seed is not None:
        torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr)
    model.train()
    for _ in range(steps):
        batch = indices[torch.randint(0, len(indices), (BATCH,))]
        model(input_ids=ids[batch], labels=targets[batch], prepend_sos=True).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids, prepend_sos=True).loss


@pytest.fixture(scope="module")
def base(digits, tmp_path_factory):
    """The pretrained checkpoint: AR on the training digits 0-4."""
    ids, labels, train_idx, _ = digits
    torch.manual_seed(0)
    model = ImageGPTForCausalImageModeling(ImageGPTConfig(**DIMS))
    train(model, ids, ids, train_idx[labels[train_idx] < 5], 3e-3, steps=300, seed=None)  # batches after the init
    folder = tmp_path_factory.mktemp("peft") / "base"
    model.save_pretrained(folder)
    return folder


def share(model) -> float:
    trainable, total = model.get_nb_trainable_parameters()
    return trainable / total


@pytest.fixture(scope="module")
def classifiers(base, digits):
    ids, labels, train_idx, test_idx = digits
    results = {}
    for kind in ("lora", "full"):
        torch.manual_seed(2)  # the same new head for both
        model = ImageGPTForImageClassification.from_pretrained(base, num_labels=10)
        if kind == "lora":
            model = peft.get_peft_model(model, lora_config(model, r=RANK, alpha=ALPHA))
        train(model, ids, labels, train_idx, LR[kind])
        with torch.no_grad():
            predictions = model(input_ids=ids[test_idx], prepend_sos=True).logits.argmax(-1)
        results[kind] = (model, (predictions == labels[test_idx]).float().mean().item())
    return results


@pytest.fixture(scope="module")
def causal_models(base, digits):
    ids, labels, train_idx, test_idx = digits
    new, held_out = train_idx[labels[train_idx] >= 5], test_idx[labels[test_idx] >= 5]
    results = {}
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(base).eval()
        results["before"] = (before, lm_loss(before, ids[held_out]).item())
    for kind in ("lora", "full"):
        model = AutoModelForCausalLM.from_pretrained(base)
        if kind == "lora":
            model = peft.get_peft_model(model, lora_config(model, r=RANK, alpha=ALPHA))
        train(model, ids, ids, new, LR[kind])
        with torch.no_grad():
            results[kind] = (model, lm_loss(model, ids[held_out]).item())
    return results


# ----------------------------------------------------------------------------------------------- what LoRA trains


def test_lora_config_targets_the_four_projections_of_every_block():
    model = ImageGPTForImageClassification(ImageGPTConfig(**DIMS, num_labels=10))
    config = lora_config(model)
    assert config.fan_in_fan_out and config.modules_to_save == ["score"] and config.r == 8
    adapted = peft.get_peft_model(model, config)
    wrapped = {name for name, module in adapted.named_modules() if hasattr(module, "lora_A")}
    expected = {f"base_model.model.transformer.h.{i}.{target}" for i in range(2) for target in LORA_TARGET_MODULES}
    assert wrapped == expected
    # The causal model's LM head comes pretrained: nothing besides the adapter trains.
    assert lora_config(ImageGPTForCausalImageModeling(ImageGPTConfig(**DIMS))).modules_to_save is None
    # Names as peft matches them (whole, or the end of a module's name); one that matches no projection is refused.
    model = ImageGPTForImageClassification(ImageGPTConfig(**DIMS, num_labels=10))
    assert lora_config(model, target_modules=["c_attn", "mlp.c_proj"]).target_modules == {"c_attn", "mlp.c_proj"}
    for wrong in (["attn.c_attn", "atn.c_proj"], ["score"], ["h.0"]):
        with pytest.raises(ValueError, match=rf"LoRA target modules \['{wrong[-1]}'\] name no projection"):
            lora_config(model, target_modules=wrong)


@pytest.mark.parametrize("preset", ["small", "medium", "large"])
def test_paper_sizes_train_a_small_share_at_the_default_rank(preset):
    with torch.device("meta"):
        model = ImageGPTForImageClassification(ImageGPTConfig.from_preset(preset, num_labels=10))
        adapted = peft.get_peft_model(model, lora_config(model))
    assert share(adapted) < 0.025, share(adapted)


def test_lora_classifier_is_close_to_full_fine_tuning(classifiers):
    lora, lora_accuracy = classifiers["lora"]
    _, full_accuracy = classifiers["full"]
    print(f"\ntrainable {share(lora):.1%}; digits accuracy after {STEPS} steps: LoRA {lora_accuracy:.3f}, full {full_accuracy:.3f}")  # fmt: skip
    assert share(lora) < 0.05
    assert lora_accuracy > 0.3  # chance: 0.1
    assert lora_accuracy > full_accuracy - 0.05


def test_lora_continued_pretraining_is_close_to_full(causal_models):
    before = causal_models["before"][1]
    lora, lora_loss = causal_models["lora"]
    _, full_loss = causal_models["full"]
    print(f"\ntrainable {share(lora):.1%}; held-out loss on new digits: before {before:.3f}, after {STEPS} steps LoRA {lora_loss:.3f}, full {full_loss:.3f}")  # fmt: skip
    assert share(lora) < 0.05
    assert lora_loss < before - 0.1
    assert lora_loss < full_loss * 1.05  # within 5% of full fine-tuning's loss


# ------------------------------------------------------------------------------------- save, reload, merge, load

LOAD_WITHOUT_THE_PACKAGE = """
import json, sys
import torch
import transformers

folders, ids, out = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
results = {}
with torch.no_grad():
    for folder, auto_class in folders:
        model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
        results[folder] = (type(model).__module__, model(ids).logits)
torch.save(results, out)
"""


def round_trip(adapted, base_folder, auto_class, ids, tmp_path, **base_kwargs):
    """Save the adapter, reload it on the base checkpoint, merge, save the merged model and load it back; the
    logits of each, with the adapter's size and the merged folder."""
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
    adapted.save_pretrained(tmp_path / "adapter")
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    adapter_size = os.path.getsize(tmp_path / "adapter" / "adapter_model.safetensors")
    assert adapter_size < os.path.getsize(base_folder / "model.safetensors") / 4

    base = auto_class.from_pretrained(base_folder, **base_kwargs)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = reloaded.merge_and_unload()
    assert not any("lora" in name for name, _ in merged.named_modules())
    merged.save_pretrained(tmp_path / "merged")
    loaded = auto_class.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        for name, model in (("reloaded", reloaded), ("merged", merged), ("loaded", loaded)):
            torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=TOL, rtol=0, msg=name)
    print(f"\nadapter {adapter_size / 1024:.1f} KiB, base {os.path.getsize(base_folder / 'model.safetensors') / 1024:.1f} KiB")  # fmt: skip
    return expected, type(loaded)


def test_adapters_reload_merge_and_load_with_and_without_the_package(classifiers, causal_models, base, digits, tmp_path):  # fmt: skip
    ids = digits[0][digits[3][:4]]
    folders, expected = [], {}
    for name, adapted, auto_class, cls, base_kwargs in (
        ("classifier", classifiers["lora"][0], AutoModelForImageClassification, ImageGPTForImageClassification, {"num_labels": 10}),
        ("causal", causal_models["lora"][0], AutoModelForCausalLM, ImageGPTForCausalImageModeling, {}),
    ):  # fmt: skip
        logits, loaded_type = round_trip(adapted, base, auto_class, ids, tmp_path / name, **base_kwargs)
        assert loaded_type is cls
        folder = str(tmp_path / name / "merged")
        folders.append((folder, auto_class.__name__))
        expected[folder] = logits

    out = tmp_path / "results.pt"
    run_without_package(LOAD_WITHOUT_THE_PACKAGE, json.dumps(folders), json.dumps(ids.tolist()), str(out), cwd=tmp_path)  # fmt: skip
    for folder, (where, logits) in torch.load(out).items():
        assert where.startswith("transformers_modules"), where
        torch.testing.assert_close(logits, expected[folder], atol=TOL, rtol=0)
