"""`diffsampler posterior` and `diffsampler edit` as users run them, at small sizes and 80 columns."""

import pytest
from typer.testing import CliRunner

from diffsampler.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, list(args), env={"COLUMNS": "80"})


@pytest.mark.parametrize("task, method", [("inpaint", "afdps"), ("denoise", "dps")])
def test_posterior_prints_accuracy_and_error_and_writes_the_picture(tmp_path, task, method):
    result = _run("posterior", "--model", "digits", "--task", task, "--method", method, "--images", "1",
                  "--particles", "2", "--steps", "4", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= 80 for line in lines if "picture" not in line), result.output
    accuracy = next(line for line in lines if "evaluator accuracy" in line)
    assert 0.0 <= float(accuracy.split()[-1].rstrip("%")) <= 100.0
    assert any("RMSE in the observed pixels" in line for line in lines)
    png = tmp_path / f"posterior_digits_{task}_{method}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_posterior_refuses_a_bad_choice():
    result = _run("posterior", "--task", "deblur")
    assert result.exit_code != 0 and "unknown task 'deblur'" in result.output


def test_posterior_that_diverges_says_so_without_a_traceback(tmp_path):
    result = _run("posterior", "--task", "inpaint", "--method", "afdps", "--sigma-y", "0.1", "--images", "1",
                  "--particles", "2", "--steps", "20", "--out", str(tmp_path))
    assert result.exit_code == 1 and "use more steps" in result.output and "Traceback" not in result.output


def test_edit_prints_the_three_numbers_and_writes_the_picture(tmp_path):
    result = _run("edit", "--model", "digits", "--index", "17", "--to", "8", "--method", "bdia", "--steps", "5",
                  "--strength", "1.0", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    text = result.output
    assert "reconstruction error" in text and "edit read as" in text and "distance to the original" in text
    assert all(len(line) <= 80 for line in text.splitlines() if "wrote" not in line), text
    assert (tmp_path / "edit-digits-17-to-8-bdia.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_edit_refuses_an_unknown_method():
    result = _run("edit", "--method", "nope")
    assert result.exit_code != 0 and "nope" in result.output
