"""``noise="diffusers"``: a seed reproduces diffusers' own stochastic schedulers.

diffusers draws the start latent with ``randn_tensor`` and each step's noise with another
``randn_tensor`` from the same generator (or one row from each of a list of generators). With the same
draws our DDIM (eta), Euler ancestral and DPM-Solver++(2M) SDE are diffusers' to float32 round-off;
the keyed default draws other numbers (so it is far from diffusers' image), by design.
"""

import pytest
import torch

import diffsampler as ds
from diffsampler.integrations import from_diffusers

diffusers = pytest.importorskip("diffusers")
randn_tensor = pytest.importorskip("diffusers.utils.torch_utils").randn_tensor
peers = pytest.importorskip("diffsampler.bench.peers")


@pytest.fixture(scope="module")
def unet():
    from test_integrations import _unet
    return _unet()


def _their_loop(unet, scheduler, x, steps, generator, **step_options):
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    for ts in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, ts), ts).sample
        x = scheduler.step(out, ts, x, generator=generator, **step_options).prev_sample
    return x


CASES = [
    ("ddim", lambda: diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True), {"eta": 0.7},
     lambda: ds.solvers.get("ddim", eta=0.7)),
    # Stable Diffusion's spacing: with "linspace" diffusers' Euler family starts at sigma_max, not at the
    # prior's sqrt(sigma_max^2 + 1) (DiffsamplerScheduler(noise="diffusers") reproduces that start too)
    ("euler_ancestral", lambda: diffusers.EulerAncestralDiscreteScheduler(timestep_spacing="leading", steps_offset=1),
     {}, lambda: "euler_ancestral"),
    ("dpmpp_2m_sde", lambda: diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), {},
     lambda: "dpmpp_2m_sde"),
]


@pytest.mark.parametrize("per_sample", [False, True], ids=["one generator", "a generator per sample"])
@pytest.mark.parametrize("name, make_scheduler, step_options, solver", CASES, ids=[c[0] for c in CASES])
def test_the_same_seed_gives_diffusers_own_sample(unet, name, make_scheduler, step_options, solver, per_sample):
    def generator():
        if per_sample:
            return [torch.Generator().manual_seed(11 + i) for i in range(3)]
        return torch.Generator().manual_seed(11)

    scheduler = make_scheduler()
    g = generator()
    theirs = _their_loop(unet, scheduler, randn_tensor((3, 1, 8, 8), generator=g), 8, g, **step_options)
    model = from_diffusers(unet, scheduler)
    grid = peers.diffusers_grid(scheduler, model.process)
    g = generator()
    x = ds.noise.diffusers_randn((3, 1, 8, 8), g)
    mine = ds.sample(model, x, grid, solver(), generator=g, noise="diffusers")
    assert ((mine - theirs).norm() / theirs.norm()).item() < 1e-5
    keyed = ds.sample(model, x, grid, solver(), generator=generator())
    assert ((keyed - theirs).norm() / theirs.norm()).item() > 0.05  # the default draws its own numbers


def test_diffusers_randn_is_randn_tensor():
    for generator in (torch.Generator().manual_seed(3), [torch.Generator().manual_seed(k) for k in range(4)]):
        ours = ds.noise.diffusers_randn((4, 2, 3), generator)
        generator = generator if isinstance(generator, torch.Generator) else [torch.Generator().manual_seed(k)
                                                                              for k in range(4)]
        if isinstance(generator, torch.Generator):
            generator.manual_seed(3)
        torch.testing.assert_close(ours, randn_tensor((4, 2, 3), generator=generator), rtol=0, atol=0)


def test_diffusers_noise_refuses_what_it_cannot_do():
    gmm = ds.testbeds.random_mixture(2, 2, seed=0)
    model = gmm.denoiser(ds.VPLinear(), "eps")
    grid = ds.grids.logsnr(model.process, 4)
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="noise must be one of"):
        ds.sample(model, x, grid, "euler_ancestral", noise="torch")
    with pytest.raises(ValueError, match="needs a Brownian path"):
        ds.sample(model, x, grid, "dpmpp_sde", noise="diffusers")
    with pytest.raises(ValueError, match="a list needs one generator per sample"):
        ds.sample(model, x, grid, "euler_ancestral", noise="diffusers", generator=[torch.Generator()] * 2)
    run = ds.Run(model, x, grid, "euler_ancestral", noise="diffusers", generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="cannot follow reindexed particles"):
        run.take(torch.tensor([0, 0, 1]))
