"""The model's speed paths compute what the plain code computes: fused MLP, CPU norm, blockwise attention with
dropout, the in-place growing KV cache."""

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.imagegpt import modeling_imagegpt as hf
from transformers.models.imagegpt.configuration_imagegpt import ImageGPTConfig as HFConfig

from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling
from image_gpt_hf.modeling_imagegpt import (
    ImageGPTDynamicCache,
    ImageGPTLayerNorm,
    ImageGPTMLP,
    blockwise_causal_sdpa_forward,
)

DIMS = {"vocab_size": 17, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4}
SOS = DIMS["vocab_size"] - 1


def make(**kwargs):
    return ImageGPTForCausalImageModeling(ImageGPTConfig(**{**DIMS, **kwargs})).eval()


def pixels(batch=2, length=40, seed=1):
    return torch.randint(0, SOS, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_fused_quick_gelu_mlp_matches_the_plain_one_with_gradients():
    mlp = ImageGPTMLP(64, ImageGPTConfig(**DIMS)).eval()  # no dropout; gradients still flow
    torch.nn.init.normal_(mlp.c_fc.bias)
    torch.nn.init.normal_(mlp.c_proj.bias)
    x = torch.randn(3, 5, DIMS["n_embd"], requires_grad=True)
    fused = mlp(x)
    fused.square().sum().backward()
    grads = [x.grad.clone(), mlp.c_fc.weight.grad.clone(), mlp.c_fc.bias.grad.clone()]
    x.grad = None
    mlp.zero_grad()
    plain = mlp.c_proj(mlp.act(mlp.c_fc(x)))
    plain.square().sum().backward()
    assert (fused - plain).abs().max() < 1e-5
    for a, b in zip(grads, [x.grad, mlp.c_fc.weight.grad, mlp.c_fc.bias.grad]):
        assert (a - b).abs().max() < 1e-4
    with torch.no_grad():  # in place without autograd
        assert (mlp(x) - plain).abs().max() < 1e-5


def test_hooked_projection_is_called_through_its_module():
    """PEFT adapters, quantized layers and offload hooks wrap the projections: the fused path must not bypass them."""
    mlp = ImageGPTMLP(64, ImageGPTConfig(**DIMS))
    calls = []
    mlp.c_fc.register_forward_hook(lambda module, args, output: calls.append(1))
    mlp(torch.randn(1, 2, DIMS["n_embd"]))
    assert calls == [1]


def test_cpu_norm_is_rms_norm():
    norm = ImageGPTLayerNorm(DIMS["n_embd"])
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 7, DIMS["n_embd"])
    expected = F.rms_norm(x, (DIMS["n_embd"],), norm.weight, norm.eps)
    assert (norm(x) - expected).abs().max() < 1e-5
    half = x.bfloat16()  # half precision keeps torch's kernel, which accumulates in float32
    assert (norm.bfloat16()(half).float() - expected).abs().max() < 0.05


class _Causal(torch.nn.Module):
    is_causal = True
    training = True


def test_blockwise_attention_equals_sdpa_and_stays_causal_with_dropout():
    q, k, v = (torch.randn(2, 4, 300, 8, requires_grad=True) for _ in range(3))
    module = _Causal()
    ours, _ = blockwise_causal_sdpa_forward(module, q, k, v, None, scaling=0.3, dropout=0.0, block_size=64)
    reference, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3, dropout=0.0)
    assert ours.shape == (2, 300, 4, 8) and (ours - reference).abs().max() < 1e-5
    grad = torch.autograd.grad(ours.sum(), q)[0]
    assert (grad - torch.autograd.grad(reference.sum(), q)[0]).abs().max() < 1e-4
    # With dropout: a change to key 200 changes no output before position 200 (same seed, same draws).
    k2 = k.detach().clone()
    k2[:, :, 200] += 1.0
    outputs = []
    for keys in (k, k2):
        torch.manual_seed(0)
        outputs.append(blockwise_causal_sdpa_forward(module, q, keys, v, None, scaling=0.3, dropout=0.5)[0])
    assert torch.equal(outputs[0][:, :200], outputs[1][:, :200])
    assert not torch.equal(outputs[0][:, 200:], outputs[1][:, 200:])


def test_training_with_attention_dropout_runs_blockwise_and_learns():
    model = make(n_positions=256).train()
    x = pixels(2, 256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_growing_cache_matches_full_forward_through_crop_and_reorder():
    model = make()
    x = pixels(2, 40)
    full = model(x).logits
    out = model(x[:, :20], use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, ImageGPTDynamicCache) and isinstance(cache, DynamicCache)
    logits = [out.logits]
    for t in range(20, 30):  # one token at a time: written in place
        logits.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert (torch.cat(logits, 1) - full[:, :30]).abs().max() < 1e-5
    cache.crop(-5)  # back to 25 tokens; the next step overwrites the cropped slots
    step = model(x[:, 25:40], past_key_values=cache, use_cache=True).logits
    assert (step - full[:, 25:40]).abs().max() < 1e-5
    cache.reorder_cache(torch.tensor([1, 0]))  # beam search: replaced tensors become the new buffers
    swapped = model(torch.full((2, 1), 3), past_key_values=cache, use_cache=True)
    reference = model(torch.cat([x.flip(0), torch.full((2, 1), 3)], 1)).logits[:, -1:]
    assert (swapped.logits - reference).abs().max() < 1e-5


@pytest.mark.parametrize("kwargs", [{"num_beams": 3}, {"do_sample": True, "num_return_sequences": 2, "top_k": 4}])
def test_generate_with_the_growing_cache_matches_transformers(kwargs):
    ours = make()
    theirs = hf.ImageGPTForCausalImageModeling(HFConfig(**DIMS)).eval()
    theirs.load_state_dict(ours.state_dict())
    start = torch.full((2, 1), SOS)
    torch.manual_seed(1)
    a = ours.generate(start, max_new_tokens=30, **kwargs)
    torch.manual_seed(1)
    b = theirs.generate(start, max_new_tokens=30, **kwargs)
    assert torch.equal(a, b)


def test_generate_keeps_a_cache_the_user_passes():
    model = make()
    cache = DynamicCache(config=model.config)
    out = model.generate(
        torch.full((1, 1), SOS), max_new_tokens=5, past_key_values=cache, return_dict_in_generate=True
    )
    assert out.past_key_values is cache and type(cache) is DynamicCache
    default = model.generate(torch.full((1, 1), SOS), max_new_tokens=5, return_dict_in_generate=True)
    assert type(default.past_key_values) is ImageGPTDynamicCache


def _decode(model, x, prefill, **kwargs):
    """Logits of one-token steps after a prefill of `prefill` tokens."""
    with torch.no_grad():
        out = model(x[:, :prefill], use_cache=True)
        cache, logits = out.past_key_values, [out.logits]
        for t in range(prefill, x.shape[1]):
            logits.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True, **kwargs).logits)
    return torch.cat(logits, 1)


def test_one_token_decode_step_takes_the_lean_path_with_the_same_bits(monkeypatch):
    model = make()
    x = pixels(3, 30)
    taken = []
    original = type(model.transformer.h[0]).decode_one

    def spy(self, *args):
        taken.append(1)
        return original(self, *args)

    monkeypatch.setattr(type(model.transformer.h[0]), "decode_one", spy)
    lean = _decode(model, x, 10)
    assert len(taken) == 20 * DIMS["n_layer"]
    monkeypatch.setattr(type(model.transformer), "_can_decode_one", lambda *args: False)
    taken.clear()
    assert torch.equal(lean, _decode(model, x, 10)) and not taken  # bit for bit the general path's logits
    assert (lean - model(x).logits).abs().max() < 1e-5


@pytest.mark.parametrize("case", ["hook", "hidden_states", "padding", "eager", "train", "static_cache"])
def test_one_token_decode_step_falls_back_where_it_does_not_apply(case, monkeypatch):
    model = make(attn_implementation="eager") if case == "eager" else make()
    x = pixels(2, 20)
    calls = []
    monkeypatch.setattr(type(model.transformer.h[0]), "decode_one", lambda *args: calls.append(1))
    kwargs = {}
    if case == "hook":
        model.transformer.h[1].mlp.register_forward_hook(lambda *args: calls.append("hook"))
    elif case == "hidden_states":
        kwargs["output_hidden_states"] = True
    elif case == "train":
        model.train()
    with torch.no_grad():
        if case == "padding":
            mask = torch.ones(2, 20, dtype=torch.long)
            mask[0, :3] = 0
            out = model(x[:, :10], attention_mask=mask[:, :10], use_cache=True)
            step = model(x[:, 10:11], attention_mask=mask[:, :11], past_key_values=out.past_key_values, use_cache=True)
        elif case == "static_cache":
            from transformers import StaticCache

            cache = StaticCache(config=model.config, max_cache_len=20)
            model(x[:, :10], past_key_values=cache, use_cache=True)
            step = model(x[:, 10:11], past_key_values=cache, use_cache=True)
        else:
            out = model(x[:, :10], use_cache=True)
            step = model(x[:, 10:11], past_key_values=out.past_key_values, use_cache=True, **kwargs)
    assert 1 not in calls
    assert step.logits.shape == (2, 1, DIMS["vocab_size"] - 1)
    if case == "hook":
        assert "hook" in calls
    if case == "hidden_states":
        assert len(step.hidden_states) == DIMS["n_layer"] + 1


def test_offloaded_model_runs_through_accelerates_hooks():
    """accelerate's offload replaces the modules' forward and keeps the weights on the meta device: nothing may read
    them directly."""
    from accelerate import cpu_offload

    model = make()
    x = pixels(2, 20)
    with torch.no_grad():
        expected = _decode(model, x, 10)
        cpu_offload(model, execution_device=torch.device("cpu"))
        assert model.transformer.h[0].attn.c_attn.weight.device.type == "meta"
        assert (_decode(model, x, 10) - expected).abs().max() < 1e-6
        sos = torch.full((2, 1), SOS)
        generated = model.generate(sos, max_new_tokens=8, do_sample=False)
    assert generated.shape == (2, 9)


def test_gradients_flow_through_several_cached_steps():
    model = make()
    x = pixels(2, 20)
    out = model(x[:, :10], use_cache=True)
    logits = [out.logits]
    for t in range(10, 14):  # four one-token steps on a cache, all kept for backward
        logits.append(model(x[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True).logits)
    loss = torch.cat(logits, 1).square().mean()
    loss.backward()  # in-place cache writes would have changed tensors autograd saved
    grad = model.transformer.h[0].attn.c_attn.weight.grad.clone()
    model.zero_grad()
    model(x[:, :14]).logits.square().mean().backward()
    assert (grad - model.transformer.h[0].attn.c_attn.weight.grad).abs().max() < 1e-5


def test_lean_decode_step_survives_output_capturing_hooks(monkeypatch):
    """Recording hidden states once installs transformers' capturing hooks for good; they record nothing afterwards,
    so later one-token steps stay lean."""
    model = make()
    x = pixels(2, 20)
    with torch.no_grad():
        model(x, output_hidden_states=True, output_attentions=True)
    calls = []
    original = type(model.transformer.h[0]).decode_one
    monkeypatch.setattr(
        type(model.transformer.h[0]), "decode_one", lambda self, *a: calls.append(1) or original(self, *a)
    )
    _decode(model, x, 18)
    assert len(calls) == 2 * DIMS["n_layer"]


def test_cache_rebuilt_from_its_tensors_as_dataparallel_gathers_it():
    model = make()
    cache = model(pixels(2, 12), use_cache=True).past_key_values
    rebuilt = type(cache)(iter([(layer.keys, layer.values) for layer in cache.layers]))
    assert rebuilt.get_seq_length() == 12
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(cache.layers, rebuilt.layers))
    assert isinstance(ImageGPTDynamicCache(model.config).layers[0], type(cache.layers[0]))  # config positionally
