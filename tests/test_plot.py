"""Training curves: write_curves for the trainer, `mocohub plot` for people, and life without matplotlib."""
import json
import sys

import pytest

from mocohub.cli.main import main
from mocohub.jsonlog import append_jsonl
from mocohub.plotting import read_run, write_curves

PNG = b"\x89PNG\r\n\x1a\n"


def _run(run_dir, *, epochs=2, steps_per_epoch=5, log_every=2, knn=True):
    """Logs as the trainer writes them: intervals end at each epoch's last step; 0-based counters."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(epochs):
        ends = sorted({*range(log_every - 1, steps_per_epoch, log_every), steps_per_epoch - 1})
        append_jsonl(run_dir / "steps.jsonl", [
            {"step": epoch * steps_per_epoch + e, "epoch": epoch, "steps": 1, "loss": 9.0 - epoch - e / 10,
             "acc1": 10.0 * epoch + e, "lr": 0.03 / (epoch + 1)} for e in ends])
        row = {"epoch": epoch, "loss": 9.0 - epoch, "acc1": 10.0, "lr": 0.03, "images_per_s": 100.0,
               "seconds": 1.0, "skipped": 0}
        append_jsonl(run_dir / "metrics.jsonl", [{**row, "knn_top1": 20.0 + epoch, "knn_top5": 60.0} if knn else row])
    return run_dir


def test_steps_per_epoch_comes_from_a_completed_epoch(tmp_path):
    assert read_run(_run(tmp_path / "a", steps_per_epoch=5)).steps_per_epoch == 5
    partial = tmp_path / "b"
    partial.mkdir()
    append_jsonl(partial / "steps.jsonl", [{"step": 3, "epoch": 0, "steps": 4, "loss": 9.0, "acc1": 1.0, "lr": 0.1}])
    assert read_run(partial).steps_per_epoch is None  # first epoch still running: plotted against steps


def test_write_curves_draws_a_png_and_is_silent_without_logs(tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    run = _run(tmp_path / "run")
    assert write_curves(run) == run / "curves.png"
    height, width, _ = matplotlib_image.imread(run / "curves.png").shape
    assert width > height > 500  # the 2x2 panels
    (tmp_path / "empty").mkdir()
    assert write_curves(tmp_path / "empty") is None


def test_plot_command_compares_runs_and_refuses_a_folder_without_logs(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    a, b = _run(tmp_path / "x" / "run"), _run(tmp_path / "y" / "run", epochs=3, knn=False)
    assert main(["plot", str(a), str(b)]) == 0
    assert capsys.readouterr().out == "curves of 2 runs (loss, instance accuracy, lr, kNN top-1) -> curves.png\n"
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
    assert main(["plot", str(a), "-o", str(tmp_path / "one.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(tmp_path / "one.png")
    (tmp_path / "nothing").mkdir()
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "has no steps.jsonl or metrics.jsonl" in capsys.readouterr().err


def test_without_matplotlib_plot_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    run = _run(tmp_path / "run")
    for name in ["matplotlib", *(m for m in list(sys.modules) if m.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed, imported here before or not
    assert write_curves(run) is None and capsys.readouterr() == ("", "")
    assert main(["plot", str(run)]) == 1
    assert capsys.readouterr() == ("", "mocohub plot: error: plotting needs matplotlib: pip install 'mocohub[plot]' "
                                       "(or pip install matplotlib)\n")
    assert not (run / "curves.png").exists()
