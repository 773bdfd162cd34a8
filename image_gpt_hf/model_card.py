"""Model cards: the repository's MODEL_CARD.md, filled in with the facts of one checkpoint.

`write_model_card(folder, model)` writes `folder/README.md`, the file the Hub shows as a model's card. The card keeps
the family description of MODEL_CARD.md (architecture, palette, usage, data, limitations, OpenAI's reported results,
citation) and replaces its two marked blocks with what is true of this checkpoint: the facts read from the model, its
config and its image processor, and what the caller knows (training, data sets, provenance, measured results). Its
metadata describes this checkpoint only: the `model-index` lists the results passed in `facts["results"]` and nothing
else, so OpenAI's numbers for OpenAI's models never appear as this checkpoint's.

MODEL_CARD.md ships inside the package (`image_gpt_hf/MODEL_CARD.md`), so this works from an installed wheel too.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PreTrainedModel

from .configuration_imagegpt import PRESETS, ImageGPTConfig
from .image_processing_imagegpt import check_palette_fits
from .safe_io import atomic_file, check_output_path

TEMPLATE_NAME = "MODEL_CARD.md"
_CHECKPOINT_BLOCK = ("<!-- checkpoint-card:start -->", "<!-- checkpoint-card:end -->")
_RESULTS_BLOCK = ("<!-- checkpoint-results:start -->", "<!-- checkpoint-results:end -->")

# What `facts` may hold. A result is a `huggingface_hub.EvalResult`, or a dict with the keys below (its fields under
# the short names the scripts use).
FACT_KEYS = {
    "model_name": "title of the card and name of its model-index entry (default: the folder's name)",
    "repo_id": "Hub id the checkpoint is published under; the card's usage snippet names it",
    "training": "how the weights were obtained (str)",
    "datasets": "Hub ids of the data sets it was trained on (list of str)",
    "results": 'measured results: EvalResult, or {"task", "dataset", "metric", "value"} (+ optional "split", "name", '
    '"dataset_name", "source", "source_url")',
    "base_model": "Hub id(s) of the model it was fine-tuned or converted from (str or list of str)",
    "source": "conversion provenance: where the weights come from and how they were converted (str)",
    "notes": "further statements about this checkpoint, one per item (list of str)",
    "license": "Hub license id, replaces OpenAI's (e.g. 'mit' for weights trained from scratch)",
    "license_name": "with license='other'",
    "license_link": "with license='other'",
    "tags": "extra Hub tags (list of str)",
}
# A result dict's keys as EvalResult's fields.
RESULT_FIELDS = {"task": "task_type", "dataset": "dataset_type", "dataset_name": "dataset_name", "split": "dataset_split",
                 "metric": "metric_type", "name": "metric_name", "value": "metric_value", "source": "source_name",
                 "source_url": "source_url"}  # fmt: skip

_OBJECTIVES = {
    "ar": "autoregressive (next-pixel prediction, causal attention; the paper's AR objective)",
    "bert": "masked-pixel prediction (bidirectional attention; the paper's BERT objective)",
}
_HEADS = {
    "ImageGPTModel": "decoder only (features)",
    "ImageGPTForCausalImageModeling": "next-pixel head (AR)",
    "ImageGPTForMaskedImageModeling": "masked-pixel head (BERT)",
    "ImageGPTForImageClassification": "image classification head",
}
_PAPER_NAMES = {"small": "iGPT-S", "medium": "iGPT-M", "large": "iGPT-L", "xl": "iGPT-XL"}


def model_card_template() -> str:
    """The text of MODEL_CARD.md: the copy inside the installed package, else the repository's top-level file."""
    packaged = resources.files("image_gpt_hf").joinpath(TEMPLATE_NAME)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parent.parent / TEMPLATE_NAME
    if not checkout.is_file():
        raise FileNotFoundError(
            f"{TEMPLATE_NAME} was not found in the installed image_gpt_hf package; it must be shipped as package data "
            "(see [tool.setuptools.package-data] in pyproject.toml)."
        )
    return checkout.read_text(encoding="utf-8")


def write_model_card(
    save_directory: str | os.PathLike,
    model_or_config: PreTrainedModel | ImageGPTConfig,
    *,
    processor: Any | None = None,
    facts: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `README.md` (the Hub's model card) for one checkpoint into `save_directory` and return its path.

    The card is huggingface_hub's `ModelCard`: MODEL_CARD.md with its checkpoint blocks filled in, under metadata
    built as `ModelCardData` (license, tags, datasets, base_model, and the model-index from `EvalResult`s). It is
    written to a hidden file next to it and renamed into place (`image_gpt_hf.safe_io.atomic_file`): a reader never
    sees half a card, the file gets the mode the umask gives, and nothing else in the folder is touched.

    Args:
        save_directory: the checkpoint folder; created if missing.
        model_or_config: the model (its head and exact parameter count go into the card) or only its config (the
            parameter count is then that of the decoder, `ImageGPTModel`).
        processor: the checkpoint's `ImageGPTImageProcessor`, whose input size and palette go into the card. Its
            palette must have `config.palette_size` colors.
        facts: what only the caller knows; see `FACT_KEYS`. Nothing is assumed when a fact is missing: without
            "datasets" the metadata names none, without "results" there is no model-index.
        overwrite: replace an existing README.md (a card or any other file; a symbolic link is refused). Without
            it, an existing README.md is refused with an `image_gpt_hf.safe_io.OutputPathError` (a ValueError).
    """
    model = model_or_config if isinstance(model_or_config, PreTrainedModel) else None
    config = model.config if model is not None else model_or_config
    if not isinstance(config, ImageGPTConfig):
        # transformers' own ImageGPTConfig, or this package's loaded as remote code: same fields, read as ours.
        config = ImageGPTConfig.from_dict({**config.to_dict(), "model_type": "imagegpt"})
    facts = dict(facts or {})
    if set(facts) - set(FACT_KEYS):  # a misspelt fact would silently leave the card without it
        raise ValueError(f"Unknown facts {sorted(set(facts) - set(FACT_KEYS))}; known: {sorted(FACT_KEYS)}.")
    for key in ("datasets", "base_model", "notes", "tags"):  # one string is one item, not its letters
        facts[key] = [facts[key]] if isinstance(facts.get(key), str) else list(facts.get(key) or [])
    facts["results"] = [_eval_result(result) for result in facts.get("results") or []]
    save_directory = Path(save_directory)
    card_checks = {"arg": "The model card", "overwrite_arg": "overwrite=True"}
    check_output_path(save_directory / "README.md", overwrite=overwrite, kind="file", **card_checks)
    name = facts.get("model_name") or save_directory.resolve().name

    template = ModelCard(model_card_template())
    body = _replace_block(template.text, _CHECKPOINT_BLOCK, _facts_section(name, model, config, processor, facts))
    body = _replace_block(body, _RESULTS_BLOCK, _results_section(facts["results"]))
    body = body.replace("# Image GPT (iGPT)\n", f"# {name}\n", 1)
    card = ModelCard(f"---\n{_metadata(template.data, name, model, config, facts).to_yaml()}\n---\n{body}")

    path = save_directory / "README.md"
    with atomic_file(path, overwrite=overwrite, **card_checks) as tmp:
        tmp.write_text(str(card), encoding="utf-8")
    return path


def _eval_result(result: EvalResult | dict[str, Any]) -> EvalResult:
    """A result as huggingface_hub's `EvalResult` (which names a missing field); a dict's keys read by RESULT_FIELDS."""
    if isinstance(result, EvalResult):
        return result
    fields = {RESULT_FIELDS.get(key, key): value for key, value in result.items()}  # EvalResult names a wrong one
    return EvalResult(**{"dataset_name": result.get("dataset"), **fields})


def _preset(config: ImageGPTConfig) -> str | None:
    for name, dims in PRESETS.items():
        if all(getattr(config, key) == value for key, value in dims.items()):
            return name
    return None


def _num_parameters(model: PreTrainedModel | None, config: ImageGPTConfig) -> tuple[int, str]:
    if model is not None:
        return model.num_parameters(), type(model).__name__
    from .modeling_imagegpt import ImageGPTModel

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        decoder = ImageGPTModel(config)
    return decoder.num_parameters(), "ImageGPTModel"


def _human(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def _input_size(config: ImageGPTConfig) -> str:
    try:
        side = config.n_px
    except ValueError:  # n_positions is not a square: no single image side
        return f"{config.n_positions} tokens"
    return f"{side} x {side} pixels, {config.n_positions} tokens"


def _processor_facts(processor: Any, config: ImageGPTConfig) -> list[tuple[str, str]]:
    rows = []
    check_palette_fits(processor, config)
    clusters = getattr(processor, "clusters", None)
    if clusters is not None:
        rows.append(("Processor palette", f"{len(clusters)} colors (`clusters` in preprocessor_config.json)"))
    size = getattr(processor, "size", None)
    if getattr(processor, "do_resize", True) and size is not None:
        size = dict(size) if not isinstance(size, int) else {"shortest_edge": size}
        if size.get("height") and size.get("width"):
            rows.append(("Processor resize", f"{size['height']} x {size['width']}"))
        elif size.get("shortest_edge"):
            rows.append(("Processor resize", f"shortest edge {size['shortest_edge']}"))
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop is not None:
        rows.append(("Processor center crop", f"{dict(crop).get('height')} x {dict(crop).get('width')}"))
    return rows


def _facts_section(
    name: str, model: PreTrainedModel | None, config: ImageGPTConfig, processor: Any, facts: dict[str, Any]
) -> str:
    preset = _preset(config)
    num_params, counted = _num_parameters(model, config)
    architecture = (config.architectures or [None])[0] if model is None else type(model).__name__
    feature_layer = config.feature_layer if config.feature_layer is not None else config.n_layer // 2
    if preset is None:
        size = "custom (no preset matches)"
    elif preset in _PAPER_NAMES:
        size = f"{_PAPER_NAMES[preset]} (preset `{preset}`)"
    else:
        size = f"preset `{preset}` (not one of the paper's sizes)"
    rows = [
        (
            "Model class",
            f"`{architecture}`, {_HEADS.get(architecture, 'Image GPT')}" if architecture else "not stated",
        ),
        ("Size", f"{size}: {config.n_layer} layers, width {config.n_embd}, {config.n_head} heads"),
        ("Objective", _OBJECTIVES.get(config.objective, config.objective)),
        ("Input", _input_size(config)),
        ("Palette", f"{config.palette_size} colors; SOS id {config.sos_token_id}"),
        ("Parameters", f"{num_params:,} ({_human(num_params)}, `{counted}`)"),
        ("Pooled features (`pooler_output`)", f"layer {feature_layer} of {config.n_layer}, mean over positions"),
    ]
    if config.prepend_sos:
        rows.append(
            ("Input convention", "`prepend_sos=True`: OpenAI's `[SOS, x_1, ..., x_{n-1}]` built from pixel ids")
        )
    if architecture == "ImageGPTForImageClassification":
        layer = "last (final norm)" if config.classifier_layer is None else str(config.classifier_layer)
        labels = ", ".join(str(config.id2label[i]) for i in sorted(config.id2label)[:20])
        more = ", ..." if config.num_labels > 20 else ""
        rows.append(("Classifier", f"{config.num_labels} labels ({labels}{more}); pooled layer {layer}"))
        if config.gen_loss_weight > 0:
            rows.append(
                ("Fine-tuning objective", f"L_clf + {config.gen_loss_weight:g} x L_gen (the paper's joint loss)")
            )
    if model is not None:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
        rows.append(("Weights dtype", ", ".join(dtypes)))
    if processor is not None:
        rows.extend(_processor_facts(processor, config))
    rows.append(("Training", facts.get("training") or "not stated"))
    datasets = facts.get("datasets")
    rows.append(("Data sets", ", ".join(f"`{d}`" for d in datasets) if datasets else "not stated"))
    if facts["base_model"]:
        rows.append(("Base model", ", ".join(f"`{b}`" for b in facts["base_model"])))
    rows.append(("Source", facts.get("source") or "not stated"))

    lines = [
        f"This card describes the checkpoint **{_escape(name)}**; the sections after this one describe the Image GPT "
        "family it belongs to. Its facts:",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {_escape(value)} |" for key, value in rows),
    ]
    if facts.get("notes"):
        lines += ["", *(f"- {_escape(note)}" for note in facts["notes"])]
    if facts.get("repo_id"):
        auto_class = {
            "ImageGPTForCausalImageModeling": "AutoModelForCausalLM",
            "ImageGPTForMaskedImageModeling": "AutoModelForMaskedImageModeling",
            "ImageGPTForImageClassification": "AutoModelForImageClassification",
        }.get(architecture, "AutoModel")
        repo_id = facts["repo_id"]
        lines += [
            "",
            "```python",
            "import image_gpt_hf  # noqa: F401  (or pass trust_remote_code=True where it is not installed)",
            f"from transformers import AutoImageProcessor, {auto_class}",
            "",
            f'model = {auto_class}.from_pretrained("{repo_id}")',
            f'processor = AutoImageProcessor.from_pretrained("{repo_id}")',
            "```",
        ]
    return "\n".join(lines)


def _results_section(results: list[EvalResult]) -> str:
    if not results:
        return (
            "No results were measured on this checkpoint for this card. The numbers above are OpenAI's, for OpenAI's "
            "models. This project's side-by-side measurements against transformers' ImageGPT are in "
            "`benchmarks/RESULTS.md`."
        )
    lines = [
        "Measured on this checkpoint:",
        "",
        "| Task | Data set | Split | Metric | Value | Source |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        source = r.source_name or "measured for this card"
        source = f"[{source}]({r.source_url})" if r.source_url else source
        value = f"{r.metric_value:g}" if isinstance(r.metric_value, (int, float)) else r.metric_value
        cells = [r.task_type, r.dataset_name, r.dataset_split or "", r.metric_name or r.metric_type, value, source]
        lines.append("| " + " | ".join(_escape(str(cell)) for cell in cells) + " |")
    return "\n".join(lines)


def _metadata(
    template: ModelCardData, name: str, model: PreTrainedModel | None, config: ImageGPTConfig, facts: dict[str, Any]
) -> ModelCardData:
    architecture = type(model).__name__ if model is not None else (config.architectures or [""])[0]
    classifier = architecture == "ImageGPTForImageClassification"
    tags = [t for t in template.tags or [] if t not in ("unconditional-image-generation", "masked-image-modeling")]
    tags.append("unconditional-image-generation" if config.objective == "ar" else "masked-image-modeling")
    tags += [t for t in facts.get("tags") or [] if t not in tags]
    license_ = facts.get("license", template.license)
    own_license = "license" in facts and facts["license"] != "other"
    eval_results = facts["results"]
    return ModelCardData(
        license=license_,
        license_name=None if own_license else facts.get("license_name", template.license_name),
        license_link=None if own_license else facts.get("license_link", template.license_link),
        library_name="transformers",
        pipeline_tag="image-classification" if classifier else "image-feature-extraction",
        tags=tags,
        datasets=facts["datasets"] or None,
        base_model=facts["base_model"][0] if len(facts["base_model"]) == 1 else facts["base_model"] or None,
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )


def _replace_block(text: str, markers: tuple[str, str], content: str) -> str:
    start, end = markers
    before, rest = text.split(start, 1)
    return f"{before}{start}\n{content}\n{end}{rest.split(end, 1)[1]}"


def _escape(text: str) -> str:
    """Keeps a value inside its markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


__all__ = ["FACT_KEYS", "model_card_template", "write_model_card"]
