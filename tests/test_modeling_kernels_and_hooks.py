"""How the model runs, beside what it computes: its own kernels compute what the plain code computes (the CPU norm, the
opt-in blockwise attention for CPU training with dropout), wrapped or offloaded modules are called as modules, and
gradients flow through cached steps."""

import torch
import torch.nn.functional as F
from conftest import TINY_DIMS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling
from image_gpt_hf.modeling_imagegpt import BLOCKWISE_SDPA, ImageGPTLayerNorm, blockwise_causal_sdpa_forward
from image_gpt_hf.transformers_compat import output_cache

DIMS = {**TINY_DIMS, "n_layer": 2}
SOS = DIMS["vocab_size"] - 1


def make(**kwargs):
    return ImageGPTForCausalImageModeling(ImageGPTConfig(**{**DIMS, **kwargs})).eval()


def pixels(batch=2, length=40, seed=1):
    return torch.randint(0, SOS, (batch, length), generator=torch.Generator().manual_seed(seed))


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

    def run(keys, dropout):
        return blockwise_causal_sdpa_forward(module, q, keys, v, None, scaling=0.3, dropout=dropout, block_size=64)[0]

    # Without dropout it hands over to transformers' sdpa.
    reference, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, None, scaling=0.3, dropout=0.0)
    assert (run(k, 0.0) - reference).abs().max() < 1e-5
    # With dropout: block by block, and causal: a change to key 200 changes no output before position 200.
    k2 = k.detach().clone()
    k2[:, :, 200] += 1.0
    outputs = []
    for keys in (k, k2):
        torch.manual_seed(0)
        outputs.append(run(keys, 0.5))
    assert outputs[0].shape == (2, 300, 4, 8)
    assert torch.equal(outputs[0][:, :200], outputs[1][:, :200])
    assert not torch.equal(outputs[0][:, 200:], outputs[1][:, 200:])


def test_cpu_training_with_dropout_runs_the_blockwise_attention_by_default(attention_calls):
    calls = attention_calls(BLOCKWISE_SDPA)
    attention_calls("sdpa")
    model = make(n_positions=256, attn_pdrop=0.1)  # the default attention, sdpa
    x = pixels(2, 256)
    with torch.no_grad():
        model.eval()(x)
    assert calls == {BLOCKWISE_SDPA: 0, "sdpa": DIMS["n_layer"]}  # inference: sdpa itself
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert calls[BLOCKWISE_SDPA] == 5 * DIMS["n_layer"]  # each layer of each training step
    make(n_positions=256, attn_pdrop=0.0).train()(x)  # no attention dropout: sdpa's own kernel
    assert calls[BLOCKWISE_SDPA] == 5 * DIMS["n_layer"]


def test_blockwise_training_has_sdpas_loss_and_gradient_distribution():
    """Over many dropout draws, the blockwise attention and transformers' sdpa give outputs of the same mean, and a model
    training on the default path (blockwise) gets gradients of the same mean as the eager attention's: the same
    distribution, not the same draws."""
    torch.manual_seed(0)
    model = make(n_positions=256, attn_pdrop=0.5, resid_pdrop=0.0, embd_pdrop=0.0).train()
    x = pixels(1, 256)
    q, k, v = (torch.randn(1, 4, 256, 8) for _ in range(3))
    module = model.transformer.h[0].attn
    draws = {"blockwise": [], "sdpa": []}
    for _ in range(400):
        draws["blockwise"].append(blockwise_causal_sdpa_forward(module, q, k, v, None, scaling=0.3, dropout=0.5)[0])
        draws["sdpa"].append(ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, None, scaling=0.3, dropout=0.5)[0])
    a, b = torch.stack(draws["blockwise"]), torch.stack(draws["sdpa"])
    z = (a.mean(0) - b.mean(0)).abs() / ((a.var(0) + b.var(0)) / 400).sqrt().clamp(min=1e-6)
    assert z.mean() < 0.9 and z.max() < 5.5  # same means: |z| averages sqrt(2/pi) = 0.80 over the 8,192 outputs
    assert 0.95 < a.var(0).mean() / b.var(0).mean() < 1.05  # same spread (a dropout rate of 0.4 in blockwise gives 0.67)
    # Gradients of the whole model over draws: the default path against eager attention (softmax, dropout, matmul).
    grads = {}
    for name in ("sdpa", "eager"):
        copy = make(n_positions=256, attn_pdrop=0.5, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation=name)
        copy.load_state_dict(model.state_dict())
        total = 0
        for _ in range(60):
            copy.zero_grad()
            copy.train()(x, labels=x).loss.backward()
            total = total + copy.transformer.h[0].attn.c_attn.weight.grad
        grads[name] = total / 60
    cosine = F.cosine_similarity(grads["sdpa"].flatten(), grads["eager"].flatten(), dim=0)
    assert cosine > 0.9, cosine


def test_hooked_projection_is_called_through_its_module():
    """PEFT adapters, quantized layers and offload hooks wrap the projections: the model calls them as modules."""
    model = make()
    calls = []
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda module, args, output: calls.append(1))
    model.transformer.h[1].attn.c_attn.register_forward_hook(lambda module, args, output: calls.append(2))
    with torch.no_grad():
        cache = output_cache(model(pixels(1, 5), use_cache=True))
        model(pixels(1, 1), cache=cache, use_cache=True)  # a one-token decode step too
    assert calls == [1, 2, 1, 2]


def test_offloaded_model_runs_through_accelerates_hooks():
    """accelerate's offload replaces the modules' forward and keeps the weights on the meta device."""
    from accelerate import cpu_offload

    model = make()
    sos = torch.full((2, 1), SOS)
    with torch.no_grad():
        expected = model.generate(sos, max_new_tokens=8, do_sample=False)
        cpu_offload(model, execution_device=torch.device("cpu"))
        assert model.transformer.h[0].attn.c_attn.weight.device.type == "meta"
        assert torch.equal(model.generate(sos, max_new_tokens=8, do_sample=False), expected)


def test_gradients_flow_through_several_cached_steps():
    model = make()
    x = pixels(2, 20)
    out = model(x[:, :10], use_cache=True)
    cache = output_cache(out)
    logits = [out.logits]
    for t in range(10, 14):  # four one-token steps on a cache, all kept for backward
        logits.append(model(x[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.cat(logits, 1).square().mean().backward()
    grad = model.transformer.h[0].attn.c_attn.weight.grad.clone()
    model.zero_grad()
    model(x[:, :14]).logits.square().mean().backward()
    assert (grad - model.transformer.h[0].attn.c_attn.weight.grad).abs().max() < 1e-5
