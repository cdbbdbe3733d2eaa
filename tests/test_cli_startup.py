"""A command line that answers at once (issue 21 item 3): --help, list and info of a zoo name import no torch.

Each command runs in a fresh interpreter that prints, after mocohub's main returns, which of the heavy
libraries were imported: the check is what was imported, not a time (timings: benchmarks/README.md).
"""
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "timm")
RUN_AND_LIST_IMPORTS = ("import sys\nfrom mocohub.cli.main import main\n"
                        "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
                        f"print('IMPORTED', *sorted(m for m in {HEAVY!r} if m in sys.modules), 'EXIT', code)")


def heavy_imports(*argv: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", RUN_AND_LIST_IMPORTS, *argv], capture_output=True, text=True,
                         check=True).stdout.splitlines()[-1].split()
    assert out[0] == "IMPORTED" and out[-2:] == ["EXIT", "0"], out
    return out[1:-2]


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["list"], ["info", "moco-r50"]])
def test_help_list_and_info_of_a_zoo_name_import_no_torch(argv):
    assert heavy_imports(*argv) == []


def test_the_augmentation_names_a_parser_lists_are_those_augment_builds():
    """Listed apart from augment.py so the parser needs no torchvision: the two must agree."""
    from mocohub.data.augment import AUGMENTATIONS
    from mocohub.data.augment_names import AUGMENTATION_NAMES

    assert AUGMENTATION_NAMES == tuple(AUGMENTATIONS)
