"""The package as pip builds it: every module folder is found, every public name imports."""
from pathlib import Path

import setuptools

import mocohub

ROOT = Path(__file__).resolve().parents[1]


def test_every_source_folder_is_a_package_setuptools_finds():
    folders = {p.parent.relative_to(ROOT).as_posix().replace("/", ".")
               for p in (ROOT / "mocohub").rglob("*.py") if "__pycache__" not in p.parts}
    assert folders == set(setuptools.find_packages(str(ROOT), include=["mocohub*"]))


def test_public_api_imports():
    assert all(hasattr(mocohub, name) for name in mocohub.__all__)
    assert {"MoCo", "from_pretrained", "save_pretrained", "push_to_hub", "list_models"} <= set(mocohub.__all__)


def test_importing_a_package_imports_no_torch_until_a_public_name_is_used():
    import subprocess
    import sys
    code = ("import sys, mocohub, mocohub.training, mocohub.zoo, mocohub.data, mocohub.evaluation, mocohub.algorithm, "
            "mocohub.detection, mocohub.backbones\n"
            "print('torch' in sys.modules)\n"
            "from mocohub import MoCo\n"
            "import mocohub.training as t\n"
            "print('torch' in sys.modules, mocohub.MoCo is MoCo, 'MoCo' in dir(mocohub), t.train.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["False", "True True True mocohub.training.trainer"]


def test_every_subpackage_name_in_all_resolves():
    import importlib
    for package in ("mocohub.training", "mocohub.zoo", "mocohub.data", "mocohub.evaluation", "mocohub.algorithm",
                    "mocohub.detection", "mocohub.backbones"):
        module = importlib.import_module(package)
        assert all(hasattr(module, name) for name in module.__all__), package
        assert set(module.__all__) <= set(dir(module))
