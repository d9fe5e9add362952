from typer.testing import CliRunner

import diffsampler as ds
from diffsampler.cli import app

runner = CliRunner()


def test_solvers_lists_every_registered_solver_uncut_at_80_columns():
    result = runner.invoke(app, ["solvers"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    for name in ds.solvers.names():
        assert name in result.output
    assert "Karras" in result.output


def test_sample_writes_a_picture_and_reports(tmp_path):
    result = runner.invoke(app, ["sample", "--testbed", "ring8", "--solver", "dpmpp_2m", "--steps", "8",
                                 "--n", "300", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert any(line.split() == ["NFE", "8"] for line in result.output.splitlines())
    assert "endpoint RMSE vs exact ODE" in result.output
    png = tmp_path / "ring8_vp_dpmpp_2m_karras8.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_rejects_unknown_names(tmp_path):
    result = runner.invoke(app, ["sample", "--solver", "nope", "--out", str(tmp_path)], env={"COLUMNS": "400"})
    assert result.exit_code != 0
    assert "unknown solver 'nope'" in result.output
    assert "ddim" in result.output and "dpmpp_2m" in result.output


def test_bench_help_names_every_section():
    from diffsampler.bench import SECTIONS
    result = runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    words = " ".join(result.output.replace("│", " ").split())
    assert all(name in words for name in SECTIONS), words
