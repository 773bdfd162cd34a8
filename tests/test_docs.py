"""README.md and MODEL_CARD.md: their runnable snippets run as written, the card's metadata is valid Hub metadata, and
`write_model_card` writes valid cards that state this checkpoint's facts only.

A snippet is runnable when the line before its ```python fence is `<!-- runnable -->`. Each one runs in a fresh
namespace with an empty temporary working directory, offline. The other python blocks are the ones that name Hub
repositories; they are checked for being exactly that.
"""

import json
import math
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_DIMS
from huggingface_hub import ModelCard
from transformers import AutoModelForImageClassification

from image_gpt_hf import (
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    ImageGPTImageProcessor,
    ImageGPTModel,
)
from image_gpt_hf.model_card import model_card_template, write_model_card

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "MODEL_CARD.md")
RUNNABLE = re.compile(r"<!-- runnable -->\n```python\n(.*?)```", re.DOTALL)
PYTHON_BLOCK = re.compile(r"(<!-- runnable -->\n)?```python\n(.*?)```", re.DOTALL)
HUB_ID = re.compile(r"[\"'][\w.-]+/[\w.-]+[\"']")
REQUIRED_METADATA = ("license", "library_name", "pipeline_tag", "tags", "datasets", "model-index")


def snippets(name):
    return RUNNABLE.findall((ROOT / name).read_text(encoding="utf-8"))


def front_matter(text):
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, "no YAML metadata block at the top"
    return yaml.safe_load(match.group(1))


# Snippets that export to ONNX trace the model with torch's exporter (tens of seconds): the slow tier.
SNIPPETS = [
    pytest.param(name, i, code, id=f"{name}-{i}", marks=[pytest.mark.slow] if "export_onnx" in code else [])
    for name in DOCS
    for i, code in enumerate(snippets(name))
]


def test_docs_mark_their_runnable_snippets():
    # Guards against markers dropped in an edit, which would silently stop testing the snippets.
    assert len(snippets("README.md")) >= 3
    assert len(snippets("MODEL_CARD.md")) >= 3
    # Each snippet's results are checked by exactly one check below, and each check has its snippet.
    codes = [code for name in DOCS for code in snippets(name)]
    for code in codes:
        matching = [key for key in SNIPPET_CHECKS if key in code]
        assert len(matching) == 1, f"add one check of this snippet's results to SNIPPET_CHECKS ({matching}):\n{code}"
    for key in SNIPPET_CHECKS:
        assert sum(key in code for code in codes) == 1, f"SNIPPET_CHECKS[{key!r}] must match exactly one snippet"
    for name in DOCS:
        for marker, code in PYTHON_BLOCK.findall((ROOT / name).read_text(encoding="utf-8")):
            if not marker:  # not run: it must be one that needs the Hub
                assert HUB_ID.search(code), f"{name}: a python block is neither runnable nor about a Hub repo:\n{code}"


# What each snippet's results must be, checked on the names it leaves behind (in its working directory), beside
# what the snippet asserts itself. A snippet is found by a piece of its code that no other snippet has.


def _close(actual, expected, **tolerances) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual).detach().float(), torch.as_tensor(expected).detach().float(), **tolerances
    )


def check_loss_and_samples(ns):
    model, pixels, samples, sos = ns["model"], ns["pixels"], ns["samples"], ns["config"].sos_token_id
    with torch.no_grad():
        logits = model(input_ids=torch.cat([torch.full_like(pixels[:, :1], sos), pixels[:, :-1]], 1)).logits
    _close(ns["loss"], torch.nn.functional.cross_entropy(logits.flatten(0, 1), pixels.flatten()))
    assert samples.shape == (2, 65) and (samples[:, 0] == sos).all() and (samples[:, 1:] < sos).all()


def check_completions(ns):
    images, completions = ns["images"], ns["completions"]
    for i, completion in enumerate(completions):  # 3 per image, image by image, keeping its top half (4 rows)
        np.testing.assert_array_equal(np.asarray(completion)[:4], np.asarray(images[i // 3])[:4])


def check_upscaled(ns):
    np.testing.assert_array_equal(
        np.asarray(ns["enlarged"][0]), np.asarray(ns["images"][0]).repeat(16, 0).repeat(16, 1)
    )


def check_fast_generate(ns):
    from image_gpt_hf.fast_decoding import forget, lower_precision_copy

    model, prompts, greedy = ns["model"], ns["prompts"], ns["greedy"]
    # The int8 ids are the greedy tokens of the int8 copy the snippet made (on random weights they may well equal the
    # float32 ones), SOS then palette ids.
    int8 = lower_precision_copy(model, "int8")  # the copy the snippet made (the weights have not changed)
    assert int8.lm_head.weight.dtype == torch.int8 and model.lm_head.weight.dtype == torch.float32
    assert torch.equal(ns["int8_ids"], int8.generate(prompts, **greedy))
    assert (ns["int8_ids"][:, 0] == model.config.sos_token_id).all() and (ns["int8_ids"][:, 1:] < 16).all()
    forget(model)


def normed_states(model, ids):
    """The paper's `n^l` for every layer, from `hidden_states`: each through the norm of the block after it (the last
    one, the final output, is normed already)."""
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
        return [block.ln_1(state) for block, state in zip(model.h, states)] + [states[-1]]


def check_onnx_features(ns):
    normed = normed_states(ImageGPTModel.from_pretrained("tiny-igpt"), torch.from_numpy(ns["ids"]))
    _close(ns["last_hidden_state"], normed[-1], atol=1e-4, rtol=1e-4)  # onnxruntime's kernels round differently
    _close(ns["pooler_output"], normed[1].mean(1), atol=1e-4, rtol=1e-4)  # layer 1 of 2


def check_pipeline_features(ns):
    model = ImageGPTModel.from_pretrained("tiny-igpt")
    normed = normed_states(model, ns["processor"](ns["image"], return_tensors="pt")["input_ids"])
    _close(ns["paper_feature"], normed[3].mean(1))
    _close(ns["layer_5"], normed[5])


def check_card(ns):
    text, metadata, _ = read_card(ns["card"])
    assert Path(ns["card"]).resolve() == Path("tiny-igpt/README.md").resolve()
    assert "None: random initialisation, for a demo." in text and "Built in the README." in text
    assert f"| Parameters | {ns['model'].num_parameters():,} " in text and metadata["library_name"] == "transformers"


def check_card_features(ns):
    normed = normed_states(ns["model"], ns["input_ids"])
    _close(ns["pooled"], normed[3][:1].mean(1))
    _close(ns["per_pixel"], normed[-1][:1])
    _close(ns["layer_2"], normed[2][:1])
    _close(ns["features"], torch.stack([normed[layer].mean(1) for layer in (2, 3, 4)]))


def check_card_generation(ns):
    # Decoded samples are palette colours: the processor maps them back to the sampled ids.
    ids = ns["processor"](ns["images"], return_tensors="pt")["input_ids"]
    np.testing.assert_array_equal(ids.numpy(), ns["samples"][:, 1:].numpy())


def check_card_classifier(ns):
    # The pipeline's scores: softmax of the classifier on the mean final features of [SOS, x_1, ..., x_{n-1}].
    model = AutoModelForImageClassification.from_pretrained("tiny-igpt-classifier")
    ids = ns["processor"](ns["images"][0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with_sos = torch.cat([torch.full_like(ids[:, :1], model.config.sos_token_id), ids[:, :-1]], 1)
        states = model.transformer(input_ids=with_sos, prepend_sos=False)
        probabilities = (states.last_hidden_state.mean(1) @ model.score.weight.T).softmax(-1)[0]
    scores = [p["score"] for p in ns["predictions"]]
    assert scores == sorted(scores, reverse=True)
    for prediction in ns["predictions"]:
        _close(prediction["score"], probabilities[model.config.label2id[prediction["label"]]])


def check_trainer_and_collator(ns):
    batch, train = ns["batch"], ns["train"]
    ids = np.stack([train[i]["input_ids"] for i in range(4)])
    np.testing.assert_array_equal(batch["input_ids"], ids)
    np.testing.assert_array_equal(batch["labels"], ids)  # the BERT loss reads the masked positions of these
    assert 0 < batch["bool_masked_pos"].float().mean() < 0.5  # OpenAI's masking, each pixel with probability 0.15
    again = ns["collator"]([train[i] for i in range(4)])["bool_masked_pos"]
    assert torch.equal(again, batch["bool_masked_pos"])  # seeded by the example: the same masks whenever drawn
    state = json.loads(Path("igpt-bert-digits/checkpoint-5/trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == 5  # Trainer ran its 5 steps on the collator's batches
    for trained, reloaded in zip(ns["model"].state_dict().values(), ns["reloaded"].state_dict().values()):
        assert torch.equal(trained, reloaded)


SNIPPET_CHECKS = {
    "prepend_sos=True).loss": check_loss_and_samples,
    "num_completions=3": check_completions,
    "upscale=16": check_upscaled,
    'precision="int8"': check_fast_generate,
    'task="feature-extraction"': check_onnx_features,
    "layer_5 = ": check_pipeline_features,
    "card = write_model_card(": check_card,
    "model.extract_features(": check_card_features,
    "top_half = ": check_card_generation,
    'pipeline("image-classification"': check_card_classifier,
    "ImageGPTDataCollator(": check_trainer_and_collator,
}


@pytest.mark.parametrize(("name", "index", "code"), SNIPPETS)
def test_runnable_snippet_runs_as_written(name, index, code, tmp_path, monkeypatch):
    assert not HUB_ID.search(code), "runnable snippets must not need the Hub"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": "__main__"}
    exec(compile(code, f"{name} snippet {index}", "exec"), namespace)
    (check,) = [check for key, check in SNIPPET_CHECKS.items() if key in code]  # one each: see the test above
    check(namespace)


# ------------------------------------------------------------------------------------------------ MODEL_CARD.md


def test_model_card_metadata_is_valid_hub_metadata():
    text = (ROOT / "MODEL_CARD.md").read_text(encoding="utf-8")
    metadata = front_matter(text)
    for field in REQUIRED_METADATA:
        assert metadata.get(field), f"MODEL_CARD.md metadata lacks {field!r}"
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-feature-extraction"
    assert "imagenet-1k" in metadata["datasets"]
    # OpenAI's license is a modified MIT: the Hub wants `other` with a name and a link.
    assert metadata["license"] == "other"
    assert metadata["license_name"] and metadata["license_link"].startswith("https://github.com/openai/image-gpt")

    # Every reported number says it is OpenAI's and where it comes from.
    (entry,) = metadata["model-index"]
    assert entry["results"]
    for result in entry["results"]:
        assert {"task", "dataset", "metrics", "source"} <= set(result)
        assert "OpenAI" in result["source"]["name"] and result["source"]["url"].startswith("https://")
        for metric in result["metrics"]:
            assert isinstance(metric["value"], (int, float)) and metric["verified"] is False

    # huggingface_hub reads it the way the Hub does.
    card = ModelCard(text)
    assert card.data.license == "other" and len(card.data.eval_results) == sum(
        len(result["metrics"]) for result in entry["results"]
    )


def test_model_card_tables_agree_with_its_metadata():
    # Every value of the model-index appears in the evaluation table of the card, and nothing else is claimed there.
    text = (ROOT / "MODEL_CARD.md").read_text(encoding="utf-8")
    values = {
        metric["value"] for result in front_matter(text)["model-index"][0]["results"] for metric in result["metrics"]
    }
    table = text[text.index("### Reported by OpenAI") : text.index("### This checkpoint")]
    in_table = {float(row.rsplit("|", 2)[-2]) for row in table.splitlines() if re.search(r"\| [\d.]+ \|$", row)}
    assert in_table == {float(v) for v in values}


def test_template_is_found_in_the_package_and_is_the_top_level_file():
    assert model_card_template() == (ROOT / "MODEL_CARD.md").read_text(encoding="utf-8")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the package's files")
def test_wheel_ships_the_card_template(tmp_path):
    pytest.importorskip("setuptools")
    # Build from a copy of the tracked and new files, so that the checkout gets no build/ or egg-info.
    source = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if name == "pyproject.toml" or name.startswith(("image_gpt_hf/", "README", "MODEL_CARD", "LICENSE")):
            target = source / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target, follow_symlinks=False)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("image_gpt_hf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "image_gpt_hf/MODEL_CARD.md" in archive.namelist(), "MODEL_CARD.md is not package data"
        shipped = archive.read("image_gpt_hf/MODEL_CARD.md").decode("utf-8")
    assert shipped == (ROOT / "MODEL_CARD.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------- write_model_card

DIMS = {**TINY_DIMS, "n_layer": 4}


def read_card(path):
    text = Path(path).read_text(encoding="utf-8")
    return text, front_matter(text), ModelCard(text)


def test_written_card_states_the_checkpoint_and_claims_no_results(tmp_path):
    model = ImageGPTForCausalImageModeling(ImageGPTConfig.from_preset("tiny", n_px=8, palette_size=16))
    processor = ImageGPTImageProcessor(
        clusters=np.random.default_rng(0).uniform(-1, 1, (16, 3)), size={"height": 8, "width": 8}
    )
    path = write_model_card(tmp_path / "ckpt", model, processor=processor)
    assert path == tmp_path / "ckpt" / "README.md"
    text, metadata, card = read_card(path)

    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-feature-extraction"
    assert metadata["license"] == "other" and "unconditional-image-generation" in metadata["tags"]
    # No facts, no claims: OpenAI's results and data set stay out of this checkpoint's metadata.
    assert "model-index" not in metadata and "datasets" not in metadata and not card.data.eval_results
    assert text.startswith("---\n") and text.count("<!-- checkpoint-card:start -->") == 1
    assert "# ckpt\n" in text
    assert f"| Parameters | {model.num_parameters():,} " in text
    assert "preset `tiny`" in text and "8 x 8 pixels, 64 tokens" in text and "16 colors; SOS id 16" in text
    assert "| Pooled features (`pooler_output`) | layer 3 of 6" in text
    assert "| Processor palette | 16 colors" in text and "| Processor resize | 8 x 8 |" in text
    assert "No results were measured on this checkpoint" in text
    assert "describe the Image GPT" in text and "Every number in the metadata above" not in text
    # The family description and OpenAI's table stay, marked as OpenAI's.
    assert "### Reported by OpenAI" in text and "| iGPT-L | 32x32 | linear probe | CIFAR-10 | 96.3 |" in text


def test_written_card_carries_the_given_facts_and_results(tmp_path):
    labels = {0: "no", 1: "yes"}
    config = ImageGPTConfig(**DIMS, id2label=labels, label2id={v: k for k, v in labels.items()}, gen_loss_weight=0.5)
    model = ImageGPTForImageClassification(config)
    facts = {
        "model_name": "igpt-test | classifier",
        "repo_id": "org/igpt-test",
        "training": "Fine-tuned for 10 steps on noise.",
        "datasets": ["ylecun/mnist"],
        "base_model": "org/igpt-base",
        "source": "Trained with examples/finetune.py.",
        "notes": ["Weights are random; for tests."],
        "results": [
            {
                "task": "image-classification",
                "dataset": "ylecun/mnist",
                "split": "test",
                "metric": "accuracy",
                "value": 0.5,
                "name": "top-1 accuracy",
            },
            {
                "task": "image-classification",
                "dataset": "ylecun/mnist",
                "metric": "loss",
                "value": 0.69,
                "source": "our run",
                "source_url": "https://example.org/run",
            },
        ],
    }
    text, metadata, card = read_card(write_model_card(tmp_path, model, facts=facts))
    assert metadata["pipeline_tag"] == "image-classification"
    assert metadata["datasets"] == ["ylecun/mnist"] and metadata["base_model"] == "org/igpt-base"
    (entry,) = metadata["model-index"]
    assert entry["name"] == "igpt-test | classifier"
    assert {m["value"] for r in entry["results"] for m in r["metrics"]} == {0.5, 0.69}
    assert [(r.metric_type, r.metric_value, r.dataset_split) for r in card.data.eval_results] == [
        ("accuracy", 0.5, "test"),
        ("loss", 0.69, None),
    ]
    assert "| Training | Fine-tuned for 10 steps on noise. |" in text
    assert "| Classifier | 2 labels (no, yes); pooled layer last (final norm) |" in text
    assert "L_clf + 0.5 x L_gen" in text
    assert "| image-classification | ylecun/mnist | test | top-1 accuracy | 0.5 | measured for this card |" in text
    assert "[our run](https://example.org/run)" in text
    assert 'AutoModelForImageClassification.from_pretrained("org/igpt-test")' in text
    assert "igpt-test \\| classifier" in text  # a | in a value does not break the facts table
    assert "- Weights are random; for tests." in text


def test_card_from_a_config_counts_the_decoder_and_names_the_paper_size(tmp_path):
    config = ImageGPTConfig.from_preset("small", objective="bert")
    text, metadata, _ = read_card(write_model_card(tmp_path, config, facts={"license": "mit"}))
    with torch.device("meta"):
        expected = ImageGPTModel(config).num_parameters()
    assert f"| Parameters | {expected:,} " in text and "`ImageGPTModel`" in text
    assert "iGPT-S (preset `small`): 24 layers, width 512, 8 heads" in text
    assert metadata["license"] == "mit" and "license_name" not in metadata and "license_link" not in metadata
    assert "masked-image-modeling" in metadata["tags"] and "unconditional-image-generation" not in metadata["tags"]


def test_unknown_facts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown facts"):  # a misspelt fact would silently be left out
        write_model_card(tmp_path, ImageGPTConfig(**DIMS), facts={"trainig": "typo"})
    assert not (tmp_path / "README.md").exists()


def test_one_data_set_is_one_item_and_a_nan_result_is_written_as_nan(tmp_path):
    facts = {"datasets": "imagenet-1k", "results": [{"task": "t", "dataset": "d", "metric": "m", "value": math.nan}]}
    _, metadata, card = read_card(write_model_card(tmp_path, ImageGPTConfig(**DIMS), facts=facts))
    assert metadata["datasets"] == ["imagenet-1k"]  # not its letters
    assert math.isnan(card.data.eval_results[0].metric_value)


def test_processor_with_another_palette_is_refused(tmp_path):
    processor = ImageGPTImageProcessor(clusters=np.zeros((8, 3)), size={"height": 8, "width": 8})
    with pytest.raises(ValueError, match="palette has 8 colors but the model predicts 16"):
        write_model_card(tmp_path, ImageGPTConfig(**DIMS), processor=processor)
