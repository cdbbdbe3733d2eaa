"""The one validator of a training config (before anything is written), the CLI's defaults taken from
TrainConfig, --compile's compiler rule, and the record of the choices a run made (run.json)."""
import ast
import dataclasses
import json
from pathlib import Path

import pytest

import mocohub
from mocohub.cli.main import build_parser, main
from mocohub.cli.train import config_from_args
from mocohub.data.synthetic import make_dataset
from mocohub.errors import MocohubError
from mocohub.training import TrainConfig
from mocohub.training.validate import CHOICES, compile_refusal, validate

TINY = ["--recipe", "cifar", "--arch", "test_resnet", "--image-size", "16", "--batch-size", "8", "--moco-k", "32",
        "--allow-large-queue", "--workers", "0", "--no-progress", "--log-every", "1", "--precision", "fp32"]
PACKAGE = Path(mocohub.__file__).parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), train_per_class=2, val_per_class=0, size=16)[0]  # 20 images


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs 0: must be a whole number of at least 1"),
    (["--epochs", "-3"], "--epochs -3: must be"),
    (["--batch-size", "0"], "--batch-size 0: must be"),
    (["--log-every", "0"], "--log-every 0: must be"),
    (["--max-steps", "0"], "--max-steps 0: must be"),
    (["--knn-every", "0"], "--knn-every 0: must be"),
    (["--workers", "-1"], "--workers -1: must be 0"),
    (["--moco-k", "0"], "--moco-k 0: the queue needs at least one key"),
    (["--recipe", "cifar-v3", "--moco-k", "0", "--epochs", "0"], "--epochs 0: must be"),
])
def test_non_positive_counts_are_refused_before_anything_is_written(data, tmp_path, capsys, flags, message):
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--out", str(run), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not run.exists()


@pytest.mark.parametrize("device, compilers, refused", [
    ("cpu", [], "--compile on the CPU needs a C++ compiler"),
    ("cpu", ["gcc", "cc"], "--compile on the CPU needs a C++ compiler"),  # C only: Inductor writes C++
    ("cpu", ["g++"], None),
    ("cpu", ["/usr/bin/clang++"], None),
    ("cpu", ["c++"], None),
    ("cuda", [], "--compile on CUDA needs a C compiler for Triton"),
    ("cuda", ["g++", "c++"], "--compile on CUDA needs a C compiler for Triton"),  # Triton looks for gcc/clang/$CC
    ("cuda", ["gcc"], None),
    ("cuda", ["clang"], None),
    ("cuda", ["$CC"], None),
    ("mps", [], None),
])
def test_compile_needs_the_compiler_of_its_device(device, compilers, refused):
    found = compile_refusal(device, compilers)
    assert found == refused if refused is None else refused in found


def test_cli_defaults_and_choices_come_from_trainconfig_and_the_validator():
    parser = build_parser()
    args = parser.parse_args(["train", "DATA"])
    assert config_from_args(args) == TrainConfig.from_recipe(TrainConfig.recipe, data="DATA")
    train = next(a for a in parser._subparsers._group_actions[0].choices["train"]._actions if a.dest == "precision")
    assert tuple(train.choices) == CHOICES["precision"]
    for name, valid in CHOICES.items():  # every choice the CLI offers passes the validator's check
        for value in valid:
            cfg = dataclasses.replace(TrainConfig.from_recipe("cifar", data="DATA"), **{name: value})
            try:
                validate(cfg, 1)
            except MocohubError as e:
                assert "unknown" not in str(e), (name, value, e)


def test_run_json_records_the_choices_made_at_start(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--max-steps", "2", "--out", str(run)]) == 0
    record = json.loads((run / "run.json").read_text())
    expected = {"precision": "fp32", "precision_why": "as asked", "memory_format": "NCHW", "device": "cpu",
                "device_type": "cpu", "world_size": 1, "workers": 0, "aug_impl": "batched", "aug_device": "cpu",
                "bn_splits": 1, "steps_per_epoch": 2, "images": 20, "moco_version": "v1", "recipe": "cifar",
                "mocohub_version": mocohub.__version__}
    assert {k: record[k] for k in expected} == expected and record["torch_version"]
    out = capsys.readouterr().out
    assert f"precision {record['precision']} ({record['precision_why']}), {record['memory_format']}" in out
    assert "2 steps/epoch" in out and "on 20 images" in out


def test_a_refused_resume_leaves_the_earlier_record(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--max-steps", "1", "--out", str(run)]) == 0
    before = (run / "run.json").read_bytes()
    assert main(["train", str(data), *TINY, "--moco-k", "16", "--out", str(run)]) == 2
    assert "moco_k: 32 -> 16" in capsys.readouterr().err and (run / "run.json").read_bytes() == before


# -- the shape of the training package (issue 18: the rooms must stay obvious) -----------------------
def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _code_mentions(path: Path, word: str) -> list[int]:
    """Lines where ``word`` is in a name, attribute or string of the code (not comments or docstrings)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(n)}
    hits = []
    for node in ast.walk(tree):
        text = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else \
            node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""
        if word in text.lower() and id(node) not in docs:
            hits.append(node.lineno)
    return hits


def test_the_loop_has_no_generation_branch_and_no_function_is_over_60_lines():
    trainer = PACKAGE / "training" / "trainer.py"
    assert _code_mentions(trainer, "v3") == [] and _code_mentions(PACKAGE / "training" / "algorithms.py", ".v3") == []
    assert len(trainer.read_text().splitlines()) < 250
    long = [f"{p.name}:{f.name}" for p in (PACKAGE / "training").glob("*.py") for f in _functions(p)
            if f.end_lineno - f.lineno + 1 > 60]
    assert long == []


def test_no_module_outside_cli_imports_cli_and_no_lr_scheduler_internals_are_edited():
    for path in PACKAGE.rglob("*.py"):
        if "cli" in path.relative_to(PACKAGE).parts or path.name == "__main__.py":  # the command itself
            continue
        text = path.read_text()
        assert "from ..cli" not in text and "from .cli" not in text and "mocohub.cli" not in text, path
        assert not any(f".{name} =" in text for name in ("base_lrs", "last_epoch", "lr_lambdas")), path
