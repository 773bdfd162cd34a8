"""The Hub, without a network: loading by repo id from huggingface_hub's cache offline (with the package and, in a
process that cannot import it, through remote code), folders laid out like `openai/imagegpt-small`, and what
`push_to_hub` uploads.

The cache is filled by huggingface_hub's own `hf_hub_download`, talking to a fake Hub (an httpx2 mock transport that
answers the file-resolution endpoint from local folders), so its layout is exactly the one huggingface_hub writes.
"""

import hashlib
import json
import sys
from pathlib import Path

import httpx2
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_DIMS, builtin, run_without_package
from huggingface_hub import CommitInfo, HfApi, RepoUrl, constants, hf_hub_download
from huggingface_hub.utils import set_client_factory
from huggingface_hub.utils._http import default_client_factory
from huggingface_hub.utils.sha import git_hash
from safetensors.torch import save_file
from test_configuration import OPENAI_SMALL_CONFIG
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    ImageGPTImageProcessorPil,
    pipeline,
)

from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTImageProcessor, ImageGPTModel
from image_gpt_hf.pipelines import ImageGPTFeatureExtractionPipeline

DIMS = TINY_DIMS
PALETTE = np.random.default_rng(0).uniform(-1, 1, (DIMS["vocab_size"] - 1, 3))
COMMIT = hashlib.sha1(b"image_gpt_hf fake hub commit").hexdigest()
LFS_SUFFIXES = (".safetensors", ".bin")  # stored in Git LFS on the Hub: blobs are named by their sha256
TOL = 1e-5


def pixels(batch=2):
    return torch.randint(
        0, DIMS["vocab_size"] - 1, (batch, DIMS["n_positions"]), generator=torch.Generator().manual_seed(3)
    )


def image():
    return PIL.Image.fromarray(np.random.default_rng(2).integers(0, 256, (10, 10, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------------ fake Hub


class FakeHub:
    """`{endpoint}/{repo_id}/resolve/{revision}/{filename}` for some repositories, answered from local folders.

    Headers are the Hub's: `X-Repo-Commit`, `ETag` (the git blob hash) and, for LFS files, `X-Linked-Etag` (sha256)
    and `X-Linked-Size`; a missing file is a 404 with `X-Error-Code: EntryNotFound`.
    """

    def __init__(self, repos: dict[str, Path]):
        self.files = {
            repo_id: {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
            for repo_id, folder in repos.items()
        }
        self.requests: list[str] = []

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        parts = request.url.path.strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return httpx2.Response(404)
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[4:])
        data = self.files.get(repo_id, {}).get(filename)
        if data is None:
            return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{git_hash(data)}"', "Content-Length": str(len(data))}
        if filename.endswith(LFS_SUFFIXES):
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)

    def download_all(self, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Fill `cache_dir` the way a user's first, online `from_pretrained` would: one `hf_hub_download` per file."""
        with monkeypatch.context() as online:
            online.setattr(constants, "HF_HUB_OFFLINE", False)
            set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(self.handle)))
            try:
                for repo_id, files in self.files.items():
                    for filename in files:
                        hf_hub_download(repo_id, filename, cache_dir=cache_dir)
            finally:
                set_client_factory(default_client_factory)


@pytest.fixture
def no_network(monkeypatch):
    """Offline mode, and a transport that records any request that still gets out."""
    attempts = []

    def refuse(request):
        attempts.append(str(request.url))
        return httpx2.Response(500)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(refuse)))
    yield attempts
    set_client_factory(default_client_factory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints as this package saves them: a causal LM, and the same weights saved through the pipeline."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    model = ImageGPTForCausalImageModeling(ImageGPTConfig(**DIMS)).eval()
    processor = ImageGPTImageProcessor(clusters=PALETTE, size={"height": 8, "width": 8})
    model.save_pretrained(root / "lm")
    processor.save_pretrained(root / "lm")
    ImageGPTFeatureExtractionPipeline(model=model.transformer, image_processor=processor).save_pretrained(
        root / "pipe"
    )
    return root, model, processor


@pytest.fixture(scope="module")
def hub_cache(checkpoints, tmp_path_factory):
    root = checkpoints[0]
    cache = tmp_path_factory.mktemp("hub_cache")
    hub = FakeHub({"org/igpt-tiny": root / "lm", "org/igpt-tiny-pipeline": root / "pipe"})
    with pytest.MonkeyPatch.context() as monkeypatch:
        hub.download_all(cache, monkeypatch)
    return cache, hub


# ------------------------------------------------------------------------------------------- loading by repo id


def test_load_by_repo_id_offline_with_the_package(hub_cache, checkpoints, no_network, monkeypatch):
    cache, _ = hub_cache
    _, model, processor = checkpoints
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    assert type(AutoConfig.from_pretrained("org/igpt-tiny")) is ImageGPTConfig
    lm = AutoModelForCausalLM.from_pretrained("org/igpt-tiny").eval()
    assert type(lm) is ImageGPTForCausalImageModeling
    x = pixels()
    torch.testing.assert_close(lm(x).logits, model(x).logits, atol=TOL, rtol=0)
    base = AutoModel.from_pretrained("org/igpt-tiny").eval()
    assert type(base) is ImageGPTModel
    loaded_processor = AutoImageProcessor.from_pretrained("org/igpt-tiny")
    assert isinstance(loaded_processor, ImageGPTImageProcessor)
    ids = loaded_processor(image(), return_tensors="pt")["input_ids"]
    assert torch.equal(ids, processor(image(), return_tensors="pt")["input_ids"])

    extractor = pipeline("image-feature-extraction", model="org/igpt-tiny")
    torch.testing.assert_close(
        extractor(image(), pool=True, return_tensors=True), model.transformer(ids).pooler_output, atol=TOL, rtol=0
    )
    custom = pipeline(
        "image-feature-extraction", model="org/igpt-tiny-pipeline", pipeline_class=ImageGPTFeatureExtractionPipeline
    )
    expected = model.transformer.extract_features(ids, layers=[1], pool=False)[0]
    torch.testing.assert_close(custom(image(), layer=1, return_tensors=True), expected, atol=TOL, rtol=0)
    assert no_network == []


REMOTE_SCRIPT = """
import sys
import numpy as np, PIL.Image, torch
from transformers import AutoImageProcessor, AutoModelForCausalLM, pipeline

out, image_path = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained("org/igpt-tiny", trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained("org/igpt-tiny", trust_remote_code=True)
for obj in (model, processor):
    assert type(obj).__module__.startswith("transformers_modules"), type(obj).__module__
ids = processor(PIL.Image.open(image_path), return_tensors="pt")["input_ids"]
extractor = pipeline(model="org/igpt-tiny-pipeline", trust_remote_code=True, layer=1)
assert type(extractor).__name__ == "ImageGPTFeatureExtractionPipeline", type(extractor)
with torch.no_grad():
    torch.save(
        {"ids": ids, "logits": model(ids).logits, "layer_1": extractor(image_path, return_tensors=True)}, out
    )
"""


def test_load_by_repo_id_offline_with_remote_code_where_the_package_cannot_be_imported(
    hub_cache, checkpoints, tmp_path
):
    cache, _ = hub_cache
    _, model, processor = checkpoints
    image().save(tmp_path / "image.png")
    out = tmp_path / "out.pt"
    run_without_package(REMOTE_SCRIPT, str(out), str(tmp_path / "image.png"), cwd=tmp_path, HF_HUB_CACHE=str(cache))
    results = torch.load(out)
    ids = processor(PIL.Image.open(tmp_path / "image.png"), return_tensors="pt")["input_ids"]
    assert torch.equal(results["ids"], ids)
    torch.testing.assert_close(results["logits"], model(ids).logits, atol=TOL, rtol=0)
    expected = model.transformer.extract_features(ids, layers=[1], pool=False)[0]
    torch.testing.assert_close(results["layer_1"], expected, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------- openai/imagegpt-small's layout


def openai_style_folder(folder: Path, weights: str, processor_style: str) -> torch.nn.Module:
    """A tiny folder with the files of the Hub's `openai/imagegpt-small`, as transformers 4 wrote them, and
    transformers' own model of its weights."""
    torch.manual_seed(1)
    config = builtin("configuration_imagegpt").ImageGPTConfig(**DIMS)
    reference = builtin("modeling_imagegpt").ImageGPTForCausalImageModeling(config).eval()
    folder.mkdir(parents=True)
    config = {**OPENAI_SMALL_CONFIG, **DIMS}  # its config.json, with the tiny sizes
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {key: value.clone() for key, value in reference.state_dict().items()}
    if weights == "pytorch_model.bin":
        # transformers 4 saved the causal-mask buffers of every attention layer with the weights.
        n = DIMS["n_positions"]
        for i in range(DIMS["n_layer"]):
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file({key: value.contiguous() for key, value in state.items()}, folder / "model.safetensors")
    preprocessor = {"clusters": PALETTE.tolist(), "do_normalize": True, "do_resize": True, "resample": 2}
    if processor_style == "feature_extractor":  # as uploaded in 2021
        preprocessor |= {"feature_extractor_type": "ImageGPTFeatureExtractor", "size": 8}
    else:
        preprocessor |= {"image_processor_type": "ImageGPTImageProcessor", "size": {"height": 8, "width": 8}}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return reference


@pytest.mark.parametrize(
    ("weights", "processor_style"),
    [("pytorch_model.bin", "feature_extractor"), ("model.safetensors", "image_processor")],
)
def test_openai_imagegpt_small_layout_loads_into_this_package(tmp_path, weights, processor_style):
    folder = tmp_path / "imagegpt-small"
    reference = openai_style_folder(folder, weights, processor_style)

    lm, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert type(lm) is ImageGPTForCausalImageModeling
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    x = pixels()
    torch.testing.assert_close(lm.eval()(x).logits, reference(x).logits, atol=TOL, rtol=0)
    assert lm.dtype == torch.float32

    processor = AutoImageProcessor.from_pretrained(folder)
    assert isinstance(processor, ImageGPTImageProcessor)
    theirs = ImageGPTImageProcessorPil(clusters=PALETTE, size={"height": 8, "width": 8})
    ids = processor(image(), return_tensors="pt")["input_ids"]
    assert ids.shape == (1, DIMS["n_positions"])
    assert torch.equal(ids, theirs(image(), return_tensors="pt")["input_ids"])

    extractor = pipeline("image-feature-extraction", model=str(folder))
    assert type(extractor.model) is ImageGPTModel
    pooled = extractor(image(), pool=True, return_tensors=True)
    expected = lm.transformer.extract_features(ids, layers=[DIMS["n_layer"] // 2])[0]
    torch.testing.assert_close(pooled, expected, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------------- push_to_hub


@pytest.fixture
def fake_upload(monkeypatch):
    """`HfApi` without a network: `create_repo` answers, `create_commit` records each file it would upload."""
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        files = {}
        for operation in operations:
            source = operation.path_or_fileobj
            files[operation.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
        uploads.append({"repo_id": repo_id, "files": files, "message": commit_message})
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}",
            commit_message=commit_message or "",
            commit_description="",
            oid=COMMIT,
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the card lookup of push_to_hub stays local
    return uploads


def test_push_to_hub_uploads_weights_config_code_and_card(fake_upload, checkpoints):
    _, model, processor = checkpoints
    model.push_to_hub("org/igpt-pushed")
    processor.push_to_hub("org/igpt-pushed")
    ImageGPTFeatureExtractionPipeline(model=model.transformer, image_processor=processor).push_to_hub("org/igpt-feat")
    assert [u["repo_id"] for u in fake_upload] == ["org/igpt-pushed", "org/igpt-pushed", "org/igpt-feat"]
    model_files, processor_files, pipeline_files = (u["files"] for u in fake_upload)

    assert {"config.json", "model.safetensors", "configuration_imagegpt.py", "modeling_imagegpt.py"} <= set(
        model_files
    )
    assert "README.md" in model_files
    config = json.loads(model_files["config.json"])
    assert config["model_type"] == "imagegpt"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_imagegpt.ImageGPTConfig",
        "AutoModel": "modeling_imagegpt.ImageGPTModel",
        "AutoModelForCausalLM": "modeling_imagegpt.ImageGPTForCausalImageModeling",
        "AutoModelForMaskedImageModeling": "modeling_imagegpt.ImageGPTForMaskedImageModeling",
        "AutoModelForImageClassification": "modeling_imagegpt.ImageGPTForImageClassification",
    }

    assert {"preprocessor_config.json", "image_processing_imagegpt.py"} <= set(processor_files)
    preprocessor = json.loads(processor_files["preprocessor_config.json"])
    assert preprocessor["auto_map"] == {"AutoImageProcessor": "image_processing_imagegpt.ImageGPTImageProcessor"}
    assert np.allclose(preprocessor["clusters"], PALETTE)

    assert {"pipelines.py", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(pipeline_files)
    assert "image-feature-extraction" in json.loads(pipeline_files["config.json"])["custom_pipelines"]
    shipped = Path(sys.modules[ImageGPTFeatureExtractionPipeline.__module__].__file__).read_bytes()
    assert pipeline_files["pipelines.py"] == shipped
