"""The Hugging Face Hub door against a loopback stand-in of the Hub API (REFERENCE.md section 5).

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import, so each client runs in a
fresh interpreter with its environment set: one online client does the three tests' loads and pushes
against one server (each part's traceback, if any, kept for its test), then one offline client reads
the cache it left.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mocohub
from mocohub.zoo.pretrained import read_pretrained_dir

from servers import HubServer
from zoo_layouts import features, moco_v1v2

REPO_ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import torch, timm, mocohub
torch.manual_seed(1)
x = torch.randn(2, 3, 64, 64)
def out(model):
    with torch.no_grad():
        return model.eval()(x)
results = {}
"""


def run_client(code: str, tmp_path: Path, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter; it fills ``results`` (tensors or plain values)."""
    result_file = tmp_path / "results.pt"
    script = PRELUDE + code + f"\ntorch.save(results, {str(result_file)!r})\n"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # no token, no offline flag
    environ.update(PYTHONPATH=str(REPO_ROOT), HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1", **env)
    proc = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(result_file, weights_only=True)


def _perturbed(state_dict: dict, tmp_path: Path) -> bytes:
    """Other weights under the same names: a second commit to tell revisions apart."""
    save_file({k: v + 0.5 if v.is_floating_point() else v for k, v in state_dict.items()}, tmp_path / "p.safetensors")
    return (tmp_path / "p.safetensors").read_bytes()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A mocohub export (save_pretrained) of a synthetic MoCo v2 resnet18, its checkpoint, and its reference output."""
    tmp_path = tmp_path_factory.mktemp("export")
    torch.save(moco_v1v2("resnet18"), tmp_path / "v2.pth.tar")
    model = mocohub.from_pretrained(tmp_path / "v2.pth.tar")
    mocohub.save_pretrained(model, tmp_path / "export", repo_id="org/moco-r18")
    return tmp_path / "export", tmp_path / "v2.pth.tar", features(model)


def _part(name: str, code: str) -> str:
    """``code`` as one test's part of a client script: a failure is recorded under ``name``, not raised."""
    body = "".join(f"    {line}\n" for line in code.strip().splitlines())
    return f"try:\n{body}except Exception:\n    import traceback\n    results[{name + '_error'!r}] = traceback.format_exc()\n"


@pytest.fixture(scope="module")
def hub(tmp_path_factory, export):
    """One loopback Hub and the clients' results: org/moco-r18 with two commits (main moved on),
    org/moving whose branch moves while a client loads it, org/pushed and org/converted pushed by a
    client; then the same cache read offline."""
    folder, checkpoint, _ = export
    tmp_path = tmp_path_factory.mktemp("hub")
    state_dict, config = read_pretrained_dir(folder)
    with HubServer() as server:
        first = server.add_folder("org/moco-r18", folder)
        server.commit("org/moco-r18", {"model.safetensors": _perturbed(state_dict, tmp_path)})
        moving_first = server.add_folder("org/moving", folder)
        moved = {"model.safetensors": _perturbed(state_dict, tmp_path),
                 "config.json": json.dumps({**config, "mocohub": {**config["mocohub"], "commit": "second"}}).encode()}

        def push_once(repo_id: str, path: str) -> None:  # a push landing between the client's two downloads
            if repo_id == "org/moving" and server.repos[repo_id]["refs"]["main"] == moving_first:
                server.commit(repo_id, moved)

        server.after_download = push_once
        online = run_client(_part("loads", f"""
results["mocohub"] = out(mocohub.from_pretrained("hf-hub:org/moco-r18"))
results["timm"] = out(timm.create_model("hf-hub:org/moco-r18", pretrained=True))
results["pinned"] = out(mocohub.from_pretrained("hf-hub:org/moco-r18@{first}"))
try:
    mocohub.from_pretrained("hf-hub:org/missing")
except mocohub.MocohubError as e:
    results["missing"] = str(e)
""") + _part("push", f"""
model = mocohub.from_pretrained({str(folder)!r})
results["url"] = mocohub.push_to_hub(model, "org/pushed")
results["pushed"] = out(mocohub.from_pretrained("hf-hub:org/pushed"))
from mocohub.cli.main import main
results["rc"] = main(["convert", {str(checkpoint)!r}, {str(tmp_path / "converted")!r}, "--push", "org/converted"])
results["converted"] = out(mocohub.from_pretrained("hf-hub:org/converted"))
results["converted_timm"] = out(timm.create_model("hf-hub:org/converted", pretrained=True))
""") + _part("moving", """
model = mocohub.from_pretrained("hf-hub:org/moving")
results["moving_out"] = out(model)
results["moving_commit"] = model.mocohub_config["mocohub"].get("commit", "first")
"""), tmp_path, HF_ENDPOINT=server.url)
        online["moved"] = server.repos["org/moving"]["refs"]["main"] != moving_first
        if "org/converted" in server.repos and "org/pushed" in server.repos:
            online["card"] = server.repos["org/converted"]["commits"][server.repos["org/converted"]["refs"]["main"]]["README.md"]
            online["config"] = json.loads(
                server.repos["org/pushed"]["commits"][server.repos["org/pushed"]["refs"]["main"]]["config.json"])
        online["server_url"] = server.url
        # offline mode answers from the cache the online client left
        offline = run_client("""
results["main"] = out(mocohub.from_pretrained("hf-hub:org/moco-r18"))
results["timm"] = out(timm.create_model("hf-hub:org/moco-r18", pretrained=True))
try:
    mocohub.from_pretrained("hf-hub:org/never-fetched")
except mocohub.MocohubError as e:
    results["uncached"] = str(e)
""", tmp_path, HF_ENDPOINT=server.url, HF_HUB_OFFLINE="1")
    # the Hub gone (a loopback port that refuses connections), HF_HUB_OFFLINE not set: the cache, at once
    down = run_client(f"""
import time
from mocohub.cli.main import main
def timed(name, load):
    start = time.perf_counter()
    try:
        results[name] = load()
    except mocohub.MocohubError as e:
        results[name] = str(e)
    results[name + "_s"] = time.perf_counter() - start
timed("cached", lambda: out(mocohub.from_pretrained("hf-hub:org/moco-r18")))
timed("uncached", lambda: mocohub.from_pretrained("hf-hub:org/never-fetched"))
timed("push", lambda: mocohub.push_to_hub(mocohub.from_pretrained({str(folder)!r}), "org/pushed-offline"))
results["convert_rc"] = main(["convert", {str(checkpoint)!r}, {str(tmp_path / "offline")!r}, "--push", "org/x"])
""", tmp_path, HF_ENDPOINT=online["server_url"])
    return online, offline, down


def test_hub_repo_loads_in_mocohub_and_timm_then_offline(export, hub):
    _, _, expected = export
    results, offline, _ = hub
    assert "loads_error" not in results, results.get("loads_error")
    assert torch.equal(results["mocohub"], results["timm"])
    assert not torch.equal(results["mocohub"], expected)  # main moved on to the second commit
    assert torch.equal(results["pinned"], expected)
    assert "org/missing" in results["missing"] and "not found" in results["missing"]
    assert torch.equal(offline["main"], results["mocohub"]) and torch.equal(offline["timm"], results["timm"])
    assert "not in the local Hub cache" in offline["uncached"]


def test_push_to_hub_and_convert_push_round_trip(export, hub):
    _, _, expected = export
    results, _, _ = hub
    assert "push_error" not in results, results.get("push_error")
    assert results["url"].startswith(f"{results['server_url']}/org/pushed/commit/") and results["rc"] == 0
    for key in ("pushed", "converted", "converted_timm"):
        assert torch.equal(results[key], expected), key
    card = results["card"]
    assert b'hf-hub:org/converted' in card and not HubServer.validate_card(card.decode())
    assert results["config"]["architecture"] == "resnet18" and results["config"]["num_classes"] == 0


def test_config_and_weights_come_from_one_commit_while_the_branch_moves(export, hub):
    """A push landing between the client's two downloads must not pair one commit's config with
    another's weights."""
    _, _, expected = export
    results, _, _ = hub
    assert "moving_error" not in results, results.get("moving_error")
    assert results["moved"]  # the branch did move mid-load
    assert results["moving_commit"] == "first" and torch.equal(results["moving_out"], expected)


def test_an_unreachable_hub_fails_fast_and_says_how_to_work_offline(export, hub):
    """Without HF_HUB_OFFLINE, huggingface_hub retried a refused Hub for 23 s before its message."""
    results, _, down = hub
    assert torch.equal(down["cached"], results["mocohub"]) and down["cached_s"] < 5
    assert "not in the local Hub cache" in down["uncached"] and "HF_HUB_OFFLINE=1" in down["uncached"]
    assert "cannot be reached" in down["uncached"] and down["uncached_s"] < 5
    assert down["push"].startswith("push to Hub repo 'org/pushed-offline' failed") and down["push_s"] < 5
    assert "cannot be reached" in down["push"] and "\n" not in down["push"]
    assert down["convert_rc"] == 2
