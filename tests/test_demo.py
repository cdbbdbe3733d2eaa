"""`mocohub demo` shows one figure for its trained backbone, named for what it measures, and its model
card carries that same figure; the epoch lines' figure (the monitor's) is named apart, in the card too."""
import json
import re

import pytest

from mocohub.cli.main import main
from mocohub.run_folder import RunFolder
from mocohub.zoo.card import METRIC_NAMES


def _card_rows(card: str) -> dict[str, str]:
    return {cells[1].strip(): cells[2].strip() for line in card.splitlines()
            if line.startswith("| ") and len(cells := line.split("|")) == 4}


def test_the_demo_figure_is_the_cards_and_each_kNN_figure_is_named(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--images-per-class", "13", "--workers", "0",
                 "--precision", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "kNN top-1 on " in text and " of the backbone features (what from_pretrained returns" in text
    trained = float(re.search(r"MoCo,\s+2 epochs\s+([\d.]+)%", text).group(1))
    last_epoch = float(re.search(r"epoch 2/2: .*kNN top-1 ([\d.]+) %", text).group(1))
    run = RunFolder(out / "run")
    rows = _card_rows((run.backbone / "README.md").read_text())
    assert float(rows[METRIC_NAMES["knn_top1_backbone"]]) == pytest.approx(trained, abs=0.05)
    monitor = json.loads(run.metrics.read_text().splitlines()[-1])["knn_top1"]
    assert float(rows[METRIC_NAMES["knn_top1"]]) == monitor == pytest.approx(last_epoch, abs=0.05)
    assert f"(the epoch lines' kNN, {monitor:.1f} % at the end, scores the query encoder's 128-d" in text
