"""What `mocohub` itself prints around a command: --version, a mistyped flag, warnings, Ctrl-C."""
import re
import warnings

import pytest

from mocohub.cli import info as info_cli
from mocohub.cli.main import main


def test_version_names_mocohub_and_the_libraries_a_bug_report_needs(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert re.fullmatch(r"mocohub \d+\.\d+\.\d+ \(torch \S+, timm \S+, python \S+\)\n", capsys.readouterr().out)


def test_a_mistyped_flag_prints_the_commands_usage_and_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as usage:
        main(["knn", "moco-r50", "--train", "a", "--val", "b", "--kk", "5"])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mocohub knn ") and "--train DIR" in err
    assert err.splitlines()[-1] == "mocohub knn: error: unrecognized arguments: --kk 5 (did you mean --k?)"


def test_a_warning_is_one_line_for_a_person_and_the_display_is_restored(monkeypatch, capsys):
    def warns(source):
        warnings.warn("the images are smaller than the crop", UserWarning)
        raise KeyboardInterrupt

    shown = warnings.showwarning
    monkeypatch.setattr(info_cli, "describe", warns)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["info", "moco-r50"]) == 130
    err = capsys.readouterr().err.splitlines()
    assert err == ["mocohub: warning: the images are smaller than the crop", "mocohub info: interrupted"]
    assert warnings.showwarning is shown


@pytest.mark.parametrize("given_out", [True, False])
def test_an_interrupted_training_says_the_command_that_resumes_it(monkeypatch, tmp_path, capsys, given_out):
    run_dir = tmp_path / "run"

    def checkpoint_then_stop(cfg):  # the trainer checkpoints, then raises with its run folder
        raise KeyboardInterrupt(str(run_dir))

    monkeypatch.setattr("mocohub.training.trainer.train", checkpoint_then_stop)  # imported by run()
    argv = ["train", str(tmp_path), "--recipe", "cifar", "--epochs", "3"] + (["--out", str(run_dir)] * given_out)
    assert main(argv) == 130
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"mocohub train: interrupted; the checkpoint is in {run_dir}; resume with: "
                    f"mocohub train {tmp_path} --recipe cifar --epochs 3 --out {run_dir}")


def test_an_interrupted_extraction_says_how_to_continue(monkeypatch, tmp_path, capsys):
    from mocohub.zoo import loading

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "from_pretrained", stop)  # extract imports it when it runs
    out = tmp_path / "e.safetensors"
    assert main(["extract", "moco-r50", str(tmp_path), str(out)]) == 130
    assert capsys.readouterr().err == (f"mocohub extract: interrupted; continue with: "
                                       f"mocohub extract moco-r50 {tmp_path} {out} --resume\n")


def test_the_shards_command_is_registered(tmp_path, capsys):
    from mocohub.data.synthetic import make_dataset

    train_dir, _ = make_dataset(tmp_path / "data", train_per_class=2, val_per_class=1, size=8)
    assert main(["shards", str(train_dir), str(tmp_path / "shards"), "--json"]) == 0
    assert '"images": ' in capsys.readouterr().out and list((tmp_path / "shards").glob("*.tar"))
