"""Shared fixtures and helpers: the processes under test, the solver lists, statistical sizes."""

import os

import pytest
import torch

import diffsampler as ds

FULL_STATS = os.environ.get("DIFFSAMPLER_FULL_STATS") == "1"

# Each process with the grid family that is natural for it (the one its users use):
# log-SNR spacing for VP, Karras for EDM, uniform in t for flows.
PROCESSES = {
    "vp_scaled_linear": (ds.VP.scaled_linear, "logsnr"),
    "vp_linear": (ds.VP.linear, "logsnr"),
    "vp_cosine": (ds.VP.cosine, "logsnr"),
    "edm": (ds.EDM, "karras"),
    "flow": (ds.Flow, "uniform"),
}
CORE_PROCESSES = ["vp_scaled_linear", "edm", "flow"]


def make_process(key):
    return PROCESSES[key][0]()


def natural_grid(key, process, steps, **kw):
    return ds.grids.get(PROCESSES[key][1], process, steps, **kw)


def natural_prediction(process):
    return "velocity" if isinstance(process, ds.Flow) else "eps"


def deterministic_solvers():
    """The deterministic solvers that take the grid's steps (adaptive ones choose their own)."""
    return [n for n in ds.solvers.names() if not ds.solvers.get(n).stochastic and not ds.solvers.get(n).adaptive]


# Every registered solver, plus the stochastic configurations of those that have one.
SOLVER_CONFIGS = [(n, {}) for n in ds.solvers.names()] + [
    ("ddim", {"eta": 1.0}),
    ("ddim", {"eta": 0.5}),
    ("euler", {"s_churn": 10.0}),
    ("heun", {"s_churn": 10.0}),
    ("heunpp2", {"s_churn": 10.0}),
    ("dpmpp_2m_sde", {"eta": 0.0}),
    ("unipc", {"solver_order": 3, "variant": "bh1"}),
    ("unipc", {"predictor": "dpmpp", "corrector": True}),
    ("dpm_2", {"s_churn": 5.0}),
    ("dpmpp_2s_ancestral", {"eta": 0.0}),
    ("lms", {"lms_order": 2}),
    ("deis", {"deis_mode": "tab"}),
    ("deis", {"deis_mode": "rhoab", "solver_order": 3}),
    ("sa_solver", {"eta": 0.0}),
    ("sa_solver", {"predictor_order": 2, "corrector_order": 2, "simple_order_2": True}),
    ("sa_solver", {"corrector_order": 0, "predictor_order": 4}),
    ("sa_solver_pece", {"eta": 0.0}),
    ("seeds_2", {"eta": 0.0}),
    ("seeds_2", {"solver_type": "phi_2"}),
    ("seeds_3", {"eta": 0.0}),
    ("er_sde", {"max_stage": 2}),
    ("dpm_solver_singlestep", {"solver_type": "paper"}),
]


def config_id(cfg):
    name, opts = cfg
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


def stat_size(reduced: int, full: int) -> int:
    """Sample size of a statistical test: reduced in CI, full with DIFFSAMPLER_FULL_STATS=1."""
    return full if FULL_STATS else reduced


def rms(a, b):
    return (a - b).pow(2).mean().sqrt().item()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is several times faster than two on a shared machine (the results are the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_bench_section_alone(tmp_path, monkeypatch, module, tiny, name):
    """Run one bench section at a tiny size into ``tmp_path``, the other sections read back from the
    repository's ``benchmarks/results.json`` (one accuracy problem kept: one plot to draw); returns the
    report's text and the new results. The other sections' plots and the real-digit floor are
    tests/test_bench.py's business (and most of the time)."""
    import json
    from pathlib import Path

    from diffsampler.bench import report, run

    monkeypatch.setattr(module, "QUICK", tiny)
    monkeypatch.setattr(report, "_plot_accuracy", lambda results, out: [])
    monkeypatch.setattr(report, "_plot_overhead", lambda timings, out: "overhead.png")
    monkeypatch.setattr(report, "_real_fd_floor", lambda: "(not measured here)")
    data = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results.json").read_text())
    first = (data["accuracy"][0]["testbed"], data["accuracy"][0]["process"])
    data["accuracy"] = [r for r in data["accuracy"] if (r["testbed"], r["process"]) == first]
    data["adaptive"] = [r for r in data["adaptive"] if (r["testbed"], r["process"]) == first]
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "results.json").write_text(json.dumps(data))
    text = run(quick=True, root=tmp_path, log=lambda s: None, sections=(name,)).read_text()
    data = json.loads((tmp_path / "benchmarks" / "results.json").read_text())
    assert data["provenance"][name] == f"diffsampler bench --quick --section {name}"
    return text, data
