"""The image cache's budget and plan from the shared-memory file system's free space (faked
statvfs in tables), a real small cache, and one copy per node shared by two real processes."""
import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from mocohub.data import cache as cache_module
from mocohub.data.cache import cache_budget, cache_plan, open_cache
from mocohub.errors import MocohubError

MB, GB = 10**6, 10**9


@pytest.mark.parametrize("decoded, copies, shm, memory, fits, line", [
    (150 * MB, 8, 64 * MB, 24 * GB, False,  # Docker's default /dev/shm, CIFAR-10 decoded by 8 ranks
     "image cache off: /dev/shm has 64 MB free, the decoded set needs 150 MB x 8 processes; streaming from disk"),
    (150 * MB, 8, 1 * GB, 24 * GB, False,  # a common GPU image's 1 GB: 1.2 GB needed
     "image cache off: /dev/shm has 1000 MB free, the decoded set needs 150 MB x 8 processes; streaming from disk"),
    (150 * MB, 1, 1 * GB, 24 * GB, True,  # decoded once for the node: fits
     "image cache on: 150 MB decoded, 1000 MB free in /dev/shm"),
    (150 * MB, 2, 12 * GB, 1 * GB, False,
     "image cache off: the decoded set needs 150 MB x 2 processes, over a quarter of the 1000 MB available "
     "memory; streaming from disk"),
    (3 * GB, 1, 100 * GB, 100 * GB, False,
     "image cache off: the decoded set needs 3000 MB, over the cache's cap of 2147 MB; streaming from disk"),
])
def test_cache_plan(decoded, copies, shm, memory, fits, line):
    assert cache_plan(decoded, copies, shm, memory) == (fits, line)


class _StatVfs:
    def __init__(self, free):
        self.f_bavail, self.f_frsize = free // 4096, 4096


@pytest.mark.parametrize("shm, local_world, expected", [
    (64 * 2**20, "8", 8 * 2**20),      # 64 MiB of /dev/shm for 8 processes' copies
    (1 << 30, "1", 1 << 30),
    (100 << 30, "2", 2 << 30),         # the 2 GiB cap (memory is 100 GiB)
])
def test_cache_budget_from_shm_free_space_and_local_processes(monkeypatch, shm, local_world, expected):
    monkeypatch.setattr(cache_module.os, "statvfs", lambda path: _StatVfs(shm))
    monkeypatch.setattr(cache_module, "available_memory", lambda: 400 << 30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert cache_budget() == expected


def _images(root: Path, n: int = 6) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (8 + i, 10, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    return paths


def test_a_full_shm_streams_with_a_line_and_on_refuses(monkeypatch, tmp_path):
    paths = _images(tmp_path)
    cache, line = open_cache(paths, "auto")
    assert cache is not None and line.startswith("image cache on: ")
    assert torch.equal(cache[3], torch.from_numpy(np.array(Image.open(paths[3]))).permute(2, 0, 1))
    monkeypatch.setattr(cache_module.os, "statvfs", lambda path: _StatVfs(0))
    cache, line = open_cache(paths, "auto")
    assert cache is None and line.startswith("image cache off: /dev/shm has 0 MB free")
    with pytest.raises(MocohubError, match="over the image cache budget"):
        open_cache(paths, "on")
    assert open_cache(paths, "off") == (None, "image cache off")


def _node_worker(rank: int, port: int, root: str, out: str) -> None:
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    paths = sorted(str(p) for p in Path(root).glob("*.png"))
    if rank == 1:  # only local rank 0 may decode
        cache_module.load_rgb = None
    cache, line = open_cache(paths, "auto", barrier=dist.barrier)
    dist.barrier()
    torch.save({"images": [cache[i].clone() for i in range(len(cache))], "failed": cache.failed, "line": line,
                "leftover": os.path.exists(cache_module._node_file(paths))}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_the_processes_of_a_node_share_one_decoded_copy(tmp_path):
    paths = _images(tmp_path / "images")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "result")
    mp.start_processes(_node_worker, args=(port, str(tmp_path / "images"), out), nprocs=2, join=True,
                       start_method="spawn")
    results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for result in results:
        assert result["failed"] == [] and result["line"].startswith("image cache on: ")
        for path, image in zip(paths, result["images"]):
            assert torch.equal(image, torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1))
    assert not results[0]["leftover"] and not results[1]["leftover"]  # the name is gone, the mapping stayed


def test_images_from_file_objects_keep_their_names(tmp_path):
    """``open_image``: what a shard reader passes (each member's bytes), with paths that name them."""
    files = _images(tmp_path)
    names = [f"shard-0.tar/{i}.png" for i in range(len(files))] + ["shard-0.tar/broken.png"]
    blobs = [Path(f).read_bytes() for f in files] + [b"not a png"]
    cache, line = open_cache(names, "on", open_image=lambda i: io.BytesIO(blobs[i]))
    assert cache.failed == ["shard-0.tar/broken.png"] and line.startswith("image cache on")
    assert torch.equal(cache[2], torch.from_numpy(np.array(Image.open(files[2]))).permute(2, 0, 1))


def _read_in_child(cache, index: int, out: str) -> None:
    torch.save(cache[index].clone(), out)


def test_a_node_shared_cache_reaches_a_spawned_loader_worker_after_its_name_is_gone(tmp_path):
    from mocohub.data.cache import ImageCache
    paths = _images(tmp_path)
    file = os.path.join(cache_module.SHM_DIR, f"mocohub-test-{os.getpid()}")
    cache = ImageCache(paths, 1 << 20, file=file)
    os.unlink(file)  # as open_cache does once every local process has mapped it
    child = mp.get_context("spawn").Process(target=_read_in_child, args=(cache, 4, str(tmp_path / "out")))
    child.start()
    child.join()
    assert child.exitcode == 0
    assert torch.equal(torch.load(tmp_path / "out"), cache[4])


def _jpeg(path: Path, mode: str = "RGB", size=(33, 17), **save) -> str:
    """A photo-like JPEG (smooth colour ramps plus noise) written with PIL's options ``save``."""
    rng = np.random.default_rng(len(str(path)))
    ramp = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    pixels = (ramp + rng.normal(0, 20, ramp.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, "JPEG", **save)
    return str(path)


def _decoded_set(tmp_path: Path) -> tuple[list[str], set[int]]:
    """Every kind of file the cache meets, and the indices of the RGB JPEGs (libjpeg called directly)."""
    rgb = [_jpeg(tmp_path / "a.jpg"), _jpeg(tmp_path / "b.jpg", subsampling=0, quality=95),
           _jpeg(tmp_path / "c.jpg", progressive=True), _jpeg(tmp_path / "d.jpg", optimize=True, size=(1, 1)),
           _jpeg(tmp_path / "e.jpg", exif=Image.Exif().tobytes() + b"\0" * 64, icc_profile=b"\0" * 300),
           _jpeg(tmp_path / "f.jpg", size=(320, 240))]
    others = [_jpeg(tmp_path / "grey.jpg", "L"), _jpeg(tmp_path / "cmyk.jpg", "CMYK")]
    Image.new("RGBA", (9, 5), (1, 2, 3, 4)).save(tmp_path / "g.png")
    Image.new("P", (4, 6), 7).save(tmp_path / "png-named.jpg", "PNG")
    others += [str(tmp_path / "g.png"), str(tmp_path / "png-named.jpg")]
    good = Path(rgb[5]).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[:len(good) // 2])
    (tmp_path / "corrupt.jpg").write_bytes(good[:200] + bytes(range(256)) * 4)
    (tmp_path / "empty.jpg").write_bytes(b"")
    broken = [str(tmp_path / n) for n in ("truncated.jpg", "corrupt.jpg", "empty.jpg", "missing.jpg")]
    paths = (rgb + others + broken) * 3
    return paths, {i for i, p in enumerate(paths) if p in rgb}


@pytest.mark.parametrize("keep", [True, False])
def test_the_cache_decodes_the_pixels_of_pil_in_threads(tmp_path, monkeypatch, keep):
    """RGB JPEGs are decoded by libjpeg directly (load_rgb is not called for them), by 4 threads
    over chunks of 3 images, with the encoded files kept between the passes or read again: each
    image holds the pixels load_rgb gives, and what PIL cannot decode is failed."""
    from mocohub.data import decode
    from mocohub.data.convert import load_rgb
    paths, direct = _decoded_set(tmp_path)
    expected = []
    for path in paths:
        try:
            expected.append(torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1))
        except (OSError, ValueError):
            expected.append(None)
    opened = []
    monkeypatch.setattr(decode, "load_rgb", lambda image: opened.append(image) or load_rgb(image))
    monkeypatch.setattr(cache_module, "DECODE_THREADS", 4)
    monkeypatch.setattr(cache_module, "CHUNK", 3)
    monkeypatch.setattr(cache_module, "KEEP_ENCODED", 1 << 30 if keep else 0)
    cache = cache_module.ImageCache(paths, 1 << 24)
    assert cache.failed == [p for p, e in zip(paths, expected) if e is None]
    assert len(cache.failed) == 4 * 3
    for i, image in enumerate(expected):
        if image is not None:
            assert torch.equal(cache[i], image), paths[i]
    assert len(opened) == len(paths) - len(direct) - 3 * 2  # not the RGB JPEGs (nor the empty and missing files)


def test_jpeg_size_reads_the_frame_header_of_rgb_jpegs_only(tmp_path):
    """The frame header after APP markers and fill bytes; None wherever PIL's plugin decides."""
    from mocohub.data.decode import jpeg_size
    data = Path(_jpeg(tmp_path / "a.jpg", size=(300, 7), exif=Image.Exif().tobytes())).read_bytes()
    assert jpeg_size(data) == (300, 7)
    assert jpeg_size(data[:2] + b"\xff\xff\xff" + data[2:]) == (300, 7)  # fill bytes before a marker
    assert jpeg_size(Path(_jpeg(tmp_path / "g.jpg", "L")).read_bytes()) is None  # one component
    assert jpeg_size(Path(_jpeg(tmp_path / "c.jpg", "CMYK")).read_bytes()) is None  # four
    sof = data.index(b"\xff\xc0")
    assert jpeg_size(data[:sof + 4] + b"\x0c" + data[sof + 5:]) is None  # 12-bit samples
    assert jpeg_size(data[:sof]) is None  # cut before the frame
    unknown = data[:2] + b"\xff\x02\x00\x04\x00\x00" + data[2:]  # a marker PIL's plugin refuses
    assert jpeg_size(unknown) is None
    with pytest.raises(Exception):
        Image.open(io.BytesIO(unknown))
    assert jpeg_size(b"\x89PNG\r\n\x1a\n" + data) is None
