"""Bad input gets a clear error naming the argument, the value and what is allowed."""

import math

import pytest
import torch

import diffsampler as ds

P = ds.EDM()
GMM = ds.testbeds.ring8()


def _x(n=4):
    return P.prior((n, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_unknown_solver_lists_the_valid_ones():
    valid = ", ".join(ds.solvers.names())
    with pytest.raises(ValueError, match=f"unknown solver 'dpm\\+\\+'; valid solvers: {valid}$"):
        ds.sample(GMM.denoiser(P), _x(), ds.grids.karras(P, 3), "dpm++")


def test_unknown_option_lists_the_valid_options():
    with pytest.raises(ValueError, match="solver 'ddim' has no option\\(s\\) order; valid options: eta"):
        ds.solvers.get("ddim", order=2)


@pytest.mark.parametrize("name, options, message", [
    ("ddim", {"eta": 1.5}, "eta = 1.5 is invalid; allowed: 0 <= eta <= 1"),
    ("ddim", {"eta": -0.1}, "eta = -0.1 is invalid"),
    ("ddim", {"eta": math.nan}, "eta = nan is invalid"),
    ("euler", {"s_churn": -1.0}, "s_churn = -1.0 is invalid"),
    ("heun", {"s_noise": math.inf}, "s_noise = inf is invalid"),
    ("heun", {"s_tmin": 5.0, "s_tmax": 1.0}, "s_tmin = 5.0 is invalid; allowed: 0 <= s_tmin <= s_tmax"),
    ("dpmpp_2m", {"lower_order_final": "yes"}, "lower_order_final = 'yes' is invalid"),
])
def test_invalid_solver_options(name, options, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")):
        ds.solvers.get(name, **options)


def test_solver_of_the_wrong_type():
    with pytest.raises(TypeError, match="solver must be a registered name"):
        ds.sample(GMM.denoiser(P), _x(), ds.grids.karras(P, 3), 42)


def test_non_decreasing_grid_in_sample():
    with pytest.raises(ValueError, match="strictly decreasing"):
        ds.sample(GMM.denoiser(P), _x(), [1.0, 2.0, 0.0], "euler")


def test_steps_below_one():
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        ds.grids.karras(P, 0)


def test_shape_mismatch_between_sample_and_model():
    with pytest.raises(ValueError, match="2 values per sample, got \\(4, 3\\)"):
        ds.sample(GMM.denoiser(P), torch.zeros(4, 3, dtype=torch.float64), ds.grids.karras(P, 3), "euler")


def test_bad_x_and_model():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ds.sample(GMM.denoiser(P), torch.zeros(4, 2, dtype=torch.int64), ds.grids.karras(P, 3), "euler")
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got list"):
        ds.sample(GMM.denoiser(P), [[0.0, 0.0]], ds.grids.karras(P, 3), "euler")
    with pytest.raises(TypeError, match="model must be a diffsampler Denoiser"):
        ds.sample(lambda x, t: x, _x(), ds.grids.karras(P, 3), "euler")


def test_generator_list_of_the_wrong_length():
    with pytest.raises(ValueError, match="one generator per sample \\(4\\), got 2"):
        ds.sample(GMM.denoiser(P), _x(), ds.grids.karras(P, 3), ds.solvers.get("ddim", eta=1.0),
                  generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        ds.sample(GMM.denoiser(P), _x(), ds.grids.karras(P, 3), ds.solvers.get("ddim", eta=1.0), generator=3)


@pytest.mark.parametrize("solver", ["euler", "heun", "ddim", "dpmpp_2m"])
def test_nan_from_the_model_stops_sampling_naming_the_step_and_time(solver):
    exact = GMM.denoiser(P, "x0").fn

    def broken(x, sigma):
        out = exact(x, sigma)
        return out * math.nan if float(sigma[0]) < 1.0 else out

    grid = ds.grids.karras(P, 10)
    first_bad = next(i for i, t in enumerate(grid.tolist()) if t < 1.0)
    # Heun also evaluates at the step's end, so it fails one step earlier.
    step = first_bad - 1 if solver == "heun" else first_bad
    with pytest.raises(ds.NonFiniteError, match=f"after step {step} \\(t = {grid[step].item():.6g} -> "):
        ds.sample(ds.Denoiser(broken, P, "x0"), _x(), grid, solver)
