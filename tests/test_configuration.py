import json

import pytest
from conftest import builtin
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import AutoConfig

from image_gpt_hf import PRESETS, ImageGPTConfig

# config.json of the Hub's openai/imagegpt-small, as transformers 4 wrote it (including keys transformers 5 dropped).
OPENAI_SMALL_CONFIG = {
    "activation_function": "quick_gelu",
    "architectures": ["ImageGPTForCausalImageModeling"],
    "attn_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "imagegpt",
    "n_embd": 512,
    "n_head": 8,
    "n_inner": None,
    "n_layer": 24,
    "n_positions": 1024,
    "reorder_and_upcast_attn": False,
    "resid_pdrop": 0.1,
    "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.13.0.dev0",
    "use_cache": True,
    "vocab_size": 513,
}


def test_fields_and_defaults_match_transformers():
    ours, theirs = ImageGPTConfig().to_dict(), builtin("configuration_imagegpt").ImageGPTConfig().to_dict()
    for key, value in theirs.items():
        if key == "transformers_version":
            continue
        assert key in ours, key
        assert ours[key] == value, key
    added = set(ours) - set(theirs)
    assert added == {"objective", "prepend_sos", "classifier_layer", "gen_loss_weight", "feature_layer", "class_conditional"}


def test_openai_hub_config_loads_unchanged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OPENAI_SMALL_CONFIG))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, ImageGPTConfig)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_positions) == (24, 512, 8, 1024)
    assert config.vocab_size == 513 and config.sos_token_id == 512 and config.palette_size == 512
    assert config.objective == "ar" and not config.prepend_sos and config.n_px == 32


def test_our_config_loads_in_transformers(tmp_path):
    ImageGPTConfig.from_preset("tiny", n_px=16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "imagegpt"
    theirs = builtin("configuration_imagegpt").ImageGPTConfig.from_pretrained(tmp_path)
    assert (theirs.n_layer, theirs.n_embd, theirs.n_positions) == (6, 128, 256)
    # The source file travels with the config, for trust_remote_code.
    assert (tmp_path / "configuration_imagegpt.py").exists()
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoConfig"] == (
        "configuration_imagegpt.ImageGPTConfig"
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"objective": "bert"},
        {"prepend_sos": True},
        {"classifier_layer": 2},
        {"feature_layer": -1},
        {"gen_loss_weight": 1.0},
        {"class_conditional": True},
    ],
)
def test_what_the_builtin_cannot_compute_is_saved_under_a_type_of_its_own(tmp_path, fields):
    config = ImageGPTConfig.from_preset("tiny", n_px=8, **fields)
    assert not config.builtin_compatible
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "image_gpt_hf"
    for loaded in (AutoConfig.from_pretrained(tmp_path), ImageGPTConfig.from_pretrained(tmp_path)):
        assert type(loaded) is ImageGPTConfig and loaded.model_type == "imagegpt"
        assert loaded.to_dict() | {"_name_or_path": ""} == config.to_dict()
    # Reset to the defaults, the same config is one the built-in computes, and is saved as such.
    loaded = ImageGPTConfig.from_pretrained(tmp_path)
    for name in fields:
        setattr(loaded, name, ImageGPTConfig().to_dict()[name])
    assert loaded.builtin_compatible and loaded.to_dict()["model_type"] == "imagegpt"


def test_auto_config_is_ours_after_import():
    """Importing the package replaces transformers' own entry for "imagegpt" (conftest imports image_gpt_hf)."""
    assert type(AutoConfig.for_model("imagegpt")) is ImageGPTConfig
    assert ImageGPTConfig is not builtin("configuration_imagegpt").ImageGPTConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("n_px", [32, 48, 64])
def test_presets(name, n_px):
    config = ImageGPTConfig.from_preset(name, n_px=n_px)
    assert config.n_positions == n_px * n_px and config.n_px == n_px
    assert (config.n_layer, config.n_embd, config.n_head) == tuple(
        PRESETS[name][k] for k in ("n_layer", "n_embd", "n_head")
    )
    assert config.n_embd % config.n_head == 0


def test_paper_sizes():
    assert PRESETS["small"] == {"n_layer": 24, "n_embd": 512, "n_head": 8}
    assert PRESETS["medium"] == {"n_layer": 36, "n_embd": 1024, "n_head": 8}
    assert PRESETS["large"] == {"n_layer": 48, "n_embd": 1536, "n_head": 16}
    assert PRESETS["xl"]["n_layer"] == 60 and PRESETS["xl"]["n_embd"] == 3072


def test_preset_overrides_and_palette_size():
    config = ImageGPTConfig.from_preset("small", n_px=48, palette_size=16, objective="bert", n_layer=2)
    assert config.vocab_size == 17 and config.objective == "bert" and config.n_layer == 2
    assert (config.n_positions, config.n_px) == (48 * 48, 48)
    # The fields themselves may stand in for n_px and palette_size, and agreeing keywords are accepted.
    config = ImageGPTConfig.from_preset("tiny", n_positions=64, vocab_size=17)
    assert (config.n_px, config.palette_size) == (8, 16)
    assert ImageGPTConfig.from_preset("tiny", n_px=8, n_positions=64, palette_size=16, vocab_size=17).n_px == 8
    default = ImageGPTConfig.from_preset("tiny")
    assert (default.n_px, default.palette_size) == (32, 512)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"n_px": 8, "palette_size": 16, "vocab_size": 100},
            r"`palette_size`=16 disagrees with the fields. palette_size=99",
        ),
        ({"n_px": 8, "n_positions": 100}, r"`n_px`=8 disagrees with the fields. n_px=10"),
    ],
)
def test_preset_keywords_that_disagree_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageGPTConfig.from_preset("tiny", **kwargs)


def test_the_image_size_is_n_positions_and_n_px_is_read_where_it_agrees(tmp_path):
    with pytest.raises(ValueError, match=r"`n_px`=8 disagrees with the fields. n_px=32"):
        ImageGPTConfig(n_px=8)
    assert ImageGPTConfig(n_px=8, n_positions=64).n_px == 8
    # A config.json that names the image side: alone it is unambiguous; beside a different n_positions it is refused.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "imagegpt", "n_px": 8, "vocab_size": 17}))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, ImageGPTConfig) and config.n_positions == 64 and "n_px" not in config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "imagegpt", "n_px": 8, "n_positions": 100}))
    with pytest.raises(ValueError, match=r"`n_px`=8 disagrees with the fields. n_px=10"):
        ImageGPTConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_embd": 100, "n_head": 3}, r"embed_dim \(100\) is not a multiple of the number of attention heads \(3\)"),
        ({"objective": "gpt"}, "objective"),
        ({"classifier_layer": 30}, r"Layer 30 is not a hidden-state index of a 24-layer model \(`classifier_layer`\)"),
        ({"feature_layer": -26}, r"Layer -26 is not a hidden-state index.*`feature_layer`"),
        ({"gen_loss_weight": -1.0}, "gen_loss_weight"),
        ({"gen_loss_weight": float("nan")}, "gen_loss_weight"),
        ({"objective": "bert", "prepend_sos": True}, "prepend_sos"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(
        (ValueError, StrictDataclassClassValidationError, StrictDataclassFieldValidationError), match=message
    ):
        ImageGPTConfig(**kwargs)


def test_bad_preset_arguments():
    with pytest.raises(ValueError, match="Unknown preset"):
        ImageGPTConfig.from_preset("huge")
    with pytest.raises(ValueError, match="n_px"):
        ImageGPTConfig.from_preset("tiny", n_px=0)
    assert ImageGPTConfig(n_layer=3, feature_layer=-1).hidden_state_index(None) == 3
    assert ImageGPTConfig(n_layer=4).hidden_state_index(None) == 2  # the middle, the paper's best probe layer
    with pytest.raises(ValueError, match="not a square"):
        _ = ImageGPTConfig(n_positions=1000).n_px
