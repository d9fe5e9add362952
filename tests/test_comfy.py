"""ComfyUI's sampler names: the aliases onto registered solvers, and the samplers written for ComfyUI.

Each reference below is our transcription of a ComfyUI sampling loop (comfy/k_diffusion/sampling.py) in
k-diffusion's sigma coordinates ``y = x / ode_scale``, ``s = ode_sigma``, written independently of the
solver it checks (its own state, its own algebra), on the class-conditional Gaussian mixture's exact
denoiser with classifier-free guidance. Guided answers ``c`` and unconditional ones ``u`` are formed as
ComfyUI's CFG does (``u + scale (c_cond - u)``); the CFG++ samplers read ``u`` as ComfyUI's
``post_cfg_function`` hands it to them. Agreement is to float64 round-off (measured below 1e-13).
"""

import math
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import diffsampler as ds
from diffsampler.cli import app, solver_cells
from diffsampler.noise import StepNoise

GMM = ds.testbeds.GaussianMixture([[2.0, 0.0], [-1.5, 1.5], [0.0, -2.0]], [0.3, 0.2, 0.4], labels=[0, 1, 1])
PROCESSES = {"vp": ds.VP.scaled_linear, "edm": ds.EDM, "flow": lambda: ds.Flow(t_max=0.99)}
LABEL = torch.tensor([0, 1, 0, 1, 1, 0])
SCALE = 2.5
TOL = 1e-12


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(key, steps=10):
    p = PROCESSES[key]()
    model = GMM.denoiser(p, "velocity" if key == "flow" else "eps")
    x = p.prior((len(LABEL), 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = ds.grids.uniform(p, steps) if key == "flow" else ds.grids.karras(p, steps)
    return p, model, x, grid


def _comfy_model(p, model, guided):
    """``C(y, s) -> (c, u)`` in sigma coordinates: the guided and the unconditional data estimates."""
    null = torch.full_like(LABEL, GMM.NULL_LABEL)

    def C(y, s):
        t = float(p.t_of_ode_sigma(s))
        xi = y * float(p.ode_scale(t))
        u = model(xi, t, label=null).x0
        if not guided:
            c = model(xi, t, label=LABEL).x0
            return c, c
        return u + SCALE * (model(xi, t, label=LABEL).x0 - u), u
    return C


def _ancestral_step(s, s_next, eta):
    """k-diffusion's get_ancestral_step."""
    if not eta:
        return s_next, 0.0
    up = min(s_next, eta * (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5)
    return (s_next ** 2 - up ** 2) ** 0.5, up


def comfy_dpmpp_2s_ancestral_cfg_pp(C, y, sigmas, eta, draws):
    for i in range(len(sigmas) - 1):
        c, u = C(y, sigmas[i])
        down, up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            y = u
        else:
            h = math.log(sigmas[i] / down)
            s_mid = sigmas[i] * math.exp(-h / 2)
            y_mid = s_mid / sigmas[i] * y - math.expm1(-h / 2) * u
            _, u_mid = C(y_mid, s_mid)
            y = down / sigmas[i] * y - math.expm1(-h) * u_mid
        if sigmas[i + 1] > 0:
            y = y + draws(i) * up
        y = y + (c - u)
    return y


def comfy_res_multistep(C, y, sigmas, eta, cfg_pp, draws):
    old, old_down = None, None
    for i in range(len(sigmas) - 1):
        c, u = C(y, sigmas[i])
        down, up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if down == 0 or old is None:
            if cfg_pp:
                y = c + (y - u) / sigmas[i] * down
            else:
                y = y + (y - c) / sigmas[i] * (down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = (-math.log(v) for v in (sigmas[i], old_down, down, sigmas[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            if cfg_pp:
                y = math.exp(-h) * (y + (c - u)) + h * (b1 * u + b2 * old)
            else:
                y = math.exp(-h) * y + h * (b1 * c + b2 * old)
        if sigmas[i + 1] > 0:
            y = y + draws(i) * up
        old, old_down = (u if cfg_pp else c), down
    return y


def comfy_gradient_estimation(C, y, sigmas, cfg_pp, gamma=2.0):
    old_d = None
    for i in range(len(sigmas) - 1):
        c, u = C(y, sigmas[i])
        d = (y - (u if cfg_pp else c)) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            y = c
        else:
            y = c + d * sigmas[i + 1] if cfg_pp else y + d * dt
            if i >= 1:
                y = y + (gamma - 1) * (d - old_d) * dt
        old_d = d
    return y


def _run_both(key, name, reference, guided=True, **solver_options):
    p, model, x, grid = _setup(key)
    net = ds.guidance.cfg(model, SCALE, plus_plus=True) if guided else model
    ours = ds.sample(net, x, grid, ds.solvers.get(name, **solver_options), label=LABEL,
                     generator=torch.Generator().manual_seed(5))
    noise = StepNoise.from_generator(torch.Generator().manual_seed(5), x.shape, x.dtype, x.device)
    sigmas = [float(p.ode_sigma(float(t))) for t in grid]
    y = reference(_comfy_model(p, model, guided), x / float(p.ode_scale(float(grid[0]))), sigmas, noise.draw)
    return ours, y * float(p.ode_scale(float(grid[-1])))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# -- the five samplers ComfyUI has and we had not ---------------------------------------------------

@pytest.mark.parametrize("eta", [1.0, 0.0])
@pytest.mark.parametrize("key", ["vp", "edm"])
def test_dpmpp_2s_ancestral_cfg_pp_is_comfyuis_loop(key, eta):
    ours, theirs = _run_both(key, "dpmpp_2s_ancestral_cfg_pp",
                             lambda C, y, s, d: comfy_dpmpp_2s_ancestral_cfg_pp(C, y, s, eta, d), eta=eta)
    assert rel(ours, theirs) < TOL


RES = [("res_multistep_cfg_pp", 0.0, True), ("res_multistep_ancestral", 1.0, False),
       ("res_multistep_ancestral", 0.5, False), ("res_multistep_ancestral_cfg_pp", 1.0, True),
       ("res_multistep", 0.0, False)]


@pytest.mark.parametrize("name, eta, cfg_pp", RES, ids=[f"{n}-{e}" for n, e, _ in RES])
@pytest.mark.parametrize("key", ["vp", "edm"])
def test_res_multistep_family_is_comfyuis_loop(key, name, eta, cfg_pp):
    options = {"eta": eta} if name.startswith("res_multistep_ancestral") else {}
    ours, theirs = _run_both(key, name, lambda C, y, s, d: comfy_res_multistep(C, y, s, eta, cfg_pp, d),
                             guided=True, **options)
    assert rel(ours, theirs) < TOL


@pytest.mark.parametrize("name, cfg_pp", [("gradient_estimation", False), ("gradient_estimation_cfg_pp", True)])
@pytest.mark.parametrize("key", ["vp", "edm", "flow"])
def test_gradient_estimation_is_comfyuis_loop(key, name, cfg_pp):
    """(ComfyUI's gradient estimation is written in sigma coordinates for every model, flows included; the
    step into sigma = 0 returns the data estimate.)"""
    ours, theirs = _run_both(key, name, lambda C, y, s, d: comfy_gradient_estimation(C, y, s, cfg_pp))
    assert rel(ours, theirs) < TOL


UNGUIDED = [("dpmpp_2s_ancestral_cfg_pp", "dpmpp_2s_ancestral", {}),
            ("dpmpp_2s_ancestral_cfg_pp", "dpmpp_2s", {"eta": 0.0}),
            ("res_multistep_cfg_pp", "res_multistep", {}),
            ("res_multistep_ancestral_cfg_pp", "res_multistep_ancestral", {}),
            ("res_multistep_ancestral", "res_multistep", {"eta": 0.0}),
            ("gradient_estimation_cfg_pp", "gradient_estimation", {})]


@pytest.mark.parametrize("name, base, options", UNGUIDED, ids=[f"{a}={b}" for a, b, _ in UNGUIDED])
def test_cfg_pp_samplers_are_their_base_method_without_cfg_pp(name, base, options):
    """Without CFG++'s unconditional estimate (an unguided model, or plain CFG) each is its unguided method."""
    for key in PROCESSES:
        p, model, x, grid = _setup(key, 6)
        for net in (model, ds.guidance.cfg(model, SCALE)) if key == "vp" else (model,):
            a = ds.sample(net, x, grid, ds.solvers.get(name, **options), label=LABEL,
                          generator=torch.Generator().manual_seed(3))
            b = ds.sample(net, x, grid, base, label=LABEL, generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cfg_pp_guidance_moves_the_result():
    """With CFG++ the new samplers differ from their plain-CFG runs (the re-noising is what they add)."""
    p, model, x, grid = _setup("vp", 6)
    for name in ("dpmpp_2s_ancestral_cfg_pp", "res_multistep_cfg_pp", "res_multistep_ancestral_cfg_pp",
                 "gradient_estimation_cfg_pp"):
        runs = [ds.sample(ds.guidance.cfg(model, SCALE, plus_plus=pp), x, grid, name, label=LABEL,
                          generator=torch.Generator().manual_seed(3)) for pp in (True, False)]
        assert (runs[0] - runs[1]).abs().max() > 1e-3, name


# -- aliases ------------------------------------------------------------------------------------------

def test_aliases_resolve_to_registered_solvers_with_their_options():
    al = ds.solvers.ALIASES
    assert not set(al) & set(ds.solvers.names()), "an alias must not shadow a registered solver"
    for alias, (target, options) in al.items():
        assert target in ds.solvers.REGISTRY, alias
        assert ds.solvers.get(alias) == ds.solvers.get(target, **options)
        assert ds.solvers.resolve(alias) == ds.solvers.get(target, **options)
    assert ds.solvers.get("uni_pc") == ds.solvers.UniPC(solver_order=3, variant="bh1")
    assert ds.solvers.get("uni_pc_bh2") == ds.solvers.UniPC(solver_order=3, variant="bh2")
    assert ds.solvers.get("dpmpp_2m_sde_heun_gpu") == ds.solvers.DPMpp2MSDE(solver_type="heun")
    # the caller's options win over the alias's, and unknown ones still raise with the alias named
    assert ds.solvers.get("dpmpp_2m_sde_heun", eta=0.5).eta == 0.5
    with pytest.raises(ValueError, match="'uni_pc' \\(alias of 'unipc'\\) has no option"):
        ds.solvers.get("uni_pc", churn=1.0)


def test_comfyuis_sampler_list_is_covered():
    """Every name of ComfyUI's KSAMPLER_NAMES + SAMPLER_NAMES is a registered solver or an alias."""
    comfy = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
             "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
             "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
             "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
             "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
             "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
             "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
    missing = [n for n in comfy if n not in ds.solvers.REGISTRY and n not in ds.solvers.ALIASES]
    assert not missing, missing


def test_dpm_fast_alias_on_its_grid_is_kdiffusions_sample_dpm_fast():
    peers = pytest.importorskip("diffsampler.bench.peers")
    try:
        sampling = peers.kdiffusion_sampling()
    except ImportError:  # pragma: no cover
        pytest.skip("k-diffusion is not installed")
    p = ds.VP.scaled_linear()
    model = GMM.denoiser(p, "eps")
    x = p.prior((6, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = ds.grids.get(ds.solvers.ALIAS_GRIDS["dpm_fast"], p, 8)
    ours = ds.sample(model, x, grid, "dpm_fast")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        theirs = sampling.sample_dpm_fast(peers.kdiffusion_denoiser(model), x / float(p.ode_scale(p.t_max)),
                                          float(p.ode_sigma(p.t_min)), float(p.ode_sigma(p.t_max)), 8, disable=True)
    finally:
        torch.set_default_dtype(default)
    assert rel(theirs * float(p.ode_scale(p.t_min)), ours) < TOL


def test_dpmpp_2m_sde_heun_alias_is_kdiffusions_heun_form_given_the_same_noise():
    peers = pytest.importorskip("diffsampler.bench.peers")
    try:
        peers.kdiffusion_sampling()
    except ImportError:  # pragma: no cover
        pytest.skip("k-diffusion is not installed")
    p, _, x, grid = _setup("vp")
    model = GMM.denoiser(p, "eps")
    solver = ds.solvers.get("dpmpp_2m_sde_heun", lower_order_final=False)
    mine = ds.sample(model, x, grid, solver, generator=torch.Generator().manual_seed(5))
    noise = StepNoise.from_generator(torch.Generator().manual_seed(5), x.shape, x.dtype, x.device)
    theirs = peers.run_kdiffusion("dpmpp_2m_sde", model, x, grid, noise=noise, solver_type="heun")
    assert rel(theirs, mine) < TOL


# -- issue 17, item 4: the remaining cases ---------------------------------------------------------------


README = Path(__file__).resolve().parents[1] / "README.md"
runner = CliRunner()


def test_classifier_guidance_without_a_gradient_path_is_a_clear_error():
    p = ds.VP.scaled_linear()
    model = GMM.denoiser(p, "eps")
    x = torch.randn(3, 2, dtype=torch.float64)
    weights = torch.zeros(2, 3, requires_grad=True)
    for classifier, why in ((lambda y, t: torch.zeros(len(y), 3), "does not require grad"),
                            (lambda y, t: y.detach() @ torch.ones(2, 3, dtype=y.dtype), "does not require grad"),
                            (lambda y, t: torch.zeros(len(y), 2) @ weights, "does not depend on x through autograd")):
        guided = ds.guidance.classifier_guidance(model, classifier, 1.0)
        with pytest.raises(ValueError, match=f"no gradient path to x \\(its output {why}\\).*gradient_free_guidance"):
            ds.sample(guided, x, ds.grids.logsnr(p, 3), "ddim", label=torch.tensor([0, 1, 0]))


def test_models_shows_full_names_and_quality_figures_at_80_columns():
    result = runner.invoke(app, ["models"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    text = result.output
    assert "…" not in text
    for name in ds.models.names():
        assert name in text
        quality = ds.models.info(name)["quality"]
        if "held_out_accuracy" in quality:
            assert f"{quality['held_out_accuracy']:.1%}" in text
        if "swd_to_data" in quality:
            assert f"{quality['swd_to_data']:.3g}" in text
    assert f"{ds.models.info('digits')['quality']['dpmpp_2m_20nfe_cfg1']['accuracy']:.1%}" in text


def _readme_solver_rows():
    section = README.read_text().split("\n## Solvers", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `(\w+)` \| (.*?) \| (.*?) \| (.*?) \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = {"order": m.group(2), "nfe": m.group(3), "stochastic": m.group(4)}
    return rows, section


def test_solvers_command_agrees_with_the_readme_table():
    """The README's order and stochastic cells say what `diffsampler solvers` says (README may add a
    parenthesis of detail after it), for exactly the registered solvers; the aliases are listed in both."""
    rows, section = _readme_solver_rows()
    assert set(rows) == set(ds.solvers.names())
    for name, readme in rows.items():
        cells = solver_cells(name)
        for column in ("order", "stochastic"):
            ours, theirs = cells[column], readme[column]
            assert theirs == ours or theirs.startswith(ours + " ("), (name, column, ours, theirs)
    result = runner.invoke(app, ["solvers"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") >= 6}
    for name in ds.solvers.names():
        cells = solver_cells(name)
        assert cells["order"] in lines[name] and cells["stochastic"] in lines[name], name
    for alias, (target, _) in ds.solvers.ALIASES.items():
        assert alias in result.output and f"`{alias}`" in section, alias


def test_sample_command_takes_solver_options(monkeypatch):
    """``--option NAME=VALUE`` reaches the solver (the run itself is stubbed: the command's other work is
    tested in test_cli.py); aliases are accepted; bad options are refused with the solver's message."""
    import typer
    import diffsampler.cli as cli
    built = []

    def stop(model, x, grid, solver, **kw):
        built.append(solver)
        raise typer.Exit(0)

    monkeypatch.setattr(cli, "_sample", stop)
    args = ["sample", "--testbed", "gmm16", "--steps", "4", "--n", "10", "--out", "/tmp/diffsampler-test-out"]
    result = runner.invoke(app, args + ["--solver", "dpmpp_2m_sde_heun", "--option", "eta=0.5",
                                        "--option", "s_noise=1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert built[-1] == ds.solvers.DPMpp2MSDE(solver_type="heun", eta=0.5, s_noise=1)
    assert cli.parse_options(["eta=1", "solver_type=heun", "tau_window=(0.0, 1.0)", "corrector=False"]) == \
        {"eta": 1, "solver_type": "heun", "tau_window": (0.0, 1.0), "corrector": False}
    bad = runner.invoke(app, args + ["--solver", "euler", "--option", "eta=1"], env={"COLUMNS": "200"})
    assert bad.exit_code != 0 and "no option(s) eta" in bad.output
    bad = runner.invoke(app, args + ["--option", "eta"], env={"COLUMNS": "200"})
    assert bad.exit_code != 0 and "NAME=VALUE" in bad.output


def test_quick_bench_writes_a_scratch_folder_by_default_and_never_over_a_full_report(tmp_path, monkeypatch):
    import diffsampler.bench as bench
    seen = []
    monkeypatch.setattr(bench, "run", lambda quick, root, log, sections: seen.append((quick, Path(root))))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["bench", "--quick"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    quick, root = seen[-1]
    assert quick and root.resolve() != tmp_path.resolve() and "diffsampler-bench-quick" in root.name
    (tmp_path / "BENCHMARKS.md").write_text("# Benchmarks\n\nGenerated by `diffsampler bench`; do not edit.\n\n## A\n")
    result = runner.invoke(app, ["bench", "--quick", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code != 0 and "full benchmark report" in result.output
    committed = README.parent / "BENCHMARKS.md"
    result = runner.invoke(app, ["bench", "--quick", "--out", str(committed.parent)], env={"COLUMNS": "200"})
    assert result.exit_code != 0 and len(seen) == 1


def test_readme_shipped_models_snippet_runs_as_written():
    section = README.read_text().split("\n## Shipped models", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(code, "README.md (Shipped models)", "exec"), namespace)  # noqa: S102
    x = namespace["x_0"]
    assert x.shape == (20, 1, 8, 8) and bool(torch.isfinite(x).all())
