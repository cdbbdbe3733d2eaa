"""WebDataset shards: written from a folder, read back with a folder's guarantees (every sample once
per epoch across processes, exact resume by position), bad input counted, missing shards refused."""
import gzip
import io
import json
import os
import pickle
import socket
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import DataLoader

from mocohub.cli.shards import build_parser, parse_size
from mocohub.data.folder import ImageFolder, collate_images
from mocohub.data.shards import ShardImages, write_shards
from mocohub.data.sources import open_images
from mocohub.errors import MocohubError

wds = pytest.importorskip("webdataset")

N, BATCH, WORLD = 24, 8, 2  # 3 global batches of 8 per epoch, 4 images per rank and step


def _pixel(image: Image.Image) -> torch.Tensor:
    """The image's number, painted into its red channel (PNG keeps it exact)."""
    return torch.tensor(image.getpixel((0, 0))[0])


@pytest.fixture
def folder(tmp_path):
    """N labelled noise images, image i numbered i in its red channel and the i-th of the folder;
    names with dots and % (escaped in keys), some nested."""
    root = tmp_path / "train"
    g = torch.Generator().manual_seed(0)
    for i in range(N):
        name = ["cat/{i:02d}.png", "dog/{i:02d}.v2.png", "dog/deep/{i:02d}%.png"][i * 3 // N].format(i=i)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (5, 6 + i % 5, 3), generator=g, dtype=torch.uint8)
        pixels[..., 0] = i
        Image.fromarray(pixels.numpy()).save(root / name)
    return root


def _write(folder, out, shard_bytes=300):
    return write_shards(folder, out, shard_bytes=shard_bytes)


def test_round_trip_count_bytes_labels_keys(folder, tmp_path):
    result = _write(folder, tmp_path / "out")
    assert len(result["shards"]) > 3 and result["images"] == N and result["resumed_from"] == 0
    assert result["pattern"] == str(tmp_path / "out" / f"train-{{000000..{len(result['shards']) - 1:06d}}}.tar")
    shards, flat = ShardImages(result["pattern"]), ImageFolder(folder)
    assert len(shards) == N and shards.classes == flat.classes == ["cat", "dog"]
    assert shards.targets == flat.targets and shards.skipped == []
    assert [os.path.relpath(p, shards.root) for p, _ in shards.samples] == \
        [os.path.relpath(p, folder) for p, _ in flat.samples]
    for i, (path, _) in enumerate(flat.samples):
        assert shards.open_member(i).read() == open(path, "rb").read()
    # the WebDataset layout: webdataset's own reader finds the same keys, bytes and classes
    seen = list(wds.WebDataset(result["pattern"], shardshuffle=False))
    assert {"cat/00", "dog/08%2Ev2", "dog/deep/16%25"} <= {s["__key__"] for s in seen}
    assert [int(s["cls"]) for s in seen] == flat.targets
    assert [s["png"] for s in seen] == [open(p, "rb").read() for p, _ in flat.samples]


def test_two_images_that_would_share_a_key_are_refused_before_writing(folder, tmp_path):
    Image.new("RGB", (4, 4)).save(folder / "cat" / "00.jpg")  # beside cat/00.png: both key cat/00
    with pytest.raises(MocohubError, match="cat/00.jpg and .*cat/00.png would be one WebDataset sample"):
        _write(folder, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))


def test_a_folder_without_classes_round_trips_unlabelled(tmp_path):
    for i in range(3):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / f"{i}.png")
    result = _write(tmp_path, tmp_path / "out")
    ds = ShardImages(result["pattern"], _pixel)
    assert result["classes"] == ds.classes == [] and ds.targets == [-1] * 3
    assert [ds[i][0].item() for i in range(3)] == [0, 1, 2]
    assert not any(name.endswith(".cls") for name in tarfile.open(tmp_path / "out" / result["shards"][0]).getnames())


def test_index_files_are_used_and_a_stale_one_ignored(folder, tmp_path, monkeypatch):
    result = _write(folder, tmp_path / "out")
    first = tmp_path / "out" / result["shards"][0]
    assert all((tmp_path / "out" / f"{name}.index.json").exists() for name in result["shards"])
    with monkeypatch.context() as m:  # the headers are not read when the index files describe the shards
        m.setattr("mocohub.data.shards.scan_shard", lambda path: pytest.fail(f"scanned {path}"))
        assert len(ShardImages(result["pattern"])) == N
    with tarfile.open(first) as tar:  # the shard rewritten with one more sample: its index is stale
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    _tar(first, members + [("cat/zz.png", _png(77))])
    ds = ShardImages(result["pattern"], _pixel)
    extra = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("cat/zz.png"))
    assert len(ds) == N + 1 and ds[extra][0].item() == 77


def test_same_augmentations_as_the_folder(folder, tmp_path):
    """The per-sample seeds (seed, epoch, index) are the folder's: a seeded random crop is the same."""
    from torchvision import transforms as T  # here: the spawned gloo ranks import this module
    views = T.Compose([T.RandomResizedCrop(3, scale=(0.2, 1.0)), T.PILToTensor()])
    shards = open_images(_write(folder, tmp_path / "out")["pattern"], views, seed=5)
    flat = open_images(folder, views, seed=5)
    assert isinstance(shards, ShardImages) and type(flat) is ImageFolder
    for ds in (shards, flat):
        ds.set_epoch(3)
    for i in range(N):
        assert torch.equal(shards[i][0], flat[i][0])
    shards.set_epoch(4)
    assert any(not torch.equal(shards[i][0], flat[i][0]) for i in range(N))


def test_writing_resumes_after_an_interruption_byte_identical(folder, tmp_path, monkeypatch):
    whole = _write(folder, tmp_path / "whole")
    calls, write = [], wds.ShardWriter.write

    def interrupted(self, sample):
        calls.append(1)
        if len(calls) == 11:
            raise KeyboardInterrupt
        write(self, sample)

    monkeypatch.setattr(wds.ShardWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _write(folder, tmp_path / "cut")
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert not json.loads((cut / "train.shards.json").read_text())["complete"]
    assert list(cut.glob("*.partial")), "the shard being written stays partial"
    resumed = _write(folder, cut)
    assert 0 < resumed["resumed_from"] < 10  # the finished shards were kept, the partial one rewritten
    assert resumed["shards"] == whole["shards"] and not list(cut.glob("*.partial"))
    for name in whole["shards"]:
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert _write(folder, cut)["resumed_from"] == N  # finished: nothing to do
    with pytest.raises(MocohubError, match="another write.*shard_bytes"):
        _write(folder, cut, shard_bytes=999)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(i):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def test_corrupt_truncated_and_non_image_members_are_counted(tmp_path):
    good = [(f"{i:04d}.png", _png(i)) for i in range(6)]
    _tar(tmp_path / "a-0.tar", good[:2] + [("notes.txt", b"not an image"), ("0009.png", b"garbage bytes")] + good[2:4])
    _tar(tmp_path / "a-1.tar", good[4:])
    cut = tmp_path / "a-1.tar"
    size_of_first = 512 + 512  # header + the tiny PNG in one block
    cut.write_bytes(cut.read_bytes()[:size_of_first + 512 + 40])  # ends inside the second member's data
    with pytest.warns(UserWarning) as record:
        ds = ShardImages(str(tmp_path / "a-{0..1}.tar"), _pixel, on_error="skip")
    messages = " | ".join(str(w.message) for w in record)
    assert "ends inside 0005.png (truncated" in messages and "1 sample(s) without an image" in messages
    assert [os.path.basename(p) for p in ds.skipped] == ["notes.txt"]
    assert len(ds) == 7 and ds.targets == [-1] * 7 and ds.classes == []
    batch = collate_images([ds[i] for i in range(len(ds))])
    assert batch.images.tolist() == [0, 1, 2, 3, 4]
    assert sorted(os.path.basename(p) for p in batch.failed) == ["0005.png", "0009.png"]
    with pytest.warns(UserWarning):  # training: a failed image is replaced by the next good one
        substituted = ShardImages(str(tmp_path / "a-{0..1}.tar"), _pixel)
    assert substituted[2][:3] == (torch.tensor(2), -1, 3) and substituted[2][3][0].endswith("0009.png")


def test_a_truncated_shard_of_ours_counts_every_image_it_lost(folder, tmp_path):
    """Its index file names the images cut off; the one cut through fails when read: all counted."""
    result = _write(folder, tmp_path / "out", shard_bytes=10 ** 6)
    shard = tmp_path / "out" / result["shards"][0]
    data = shard.read_bytes()
    cut = data.index(b"dog/deep/16%25.png") + 512 + 100  # 100 bytes into image 16's data
    shard.write_bytes(data[:cut])
    with pytest.warns(UserWarning) as record:
        ds = ShardImages(result["pattern"], _pixel, on_error="skip")
    messages = " | ".join(str(w.message) for w in record)
    assert "ends inside dog/deep/16%25.png (truncated" in messages
    assert "7 image(s) its index lists are gone (counted as skipped)" in messages
    assert [os.path.basename(p) for p in ds.skipped] == [f"{i}%.png" for i in range(17, N)]
    batch = collate_images([ds[i] for i in range(len(ds))])
    assert batch.images.tolist() == list(range(16)) and [os.path.basename(p) for p in batch.failed] == ["16%.png"]
    assert len(batch.images) + len(batch.failed) + len(ds.skipped) == N


def test_a_damaged_header_loses_one_sample_and_is_reported(tmp_path):
    _tar(tmp_path / "d.tar", [(f"{i:04d}.png", _png(i)) for i in range(4)])
    data = bytearray((tmp_path / "d.tar").read_bytes())
    data[2 * 1024 + 148:2 * 1024 + 156] = b"XXXXXXXX"  # the third member's header checksum
    (tmp_path / "d.tar").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged tar header at byte 2048"):
        ds = ShardImages(str(tmp_path / "d.tar"), _pixel)
    assert [ds[i][0].item() for i in range(len(ds))] == [0, 1, 3]


def test_labels_from_cls_members_of_foreign_shards(tmp_path):
    _tar(tmp_path / "f.tar", [m for i in range(4) for m in ((f"{i:04d}.cls", b"%d" % (i % 3)),
                                                            (f"{i:04d}.jpg", _png(i)))])
    ds = ShardImages(str(tmp_path / "f.tar"))
    assert ds.targets == [0, 1, 2, 0] and ds.classes == ["0", "1", "2"]


def test_missing_or_unreadable_shards_are_refused_before_reading(folder, tmp_path):
    result = _write(folder, tmp_path / "out")
    last = len(result["shards"]) - 1
    with pytest.raises(MocohubError, match=f"2 of the {last + 3} shards do not exist, e.g. .*train-{last + 1:06d}.tar"):
        ShardImages(str(tmp_path / "out" / f"train-{{000000..{last + 2:06d}}}.tar"))
    with pytest.raises(MocohubError, match="holds .tar shards, not images: pass the shards' pattern, '.*train-{0"):
        open_images(tmp_path / "out")
    (tmp_path / "x.tar").write_bytes(gzip.compress((tmp_path / "out" / result["shards"][0]).read_bytes()))
    with pytest.raises(MocohubError, match="x.tar is not an uncompressed tar file"):
        ShardImages(str(tmp_path / "x.tar"))
    with pytest.raises(MocohubError, match="from files: copy them to a disk or mount"):
        ShardImages("pipe:curl -s https://example.com/train-{0..3}.tar")


def test_without_webdataset_a_pattern_says_what_to_install(folder, tmp_path, monkeypatch):
    pattern = _write(folder, tmp_path / "out")["pattern"]
    monkeypatch.setitem(sys.modules, "webdataset", None)  # import webdataset raises ImportError
    with pytest.raises(MocohubError, match=r"pip install 'mocohub\[shards\]'") as error:
        ShardImages(pattern)
    assert error.value.exit_code == 1  # a missing optional package, as the CLI's exit codes say
    assert len(ShardImages(tmp_path / "out" / "train-000000.tar")) >= 1  # one file needs no expansion


def test_image_cache_over_shards(folder, tmp_path):
    pattern = _write(folder, tmp_path / "out")["pattern"]
    cached, streamed = ShardImages(pattern, _pixel, cache_images="on"), ShardImages(pattern, _pixel)
    assert cached.cache is not None and len(cached.cache) == N
    assert [cached[i][0].item() for i in range(N)] == [streamed[i][0].item() for i in range(N)] == list(range(N))


def test_threads_reading_one_shard_get_their_own_bytes(folder, tmp_path):
    """The image cache decodes in threads: reads must not share a file offset."""
    ds = ShardImages(_write(folder, tmp_path / "out", shard_bytes=10 ** 6)["pattern"])
    expected = [ds.open_member(i).read() for i in range(N)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns between any two calls
    try:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda i: ds.open_member(i % N).read(), range(100 * N)))
    finally:
        sys.setswitchinterval(interval)
    assert got == expected * 100


def test_a_dataset_with_open_shards_pickles_for_spawned_workers(folder, tmp_path):
    ds = ShardImages(_write(folder, tmp_path / "out")["pattern"], _pixel)
    assert ds[3][0].item() == 3  # a shard is open now
    copy = pickle.loads(pickle.dumps(ds))
    assert [copy[i][0].item() for i in range(N)] == list(range(N))


def _epoch_batches(ds, rank, world, epoch, start_step=0, workers=1):
    """(indices, image numbers) of each of this rank's batches, as the trainer's sampler deals them."""
    from mocohub.training.sampler import ResumableSampler
    sampler = ResumableSampler(len(ds), BATCH, num_replicas=world, rank=rank, seed=11)
    ds.set_epoch(epoch)
    sampler.set_epoch(epoch, start_step=start_step)
    loader = DataLoader(ds, batch_size=BATCH // world, sampler=sampler, num_workers=workers, collate_fn=collate_images,
                        multiprocessing_context="fork" if workers else None)  # a spawned rank would spawn them
    return [(b.indices.tolist(), b.images.tolist()) for b in loader]


def _rank(rank, port, pattern, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    ds = ShardImages(pattern, _pixel, seed=0)
    seen = [_epoch_batches(ds, rank, WORLD, epoch) for epoch in range(2)]
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, seen)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def test_two_gloo_processes_see_every_sample_once_per_epoch(folder, tmp_path):
    pattern = _write(folder, tmp_path / "out")["pattern"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(port, pattern, tmp_path / "seen.pt"), nprocs=WORLD, join=True,
                       start_method="spawn")
    gathered = torch.load(tmp_path / "seen.pt")
    orders = []
    for epoch in range(2):
        steps = [gathered[r][epoch] for r in range(WORLD)]
        assert all(len(s) == N // BATCH for s in steps)
        indices = [i for step in zip(*steps) for indices, _ in step for i in indices]
        images = [i for step in zip(*steps) for _, pixels in step for i in pixels]
        assert sorted(indices) == list(range(N)) and images == indices  # each once, and its own bytes
        orders.append(indices)
    assert orders[0] != orders[1]


def test_resume_by_position_reads_only_the_samples_left(folder, tmp_path, monkeypatch):
    ds = ShardImages(_write(folder, tmp_path / "out")["pattern"], _pixel, seed=0)
    whole = _epoch_batches(ds, 0, 1, epoch=2)
    reads, read = [], ShardImages._read
    monkeypatch.setattr(ShardImages, "_read", lambda self, *a: reads.append(a) or read(self, *a))
    assert _epoch_batches(ds, 0, 1, epoch=2, start_step=1, workers=0) == whole[1:]
    assert len(reads) == N - BATCH  # one read per image left; the first step's are not touched


def test_cli_writes_and_prints_the_pattern(folder, tmp_path, capsys):
    assert [parse_size(t) for t in ("1GB", "512MiB", "1.5gb", "4096", "2kB")] == [10 ** 9, 2 ** 29, 15 * 10 ** 8,
                                                                                 4096, 2000]
    args = build_parser().parse_args(["shards", str(folder), str(tmp_path / "o"), "--shard-size", "1kB", "--json"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == N and result["classes"] == ["cat", "dog"] and result["shards"] > 1
    assert len(ShardImages(result["pattern"])) == N
    args = build_parser().parse_args(["shards", str(folder), str(tmp_path / "o"), "--shard-size", "1kB"])
    args.func(args)
    assert f"train on them with: mocohub train '{result['pattern']}'" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["shards", "a", "b", "--shard-size", "1XB"])
    assert exit_.value.code == 2


def test_training_on_shards_killed_and_resumed_equals_the_folder_run(tmp_path):
    from mocohub.data.synthetic import make_dataset
    from mocohub.training import TrainConfig, train
    train_dir, val_dir = make_dataset(tmp_path / "data", train_per_class=4, val_per_class=2, size=16)
    pattern = write_shards(train_dir, tmp_path / "shards", shard_bytes=2000)["pattern"]
    val = write_shards(val_dir, tmp_path / "shards", shard_bytes=2000)["pattern"]
    base = dict(image_size=16, batch_size=8, moco_k=32, workers=0, progress=False, log_every=1, epochs=2,
                seed=3, arch="test_resnet")
    train(TrainConfig.from_recipe("cifar", data=str(train_dir), out=str(tmp_path / "folder"), **base))
    train(TrainConfig.from_recipe("cifar", data=pattern, out=str(tmp_path / "split"), max_steps=3, **base))
    train(TrainConfig.from_recipe("cifar", data=pattern, out=str(tmp_path / "split"), val=val,
                                  **{**base, "workers": 2}))
    losses = lambda run: [json.loads(l)["loss"] for l in (run / "steps.jsonl").read_text().splitlines()]
    assert losses(tmp_path / "split") == losses(tmp_path / "folder")
