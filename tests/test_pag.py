"""Perturbed-attention guidance: the identity-attention hook, the guidance algebra, batching."""

import pytest
import torch

import diffsampler as ds
from diffsampler.guidance.pag import IdentityAttentionProcessor, perturb_attention, self_attention_layers
from diffsampler.models.nets import DigitsUNet, SelfAttention2d


def _digits_denoiser(seed=0):
    torch.manual_seed(seed)
    net = DigitsUNet().eval().requires_grad_(False)
    return ds.Denoiser(net, ds.VP.cosine(), "eps", null=ds.models.null_label)


def test_identity_attention_returns_the_projected_values():
    torch.manual_seed(0)
    layer = SelfAttention2d(16).eval()
    x = torch.randn(3, 16, 4, 4)
    q, k, v = layer.qkv(layer.norm(x)).chunk(3, dim=1)
    layer.perturbed = True
    torch.testing.assert_close(layer(x), x + layer.proj(v))
    layer.perturbed = torch.tensor([False, True, False])
    mixed = layer(x)
    layer.perturbed = False
    normal = layer(x)
    torch.testing.assert_close(mixed[1], (x + layer.proj(v))[1])
    assert torch.equal(mixed[0], normal[0]) and torch.equal(mixed[2], normal[2])
    assert (normal[1] - mixed[1]).abs().max() > 1e-3


def test_diffusers_identity_processor():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    torch.manual_seed(0)
    attn = Attention(8, heads=2, dim_head=4, norm_num_groups=4, residual_connection=True,
                     rescale_output_factor=2.0).eval()
    h = torch.randn(2, 8, 3, 3)
    base = AttnProcessor2_0()
    plain = base(attn, h)
    processor = IdentityAttentionProcessor(base, torch.tensor([False, False]))
    assert torch.equal(processor(attn, h), plain)
    processor = IdentityAttentionProcessor(base, torch.tensor([False, True]))
    out = processor(attn, h)
    tokens = attn.group_norm(h.reshape(2, 8, 9)).transpose(1, 2)
    identity = (attn.to_out[0](attn.to_v(tokens)).transpose(1, 2).reshape(2, 8, 3, 3) + h) / 2.0
    torch.testing.assert_close(out[1], identity[1])
    assert torch.equal(out[0], plain[0])
    del diffusers


def test_guidance_is_its_definition_in_one_network_call():
    model = _digits_denoiser()
    calls = []
    model.fn.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    label = torch.tensor([1, 2, 3, 4])
    layers = self_attention_layers(model.fn)
    assert [name for name, _ in layers] == ["attn_mid"]
    with torch.no_grad():
        c = model(x, 0.5, label=label)
        u = model(x, 0.5, label=torch.full((4,), 10))
        with perturb_attention(layers, torch.ones(4, dtype=torch.bool)):
            p = model(x, 0.5, label=label)
        calls.clear()
        out = ds.guidance.perturbed_attention(model, 3.0)(x, 0.5, label=label)
        assert calls == [8]
        torch.testing.assert_close(out.eps, c.eps + 3.0 * (c.eps - p.eps), rtol=1e-5, atol=1e-5)
        calls.clear()
        both = ds.guidance.perturbed_attention(model, 3.0, cfg_scale=2.0)(x, 0.5, label=label)
        assert calls == [12]
        want = u.eps + 2.0 * (c.eps - u.eps) + 3.0 * (c.eps - p.eps)
        torch.testing.assert_close(both.eps, want, rtol=1e-5, atol=1e-5)
    assert (p.eps - c.eps).abs().max() > 1e-4  # the perturbation changes the prediction
    assert model.fn.attn_mid.perturbed is False  # the hook is removed after the call


def test_scale_zero_is_the_model_bit_for_bit():
    model = _digits_denoiser()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = ds.grids.logsnr(model.process, 5)
    with torch.no_grad():
        a = ds.sample(ds.guidance.perturbed_attention(model, 0.0), x, grid, "dpmpp_2m")
        b = ds.sample(model, x, grid, "dpmpp_2m")
    assert torch.equal(a, b)


def test_adaptive_scale_falls_linearly_to_zero():
    model = _digits_denoiser()
    pag = ds.guidance.perturbed_attention(model, 3.0, adaptive_scale=0.005)
    t_max = model.process.t_max
    assert pag.scale_at(t_max) == 3.0
    assert pag.scale_at(t_max * 0.8) == pytest.approx(3.0 - 0.005 * 200)
    assert pag.scale_at(t_max * 0.1) == 0.0


def test_pag_on_a_diffusers_unet_through_from_diffusers():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4).eval().requires_grad_(False)
    model = ds.integrations.from_diffusers(unet, diffusers.DDIMScheduler())
    layers = self_attention_layers(unet)
    assert layers and all("mid" in name for name, _ in layers)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        c = model(x, 0.5)
        with perturb_attention(layers, torch.ones(2, dtype=torch.bool)):
            p = model(x, 0.5)
        out = ds.guidance.perturbed_attention(model, 2.0)(x, 0.5)
    torch.testing.assert_close(out.eps, c.eps + 2.0 * (c.eps - p.eps), rtol=1e-5, atol=1e-5)
    assert (p.eps - c.eps).abs().max() > 1e-5
    assert all(type(m.processor).__name__ != "IdentityAttentionProcessor" for _, m in layers)


def test_pag_errors():
    gmm = ds.testbeds.ring8()
    with pytest.raises(TypeError, match="torch.nn.Module with self-attention"):
        ds.guidance.perturbed_attention(gmm.denoiser(ds.EDM(), "x0"), 2.0)
    with pytest.raises(ValueError, match="match none of the self-attention layers"):
        ds.guidance.perturbed_attention(_digits_denoiser(), 2.0, layers=["nope"])
    with pytest.raises(ValueError, match="adaptive_scale must be a finite number >= 0"):
        ds.guidance.perturbed_attention(_digits_denoiser(), 2.0, adaptive_scale=-1.0)
