"""The exit codes a script reads from `mocohub`: named once in mocohub.errors, used where raised and shown."""
from pathlib import Path

from mocohub.cli.main import build_parser
from mocohub.errors import EXIT_DIVERGED, EXIT_USAGE, MocohubError
from mocohub.training.stop import divergence_error


def test_a_diverged_loss_exits_with_the_named_code_and_the_help_lists_it(tmp_path):
    assert (EXIT_USAGE, EXIT_DIVERGED) == (2, 3) and MocohubError("bad").exit_code == EXIT_USAGE
    assert divergence_error("nan", 5, 1, tmp_path / "none.pth.tar", "fp32").exit_code == EXIT_DIVERGED
    assert f"\n  {EXIT_DIVERGED}    training stopped on a NaN/inf loss" in build_parser().epilog
