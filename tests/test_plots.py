"""Learning-curve PNGs and `molden plot RUN_DIR`."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from molden.cli import plot
from molden.errors import MoldenInputError
from molden.train.metrics_log import MetricsLog, read_metrics
from molden.train.plots import learning_curves_figure, plot_learning_curves, plot_mae_vs_wallclock

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "qm9_homo_nn"
    with MetricsLog(run) as log:
        for step in range(1, 41):
            log.write(step, step / 20, "train", {"loss": 10.0 / step, "homo_mae_mev": 500.0 / step, "lr": 1e-3}, wall_s=step * 0.2)
            if step % 10 == 0:
                log.write(step, step / 20, "val", {"homo_mae_mev": 600.0 / step, "homo_mae_mev_ema": math.nan}, wall_s=step * 0.2)
        log.write(40, 2.0, "test", {"homo_mae_mev": 20.0}, wall_s=8.5)
    return run


def test_learning_curves_png_is_written_with_one_panel_per_metric(run_dir):
    (path,) = plot_learning_curves(run_dir)
    assert path == run_dir / "learning_curves.png"
    _assert_png(path)
    figure = learning_curves_figure(read_metrics(run_dir), title=run_dir.name)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["loss", "homo_mae_mev", "lr", "homo_mae_mev_ema"]
    assert run_dir.name in figure.get_suptitle()


def test_learning_curves_draw_each_split_in_its_own_colour_and_log_y_over_decades(run_dir):
    figure = learning_curves_figure(read_metrics(run_dir), title="run")
    loss, mae, lr, _ = figure.axes
    lines = {line.get_label(): line for line in mae.get_lines()}
    assert set(lines) == {"train", "val", "test"}
    assert len({line.get_color() for line in lines.values()}) == 3
    assert list(lines["val"].get_xdata()) == [10, 20, 30, 40]
    assert loss.get_yscale() == "log" and mae.get_yscale() == "log"
    assert lr.get_yscale() == "linear"  # constant: no decade to span


def test_out_option_picks_the_file(run_dir, tmp_path):
    out = tmp_path / "figs" / "curves.png"
    assert plot_learning_curves(run_dir, out) == [out]
    _assert_png(out)
    assert not (run_dir / "learning_curves.png").exists()


def test_an_existing_file_is_replaced_only_with_overwrite(run_dir, tmp_path):
    from molden.errors import MoldenConfigError

    precious = tmp_path / "figure.png"
    precious.write_bytes(b"the user's figure")
    with pytest.raises(MoldenConfigError, match="exists: pass --overwrite"):
        plot_learning_curves(run_dir, precious)
    assert precious.read_bytes() == b"the user's figure"
    with pytest.raises(MoldenConfigError, match="name a .png file"):
        plot_learning_curves(run_dir, run_dir / "metrics.jsonl", overwrite=True)
    assert plot_learning_curves(run_dir, precious, overwrite=True) == [precious]
    _assert_png(precious)
    plot_learning_curves(run_dir)
    assert plot_learning_curves(run_dir) == [run_dir / "learning_curves.png"]  # the run's own figure, redrawn at will


def test_missing_or_empty_metrics_file_is_a_user_error(tmp_path):
    with pytest.raises(MoldenInputError, match="metrics.jsonl"):
        plot_learning_curves(tmp_path)
    MetricsLog(tmp_path).close()
    with pytest.raises(MoldenInputError, match="metrics.jsonl: no metrics recorded yet"):
        plot_learning_curves(tmp_path)


def test_mae_vs_wallclock_compares_runs_on_one_axis(run_dir, tmp_path):
    records = read_metrics(run_dir)
    slower = [dict(r, wall_s=2 * r["wall_s"]) for r in records]
    out = plot_mae_vs_wallclock({"molden": records, "schnetpack": slower}, "homo_mae_mev", tmp_path / "cmp.png")
    _assert_png(out)
    with pytest.raises(MoldenInputError, match="peer: no validation values of homo_mae_mev"):
        plot_mae_vs_wallclock({"peer": [r for r in records if r["split"] == "train"]}, "homo_mae_mev", tmp_path / "x.png")


def _cli():
    app = typer.Typer()
    app.command()(plot.plot)
    return app


def test_cli_plot_writes_the_png_and_prints_its_path(run_dir):
    result = CliRunner().invoke(_cli(), [str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "learning_curves.png" in result.stdout
    _assert_png(run_dir / "learning_curves.png")


def test_cli_plot_of_a_missing_run_dir_is_one_error_line(tmp_path):
    result = CliRunner().invoke(_cli(), [str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error:")
    assert "Traceback" not in result.output and "nowhere" in result.stderr


def test_importing_the_training_plots_does_not_load_matplotlib():
    code = "import sys, molden.train.plots, molden.cli.plot; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
