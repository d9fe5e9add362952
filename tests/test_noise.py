import math

import pytest
import torch
from scipy import stats

from diffsampler.noise import StepNoise, sample_keys


def _noise(n=64, shape=(3, 5), seed=0, dtype=torch.float64):
    return StepNoise.from_generator(torch.Generator().manual_seed(seed), (n, *shape), dtype, "cpu")


@pytest.mark.statistical
def test_draws_are_standard_normal():
    z = torch.cat([_noise(n=200, shape=(7, 9)).draw(i).flatten() for i in range(20)])  # 252k values
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / z.numel())


def test_steps_streams_and_samples_are_uncorrelated():
    noise = _noise(n=2000, shape=(50,))
    a, b, c = noise.draw(0), noise.draw(1), noise.draw(0, stream=1)
    lim = 5 / math.sqrt(a.numel())
    for u, v in ((a, b), (a, c), (b, c), (a[:-1], a[1:])):
        assert abs(torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1].item()) < lim


def test_noise_is_a_pure_function_of_the_keys():
    keys = sample_keys(5, torch.Generator().manual_seed(3))
    a = StepNoise(keys, (5, 4, 4), torch.float32, "cpu")
    b = StepNoise(keys[:2], (2, 4, 4), torch.float32, "cpu")
    assert torch.equal(a.draw(7), a.draw(7))
    assert torch.equal(a.draw(7)[:2], b.draw(7))
    assert not torch.equal(a.draw(7), a.draw(8))


def test_keys_follow_the_generator_sample_by_sample():
    k9 = sample_keys(9, torch.Generator().manual_seed(0))
    k3 = sample_keys(3, torch.Generator().manual_seed(0))
    assert torch.equal(k9[:3], k3)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    k_list = sample_keys(2, gens)
    assert k_list[0].item() == sample_keys(1, torch.Generator().manual_seed(10)).item()


def test_odd_sizes_and_dtypes():
    z = _noise(n=3, shape=(1, 3, 3), dtype=torch.bfloat16).draw(0)
    assert z.shape == (3, 1, 3, 3) and z.dtype == torch.bfloat16


def _brownian(n=3000, times=(1.0, 0.6, 0.1, 0.0), seed=0, shape=(2,)):
    from diffsampler.noise import BrownianNoise
    return BrownianNoise(sample_keys(n, torch.Generator().manual_seed(seed)), (n, *shape), torch.float64, "cpu",
                         times, 0.0, 1.0)


@pytest.mark.statistical
def test_brownian_increments_are_standard_normal_and_independent():
    b = _brownian()
    a, c = b.between(1.0, 0.6), b.between(0.6, 0.1)
    for z in (a, c, b.draw(2)):
        assert stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-4
    assert abs(torch.corrcoef(torch.stack([a.flatten(), c.flatten()]))[0, 1].item()) < 5 / math.sqrt(a.numel())


def test_brownian_increments_add_up_along_the_path():
    """The increment over [0.1, 1] is the sum of those over [0.1, 0.6] and [0.6, 1]: a coarser grid
    sees the same path as a finer one."""
    b = _brownian(n=50)
    whole = b.between(1.0, 0.1) * math.sqrt(0.9)
    parts = b.between(1.0, 0.6) * math.sqrt(0.4) + b.between(0.6, 0.1) * math.sqrt(0.5)
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-12)


def test_brownian_path_is_per_sample():
    big, small = _brownian(n=9), _brownian(n=3)
    torch.testing.assert_close(big.between(0.7, 0.2)[:3], small.between(0.7, 0.2), rtol=0, atol=0)
