"""The URL door and the torch.hub door: real downloads from a loopback server into $TORCH_HOME."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mocohub
from mocohub.errors import MocohubError
from mocohub.zoo.download import cache_file
from mocohub.zoo.registry import REGISTRY

from servers import FileServer
from zoo_layouts import features, moco_v1v2, official_v1v2_backbone

REPO_ROOT = Path(__file__).resolve().parents[1]
ZOO_NAME = "moco-v2-r50-800ep"


def _digest(path: Path, algo: str) -> str:
    return hashlib.new(algo, path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def zoo_site(tmp_path_factory):
    """A stand-in for dl.fbaipublicfiles.com holding a synthetic MoCo v2 R-50 and a resnet18 one."""
    root = tmp_path_factory.mktemp("zoo_site")
    ckpt = moco_v1v2("resnet50", cleaned=True)
    target = root / REGISTRY[ZOO_NAME].path
    target.parent.mkdir(parents=True)
    torch.save(ckpt, target)
    small = moco_v1v2("resnet18")
    torch.save(small, root / "r18.pth.tar")
    with FileServer(root) as server:
        yield server, {"r50": (ckpt, target), "r18": (small, root / "r18.pth.tar"),
                       "r18-cleaned": (moco_v1v2("resnet18", cleaned=True), None)}


@pytest.fixture
def torch_home(tmp_path, monkeypatch, zoo_site):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MOCOHUB_ZOO_URL", zoo_site[0].url)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def our_hash(monkeypatch, zoo_site):
    """Point the registry's md5 prefix at the synthetic file (the real one cannot match it)."""
    md5 = _digest(zoo_site[1]["r50"][1], "md5")
    monkeypatch.setitem(REGISTRY, ZOO_NAME, dataclasses.replace(REGISTRY[ZOO_NAME], hash=f"md5:{md5[:8]}"))


def _cache_listing(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir()} if cache.exists() else set()


def _entry(url: str) -> set[str]:
    """The names a verified download of ``url`` leaves: the file, its record, its conversion."""
    name = cache_file(url).name
    return {name, f"{name}.json", f"{name}.mocohub"}


def test_zoo_name_downloads_verifies_and_caches_safetensors(torch_home, zoo_site, our_hash, monkeypatch):
    server, files = zoo_site
    ckpt, target = files["r50"]
    url_path = "/" + REGISTRY[ZOO_NAME].path
    before = server.requests.get(url_path, 0)
    model = mocohub.from_pretrained("moco-r50", progress=False)
    assert model.num_features == 2048 and model.mocohub_config["mocohub"]["zoo_name"] == ZOO_NAME
    expected = features(official_v1v2_backbone(ckpt, "resnet50"))
    assert torch.equal(features(model), expected)
    assert _cache_listing(torch_home) == _entry(REGISTRY[ZOO_NAME].url)
    assert server.requests[url_path] == before + 1

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the second load must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    again = mocohub.from_pretrained(ZOO_NAME, progress=False)
    assert torch.equal(features(again), expected) and server.requests[url_path] == before + 1


def test_published_hash_mismatch_is_refused_and_not_cached(torch_home, zoo_site):
    actual = _digest(zoo_site[1]["r50"][1], "md5")
    with pytest.raises(MocohubError, match=f"md5 mismatch.*expected md5 a04e12f8, got md5 {actual}"):
        mocohub.from_pretrained(ZOO_NAME, progress=False)
    assert _cache_listing(torch_home) == set()


def test_url_with_sha256_and_truncated_download(torch_home, zoo_site):
    server, files = zoo_site
    ckpt, path = files["r18"]
    sha = _digest(path, "sha256")
    model = mocohub.from_pretrained(f"{server.url}/r18.pth.tar", check_hash=f"sha256:{sha[:10]}", progress=False)
    assert torch.equal(features(model), features(official_v1v2_backbone(ckpt, "resnet18")))

    server.truncate.add("/r18-cut.pth.tar")
    (path.parent / "r18-cut.pth.tar").write_bytes(path.read_bytes())
    with pytest.raises(MocohubError, match=rf"truncated: got \d+ of \d+ bytes.*expected sha256 {sha}, got sha256 "):
        mocohub.from_pretrained(f"{server.url}/r18-cut.pth.tar", check_hash=f"sha256:{sha}", progress=False)
    assert _cache_listing(torch_home) == _entry(f"{server.url}/r18.pth.tar")  # nothing of r18-cut


def test_file_url(torch_home, zoo_site):
    ckpt, path = zoo_site[1]["r18"]
    model = mocohub.from_pretrained(path.as_uri(), progress=False)
    assert torch.equal(features(model), features(official_v1v2_backbone(ckpt, "resnet18")))


def test_two_processes_loading_at_once_leave_a_sound_cache(torch_home, zoo_site):
    url = f"{zoo_site[0].url}/r18.pth.tar"
    code = f"import mocohub; m = mocohub.from_pretrained({url!r}, progress=False); print(m.num_features)"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    assert [p.communicate(timeout=120)[0].strip() for p in procs] == ["512", "512"]
    assert all(p.returncode == 0 for p in procs)
    assert _cache_listing(torch_home) == _entry(url)
    assert _digest(cache_file(url), "sha256") == _digest(zoo_site[1]["r18"][1], "sha256")
    assert mocohub.from_pretrained(url).num_features == 512  # and the cache reads back


def test_torch_hub_load_local_entrypoint_with_served_weights(torch_home, zoo_site, our_hash):
    ckpt, _ = zoo_site[1]["r50"]
    model = torch.hub.load(str(REPO_ROOT), "moco_v2_800ep", source="local", pretrained=True, progress=False)
    assert torch.equal(features(model), features(official_v1v2_backbone(ckpt, "resnet50")))
    untrained = torch.hub.load(str(REPO_ROOT), "moco_v3_vit_s_300ep", source="local", pretrained=False)
    assert untrained.blocks[0].attn.num_heads == 12 and untrained.num_classes == 0
    generic = torch.hub.load(str(REPO_ROOT), "mocohub", f"{zoo_site[0].url}/r18.pth.tar", source="local",
                             features_only=True, progress=False)
    assert generic.feature_info.channels() == [64, 64, 128, 256, 512]


def _publish(root: Path, rel: str, ckpt: dict) -> tuple[str, str]:
    """Save ``ckpt`` under the site root; returns its URL path and sha256."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return "/" + rel, _digest(path, "sha256")


def _shifted(ckpt: dict) -> dict:
    """The same layout with other weights."""
    return dict(ckpt, state_dict={k: v + 1 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()})


def test_same_file_name_at_two_urls_is_two_entries_and_every_hash_is_checked(torch_home, zoo_site):
    server, files = zoo_site
    root, ckpt = files["r18"][1].parent, files["r18-cleaned"][0]
    path_a, sha_a = _publish(root, "run-a/checkpoint.pth.tar", ckpt)
    path_b, sha_b = _publish(root, "run-b/checkpoint.pth.tar", _shifted(ckpt))
    url_a, url_b = server.url + path_a, server.url + path_b
    a = features(mocohub.from_pretrained(url_a, check_hash=f"sha256:{sha_a}", progress=False))
    b = features(mocohub.from_pretrained(url_b, check_hash=f"sha256:{sha_b}", progress=False))
    assert torch.equal(a, features(official_v1v2_backbone(ckpt, "resnet18")))
    assert not torch.equal(a, b)
    assert _cache_listing(torch_home) == _entry(url_a) | _entry(url_b) and cache_file(url_a) != cache_file(url_b)
    requests = dict(server.requests)
    assert torch.equal(features(mocohub.from_pretrained(url_a, progress=False)), a)  # both stay cached
    assert server.requests == requests
    # a cached file is checked again under a new expectation: a wrong one is refused ...
    with pytest.raises(MocohubError, match=f"download of {url_b} refused.*sha256 mismatch: expected sha256 {sha_a}"):
        mocohub.from_pretrained(url_b, check_hash=f"sha256:{sha_a}", progress=False)
    # ... and a right one is met from the record beside the file, without downloading again
    md5_b = _digest(root / path_b.lstrip("/"), "md5")
    requests = dict(server.requests)
    again = mocohub.from_pretrained(url_b, check_hash=f"md5:{md5_b[:8]}", progress=False)
    assert torch.equal(features(again), b) and server.requests == requests
    assert _cache_listing(torch_home) == _entry(url_a) | _entry(url_b)


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_truncated_download_without_content_length_is_never_cached(torch_home, zoo_site, framing):
    server, files = zoo_site
    ckpt = files["r18-cleaned"][0]
    url_path, _ = _publish(files["r18"][1].parent, f"cut-{framing}/r18.pth.tar", ckpt)
    server.framing[url_path], url = framing, server.url + url_path
    server.truncate.add(url_path)
    with pytest.raises(MocohubError, match=f"download of {url} refused.*(truncated|does not load)"):
        mocohub.from_pretrained(url, progress=False)
    assert _cache_listing(torch_home) == set()
    server.truncate.discard(url_path)  # the server recovers: the next call downloads again
    model = mocohub.from_pretrained(url, progress=False)
    assert torch.equal(features(model), features(official_v1v2_backbone(ckpt, "resnet18")))
    assert _cache_listing(torch_home) == _entry(url)


def test_registry_file_size_is_checked(torch_home, zoo_site, our_hash, monkeypatch):
    size = zoo_site[1]["r50"][1].stat().st_size
    entry = REGISTRY[ZOO_NAME]
    monkeypatch.setitem(REGISTRY, ZOO_NAME, dataclasses.replace(entry, file_size=size + 1))
    with pytest.raises(MocohubError, match=f"size {size} bytes, expected {size + 1}"):
        mocohub.from_pretrained(ZOO_NAME, progress=False)
    assert _cache_listing(torch_home) == set()
    monkeypatch.setitem(REGISTRY, ZOO_NAME, dataclasses.replace(entry, file_size=size))
    assert mocohub.from_pretrained(ZOO_NAME, progress=False).num_features == 2048
    assert mocohub.model_info(ZOO_NAME)["file_size"] == size


def test_download_killed_mid_transfer_leaves_no_file_under_the_cache_name(torch_home, zoo_site):
    server, files = zoo_site
    url_path, _ = _publish(files["r18"][1].parent, "slow/r18.pth.tar", files["r18-cleaned"][0])
    server.slow[url_path], url = 0.01, server.url + url_path
    code = f"import mocohub; mocohub.from_pretrained({url!r}, progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    try:
        deadline = time.monotonic() + 120
        while not any(p.is_file() and p.stat().st_size > 0 for p in torch_home.glob("*")):
            assert proc.poll() is None and time.monotonic() < deadline, "the download never started"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no handler runs, as when a machine loses power
        proc.wait()
    assert not cache_file(url).exists() and cache_file(url).name not in _cache_listing(torch_home)
    del server.slow[url_path]
    model = mocohub.from_pretrained(url, progress=False)
    assert model.num_features == 512 and cache_file(url).is_file()


def _closed_port_url() -> str:
    """A loopback URL where nothing listens: connections are refused, as with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_offline_zoo_download_says_where_the_cache_is_and_what_works_instead(torch_home, monkeypatch):
    monkeypatch.setenv("MOCOHUB_ZOO_URL", _closed_port_url())
    start = time.perf_counter()
    with pytest.raises(MocohubError) as refused:
        mocohub.from_pretrained(ZOO_NAME, progress=False)
    message = str(refused.value)
    assert time.perf_counter() - start < 2 and "\n" not in message
    assert "refused" in message.lower() and str(torch_home) in message and "$TORCH_HOME" in message
    assert "local checkpoint file or folder" in message


def test_a_missing_file_on_the_server_is_an_http_error_not_a_network_hint(torch_home, zoo_site):
    with pytest.raises(MocohubError, match=r"could not download .*/nothing\.pth\.tar: HTTP 404"):
        mocohub.from_pretrained(f"{zoo_site[0].url}/nothing.pth.tar", progress=False)
