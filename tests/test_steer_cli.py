"""`diffsampler steer` and the digits reward it steers with: small runs (few steps, two populations)."""

import pytest
import torch
from typer.testing import CliRunner

import diffsampler as ds
from diffsampler.cli import app

runner = CliRunner()


def _steer(tmp_path, *args):
    return runner.invoke(app, ["steer", "--steps", "3", "--groups", "2", "--particles", "2", "--out", str(tmp_path),
                               *args], env={"COLUMNS": "80"})


@pytest.mark.parametrize("method", ["best_of_n", "fk", "svdd"])
def test_steer_reports_at_80_columns_and_writes_the_picture(tmp_path, method):
    result = _steer(tmp_path, "--method", method, "--target", "3", "--candidates", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= 80 for line in lines if "picture" not in line), result.output
    for label in ("reward of the best, mean", "evaluator accuracy, best", "evaluator accuracy, all",
                  "NFE per population", "time"):
        assert any(line.strip().startswith(label) for line in lines), (label, result.output)
    nfe = next(line for line in lines if "NFE per population" in line).split()[3]
    # two particles on 3 steps; SVDD: 1 + M (steps - 1) per particle with M = 2
    assert nfe == {"best_of_n": "6", "fk": "6", "svdd": "10"}[method]
    png = tmp_path / f"steer_digits_{method}_3_p2_g2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_steer_dts_needs_tree_search_and_says_so(tmp_path, monkeypatch):
    import diffsampler.bench.steering as bench_steering
    monkeypatch.setattr(bench_steering, "tree_search_or_none", lambda: None)
    result = _steer(tmp_path, "--method", "dts*")
    assert result.exit_code != 0
    assert "needs ds.steering.tree_search" in result.output and "fk" in result.output


def test_steer_dts_runs_when_tree_search_exists(tmp_path):
    from diffsampler.bench.steering import tree_search_or_none
    if tree_search_or_none() is None:
        pytest.skip("ds.steering.tree_search is not in this version")
    result = _steer(tmp_path, "--method", "dts", "--budget", "8")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "steer_digits_dts_3_p2_g2.png").is_file()


def test_steer_refuses_bad_choices(tmp_path):
    result = _steer(tmp_path, "--method", "fk", "--solver", "dpmpp_2m")
    assert result.exit_code != 0 and "stochastic" in result.output and "ddpm" in result.output
    result = _steer(tmp_path, "--method", "beam")
    assert result.exit_code != 0 and "unknown method 'beam'" in result.output
    result = _steer(tmp_path, "--potential", "sum")
    assert result.exit_code != 0 and "unknown potential 'sum'" in result.output


def test_digits_reward_is_the_classifier_log_probability_on_real_digits():
    from diffsampler.models import data
    images, labels = data.digits("held_out")
    images, labels = images[:200], labels[:200]
    x = images.clone().requires_grad_(True)
    rewards = torch.stack([ds.steering.digits_reward(c)(x) for c in range(10)], 1)
    assert rewards.shape == (200, 10) and not rewards.requires_grad
    torch.testing.assert_close(rewards.exp().sum(1), torch.ones(200), rtol=1e-5, atol=1e-5)
    assert (rewards.argmax(1) == labels).double().mean() > 0.95  # at its lowest noise level it reads clean digits
    # one class per sample from a conditioning keyword: the same numbers
    by_keyword = ds.steering.digits_reward("target")(images, target=labels)
    torch.testing.assert_close(by_keyword, rewards.gather(1, labels[:, None]).squeeze(1))
    with pytest.raises(ValueError, match="conditioning keyword 'target'"):
        ds.steering.digits_reward("target")(images)
    with pytest.raises(ValueError, match=r"classes in \[0, 10\)"):
        ds.steering.digits_reward(10)(images)


def test_digits_accuracy_judges_with_the_evaluator_never_the_reward():
    from diffsampler.models import data
    images, labels = data.digits("held_out")
    assert ds.steering.digits_accuracy(images, labels) > 0.95
    assert ds.steering.digits_accuracy(images[labels == 3], 3) > 0.9
    reward = ds.steering.digits_reward(3)
    with pytest.raises(ValueError, match="reward's own classifier"):
        ds.steering.digits_accuracy(images, 3, evaluator=reward.classifier)


def test_a_per_population_target_follows_its_particles_through_every_driver():
    """Populations steered toward different classes by a keyword: the reward each driver reports for a
    final particle is the reward of that particle for its own population's class."""
    from diffsampler.bench.steering import _ignoring, steer
    model = _ignoring(ds.models.load("digits"), "target")
    grid = ds.grids.logsnr(model.process, 3)
    reward = ds.steering.digits_reward("target")
    targets = torch.tensor([0, 7])
    for method in ("best_of_n", "fk", "svdd"):
        g = torch.Generator().manual_seed(0)
        x = model.process.prior((4, 1, 8, 8), generator=g)
        res = steer(method, model, x, grid, "ddpm", reward, particles=2, generator=g, candidates=2,
                    target=targets.repeat_interleave(2))
        for k, c in enumerate(targets.repeat_interleave(2).tolist()):
            torch.testing.assert_close(res.rewards[k].float(), ds.steering.digits_reward(c)(res.x[k:k + 1])[0],
                                       rtol=1e-5, atol=1e-5)
