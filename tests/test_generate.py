"""``ds.generate`` / ``diffsampler generate``: samples keyed by (seed, index), the same for any number of
workers, resumable after a kill, refusing a changed configuration, redoing damaged shards."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import diffsampler as ds
from diffsampler import generation as gen
from diffsampler.cli import app

# The exact ring8 testbed under a stochastic solver, so the start point and every step's noise matter.
# 24 samples in 3 shards of 8, batches of 4; labels cycle 0, 5, 2, 0, 5, 2, ...
RING = dict(num_samples=24, batch=4, shard_size=8, shape=(2,), grid="logsnr", steps=8, solver="ddpm", seed=7,
            dtype=torch.float64, model_id="ring8-vp-cosine")
LABELS = [0, 5, 2]

# The tolerance across batch sizes. The exact testbed's float64 denoiser changes by a few 1e-16 with the
# batch size (matrix products take other kernels); the digits network's float32 output for a row by up
# to 2e-6 on this CPU, which a few solver steps carry into the sample. Within one batch size nothing
# depends on the other rows, so the number of workers changes nothing (checked bitwise below).
RING_BATCH_TOL = 1e-12
DIGITS_BATCH_TOL = 1e-4

# What each torchrun worker runs: the same call as run_ring (the module is not imported, to start fast).
SCRIPT = textwrap.dedent("""
    import sys, torch, diffsampler as ds
    model = ds.testbeds.get("ring8").denoiser(ds.VP.cosine())
    ds.generate(model, out=sys.argv[1], cond={{"label": torch.tensor({labels})}}, preview=False, **{ring})
""")


def ring_model(slow_after: int = 0):
    """The ring8 denoiser; with ``slow_after``, every network call after that many sleeps (to be killed)."""
    gmm = ds.testbeds.get("ring8")
    model = gmm.denoiser(ds.VP.cosine())
    if slow_after:
        fn, calls = model.fn, [0]

        def slow(x, time_, **cond):
            calls[0] += 1
            if calls[0] > slow_after:
                time.sleep(0.25)
            return fn(x, time_, **cond)

        model.fn = slow
    return model


def run_ring(out, model=None, **changes):
    kw = {**RING, "cond": {"label": torch.tensor(LABELS)}, "preview": False, **changes}
    return ds.generate(model if model is not None else ring_model(), out=out, **kw)


def _run_slow_and_wait(out):
    """In a forked child: generate with a network that turns slow after the first shard (8 calls a batch)."""
    try:
        run_ring(out, model=ring_model(slow_after=16))
    finally:
        os._exit(0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as each worker has: on a shared 2-core machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process run: ``(directory, samples)``."""
    out = tmp_path_factory.mktemp("reference")
    run_ring(out)
    return out, ds.load_samples(out)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _script(tmp_path: Path) -> Path:
    path = tmp_path / "run_ring.py"
    ring = "dict(" + ", ".join(f"{k}={v!r}" for k, v in RING.items()) + ")"
    path.write_text(SCRIPT.format(labels=LABELS, ring=ring))
    return path


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def test_sample_i_is_what_the_seeded_generator_idiom_makes(reference):
    """Noise from (seed, index) alone: sample i equals sample i of prior(g) + sample(..., generator=g) in one
    batch, so it depends on neither the batch nor the shard it was made in."""
    _, data = reference
    model, proc = ring_model(), ds.VP.cosine()
    g = torch.Generator().manual_seed(RING["seed"])
    x = proc.prior((24, 2), generator=g, dtype=torch.float64)
    expected = ds.sample(model, x, ds.grids.get("logsnr", proc, 8), "ddpm", generator=g,
                         label=torch.tensor(LABELS).repeat(8))
    assert torch.equal(data["index"], torch.arange(24))
    assert torch.equal(data["label"], torch.tensor(LABELS).repeat(8))
    assert torch.equal(data["samples"], expected)


def test_explicit_grid_and_solver_object(tmp_path, reference):
    proc = ds.VP.cosine()
    times = ds.grids.get("logsnr", proc, 8)
    run_ring(tmp_path, grid=times, steps=None, solver=ds.solvers.get("ddpm"))
    assert torch.equal(ds.load_samples(tmp_path)["samples"], reference[1]["samples"])
    assert json.loads((tmp_path / gen.MANIFEST).read_text())["config"]["grid"] == "explicit"


def test_two_torchrun_workers_are_bitwise_one(tmp_path, reference):
    """P = 2 under torchrun (gloo, one thread each) writes the same shards, byte for byte, as P = 1."""
    out = tmp_path / "p2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(_script(tmp_path)), str(out)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    manifest = json.loads((out / gen.MANIFEST).read_text())
    assert manifest["last_run"]["workers"] == 2 and manifest["complete"]
    assert same(ds.load_samples(out), reference[1])
    ref_manifest = json.loads((reference[0] / gen.MANIFEST).read_text())
    assert manifest["shards"] == ref_manifest["shards"]  # the same SHA-256 for every shard


def test_batch_size_changes_samples_only_by_round_off(tmp_path, reference):
    for batch in (3, 8, 24):
        run_ring(tmp_path / f"b{batch}", batch=batch)
        data = ds.load_samples(tmp_path / f"b{batch}")
        assert torch.equal(data["index"], reference[1]["index"])
        assert (data["samples"] - reference[1]["samples"]).abs().max().item() <= RING_BATCH_TOL
    digits = gen.shipped("digits", labels=[1, 7])
    outs = {}
    for batch in (2, 6):
        out = tmp_path / f"digits{batch}"
        ds.generate(num_samples=6, batch=batch, shard_size=6, grid="logsnr", steps=3, solver="dpmpp_2m",
                    seed=0, out=out, preview=False, **digits)
        outs[batch] = ds.load_samples(out)["samples"]
    assert (outs[2] - outs[6]).abs().max().item() <= DIGITS_BATCH_TOL


def test_killed_run_resumes_to_the_uninterrupted_samples(tmp_path, reference):
    """SIGKILL after the first shard is written; the same call then makes exactly the rest."""
    out = tmp_path / "killed"
    # a forked worker (no second interpreter to start): after its first shard every network call sleeps
    proc = multiprocessing.get_context("fork").Process(target=_run_slow_and_wait, args=(out,))
    proc.start()
    first = out / gen.shard_name(0, 3)
    deadline = time.monotonic() + 120
    while not first.exists() and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL and first.exists()
    finished = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert finished and len(finished) < 3, finished  # killed part way
    messages = []
    manifest = run_ring(out, log=messages.append)
    assert manifest["complete"] and manifest["last_run"]["samples"] == 8 * (3 - len(finished))
    assert any("resuming" in m for m in messages)
    data = ds.load_samples(out)
    assert torch.equal(data["index"], torch.arange(24))  # exactly n samples, each index once
    assert same(data, reference[1])
    assert not list(out.glob(".*tmp*")), "a half-written temporary file was left behind"


def test_changed_option_is_refused_by_name(tmp_path):
    run_ring(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for option, value in (("steps", 6), ("seed", 8), ("solver", "euler_ancestral"), ("batch", 8),
                          ("num_samples", 32), ("cond", {"label": torch.tensor([1])})):
        with pytest.raises(gen.ConfigMismatch) as err:
            run_ring(tmp_path, **{option: value})
        name = "cond.label" if option == "cond" else option
        assert name in err.value.fields and name in str(err.value), (option, str(err.value))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched


def test_truncated_or_altered_shard_is_redone(tmp_path, reference):
    run_ring(tmp_path)
    truncated, altered = tmp_path / gen.shard_name(1, 3), tmp_path / gen.shard_name(2, 3)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(altered.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit pattern in a sample, the size unchanged
    altered.write_bytes(bytes(data))
    with pytest.raises(gen.GenerateError, match="SHA-256"):
        ds.load_samples(tmp_path)
    messages = []
    manifest = run_ring(tmp_path, log=messages.append)
    assert manifest["last_run"]["samples"] == 16
    assert any("shard 1" in m and "redone" in m for m in messages)
    assert any("shard 2" in m and "redone" in m for m in messages)
    assert same(ds.load_samples(tmp_path), reference[1])


def test_a_shard_appears_only_when_complete(tmp_path, monkeypatch, reference):
    """A worker dying while it writes a shard leaves no file under the shard's name (and resume redoes it)."""
    real_replace = os.replace

    def die_before_naming_shard_1(src, dst):
        if Path(dst).name == gen.shard_name(1, 3):  # its bytes are written, the rename not yet
            raise KeyboardInterrupt("worker died mid-write")
        real_replace(src, dst)

    monkeypatch.setattr(gen.os, "replace", die_before_naming_shard_1)
    with pytest.raises(KeyboardInterrupt):
        run_ring(tmp_path)
    monkeypatch.setattr(gen.os, "replace", real_replace)
    assert (tmp_path / gen.shard_name(0, 3)).exists()
    assert not (tmp_path / gen.shard_name(1, 3)).exists()
    assert list(tmp_path.glob(".shard-*tmp*"))  # the unfinished write is only under a temporary name
    run_ring(tmp_path)
    assert same(ds.load_samples(tmp_path), reference[1])
    assert not list(tmp_path.glob(".shard-*tmp*"))


def test_load_samples_of_an_unfinished_run(tmp_path, reference):
    run_ring(tmp_path)
    manifest = json.loads((tmp_path / gen.MANIFEST).read_text())
    del manifest["shards"]["1"]
    (tmp_path / gen.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(gen.GenerateError, match="1 of 3 shards"):
        ds.load_samples(tmp_path)
    part = ds.load_samples(tmp_path, allow_partial=True)
    keep = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])
    assert torch.equal(part["index"], keep)
    assert torch.equal(part["samples"], reference[1]["samples"][keep])


def test_cli_generate_resume_refusal_and_labels(tmp_path):
    runner = CliRunner()
    args = ["generate", "--model", "digits", "--num-samples", "6", "--batch", "2", "--shard-size", "4",
            "--solver", "dpmpp_2m", "--grid", "logsnr", "--steps", "2", "--label", "3", "--seed", "1",
            "--out", str(tmp_path), "--no-progress"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    data = ds.load_samples(tmp_path)
    assert data["samples"].shape == (6, 1, 8, 8) and torch.equal(data["label"], torch.full((6,), 3))
    assert (tmp_path / "preview.png").stat().st_size > 0
    manifest = json.loads((tmp_path / gen.MANIFEST).read_text())
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["config"]["extra"] == {"cfg": 1.0}
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "nothing to do" in again.output
    refused = runner.invoke(app, args + ["--cfg", "2"])
    assert refused.exit_code == 2 and "cfg" in refused.output, refused.output
    # --label repeated and comma-separated: 3, 4, 6, cycling over the samples
    cycling = runner.invoke(app, args[:-3] + ["--label", "4,6", "--out", str(tmp_path / "cycle"), "--no-progress"])
    assert cycling.exit_code == 0, cycling.output
    assert ds.load_samples(tmp_path / "cycle")["label"].tolist() == [3, 4, 6, 3, 4, 6]


def test_cli_default_labels_for_fewer_samples_than_classes(tmp_path):
    """Every class in turn is cut to the run's size; more --label values than samples is a clear error."""
    runner = CliRunner()
    args = ["generate", "--model", "digits", "--num-samples", "4", "--batch", "2", "--shard-size", "4",
            "--steps", "2", "--no-progress"]
    done = runner.invoke(app, args + ["--out", str(tmp_path / "few")])
    assert done.exit_code == 0, done.output
    assert ds.load_samples(tmp_path / "few")["label"].tolist() == [0, 1, 2, 3]
    refused = runner.invoke(app, args + ["--label", "1,2,3,4,5", "--out", str(tmp_path / "many")])
    assert refused.exit_code == 2 and "5 rows for 4 samples" in refused.output, refused.output


def test_the_module_is_not_hidden_by_the_function():
    """``ds.generate`` is the function; its module ``diffsampler.generation`` imports as a module."""
    import inspect

    import diffsampler.generation as module
    assert inspect.ismodule(module) and module is gen
    assert ds.generate is gen.generate and ds.load_samples is gen.load_samples and inspect.isfunction(ds.generate)


# The shipped configuration of ds.models.info("digits")["quality"]["dpmpp_2m_20nfe_cfg1"]: dpmpp_2m, 20 steps
# on the logsnr grid, 500 samples, 50 per class, seed 0: accuracy 0.986, Frechet distance 6.325. Here the
# command line's defaults (every class in turn) with another seed. Sampling error, measured with seeds 1-6
# at 500 samples: accuracy 0.974-0.984, FD 6.01-8.70 (mean 7.0, sd 1.0). The bounds: three standard
# errors of a difference of two binomial accuracies, and 4 for FD (about three sd of a difference).
def test_evaluate_reproduces_the_shipped_figures(tmp_path):
    runner = CliRunner()
    done = runner.invoke(app, ["generate", "--model", "digits", "--num-samples", "500", "--batch", "500",
                               "--shard-size", "500", "--steps", "20", "--seed", "1", "--out", str(tmp_path),
                               "--no-progress"])
    assert done.exit_code == 0, done.output
    result = gen.evaluate(tmp_path, "digits")
    ref = ds.models.info("digits")["quality"]["dpmpp_2m_20nfe_cfg1"]
    assert result["reference"] == {"key": "dpmpp_2m_20nfe_cfg1", **ref}
    assert result["n"] == 500
    p = ref["accuracy"]
    assert abs(result["accuracy"] - p) <= 3 * (2 * p * (1 - p) / 500) ** 0.5
    assert abs(result["frechet_distance"] - ref["frechet_distance"]) <= 4.0
    shown = runner.invoke(app, ["evaluate", str(tmp_path), "--model", "digits"])
    assert shown.exit_code == 0 and "Frechet distance" in shown.output and "98.6%" in shown.output


def test_the_literal_torchrun_form_runs_from_any_directory(tmp_path):
    """``torchrun --nproc-per-node 2 -- diffsampler generate ...``, neither ``-m`` nor ``--no-python`` (issue
    18's spelling): torchrun starts each worker as ``python -u diffsampler ...``, which would look for a file
    ``./diffsampler``; the startup hook ``diffsampler-torchrun.pth`` (see ``diffsampler/_torchrun.py``) makes it
    ``python -u -m diffsampler ...``. Run from an empty directory; the hook leaves every other start alone."""
    import site

    from diffsampler import _torchrun

    pth = "diffsampler-torchrun.pth"
    if not any(Path(d, pth).is_file() for d in [*site.getsitepackages(), site.getusersitepackages()]):
        pytest.skip(f"{pth} is not in this environment's site-packages (it comes with `pip install .` or "
                    "`pip install -e .` of this version)")
    if os.name != "posix":
        pytest.skip("the hook replaces the worker with os.execv, POSIX only")
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    empty = tmp_path / "empty"
    empty.mkdir()
    env = _env()
    env.pop("TORCHELASTIC_RUN_ID", None)
    env.pop("PYTHON_EXEC", None)

    # When it fires, and when not: only `-u diffsampler` under torchrun with no ./diffsampler of any kind.
    run = {"TORCHELASTIC_RUN_ID": "x"}
    assert _torchrun.worker_command(["py", "-u", "diffsampler", "generate"], run, "/py", lambda p: False) == [
        "/py", "-u", "-m", "diffsampler", "generate"]
    assert _torchrun.worker_command(["py", "-u", "diffsampler"], {}, "/py", lambda p: False) is None
    assert _torchrun.worker_command(["py", "-u", "diffsampler"], run, "/py", lambda p: True) is None
    assert _torchrun.worker_command(["py", "diffsampler"], run, "/py", lambda p: False) is None
    assert _torchrun.worker_command(["py", "-u", "-m", "diffsampler"], run, "/py", lambda p: False) is None
    plain = subprocess.run([sys.executable, "-u", "diffsampler"], cwd=empty, env=env, capture_output=True,
                           text=True, timeout=60)
    assert plain.returncode != 0 and "can't open file" in plain.stderr, plain.stderr  # not under torchrun
    (tmp_path / "local" / "diffsampler").mkdir(parents=True)
    (tmp_path / "local" / "diffsampler" / "__main__.py").write_text("print('the local one')\n")
    local = subprocess.run([sys.executable, "-u", "diffsampler"], cwd=tmp_path / "local", env={**env, **run},
                           capture_output=True, text=True, timeout=60)
    assert local.returncode == 0 and local.stdout == "the local one\n", local.stdout + local.stderr

    # --standalone picks a free port (the static default, 29500, may be taken); the worker command is the same.
    out = tmp_path / "out"
    cmd = [*launcher, "--standalone", "--nproc-per-node", "2", "--", "diffsampler", "generate", "--model",
           "digits", "--num-samples", "4", "--batch", "2", "--shard-size", "2", "--steps", "2", "--seed", "0",
           "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, cwd=empty, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    manifest = json.loads((out / gen.MANIFEST).read_text())
    assert manifest["last_run"]["workers"] == 2 and manifest["complete"]
    assert ds.load_samples(out)["samples"].shape == (4, 1, 8, 8)
    assert list(empty.iterdir()) == []
