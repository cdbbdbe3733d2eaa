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
