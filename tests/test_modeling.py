"""The decoder and its heads: parity with transformers' ImageGPT, OpenAI's objectives, and clear errors."""

import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DIMS, builtin, run_without_package
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
    DynamicCache,
    StaticCache,
)
from transformers.utils import logging as transformers_logging

from image_gpt_hf import (
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    ImageGPTForMaskedImageModeling,
    ImageGPTModel,
    random_bert_mask,
)
from image_gpt_hf.transformers_compat import CACHE_OUTPUT_FIELD, output_cache

TOL = 1e-5  # max abs difference allowed against transformers' ImageGPT in float32
# head_dim 8: not a perfect square, so the parity tests see the attention scale exactly (transformers' ImageGPT before
# 5.22, below the supported range, rounded sqrt(head_dim)).
DIMS = TINY_DIMS
PALETTE = DIMS["vocab_size"] - 1
SOS = DIMS["vocab_size"] - 1
ATTN = ["eager", "sdpa"]


def make(cls, attn="sdpa", **kwargs):
    return cls(ImageGPTConfig(**{**DIMS, **kwargs}, attn_implementation=attn)).eval()


def twin(ours, name, **kwargs):
    """transformers' model of the class `name`, carrying our weights."""
    config = builtin("configuration_imagegpt").ImageGPTConfig(**{**DIMS, **kwargs})
    theirs = getattr(builtin("modeling_imagegpt"), name)(config).eval()
    result = theirs.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return theirs


def pixels(batch=3, length=64, generator_seed=1):
    return torch.randint(0, PALETTE, (batch, length), generator=torch.Generator().manual_seed(generator_seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("attn", ATTN)
def test_causal_parity_logits_hidden_states_and_loss(attn):
    ours = make(ImageGPTForCausalImageModeling, attn)
    theirs = twin(ours, "ImageGPTForCausalImageModeling")
    x = pixels()
    a = ours(x, labels=x, output_hidden_states=True)
    b = theirs(x, labels=x, output_hidden_states=True)
    assert a.logits.shape == (3, 64, PALETTE)
    assert max_diff(a.logits, b.logits) < TOL
    assert abs(a.loss.item() - b.loss.item()) < TOL
    assert len(a.hidden_states) == len(b.hidden_states) == DIMS["n_layer"] + 1
    assert all(max_diff(p, q) < TOL for p, q in zip(a.hidden_states, b.hidden_states))


def test_attentions_parity_eager():
    ours = make(ImageGPTForCausalImageModeling, "eager")
    theirs = twin(ours, "ImageGPTForCausalImageModeling")
    x = pixels()
    a, b = ours(x, output_attentions=True), theirs(x, output_attentions=True)
    assert len(a.attentions) == DIMS["n_layer"]
    for p, q in zip(a.attentions, b.attentions):
        assert p.shape == (3, DIMS["n_head"], 64, 64) and max_diff(p, q) < TOL


@pytest.mark.parametrize("attn", ATTN)
def test_classification_parity(attn):
    ours = make(ImageGPTForImageClassification, attn, num_labels=5)
    theirs = twin(ours, "ImageGPTForImageClassification", num_labels=5)
    y = torch.tensor([0, 3, 4])
    for x in (pixels(), pixels(3, 16)):  # a whole image, and part of one (the mean over the ids given)
        a, b = ours(x, labels=y), theirs(x, labels=y)
        assert max_diff(a.logits, b.logits) < TOL
        assert abs(a.loss.item() - b.loss.item()) < TOL


def test_token_type_ids_and_position_ids_as_transformers():
    ours = make(ImageGPTForCausalImageModeling)
    theirs = twin(ours, "ImageGPTForCausalImageModeling")
    x = pixels()
    types = torch.randint(0, DIMS["vocab_size"], x.shape, generator=torch.Generator().manual_seed(4))
    positions = torch.arange(64).flip(0).expand(3, -1)
    a = ours(x, token_type_ids=types, position_ids=positions).logits
    assert max_diff(a, theirs(x, token_type_ids=types, position_ids=positions).logits) < TOL
    assert max_diff(a, ours(x).logits) > 1e-3  # they do change the result


def test_labels_with_sos_at_position_zero_as_transformers():
    """`labels=input_ids` with SOS first: after the shift position 0 is never a target (transformers' pattern)."""
    ours = make(ImageGPTForCausalImageModeling)
    theirs = twin(ours, "ImageGPTForCausalImageModeling")
    x = torch.cat([torch.full((3, 1), SOS), pixels(3, 63)], dim=1)
    assert abs(ours(x, labels=x).loss.item() - theirs(x, labels=x).loss.item()) < TOL


@pytest.mark.parametrize("cls, kwargs", [(ImageGPTModel, {}), (ImageGPTForImageClassification, {"num_labels": 2})])
def test_selected_hidden_states_only(cls, kwargs):
    model = make(cls, **kwargs)
    x = pixels()
    every = model(x, output_hidden_states=True).hidden_states
    for selection, kept in (([1, 2], {1, 2}), ([0, -1], {0, 3}), (2, {2})):
        selected = model(x, output_hidden_states=selection).hidden_states
        assert len(selected) == len(every) == DIMS["n_layer"] + 1  # None where a state is not selected
        for i, state in enumerate(selected):
            assert (state is None) == (i not in kept) and (state is None or max_diff(state, every[i]) < TOL)


@pytest.mark.parametrize("objective", ["ar", "bert"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_and_sdpa_agree(objective, padding, dtype):
    """What transformers' common eager-vs-sdpa test checks (it cannot run on this package's classes: see
    tests/transformers_suite_allowlist.txt): the same outputs with and without padding, in fp32 and bf16."""
    eager = make(ImageGPTModel, "eager", objective=objective).to(dtype)
    sdpa = make(ImageGPTModel, "sdpa", objective=objective).to(dtype)
    sdpa.load_state_dict(eager.state_dict())
    x = pixels()
    mask = torch.ones_like(x)
    if padding == "left":
        mask[0, :9] = 0
    elif padding == "right":
        mask[0, -9:] = 0
    kwargs = {} if padding is None else {"attention_mask": mask}
    a, b = (model(x, output_hidden_states=True, **kwargs) for model in (eager, sdpa))
    kept = mask.bool()  # padded positions' outputs are meaningless
    if dtype == torch.float32:
        for p, q in zip(a.hidden_states, b.hidden_states):
            assert max_diff(p[kept], q[kept]) < TOL
    else:  # the final output (normed, up to ~4 in size) within 2 bf16 steps there, and close on average
        p, q = a.last_hidden_state[kept].float(), b.last_hidden_state[kept].float()
        assert max_diff(p, q) <= 2 * 2**-6 and (p - q).abs().mean() < 5e-3


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_flex_attention_matches_sdpa_with_and_without_padding(objective, attention_calls):
    """transformers' flex attention (compiled, on CPU too) gives sdpa's results, causal and bidirectional."""
    cls = ImageGPTForCausalImageModeling if objective == "ar" else ImageGPTForMaskedImageModeling
    sdpa = make(cls, "sdpa", objective=objective)
    flex = make(cls, "flex_attention", objective=objective)
    flex.load_state_dict(sdpa.state_dict())
    calls = attention_calls("flex_attention")
    x = pixels()
    padding = torch.ones_like(x)
    padding[0, :5] = 0
    kwargs = {"bool_masked_pos": random_bert_mask(x.shape, generator=torch.Generator().manual_seed(0))}
    kwargs = kwargs if objective == "bert" else {}
    with torch.no_grad():
        assert max_diff(sdpa(x, **kwargs).logits, flex(x, **kwargs).logits) < TOL
        padded = [m(x, attention_mask=padding, **kwargs).logits for m in (sdpa, flex)]
    assert max_diff(padded[0][1:], padded[1][1:]) < TOL and max_diff(padded[0][0, 5:], padded[1][0, 5:]) < TOL
    assert calls["flex_attention"] == 2 * DIMS["n_layer"]  # flex really ran, in every layer of both calls


@pytest.mark.parametrize("attn", ATTN)
def test_greedy_generate_matches_transformers(attn):
    ours = make(ImageGPTForCausalImageModeling, attn)
    theirs = twin(ours, "ImageGPTForCausalImageModeling")
    start = torch.full((2, 1), SOS)
    a = ours.generate(start, max_length=DIMS["n_positions"] + 1, do_sample=False)
    b = theirs.generate(start, max_length=DIMS["n_positions"] + 1, do_sample=False)
    assert a.shape == (2, 65)
    assert torch.equal(a, b)


@pytest.mark.parametrize("cache_class", ["dynamic", "static"])
def test_cached_steps_give_the_logits_of_the_full_forward(cache_class):
    model = make(ImageGPTForCausalImageModeling)
    x = torch.cat([torch.full((2, 1), SOS), pixels(2, 20)], dim=1)
    full = model(x, use_cache=False).logits
    cache = DynamicCache(config=model.config) if cache_class == "dynamic" else StaticCache(model.config, 64)
    logits = [model(x[:, :12], cache=cache, use_cache=True).logits]
    for t in range(12, 21):  # then one token at a time
        logits.append(model(x[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert max_diff(torch.cat(logits, 1), full) < TOL


def test_static_cache_generate_matches_dynamic():
    model = make(ImageGPTForCausalImageModeling)
    start = torch.full((2, 1), SOS)
    dynamic = model.generate(start, max_length=65, do_sample=False)
    static = model.generate(start, max_length=65, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_sampling_options_are_honoured():
    model = make(ImageGPTForCausalImageModeling)
    start = torch.full((3, 1), SOS)
    greedy = model.generate(start, max_length=65, do_sample=False)

    def draw(**options):
        torch.manual_seed(0)
        return model.generate(start, max_length=65, do_sample=True, temperature=3.0, **options)

    free = draw()
    assert free.shape == (3, 65) and (free[:, 1:] < PALETTE).all() and (free[:, 1:] >= 0).all()
    assert not torch.equal(free, greedy)  # it does sample
    # The same draws, truncated to the most likely pixel: top_k=1, or a nucleus smaller than any pixel's probability.
    assert torch.equal(draw(top_k=1), greedy)
    assert torch.equal(draw(top_p=1e-6), greedy)


def test_generate_with_prepend_sos_config_is_not_shifted_twice():
    model = make(ImageGPTForCausalImageModeling, prepend_sos=True)
    reference = make(ImageGPTForCausalImageModeling)
    reference.load_state_dict(model.state_dict())
    start = torch.full((1, 1), SOS)
    assert torch.equal(
        model.generate(start, max_length=30, do_sample=False),
        reference.generate(start, max_length=30, do_sample=False),
    )


# ------------------------------------------------------------------------------------- checkpoints, both directions


@pytest.mark.parametrize(
    "ours_cls, hf_name, kwargs",
    [
        (ImageGPTModel, "ImageGPTModel", {}),
        (ImageGPTForCausalImageModeling, "ImageGPTForCausalImageModeling", {}),
        (ImageGPTForImageClassification, "ImageGPTForImageClassification", {"num_labels": 4}),
    ],
)
def test_checkpoint_round_trip_both_ways(tmp_path, ours_cls, hf_name, kwargs):
    x = pixels()
    ours = make(ours_cls, **kwargs)
    ours.save_pretrained(tmp_path / "ours")
    theirs = getattr(builtin("modeling_imagegpt"), hf_name).from_pretrained(tmp_path / "ours").eval()
    first = lambda out: out[0]  # noqa: E731
    assert max_diff(first(ours(x)), first(theirs(x))) < TOL

    theirs.save_pretrained(tmp_path / "theirs")
    back = ours_cls.from_pretrained(tmp_path / "theirs").eval()
    assert max_diff(first(back(x)), first(ours(x))) < TOL


def test_auto_classes_build_ours(tmp_path):
    make(ImageGPTForCausalImageModeling).save_pretrained(tmp_path / "ar")
    make(ImageGPTForMaskedImageModeling, objective="bert").save_pretrained(tmp_path / "bert")
    assert type(AutoModel.from_pretrained(tmp_path / "ar")) is ImageGPTModel
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "ar")) is ImageGPTForCausalImageModeling
    assert type(AutoModelForMaskedImageModeling.from_pretrained(tmp_path / "bert")) is ImageGPTForMaskedImageModeling
    clf = AutoModelForImageClassification.from_pretrained(tmp_path / "ar", num_labels=3)
    assert type(clf) is ImageGPTForImageClassification and clf.score.out_features == 3
    assert AutoModel.from_pretrained(tmp_path / "bert").config.objective == "bert"


def test_old_checkpoint_buffers_are_ignored(tmp_path):
    """The Hub's openai/imagegpt-* weights carry transformers 4's `attn.bias` / `attn.masked_bias` buffers."""
    ours = make(ImageGPTForCausalImageModeling)
    state = dict(ours.state_dict())
    for i in range(DIMS["n_layer"]):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.uint8))
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    ours.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded, info = ImageGPTForCausalImageModeling.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    x = pixels()
    assert max_diff(loaded.eval()(x).logits, ours(x).logits) < TOL


# Each kind of checkpoint: (head, config fields, the head's auto class).
CHECKPOINT_KINDS = {
    "ar": (ImageGPTForCausalImageModeling, {}, "AutoModelForCausalLM"),
    "ar_prepend_sos": (ImageGPTForCausalImageModeling, {"prepend_sos": True}, "AutoModelForCausalLM"),
    "bert": (ImageGPTForMaskedImageModeling, {"objective": "bert"}, "AutoModelForMaskedImageModeling"),
    "classifier_middle_layer": (
        ImageGPTForImageClassification,
        {"num_labels": 3, "classifier_layer": 1, "gen_loss_weight": 0.5},
        "AutoModelForImageClassification",
    ),
    "class_conditional": (
        ImageGPTForCausalImageModeling,
        {"class_conditional": True, "prepend_sos": True, "num_labels": 3, "vocab_size": TINY_DIMS["vocab_size"] + 3},
        "AutoModelForCausalLM",
    ),
}

LOAD_EACH_KIND = """
import json, sys
import torch
import transformers
from transformers import AutoModel

folders, x, out = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
results = {}
for kind, (folder, head_auto_class) in folders.items():
    try:
        plain = AutoModel.from_pretrained(folder).eval()
        results[kind, "plain"] = (type(plain).__module__, plain(x).last_hidden_state)
    except Exception as error:
        results[kind, "plain"] = (type(error).__name__, str(error))
    remote = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    head = getattr(transformers, head_auto_class).from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        results[kind, "remote"] = (type(remote).__module__, remote(x).last_hidden_state)
        results[kind, "remote_head"] = (type(head).__module__, head(x).logits)
torch.save(results, out)
"""


def test_each_kind_of_checkpoint_without_the_package(tmp_path):
    """Where image_gpt_hf cannot be imported, plain `AutoModel.from_pretrained` gives this package's numbers (a
    checkpoint transformers' built-in computes exactly) or refuses with a message asking for remote code; with
    `trust_remote_code=True` every kind gives this package's numbers."""
    x = pixels()
    folders, expected = {}, {}
    for kind, (cls, fields, head_auto_class) in CHECKPOINT_KINDS.items():
        torch.manual_seed(0)
        model = make(cls, **fields)
        model.save_pretrained(tmp_path / kind)
        assert {"configuration_imagegpt.py", "modeling_imagegpt.py", "transformers_compat.py"} <= set(
            os.listdir(tmp_path / kind)
        )
        folders[kind] = (str(tmp_path / kind), head_auto_class)
        with torch.no_grad():
            expected[kind] = (model.transformer(x).last_hidden_state, model(x).logits)
    builtin()  # the plain load below is transformers' own model
    out = tmp_path / "results.pt"
    run_without_package(LOAD_EACH_KIND, json.dumps(folders), json.dumps(x.tolist()), str(out), cwd=tmp_path)
    results = torch.load(out)
    for kind in CHECKPOINT_KINDS:
        hidden, logits = expected[kind]
        where, plain = results[kind, "plain"]
        if kind == "ar":  # transformers' own ImageGPT, with the same numbers
            assert where == "transformers.models.imagegpt.modeling_imagegpt" and max_diff(plain, hidden) < TOL
        else:  # refused, with a message that says how to load it
            assert where == "ValueError" and "trust_remote_code=True" in plain, (kind, where, plain)
        for name, reference in (("remote", hidden), ("remote_head", logits)):
            where, value = results[kind, name]
            assert where.startswith("transformers_modules"), where
            assert max_diff(value, reference) < TOL, (kind, name)


# --------------------------------------------------------------------------------------- OpenAI's objectives


def test_prepend_sos_is_openai_generative_loss():
    model = make(ImageGPTForCausalImageModeling)
    x = pixels()
    out = model(x, labels=x, prepend_sos=True)
    # By hand: input [SOS, x_1..x_{n-1}], logits[:, t] predicts x_t, mean over all n pixels.
    manual_input = torch.cat([torch.full((3, 1), SOS), x[:, :-1]], 1)
    logits = model(manual_input).logits
    assert max_diff(out.logits, logits) < TOL
    expected = F.cross_entropy(logits.reshape(-1, PALETTE), x.reshape(-1))
    assert abs(out.loss.item() - expected.item()) < TOL
    # The config default does the same.
    by_config = make(ImageGPTForCausalImageModeling, prepend_sos=True)
    by_config.load_state_dict(model.state_dict())
    assert abs(by_config(x, labels=x).loss.item() - expected.item()) < TOL


def test_transformers_style_labels_are_shifted():
    model = make(ImageGPTForCausalImageModeling)
    x = pixels()
    out = model(x, labels=x)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, PALETTE), x[:, 1:].reshape(-1))
    assert abs(out.loss.item() - expected.item()) < TOL


def test_causal_attention_does_not_look_ahead_and_bert_does():
    x = pixels(1)
    y = x.clone()
    y[0, 40] = (y[0, 40] + 1) % PALETTE
    ar = make(ImageGPTModel)
    a, b = ar(x).last_hidden_state, ar(y).last_hidden_state
    assert max_diff(a[:, :40], b[:, :40]) < TOL and max_diff(a[:, 40:], b[:, 40:]) > 1e-3
    bert = make(ImageGPTModel, objective="bert")
    a, b = bert(x).last_hidden_state, bert(y).last_hidden_state
    assert max_diff(a[:, :40], b[:, :40]) > 1e-3


@pytest.mark.parametrize("attn", ATTN)
def test_bert_masking_zeroes_embeddings_and_loss_is_openai(attn):
    model = make(ImageGPTForMaskedImageModeling, attn, objective="bert")
    x = pixels()
    mask = random_bert_mask(x, generator=torch.Generator().manual_seed(3))
    mask[2] = False  # an image with nothing masked does not count in the loss
    out = model(x, bool_masked_pos=mask, labels=x)
    # Zeroed input embeddings: the masked token's identity must not matter.
    y = x.clone()
    y[mask] = (y[mask] + 5) % PALETTE
    assert max_diff(model(y, bool_masked_pos=mask).logits, out.logits) < TOL
    embeds = model.transformer.wte(x) * (~mask).unsqueeze(-1)
    assert max_diff(model(inputs_embeds=embeds).logits, out.logits) < TOL
    # OpenAI's loss: per image, mean CE over masked positions; then mean over images.
    ce = F.cross_entropy(out.logits.transpose(1, 2), x, reduction="none")
    per_image = [ce[i][mask[i]].mean() for i in range(2)]
    assert abs(out.loss.item() - torch.stack(per_image).mean().item()) < TOL


def test_random_bert_mask_rate_and_shape():
    mask = random_bert_mask((64, 1024), generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (64, 1024)
    assert abs(mask.float().mean().item() - 0.15) < 0.01
    assert random_bert_mask(pixels(), mask_prob=0.0).sum() == 0
    with pytest.raises(ValueError, match="mask_prob"):
        random_bert_mask((2, 3), mask_prob=1.5)


def test_classification_layer_choice_and_joint_loss():
    model = make(ImageGPTForImageClassification, num_labels=4, classifier_layer=1, gen_loss_weight=0.5)
    x, y = pixels(), torch.tensor([0, 1, 3])
    out = model(x, labels=y, prepend_sos=True)
    base = model.transformer(x, prepend_sos=True, output_hidden_states=True)
    # The paper's n^l: layer 1's hidden state through block 1's ln_1, averaged over positions.
    assert max_diff(out.logits, model.score(model.transformer.h[1].ln_1(base.hidden_states[1]).mean(1))) < TOL
    clf = F.cross_entropy(out.logits, y)
    gen = F.cross_entropy(model.lm_head(base.last_hidden_state).reshape(-1, PALETTE), x.reshape(-1))
    assert abs(out.clf_loss.item() - clf.item()) < TOL and abs(out.gen_loss.item() - gen.item()) < TOL
    assert abs(out.loss.item() - (clf + 0.5 * gen).item()) < TOL


def test_bert_classification_joint_loss_is_the_papers_and_needs_a_mask():
    model = make(ImageGPTForImageClassification, objective="bert", num_labels=2, gen_loss_weight=0.5)
    x, y = pixels(), torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match="bool_masked_pos"):
        model(x, labels=y)
    mask = random_bert_mask(x, generator=torch.Generator().manual_seed(3))
    assert mask.any(dim=1).all()
    out = model(x, labels=y, bool_masked_pos=mask)
    # By hand: the classifier on the mean of the final normed layer, OpenAI's BERT loss on the masked positions.
    hidden = model.transformer(x, bool_masked_pos=mask).last_hidden_state
    clf = F.cross_entropy(model.score(hidden.mean(1)), y)
    ce = F.cross_entropy(model.lm_head(hidden).transpose(1, 2), x, reduction="none")
    gen = torch.stack([ce[i][mask[i]].mean() for i in range(3)]).mean()
    assert abs(out.clf_loss.item() - clf.item()) < TOL and abs(out.gen_loss.item() - gen.item()) < TOL
    assert abs(out.loss.item() - (clf + 0.5 * gen).item()) < TOL


def test_classification_without_gen_weight_has_no_lm_head():
    model = make(ImageGPTForImageClassification, num_labels=2)
    assert not hasattr(model, "lm_head")
    assert model(pixels(), labels=torch.tensor([0, 1, 0])).gen_loss is None


def test_heads_refuse_the_wrong_objective():
    with pytest.raises(ValueError, match="objective='bert'"):
        make(ImageGPTForMaskedImageModeling)
    with pytest.raises(ValueError, match="objective='ar'"):
        make(ImageGPTForCausalImageModeling, objective="bert")


# ----------------------------------------------------------------------------------------------- training & speed


def test_gradient_checkpointing_gives_the_same_gradients():
    x = pixels()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = make(ImageGPTForCausalImageModeling, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()
        if checkpointing:
            # transformers >= 5.2x renamed it activation_checkpointing_enable; both exist there.
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
            assert model.transformer.gradient_checkpointing
        model(x, labels=x).loss.backward()
        grads.append(model.transformer.h[0].attn.c_attn.weight.grad.clone())
    assert max_diff(*grads) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_and_backward(dtype):
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    model = make(ImageGPTForCausalImageModeling, **no_dropout).to(dtype).train()
    x = pixels()
    out = model(x, labels=x)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    reference = make(ImageGPTForCausalImageModeling)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert max_diff(out.logits.float(), reference(x).logits) < 0.1


def test_compile_fullgraph_has_no_graph_breaks():
    model = make(ImageGPTForCausalImageModeling)
    x = pixels()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph=True raises on any graph break
    with torch.no_grad():
        assert max_diff(compiled(x, labels=x).logits, model(x).logits) < TOL


# ---------------------------------------------------------------------------------------------------- bad input


def test_errors_torch_does_not_raise():
    """The refusals the model makes itself; torch and transformers raise for the rest (ids out of range, shapes)."""
    model = make(ImageGPTForCausalImageModeling)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="not both"):
        model(pixels(2, 4), cache=DynamicCache(), past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="need `bool_masked_pos`"):
        make(ImageGPTForMaskedImageModeling, objective="bert")(pixels(), labels=pixels())
    with pytest.raises(IndexError, match="index out of range"):  # torch's own, on CPU
        model(torch.tensor([[0, 1, 17]]))


@pytest.mark.parametrize("model", [ImageGPTModel, ImageGPTForImageClassification])
def test_a_bert_mask_is_refused_by_models_that_do_not_use_masks(model):
    """A causal model never saw zeroed embeddings: a BERT batch (`bool_masked_pos`) fed to it would change its output
    (up to 0.25 in the logits) without a word."""
    ar, x = make(model, num_labels=2), pixels()
    with pytest.raises(ValueError, match="`bool_masked_pos` masks pixels for BERT models"):
        ar(x, bool_masked_pos=random_bert_mask(x))
    bert = make(model, num_labels=2, objective="bert")
    assert not torch.equal(bert(x, bool_masked_pos=random_bert_mask(x))[0], bert(x)[0])


@pytest.mark.parametrize("mask_shape", [(3, 16), (16,), (2, 5), (2, 32), (2, 16, 16)])
@pytest.mark.parametrize("cls", [ImageGPTForCausalImageModeling, ImageGPTForImageClassification])
def test_a_padding_mask_of_the_wrong_shape_is_refused(mask_shape, cls):
    """transformers' masking utilities would read it misaligned, or not at all."""
    model = make(cls, num_labels=2)
    with pytest.raises(ValueError, match=r"`attention_mask` has shape .* expected \(2, 16\)"):
        model(pixels(2, 16), attention_mask=torch.ones(mask_shape, dtype=torch.long))


def test_attention_masks_of_the_right_shapes():
    model = make(ImageGPTForCausalImageModeling)
    x = pixels(2, 16)
    plain = model(x).logits
    assert max_diff(model(x, attention_mask=torch.ones(2, 16, dtype=torch.long)).logits, plain) < TOL
    assert max_diff(model(x, attention_mask=torch.ones(2, 16, dtype=torch.bool)).logits, plain) < TOL
    causal = torch.ones(16, 16, dtype=torch.bool).tril().expand(2, 1, 16, 16)
    assert max_diff(model(x, attention_mask=causal).logits, plain) < TOL


def test_an_integer_bert_mask_is_read_as_a_mask():
    """`~` of an int64 mask is -1/-2, not a mask: the model reads any dtype as true where nonzero."""
    model = make(ImageGPTForMaskedImageModeling, objective="bert")
    x = pixels(2, 16)
    mask = random_bert_mask(x, generator=torch.Generator().manual_seed(0))
    assert max_diff(model(x, bool_masked_pos=mask.long()).logits, model(x, bool_masked_pos=mask).logits) < TOL


def test_int32_ids_give_the_same_result():
    model = make(ImageGPTForCausalImageModeling)
    x = pixels(2, 16)
    assert max_diff(model(x.to(torch.int32), labels=x).logits, model(x, labels=x).logits) == 0


@pytest.mark.parametrize(
    "argument", ["encoder_hidden_states", "head_mask", "is_causal", "num_items_in_batch", "cache_position"]
)
@pytest.mark.parametrize("cls", [ImageGPTModel, ImageGPTForCausalImageModeling, ImageGPTForImageClassification])
def test_arguments_the_model_does_not_support_are_refused(argument, cls):
    """transformers' forwards take `**kwargs`; one they do not honour must not be silently dropped."""
    model = make(cls, num_labels=2)
    with pytest.raises(TypeError, match=argument):
        model(pixels(2, 8), **{argument: torch.zeros(2, 8)})


def test_bert_models_keep_no_cache_by_default():
    assert output_cache(make(ImageGPTModel, objective="bert")(pixels(2, 8))) is None
    assert output_cache(make(ImageGPTModel)(pixels(2, 8))) is not None


def test_a_given_cache_is_used_even_without_use_cache():
    """As in transformers: `use_cache=False` only means no cache is returned; a cache passed in is read."""
    model = make(ImageGPTForCausalImageModeling)
    x = pixels(2, 10)
    cache = output_cache(model(x[:, :6], use_cache=True))
    step = model(x[:, 6:], cache=cache, use_cache=False)
    assert output_cache(step) is None
    assert max_diff(step.logits, model(x, use_cache=False).logits[:, 6:]) < TOL


# Every input, ill-formed at random: the forward either gives the result of the well-formed equivalent of what it was
# given, or raises: torch's own error where torch rejects it, a ValueError naming the argument where the model does.
AR_MODEL = make(ImageGPTForCausalImageModeling)
BERT_MODEL = make(ImageGPTForMaskedImageModeling, objective="bert")
# What each argument must hold: (lowest valid value, highest valid value + 1), and the integer dtypes torch reads.
VALID = {
    "input_ids": (0, DIMS["vocab_size"]),
    "position_ids": (0, DIMS["n_positions"]),
    "token_type_ids": (0, DIMS["vocab_size"]),
    "labels": (0, PALETTE),
    "attention_mask": (0, 2),
    "bool_masked_pos": (0, 2),
}
INDEX_DTYPES = {torch.long, torch.int32}  # nn.Embedding's; cross_entropy takes int64 and uint8 targets
REFUSED_BY_THE_MODEL = {"attention_mask"}  # the one argument checked here (a misaligned padding mask is silent)


@st.composite
def forward_inputs(draw):
    batch, length = draw(st.integers(1, 3)), draw(st.integers(2, 12))
    name = draw(st.sampled_from(sorted(VALID)))
    shape = draw(st.sampled_from([(batch, length), (batch + 1, length), (batch, length + 1), (length,), (0, length)]))
    shape = draw(st.sampled_from([shape, (batch, length, 1), ()]))
    dtype = draw(st.sampled_from([torch.long, torch.int32, torch.uint8, torch.bool, torch.float32]))
    low, high = VALID[name]
    low, high = draw(st.sampled_from([(low, high), (low - 1, high), (low, high + 1), (-100, high)]))
    return batch, length, name, shape, dtype, low, high, draw(st.integers(0, 2**16))


def broadcasts(shape: tuple, to: tuple) -> bool:
    try:
        return torch.broadcast_shapes(shape, to) == to
    except RuntimeError:
        return False


def well_formed(name: str, value: torch.Tensor, batch: int, length: int) -> bool:
    """What the forward must accept, judged here independently of the model's checks."""
    if name == "input_ids":  # alone, any non-empty (batch, length) is well formed
        shape_ok = value.dim() == 2 and value.numel() > 0
    elif name in ("position_ids", "token_type_ids", "bool_masked_pos"):  # read by torch's broadcasting
        shape_ok = value.numel() > 0 and broadcasts(tuple(value.shape), (batch, length))
    else:
        shape_ok = tuple(value.shape) == (batch, length)
    if not shape_ok:
        return False
    if name in ("attention_mask", "bool_masked_pos"):  # masks: any dtype and values, true where nonzero
        return True
    if value.dtype not in (INDEX_DTYPES | {torch.uint8} if name == "labels" else INDEX_DTYPES):
        return False
    numbers = value.long()
    checked = numbers[:, 1:] if name == "labels" else numbers  # position 0 of shifted labels is never a target
    low, high = VALID[name]
    valid = ((checked >= low) & (checked < high)) | ((checked == -100) & (name == "labels"))
    return bool(valid.all())


@settings(max_examples=200, deadline=None, derandomize=True)  # the same examples in every run (CI)
@given(forward_inputs())
def test_forward_gives_the_well_formed_result_or_raises(case):
    batch, length, name, shape, dtype, low, high, seed = case
    g = torch.Generator().manual_seed(seed)
    model = BERT_MODEL if name == "bool_masked_pos" else AR_MODEL
    inputs = {} if name == "input_ids" else {"input_ids": torch.randint(0, PALETTE, (batch, length), generator=g)}
    values = torch.randint(low, high, shape, generator=g) if math.prod(shape) else torch.zeros(shape, dtype=torch.long)
    value = values != 0 if dtype == torch.bool else values.to(dtype)  # what a cast to uint8 makes of -1 is tested too
    inputs[name] = value
    accept = well_formed(name, value, batch, length)
    try:
        result = model(**inputs)
    except Exception as error:  # noqa: BLE001 - which error is the point of the test
        assert not accept, (name, tuple(value.shape), value.dtype, "well formed, but refused:", repr(error))
        if isinstance(error, ValueError) and name in REFUSED_BY_THE_MODEL:
            assert f"`{name}`" in str(error), (name, str(error))
        else:  # torch's own error, not one of ours restating it
            assert not str(error).startswith(f"`{name}`"), (name, str(error))
        return
    assert accept, (name, tuple(value.shape), value.dtype, "ill formed, but accepted")
    # Accepted: it gives what the canonical form of the same numbers gives.
    canonical = value.bool() if name in ("bool_masked_pos", "attention_mask") else value.long()
    if name == "labels":
        canonical = canonical.clone()
        canonical[:, 0] = 0
    expected = model(**{**inputs, name: canonical})
    assert torch.equal(result.logits, expected.logits)
    if name == "labels":
        assert torch.equal(result.loss, expected.loss)


def test_classification_labels_follow_transformers_problem_type():
    x = pixels()
    # One label: regression, for float and integer scores alike (transformers' rule for num_labels == 1).
    regression = make(ImageGPTForImageClassification, num_labels=1)
    for scores in (torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1, 0, 2])):
        out = regression(x, labels=scores)
        assert abs(out.loss.item() - F.mse_loss(out.logits.squeeze(-1), scores.float()).item()) < TOL
    assert regression.config.problem_type == "regression"
    # Float multi-hot labels: multi-label classification.
    multi = make(ImageGPTForImageClassification, num_labels=3)
    hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    out = multi(x, labels=hot)
    assert abs(out.loss.item() - F.binary_cross_entropy_with_logits(out.logits, hot).item()) < TOL
    assert multi.config.problem_type == "multi_label_classification"
    # Integer class ids: single-label classification.
    single = make(ImageGPTForImageClassification, num_labels=3)
    out = single(x, labels=torch.tensor([0, 2, 1]))
    assert abs(out.loss.item() - F.cross_entropy(out.logits, torch.tensor([0, 2, 1])).item()) < TOL


def test_a_loss_with_no_target_is_nan_for_both_objectives():
    """One rule, transformers' causal LMs': a mean over no target is nan (not 0, which would look like a perfect fit)."""
    x = pixels()
    assert torch.isnan(make(ImageGPTForCausalImageModeling)(x, labels=torch.full_like(x, -100)).loss)
    bert = make(ImageGPTForMaskedImageModeling, objective="bert")
    assert torch.isnan(bert(x, bool_masked_pos=torch.zeros_like(x, dtype=torch.bool), labels=x).loss)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[0, 5] = True  # one masked pixel: its loss alone (the images without one do not count)
    out = bert(x, bool_masked_pos=mask, labels=x)
    assert abs(out.loss.item() - F.cross_entropy(out.logits[0, 5:6], x[0, 5:6]).item()) < TOL


def test_part_of_an_image_is_pooled_as_given_with_a_warning(caplog):
    """As transformers' ImageGPT: the mean over the positions given (honouring a padding mask), and a warning that
    names both lengths; per-pixel outputs take any length, and the default pools whole images only."""
    x16, base = pixels(2, 16), make(ImageGPTModel)
    classifier = make(ImageGPTForImageClassification, num_labels=3)
    transformers_logging.warning_once.cache_clear()
    with caplog.at_level("WARNING"):
        logits = classifier(x16).logits
    assert "Pooling 16 positions, not a whole image of n_positions=64" in caplog.text
    last = classifier.transformer(x16, output_hidden_states=True).last_hidden_state
    assert max_diff(logits, classifier.score(last.mean(1))) < TOL
    features = base.extract_features(x16, layers=[1])
    assert max_diff(features[0], base.h[1].ln_1(base(x16, output_hidden_states=True).hidden_states[1]).mean(1)) < TOL
    assert (
        max_diff(base(x16, return_pooler_output=True).pooler_output, base.extract_features(x16, layers=None)[1]) < TOL
    )
    mask = torch.ones_like(x16)
    mask[0, 10:] = 0
    padded = base.extract_features(x16, layers=[0], attention_mask=mask)
    assert max_diff(padded[0, 0], base.extract_features(x16[:1, :10], layers=[0])[0, 0]) < TOL
    out = base(x16)  # by default pooled only when it is a whole image
    assert out.pooler_output is None and out.last_hidden_state.shape == (2, 16, DIMS["n_embd"])
    assert base(pixels(2, 64)).pooler_output.shape == (2, DIMS["n_embd"])


def test_prepend_sos_leaves_started_sequences_as_given_and_refuses_a_start_after_pixels():
    model = make(ImageGPTForCausalImageModeling)
    converted = make(ImageGPTForCausalImageModeling, prepend_sos=True)
    converted.load_state_dict(model.state_dict())
    with_sos = torch.cat([torch.full((3, 1), SOS), pixels(3, 63)], dim=1)
    # Started sequences (ids that begin with SOS, as generate() and its guidance pass them; a step on a cache) are
    # used as given: never a second SOS, and the labels shift as transformers' do.
    plain = model(with_sos, labels=with_sos)
    started = converted(with_sos, labels=with_sos)
    assert max_diff(started.logits, plain.logits) < TOL and abs(started.loss - plain.loss) < TOL
    cache = output_cache(converted(with_sos[:, :5], use_cache=True))
    step = converted(with_sos[:, 5:6], cache=cache)
    assert max_diff(step.logits[:, -1], plain.logits[:, 5]) < TOL
    # Pixel ids get SOS in front: logits[:, t] predicts pixel t.
    x = pixels(3, 64)
    assert max_diff(converted(x).logits, model(torch.cat([with_sos[:, :1], x[:, :-1]], 1)).logits) < TOL
    with pytest.raises(ValueError, match="attention_mask"):
        converted(pixels(1, 4), attention_mask=torch.ones(1, 4))
    mixed = torch.cat([pixels(1, 4), torch.full((1, 1), SOS), pixels(1, 3)], dim=1)
    with pytest.raises(ValueError, match="hold SOS or class ids"):
        converted(mixed)


# ------------------------------------------------------------------------------------------------------- features


def test_extract_features_are_the_papers_normed_layer_means():
    model = make(ImageGPTModel)
    x = pixels()
    features = model.extract_features(x)  # every layer, pooled
    assert features.shape == (DIMS["n_layer"] + 1, 3, DIMS["n_embd"])
    hidden = model(x, output_hidden_states=True).hidden_states
    for layer in range(DIMS["n_layer"]):
        assert max_diff(features[layer], model.h[layer].ln_1(hidden[layer]).mean(1)) < TOL
    assert max_diff(features[-1], hidden[-1].mean(1)) < TOL
    per_position = model.extract_features(x, layers=[1, -1], pool=False)
    assert per_position.shape == (2, 3, 64, DIMS["n_embd"])
    assert max_diff(per_position[1], hidden[-1]) < TOL


def test_pooler_output_is_the_middle_layer_by_default_and_follows_config():
    model = make(ImageGPTModel, n_layer=4)
    x = pixels()
    out = model(x)
    assert max_diff(out.pooler_output, model.extract_features(x, layers=2)[0]) < TOL
    model.config.feature_layer = -1
    assert max_diff(model(x).pooler_output, out.last_hidden_state.mean(1)) < TOL
    with pytest.raises(ValueError, match="Layer 7 is not a hidden-state index of a 4-layer model"):
        model.extract_features(x, layers=[7])  # never read modulo n_layer + 1 as another layer


def test_extract_features_with_openai_inputs_and_padding_mask():
    model = make(ImageGPTModel)
    x = pixels()
    a = model.extract_features(x, layers=[2], prepend_sos=True)
    b = model.extract_features(model.add_sos(x), layers=[2])
    assert max_diff(a, b) < TOL
    mask = torch.ones_like(x)
    mask[:, 32:] = 0
    masked = model.extract_features(x, layers=[0], attention_mask=mask)
    unmasked = model.extract_features(x, layers=[0], pool=False)
    assert max_diff(masked[0], unmasked[0, :, :32].mean(1)) < TOL


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_attention_weights_need_eager_attention(attn, caplog):
    """As transformers' models do with sdpa: the call runs and says that it computes no weights (never silently)."""
    transformers_logging.warning_once.cache_clear()
    model = make(ImageGPTForCausalImageModeling, attn)
    with caplog.at_level("WARNING"), torch.no_grad():  # (flex attention has no backward on CPU)
        assert not model(pixels(), output_attentions=True).attentions
    assert "needs attn_implementation='eager'" in caplog.text
    model.set_attn_implementation("eager")
    assert len(model(pixels(), output_attentions=True).attentions) == DIMS["n_layer"]


def test_extract_features_pools_with_a_padding_mask_only():
    model = make(ImageGPTModel)
    causal = torch.ones(64, 64, dtype=torch.bool).tril().expand(3, 1, 64, 64)
    with pytest.raises(ValueError, match="2-D `attention_mask`"):
        model.extract_features(pixels(), layers=[1], attention_mask=causal)
    assert model.extract_features(pixels(), layers=[1], attention_mask=causal, pool=False).shape == (1, 3, 64, 32)


def test_joint_loss_leaves_padded_positions_out():
    model = make(ImageGPTForImageClassification, num_labels=2, gen_loss_weight=1.0)
    x, y = pixels(2), torch.tensor([0, 1])
    mask = torch.ones_like(x)
    mask[0, 40:] = 0  # right padding
    out = model(x, attention_mask=mask, labels=y)
    other = x.clone()
    other[0, 40:] = (other[0, 40:] + 3) % PALETTE  # what the padding holds does not count
    assert abs(model(other, attention_mask=mask, labels=y).gen_loss.item() - out.gen_loss.item()) < TOL
    logits = model.lm_head(model.transformer(x, attention_mask=mask).last_hidden_state)
    targets = x.masked_fill(mask == 0, -100)[:, 1:]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, PALETTE), targets.reshape(-1), ignore_index=-100)
    assert abs(out.gen_loss.item() - expected.item()) < TOL


def test_the_old_cache_name_warns_at_the_users_call():
    model = make(ImageGPTForCausalImageModeling)
    cache = output_cache(model(pixels(1, 4), use_cache=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(pixels(1, 1), past_key_values=cache)
    future = [w for w in caught if issubclass(w.category, FutureWarning)]
    if CACHE_OUTPUT_FIELD == "cache":  # the release renamed it
        assert len(future) == 1 and future[0].filename == __file__
    else:
        assert future == []


# ---------------------------------------------------------------------------------------------- class-conditional


def test_class_conditional_model_starts_with_the_class_token_and_guides_through_generate():
    fields = {"class_conditional": True, "prepend_sos": True, "id2label": {0: "zero", 1: "one", 2: "two"}}
    model = make(ImageGPTForCausalImageModeling, **fields, vocab_size=DIMS["vocab_size"] + 3)
    config = model.config
    assert (config.palette_size, config.num_labels, config.sos_token_id) == (PALETTE, 3, PALETTE + 3)
    assert config.class_token_id("two") == config.class_token_id(2) == PALETTE + 2
    x, y = pixels(2), torch.tensor([1, -100])  # -100: no class (label dropout), SOS itself
    starts = torch.tensor([[config.class_token_id(1)], [config.sos_token_id]])
    out = model(x, labels=x, class_labels=y)
    given = model(torch.cat([starts, x[:, :-1]], 1), prepend_sos=False)
    assert max_diff(out.logits, given.logits) < TOL
    assert abs(out.loss - F.cross_entropy(given.logits.flatten(0, 1), x.flatten())) < TOL  # every pixel, no class id
    assert out.logits.shape[-1] == PALETTE  # the head predicts pixels only
    # Guidance through generate(): scale 1 gives the unguided tokens; another scale follows uncond + s (cond - uncond).
    prompt, negative = torch.full((2, 1), config.class_token_id(2)), torch.full((2, 1), config.sos_token_id)
    plain = model.generate(prompt, max_new_tokens=12, do_sample=False)
    one = model.generate(prompt, max_new_tokens=12, do_sample=False, guidance_scale=1.0, negative_prompt_ids=negative)
    guided = model.generate(prompt, max_new_tokens=12, do_sample=False, guidance_scale=3.0, negative_prompt_ids=negative)
    assert torch.equal(plain, one) and not torch.equal(plain, guided)
    with torch.no_grad():  # each guided token by hand, from whole-sequence forwards
        for t in range(1, 12):
            cond = model(guided[:, :t], prepend_sos=False).logits[:, -1].log_softmax(-1)
            uncond_ids = torch.cat([negative, guided[:, 1:t]], 1)
            uncond = model(uncond_ids, prepend_sos=False).logits[:, -1].log_softmax(-1)
            assert torch.equal((uncond + 3.0 * (cond - uncond)).argmax(-1), guided[:, t])
    for bad in (torch.tensor([3, 0]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match="class indices"):
            model(x, class_labels=bad)
    with pytest.raises(ValueError, match="this model has no classes"):
        make(ImageGPTForCausalImageModeling, prepend_sos=True)(x, class_labels=y)
    with pytest.raises(ValueError, match="Unknown class 'three'"):
        config.class_token_id("three")
