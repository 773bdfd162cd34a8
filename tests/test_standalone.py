"""The package stands without transformers' built-in ImageGPT.

transformers moves models it no longer maintains to `models/deprecated` and deletes deprecated ones in major releases.
A subprocess plays that release: `transformers.models.imagegpt` cannot be imported (a meta path finder refuses it
before transformers is imported), "imagegpt" is absent from transformers' Auto tables and transformers exports no
`ImageGPT*` name. There `import image_gpt_hf`
registers "imagegpt" itself, and every kind of checkpoint (the Hub's `openai/imagegpt-small` layout as transformers 4
wrote it, AR, BERT, classifier) loads through the Auto classes and the feature-extraction pipeline with the numbers
this package computes here; the processor loads from a `preprocessor_config.json` that transformers' own processor
wrote.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_DIMS
from test_hub import PALETTE, openai_style_folder
from transformers import ImageGPTImageProcessorPil

from image_gpt_hf import (
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    ImageGPTForMaskedImageModeling,
    ImageGPTImageProcessor,
)

TOL = 1e-5

# In the subprocess: block the built-in, drop its Auto entries, then import the package and load each folder.
WITHOUT_THE_BUILT_IN = textwrap.dedent(
    """
    import importlib.abc, json, sys, traceback

    class NoBuiltInImageGPT(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "transformers.models.imagegpt" or name.startswith("transformers.models.imagegpt."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NoBuiltInImageGPT())

    import PIL.Image
    import torch
    import transformers
    from transformers.models.auto import (
        auto_mappings, configuration_auto, feature_extraction_auto, image_processing_auto, modeling_auto
    )

    for module in (auto_mappings, configuration_auto, feature_extraction_auto, image_processing_auto, modeling_auto):
        for name, table in vars(module).items():
            if name.endswith(("MAPPING_NAMES", "NAMES_MAPPING")) and isinstance(table, dict):
                table.pop("imagegpt", None)
    # A release without the model exports none of its names either (transformers' pipeline looks the config's
    # `architectures` up on the transformers module before it falls back to the task's Auto class).
    # (`sys.modules["transformers"]` is another module object than the one `import transformers` bound.)
    for name in [name for name in dir(transformers) if name.startswith("ImageGPT")]:
        setattr(transformers, name, None)
        setattr(sys.modules["transformers"], name, None)
    results = {"built_in": "importable"}
    try:
        import transformers.models.imagegpt
    except ImportError as error:
        results["built_in"] = f"{type(error).__name__}: {error}"
    results["auto_before"] = "imagegpt" in transformers.CONFIG_MAPPING

    import image_gpt_hf

    registered = transformers.CONFIG_MAPPING["imagegpt"]
    results["auto_after"] = f"{registered.__module__}.{registered.__name__}"
    folders, image, processor_folder = json.loads(sys.argv[1]), PIL.Image.open(sys.argv[2]), sys.argv[3]

    def attempt(key, load):
        try:
            results[key] = load()
        except Exception as error:
            results[key] = "".join(traceback.format_exception_only(error)) + traceback.format_exc()[-2000:]

    with torch.no_grad():
        for kind, (folder, head_auto_class) in folders.items():
            def head():
                model = getattr(transformers, head_auto_class).from_pretrained(folder).eval()
                processor = transformers.AutoImageProcessor.from_pretrained(folder)
                ids = processor(image, return_tensors="pt")["input_ids"]
                return type(model).__module__, type(processor).__name__, ids, model(ids).logits

            def features():
                extractor = transformers.pipeline("image-feature-extraction", model=folder)
                return type(extractor.model).__module__, extractor(image, pool=True, return_tensors=True)

            attempt((kind, "head"), head)
            attempt((kind, "pipeline"), features)

    def processor():
        loaded = transformers.AutoImageProcessor.from_pretrained(processor_folder)
        return type(loaded).__module__, loaded(image, return_tensors="pt")["input_ids"]

    attempt("processor", processor)
    torch.save(results, sys.argv[4])
    """
)


@pytest.mark.slow
def test_the_package_stands_without_the_built_in_imagegpt(tmp_path):
    dims = TINY_DIMS
    image_path = tmp_path / "image.png"
    PIL.Image.fromarray(np.random.default_rng(2).integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(image_path)
    image = PIL.Image.open(image_path)
    processor = ImageGPTImageProcessor(clusters=PALETTE, size={"height": 8, "width": 8})
    ids = processor(image, return_tensors="pt")["input_ids"]

    kinds = {
        "ar": (ImageGPTForCausalImageModeling, {}, "AutoModelForCausalLM"),
        "bert": (ImageGPTForMaskedImageModeling, {"objective": "bert"}, "AutoModelForMaskedImageModeling"),
        "classifier": (
            ImageGPTForImageClassification,
            {"num_labels": 3, "classifier_layer": 1, "gen_loss_weight": 0.5},
            "AutoModelForImageClassification",
        ),
    }
    folders, expected = {}, {}
    for kind, (cls, fields, head_auto_class) in kinds.items():
        torch.manual_seed(0)
        model = cls(ImageGPTConfig(**dims, **fields)).eval()
        model.save_pretrained(tmp_path / kind)
        processor.save_pretrained(tmp_path / kind)
        folders[kind] = (str(tmp_path / kind), head_auto_class)
        expected[kind] = model
    for kind, weights, style in (
        ("hub_2021", "pytorch_model.bin", "feature_extractor"),
        ("hub", "model.safetensors", "image_processor"),
    ):
        openai_style_folder(tmp_path / kind, weights, style)
        expected[kind] = ImageGPTForCausalImageModeling.from_pretrained(tmp_path / kind).eval()
        folders[kind] = (str(tmp_path / kind), "AutoModelForCausalLM")
    # transformers' own processor writes the preprocessor_config.json.
    ImageGPTImageProcessorPil(clusters=PALETTE, size={"height": 8, "width": 8}).save_pretrained(tmp_path / "processor")

    out = tmp_path / "results.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    arguments = [json.dumps(folders), str(image_path), str(tmp_path / "processor"), str(out)]
    result = subprocess.run([sys.executable, "-c", WITHOUT_THE_BUILT_IN, *arguments], cwd=tmp_path, env=env,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = torch.load(out, weights_only=False)

    assert results["built_in"].startswith("ModuleNotFoundError"), results["built_in"]
    assert results["auto_before"] is False
    assert results["auto_after"] == "image_gpt_hf.configuration_imagegpt.ImageGPTConfig"
    failures = {key: value for key, value in results.items() if isinstance(value, str) and "Traceback" in value}
    assert not failures, "\n\n".join(f"{key}:\n{value}" for key, value in failures.items())
    for kind, model in expected.items():
        where, processor_class, got_ids, logits = results[kind, "head"]
        assert where == "image_gpt_hf.modeling_imagegpt", (kind, where)
        assert processor_class in ("ImageGPTImageProcessor", "ImageGPTImageProcessorPil"), (kind, processor_class)
        assert torch.equal(got_ids, ids), kind
        with torch.no_grad():
            torch.testing.assert_close(logits, model(ids).logits, atol=TOL, rtol=0)
            where, pooled = results[kind, "pipeline"]
            assert where == "image_gpt_hf.modeling_imagegpt", (kind, where)
            torch.testing.assert_close(pooled, model.transformer(ids).pooler_output, atol=TOL, rtol=0)
    where, processor_ids = results["processor"]
    assert where == "image_gpt_hf.image_processing_imagegpt"
    assert torch.equal(processor_ids, ids)
