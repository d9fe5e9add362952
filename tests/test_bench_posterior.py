"""The bench's posterior section at its smallest size: every row, finite numbers, the section's text."""

import math

import pytest

from diffsampler.bench.posterior import QUICK, posterior_section, run_posterior


@pytest.fixture(scope="module")
def rows():
    size = dict(QUICK, steps=(25,), digits_images=1, digits_particles=2, digits_steps=5)
    return run_posterior(sizes=size, log=lambda s: None)


def test_every_method_gives_a_row_with_finite_errors(rows):
    post = {(r.method, r.setting.split(",")[0]) for r in rows if r.problem == "posterior"}
    assert {("afdps", "ddpm (V = g)"), ("afdps", "dpmpp_2m (V = 0)"), ("fk", "ddpm"), ("dps", "ddpm")} <= post
    assert {r.method for r in rows if r.problem == "fkc"} == {"fkc", "cfg"}
    assert {(r.method, r.setting.split(",")[0]) for r in rows if r.problem == "digits"} == \
        {(m, t) for m in ("dps", "afdps") for t in ("inpaint", "denoise")}
    for r in rows:
        if r.problem != "digits":
            assert all(math.isfinite(v) and v >= 0 for v in (r.mean_error, r.cov_error, r.mode_error)), r
            assert r.nfe == r.steps
        else:
            assert 0 <= r.accuracy <= 1 and r.observed_rmse >= 0, r


def test_the_section_has_a_table_for_each_problem(rows):
    text = "\n".join(posterior_section(rows))
    assert text.startswith("## Posterior sampling and Feynman-Kac correctors")
    assert text.count("| method | setting | steps | NFE |") == 3
    assert "GaussianMixture.posterior" in text and "digits-evaluator" in text
