"""README.md and MODEL_CARD.md: their runnable snippets run as written, the card's metadata is valid Hub metadata, and
`write_model_card` writes valid cards that state this checkpoint's facts only.

A snippet is runnable when the line before its ```python fence is `<!-- runnable -->`. Each one runs in a fresh
namespace with an empty temporary working directory, offline. The other python blocks are the ones that name Hub
repositories; they are checked for being exactly that.
"""

import os
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
    for name in DOCS:
        for marker, code in PYTHON_BLOCK.findall((ROOT / name).read_text(encoding="utf-8")):
            if not marker:  # not run: it must be one that needs the Hub
                assert HUB_ID.search(code), f"{name}: a python block is neither runnable nor about a Hub repo:\n{code}"


@pytest.mark.parametrize(("name", "index", "code"), SNIPPETS)
def test_runnable_snippet_runs_as_written(name, index, code, tmp_path, monkeypatch):
    assert not HUB_ID.search(code), "runnable snippets must not need the Hub"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, f"{name} snippet {index}", "exec"), {"__name__": "__main__"})


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
    config = ImageGPTConfig.from_preset("small")
    text, metadata, _ = read_card(write_model_card(tmp_path, config, facts={"license": "mit"}))
    with torch.device("meta"):
        expected = ImageGPTModel(config).num_parameters()
    assert f"| Parameters | {expected:,} " in text and "`ImageGPTModel`" in text
    assert "iGPT-S (preset `small`): 24 layers, width 512, 8 heads" in text
    assert metadata["license"] == "mit" and "license_name" not in metadata and "license_link" not in metadata


def test_bert_models_are_tagged_as_masked_image_modeling(tmp_path):
    config = ImageGPTConfig(**DIMS, objective="bert")
    _, metadata, _ = read_card(write_model_card(tmp_path, config))
    assert "masked-image-modeling" in metadata["tags"] and "unconditional-image-generation" not in metadata["tags"]


def test_card_replaces_an_existing_one_only_when_told_and_atomically(tmp_path):
    (tmp_path / "README.md").write_text("old card")
    config = ImageGPTConfig(**DIMS)
    with pytest.raises(ValueError, match="overwrite"):
        write_model_card(tmp_path, config)
    assert (tmp_path / "README.md").read_text() == "old card"
    write_model_card(tmp_path, config, overwrite=True)
    assert (tmp_path / "README.md").read_text().startswith("---\n")
    assert sorted(os.listdir(tmp_path)) == ["README.md"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("facts", "message"),
    [
        ({"trainig": "typo"}, "Unknown facts"),
        ({"datasets": "imagenet-1k"}, "list of strings"),
        ({"results": [{"task": "image-classification", "dataset": "x", "metric": "accuracy"}]}, "lacks"),
        ({"results": [{"task": "t", "dataset": "d", "metric": "m", "value": float("nan")}]}, "finite number"),
        ({"results": [{"task": "t", "dataset": "d", "metric": "m", "value": 1, "seed": 0}]}, "unknown keys"),
    ],
)
def test_wrong_facts_are_refused(tmp_path, facts, message):
    with pytest.raises(ValueError, match=message):
        write_model_card(tmp_path, ImageGPTConfig(**DIMS), facts=facts)
    assert not (tmp_path / "README.md").exists()


def test_processor_with_another_palette_is_refused(tmp_path):
    processor = ImageGPTImageProcessor(clusters=np.zeros((8, 3)), size={"height": 8, "width": 8})
    with pytest.raises(ValueError, match="palette has 8 colors but the model predicts 16"):
        write_model_card(tmp_path, ImageGPTConfig(**DIMS), processor=processor)
