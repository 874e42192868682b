"""The tensor (GPU) reader/encoder stage: batched resize vs CLIP's transform, routing, pipeline wiring.

Tolerance of the batched resize: it reproduces Pillow's two-pass 8-bit bicubic
resize in float, so against `clip.clip._transform(R)` on the same decoded
pixels a value may differ by one 8-bit level (a rounding tie or float
round-off before the intermediate rounding): at most 1/255/std <= 0.0152 in
normalised units, on < 0.1% of the values. The CPU-path/tensor-path embeddings
then agree to cosine > 0.999 (tiny model). nvJPEG's decoder is not libjpeg:
its chroma upsampling differs from libjpeg-turbo's "fancy" one. On these grainy
test images (per-channel noise: worst case for chroma) an H100 gave up to 36
levels, mean 5.0 levels per decoded pixel; the CUDA test bounds the mean (8
levels; 6 levels after the resize averages it) and the index test asks cosine
> 0.99 against the CPU path.
"""

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pnsfw.indexer.decode import mean_std
from pnsfw.indexer.gpu import GpuOptions, jpeg_size
from pnsfw.indexer.pipeline import IndexOptions, run_index
from pnsfw.indexer.tensor_preprocess import clip_preprocess
from pnsfw.store import Store

ONE_LEVEL = 1 / 255 / float(mean_std()[1].min()) + 1e-6
CUDA = torch.cuda.is_available()


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour content plus grain (resampling of pure noise is a poor test of real images)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR), dtype=np.float32)
    return Image.fromarray(np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8))


def _reference(images: list[Image.Image], size: int) -> torch.Tensor:
    import clip

    return torch.stack([clip.clip._transform(size)(img) for img in images])


def _as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("size", [224, 32])
def test_batched_resize_matches_clip_transform(size: int) -> None:
    shapes = [(400, 300), (300, 400), (224, 224), (257, 199), (1632, 1224), (90, 60), (41, 30), (500, 63)]
    images = [_photo(w, h, i) for i, (w, h) in enumerate(shapes)]
    ours = clip_preprocess([_as_tensor(img) for img in images], size)
    diff = (ours - _reference(images, size)).abs()
    assert ours.shape == (len(images), 3, size, size)
    assert diff.max().item() <= 2 * ONE_LEVEL
    assert diff[:4].max().item() <= ONE_LEVEL
    assert (diff > 1e-4).float().mean().item() < 1e-3


def test_batched_resize_same_sizes_stack_path() -> None:
    images = [_photo(320, 240, 10 + i) for i in range(3)]
    ours = clip_preprocess([_as_tensor(img) for img in images], 224)
    assert (ours - _reference(images, 224)).abs().max().item() <= ONE_LEVEL


def test_padded_resize_ignores_what_lies_beyond_each_image() -> None:
    from pnsfw.indexer.tensor_preprocess import resize_crop, resize_padded

    shapes = [(300, 400), (257, 199), (224, 224), (90, 60)]
    images = [_as_tensor(_photo(w, h, 20 + i)) for i, (h, w) in enumerate(shapes)]
    garbage = torch.randint(0, 256, (len(images), 3, 300, 400), dtype=torch.uint8)  # as nvJPEG leaves a slot
    for i, image in enumerate(images):
        garbage[i, :, :image.shape[1], :image.shape[2]] = image
    assert torch.equal(resize_padded(garbage, shapes, 224), resize_crop(images, 224))


def test_resize_weight_cache_gives_the_weights_built_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Units through the weight cache (rows added, the table grown, restarted for a wider unit) resize exactly
    as the weights built for each unit alone; past its size budget the cache is bypassed."""
    from pnsfw.indexer import tensor_preprocess as tp

    gen = torch.Generator().manual_seed(0)
    units = [[(int(h), int(w)) for h, w in torch.randint(30, limit, (n, 2), generator=gen)]
             for n, limit in ((40, 90), (300, 90), (40, 90), (20, 200))]
    batches = [torch.randint(0, 256, (len(u), 3, max(h for h, _ in u), max(w for _, w in u)), dtype=torch.uint8,
                             generator=gen) for u in units]
    monkeypatch.setattr(tp, "_CACHES", {})
    cached = [tp.resize_padded(b, u, 32) for b, u in zip(batches, units)]
    cache = next(iter(tp._CACHES.values()))
    assert cache.table.shape[2] >= 200 and len(cache.rows) <= 2 * len(units[3])  # restarted for the wider unit
    for budget in (10 << 20, 0):  # the second unit overflows and starts afresh; nothing fits, built directly
        monkeypatch.setattr(tp, "WEIGHT_CACHE_BYTES", budget)
        monkeypatch.setattr(tp, "_CACHES", {})
        for got, batch, unit in zip(cached, batches, units):
            assert torch.equal(got, tp.resize_padded(batch, unit, 32))
    assert next(iter(tp._CACHES.values())).table is None


def _encoded(img: Image.Image, fmt: str = "JPEG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_jpeg_probe_routes_only_plain_jpegs_to_the_device() -> None:
    img = _photo(120, 80, 0)
    assert jpeg_size(_encoded(img)) == (120, 80)
    assert jpeg_size(_encoded(img.convert("L"))) == (120, 80)
    assert jpeg_size(_encoded(img, progressive=True)) == (120, 80)
    exif = Image.Exif()
    exif[0x0112] = 1
    assert jpeg_size(_encoded(img, exif=exif.tobytes())) == (120, 80)
    exif[0x0112] = 6
    assert jpeg_size(_encoded(img, exif=exif.tobytes())) is None  # rotated: the CPU path applies EXIF
    assert jpeg_size(_encoded(img.convert("CMYK"))) is None
    assert jpeg_size(_encoded(img, "PNG")) is None
    assert jpeg_size(_encoded(img)[:-200]) is None  # truncated: the CPU path reports it
    assert jpeg_size(b"") is None


def _mixed_folder(root: Path) -> Path:
    """JPEGs of several sizes, a PNG, a rotated and a CMYK JPEG, and three broken files."""
    root.mkdir(parents=True)
    for i, (w, h) in enumerate([(64, 48), (48, 64), (400, 300), (120, 90), (33, 200), (90, 90)] * 3):
        _photo(w, h, i).save(root / f"{i:02d}.jpg", quality=90)
    _photo(70, 50, 100).save(root / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo(80, 60, 101).save(root / "rotated.jpg", exif=exif.tobytes())
    _photo(80, 60, 102).convert("CMYK").save(root / "cmyk.jpg")
    (root / "truncated.jpg").write_bytes(_encoded(_photo(200, 150, 103))[:1500])
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 300 + b"\xff\xd9")
    (root / "notes.txt").write_text("not an image")
    return root


def _rows(store: Path) -> dict[str, np.ndarray]:
    s = Store(store)
    uris = s.table(["uri"]).column("uri").to_pylist()
    return dict(zip(uris, s.vectors()[1].astype(np.float32)))


def _errors(store: Path) -> dict[str, str]:
    table = Store(store).errors()
    return dict(zip(table.column("uri").to_pylist(), table.column("reason").to_pylist()))


def _index(source: Path, store: Path, ckpt: Path, **kw: object) -> None:
    options = IndexOptions(model=str(ckpt), device=str(kw.pop("device", "cpu")), shard_size=7, **kw)
    run_index([str(source)], str(store), options)


def _assert_same(a: Path, b: Path, cosine: float) -> None:
    rows_a, rows_b = _rows(a), _rows(b)
    assert set(rows_a) == set(rows_b) and len(rows_a) == 21
    assert _errors(a) == _errors(b) and len(_errors(a)) == 3
    for uri, vec in rows_a.items():
        assert float(vec @ rows_b[uri]) > cosine, uri


@pytest.fixture(scope="module")
def pil_store(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gpu-path")
    source = _mixed_folder(root / "images")
    _index(source, root / "pil", tiny_checkpoint, reader="pil", workers=-1)
    return source, root / "pil"


@pytest.mark.parametrize("read", ["workers", "workers-reread", "threads", "threads-resize-on-decode",
                                  "workers-resize-thread", "workers-reference-tower"])
def test_tensor_stage_on_cpu_equals_cpu_path(pil_store: tuple[Path, Path], tiny_checkpoint: Path,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read: str) -> None:
    """Files read, hashed and probed in the worker processes (bytes sent back, or files too large for the
    pipe read again here) or, without workers, in this process's threads, resized on either thread, through
    either tower: the same rows."""
    import pnsfw.indexer.gpu.probe as probe

    source, reference = pil_store
    if read == "workers-reread":
        monkeypatch.setattr(probe, "INLINE_BYTES", 0)  # the workers are forked after this
    resize = {"threads-resize-on-decode": "decoder", "workers-resize-thread": "thread"}
    gpu = GpuOptions(resize=resize.get(read, "encoder"), stage_stats=str(tmp_path / "stats.json"), cpu_share=0,
                     tower="reference" if read.endswith("reference-tower") else "fast")  # on CPU: eager
    workers = -1 if read.startswith("threads") else 1
    _index(source, tmp_path / "tensor", tiny_checkpoint, reader="tensor", workers=workers, batch_size=8, gpu=gpu)
    _assert_same(reference, tmp_path / "tensor", 0.995)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["device_images"] == 18 and stats["wait_features_s"] >= 0 and stats["nvjpeg_calls"] == {}
    _index(source, tmp_path / "tensor", tiny_checkpoint, reader="tensor", workers=1)  # nothing new
    assert len(_rows(tmp_path / "tensor")) == 21


def test_tensor_stage_with_cpu_share(pil_store: tuple[Path, Path], tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Each unit's last images decoded by the CPU workers beside the device part give the same rows."""
    source, reference = pil_store
    _index(source, tmp_path / "shared", tiny_checkpoint, reader="tensor", workers=1, batch_size=4,
           gpu=GpuOptions(cpu_share=8))  # not the default: on here
    _assert_same(reference, tmp_path / "shared", 0.995)


def test_cpu_share_follows_the_encoders_waits() -> None:
    from pnsfw.indexer.gpu.route import CPU_CHUNK, CpuShare

    share = CpuShare(4 * CPU_CHUNK)
    assert share.take(1024) == CPU_CHUNK and share.take(8) == 4  # never more than half a unit
    for _ in range(10):
        share.joined(0.0)  # ready when the encoder came: more
    assert share.take(1024) == 4 * CPU_CHUNK  # up to the limit
    share.joined(0.5)  # the encoder waited: a quarter less, whole tasks
    assert share.take(1024) == 3 * CPU_CHUNK
    for _ in range(10):
        share.joined(0.5)
    assert share.take(1024) == 0 and CpuShare(0).take(1024) == 0
    share.joined(0.0)
    assert share.take(1024) == CPU_CHUNK  # and it tries again


def test_tensor_stage_resumes_after_a_partial_run(pil_store: tuple[Path, Path], tiny_checkpoint: Path,
                                                  tmp_path: Path) -> None:
    source, _ = pil_store
    partial = tmp_path / "partial"
    shutil.copytree(source, partial)
    for path in sorted(partial.iterdir())[::2]:
        path.unlink()
    _index(partial, tmp_path / "store", tiny_checkpoint, reader="tensor", workers=-1, batch_size=4)
    shutil.rmtree(partial)
    shutil.copytree(source, partial)  # same uris as a full run of `partial`: the rest is added
    _index(partial, tmp_path / "store", tiny_checkpoint, reader="tensor", workers=-1, batch_size=4)
    _index(partial, tmp_path / "full", tiny_checkpoint, reader="pil", workers=-1)
    _assert_same(tmp_path / "full", tmp_path / "store", 0.995)


def test_multi_device_workers_commit_through_one_writer(pil_store: tuple[Path, Path], tiny_checkpoint: Path,
                                                        tmp_path: Path) -> None:
    """Two spawned device workers (both on CPU here) over disjoint units; the parent writes."""
    source, reference = pil_store
    _index(source, tmp_path / "multi", tiny_checkpoint, reader="tensor", workers=-1, batch_size=4,
           gpu=GpuOptions(workers=2))
    _assert_same(reference, tmp_path / "multi", 0.995)
    ids = Store(tmp_path / "multi").table(["id"]).column("id").to_pylist()
    assert sorted(ids) == list(range(21))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (nvJPEG)")
def test_nvjpeg_decode_close_to_pil() -> None:
    from pnsfw.indexer.gpu.decode import decode_jpegs as _decode_jpegs

    images = [_photo(w, h, i) for i, (w, h) in enumerate([(400, 300), (256, 341), (1632, 1224)])]
    data = [torch.frombuffer(bytearray(_encoded(img, quality=90)), dtype=torch.uint8) for img in images]
    decoded = _decode_jpegs(data, "cuda")
    pil = [Image.open(io.BytesIO(bytes(d.numpy()))).convert("RGB") for d in data]
    for gpu, ref in zip(decoded, pil):
        diff = (gpu.cpu().int() - _as_tensor(ref).int()).abs().float()
        print(f"nvJPEG vs PIL {tuple(gpu.shape)}: max {diff.max():.0f}, mean {diff.mean():.3f}, "
              f"p99.9 {diff.flatten().quantile(0.999):.0f} levels")
        assert gpu.shape == _as_tensor(ref).shape and diff.mean().item() < 8
    after = (clip_preprocess(decoded, 224, torch.float16).cpu() - _reference(pil, 224)).abs()
    print(f"after resize: max {after.max():.4f}, mean {after.mean():.5f} (one level = {ONE_LEVEL:.4f})")
    assert after.mean().item() < 6 * ONE_LEVEL


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (nvJPEG)")
def test_cuda_index_equals_cpu_path(pil_store: tuple[Path, Path], tiny_checkpoint: Path, tmp_path: Path) -> None:
    source, reference = pil_store
    _index(source, tmp_path / "cuda", tiny_checkpoint, device="cuda", workers=2, batch_size=8)
    _assert_same(reference, tmp_path / "cuda", 0.99)



def test_gpu_options_refuse_unknown_values() -> None:
    from pnsfw.errors import BadInput

    with pytest.raises(BadInput, match="resize"):
        GpuOptions(resize="sideways")
    with pytest.raises(BadInput, match="tower"):
        GpuOptions(tower="slow")


def test_units_start_with_a_short_one() -> None:
    from pnsfw.indexer.gpu.stage import units

    cut = list(units(range(10), 4, first=2))
    assert [u.index for u in cut] == [0, 1, 2] and [len(u.items) for u in cut] == [2, 4, 4]
    assert [i for u in cut for i in u.items] == list(range(10))
    assert [len(u.items) for u in units(range(5), 4, first=8)] == [4, 1]


def test_gpu_options_refuse_unknown_streams() -> None:
    from pnsfw.errors import BadInput

    with pytest.raises(BadInput, match="encode_stream"):
        GpuOptions(encode_stream="mine")
    with pytest.raises(BadInput, match="decode_priority"):
        GpuOptions(decode_priority="urgent")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(("priority", "tower_above_decode"), [("low", True), ("normal", False), ("high", False)])
def test_decode_priority_low_puts_the_towers_stream_above_the_decoders(priority: str,
                                                                       tower_above_decode: bool) -> None:
    from types import SimpleNamespace

    from pnsfw.indexer.gpu.decode import DecoderPool
    from pnsfw.indexer.gpu.encode import encode_stream

    options = SimpleNamespace(gpu=GpuOptions(decode_priority=priority))
    tower = encode_stream(SimpleNamespace(device="cuda"), options)  # type: ignore[arg-type]
    decode = DecoderPool("cuda", "sm", priority).stream()
    assert (tower.priority < decode.priority) is tower_above_decode  # CUDA: the lower, the higher


def test_decode_threads_keep_order_and_never_hold_the_process(tmp_path: Path) -> None:
    """The decode threads are daemons nothing joins at exit: a process whose decode call is wedged still exits."""
    import subprocess
    import sys

    from pnsfw.indexer.gpu.stage import DaemonThreads, _ordered

    with DaemonThreads(3, "t") as threads:
        assert list(_ordered(threads, lambda x: x * x, range(20), 4)) == [x * x for x in range(20)]
        with pytest.raises(ZeroDivisionError):
            list(_ordered(threads, lambda x: 1 // x, [1, 0], 2))
    script = ("import threading; from pnsfw.indexer.gpu.stage import DaemonThreads; "
              "DaemonThreads(1, 'stuck').submit(lambda _: threading.Event().wait(), None)")
    subprocess.run([sys.executable, "-c", script], timeout=60, check=True, cwd=Path(__file__).parent.parent)


def test_a_wedged_hardware_decode_stops_the_run_with_one_line() -> None:
    import queue
    import time
    from types import SimpleNamespace

    from pnsfw.errors import DeviceStalled
    from pnsfw.indexer.gpu.decode import DecoderPool
    from pnsfw.indexer.gpu.stage import STALL_S, _from_queue

    decoders = DecoderPool("cpu", "auto")
    out: queue.Queue = queue.Queue()
    out.put("unit")
    out.put(None)
    assert list(_from_queue(out, decoders)) == ["unit"]
    decoders.made.append(SimpleNamespace(since=time.monotonic() - STALL_S - 5))  # a call in progress that long
    with pytest.raises(DeviceStalled, match=r"has not returned for 12[5-9] s"):
        next(_from_queue(out, decoders))
    decoders.made[0].since = None  # the call returned
    assert decoders.stalled(STALL_S) == 0.0


def _decoded_unit(index: int, count: int, size: int = 8):  # type: ignore[no-untyped-def]
    from pnsfw.indexer.gpu.decode import Decoded
    from pnsfw.indexer.gpu.route import Prepared, Unit
    from pnsfw.indexer.reader import Result
    from pnsfw.indexer.sources import Item

    rows = [Result(Item(f"u{index}-{i}", "test"), None, width=size, height=size) for i in range(count)]
    prepared = Prepared(Unit(index, [r.item for r in rows]), rows, [], [])
    return Decoded(prepared, torch.full((count, 3, size, size), 100.0 + index))


@pytest.mark.parametrize("ready", [False, True])
def test_first_unit_is_handed_out_before_the_second_is_decoded(ready: bool) -> None:
    """The encoder does not hold the first unit's features until the next unit is there (its decode may take
    seconds); with input ready it keeps the next unit in flight first, as before."""
    import threading
    from types import SimpleNamespace

    from pnsfw.indexer.gpu.encode import encode_units
    from pnsfw.indexer.gpu.route import Stats

    encoder = SimpleNamespace(device="cpu", resolution=8, width=2)
    handed = threading.Event()
    order: list[str] = []

    def decoded():  # type: ignore[no-untyped-def]
        for index in range(3):
            order.append(f"decoded {index}")
            yield _decoded_unit(index, 4)
            if index == 0 and not ready:
                assert handed.wait(5), "the first unit was held back for the second"

    model = lambda images: images.mean(dim=(2, 3))[:, :2]  # noqa: E731
    stats = Stats()
    results = encode_units(decoded(), encoder, model, stats, ready=lambda: ready)  # type: ignore[arg-type]
    for result in results:
        order.append(f"out {result.index}")
        handed.set()
        time.sleep(0.05)  # the writer's time with each result: write_s, within the encoder's loop
        assert result.features.shape == (4, 2) and len(result.rows) == 4
    want_held = ["decoded 0", "out 0", "decoded 1", "out 1", "decoded 2", "out 2"]  # done: out at once
    assert order == (["decoded 0", "decoded 1", "out 0", "decoded 2", "out 1", "out 2"] if ready else want_held)
    parts = stats.wait_input_s + stats.encode_s + stats.wait_features_s + stats.write_s + stats.poll_s
    assert stats.write_s >= 0.15 and stats.poll_s > 0 and parts <= stats.encoder_s < parts + 0.05
    assert 0 < stats.encoder_cpu_s < stats.encoder_s - 0.1  # the writer's sleeps are no CPU time


def test_gc_pauses_are_summed_from_every_collection_inside() -> None:
    import gc

    from pnsfw.indexer.gpu.route import Stats, gc_pauses

    stats, callbacks = Stats(), list(gc.callbacks)
    with gc_pauses(stats):
        for _ in range(3):
            gc.collect()
    gc.collect()  # outside: not counted
    assert stats.gc_collections == 3 and 0 < stats.gc_longest_s <= stats.gc_s and gc.callbacks == callbacks
    merged = Stats()
    merged.merge(stats.as_dict())
    merged.merge({"gc_longest_s": stats.gc_longest_s / 2, "gc_collections": 1})
    assert merged.gc_longest_s == stats.as_dict()["gc_longest_s"] and merged.gc_collections == 4


@pytest.mark.parametrize("compile_mode", ["on", "off"])
def test_decode_threads_start_after_a_compiled_towers_warm_up(monkeypatch: pytest.MonkeyPatch,
                                                               compile_mode: str) -> None:
    """A compiled tower is built and warmed up before any hardware decode call can run beside its compile;
    otherwise the decode threads start first and the tower warms up beside them."""
    from types import SimpleNamespace

    import pnsfw.indexer.gpu.stage as stage
    from pnsfw.indexer.gpu.route import Stats

    order: list[str] = []

    def start(units, router, encoder, options, out, stop, decoders):  # type: ignore[no-untyped-def]
        order.append("decode threads")
        out.put(None)  # no units
        return []

    def model(encoder, gpu, items, batch, first=None):  # type: ignore[no-untyped-def]
        order.append("tower")
        return lambda images: images

    monkeypatch.setattr(stage, "_start_threads", start)
    monkeypatch.setattr(stage, "image_model", model)
    options = SimpleNamespace(gpu=GpuOptions(compile=compile_mode))
    encoder = SimpleNamespace(device="cpu", resolution=8, width=2)
    router = SimpleNamespace(stats=Stats())
    assert list(stage.device_stage([], encoder, router, options, 0, 8)) == []  # type: ignore[arg-type]
    assert order == (["tower", "decode threads"] if compile_mode == "on" else ["decode threads", "tower"])


def test_early_cuda_context_only_for_runs_that_use_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The primary context is made beside the torch import only where the run will use a CUDA device; without
    a driver the thread ends quietly and torch reports what matters later."""
    from pnsfw.indexer.gpu import context

    assert [context.device_index(d) for d in ("cuda", "cuda:3", "cpu", "mps")] == [0, 3, None, None]
    monkeypatch.setattr(context, "GPU_NODES", ())
    assert context.device_index("auto") is None and context.start_context("auto") is None
    monkeypatch.setattr(context.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(f"no {name}")))
    after: list[int] = []
    thread = context.start_context("cuda:1", after.append)
    assert thread is not None
    thread.join(timeout=5)
    assert not thread.is_alive() and after == []  # no context: nothing after it


def test_the_early_context_made_current_then_what_comes_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """start_context's `then` (the nvJPEG handles made ahead) runs on the context's thread with the device's
    primary context current; a driver call that fails ends the thread before it."""
    import types

    from pnsfw.indexer.gpu import context

    calls: list[str] = []
    status = {"cuCtxSetCurrent": 0}

    def call(name: str) -> object:
        return lambda *args: calls.append(name) or status.get(name, 0)

    fake = types.SimpleNamespace(**{name: call(name) for name in ("cuInit", "cuDeviceGet",
                                                                   "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent")})
    monkeypatch.setattr(context, "libcuda", lambda: fake)
    after: list[tuple[int, str]] = []
    thread = context.start_context("cuda:2", lambda index: after.append((index, calls[-1])), None,
                                   lambda index: after.append((index, "second")))
    assert thread is not None
    thread.join(timeout=5)
    assert after == [(2, "cuCtxSetCurrent"), (2, "second")] and calls[0] == "cuInit"  # in turn, None skipped
    after.pop()
    status["cuCtxSetCurrent"] = 201  # CUDA_ERROR_INVALID_CONTEXT
    thread = context.start_context("cuda", lambda index: after.append((index, "again")))
    assert thread is not None
    thread.join(timeout=5)
    assert after == [(2, "cuCtxSetCurrent")]


def test_close_does_not_wait_for_good_on_a_cuda_start_up_thread_stuck_in_a_call(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """_Startup.close: the handles made ahead are destroyed once the context's thread is done; a thread still
    inside a call after CONTEXT_WAIT_S (a wedged nvJPEG decode) keeps them, and the run still ends."""
    import logging
    import threading

    from pnsfw.indexer import gpu, pipeline

    discarded: list[int] = []
    monkeypatch.setattr(gpu, "discard_premade", lambda: discarded.append(1) or 0)
    monkeypatch.setattr(pipeline, "CONTEXT_WAIT_S", 0.2)
    release = threading.Event()
    for stuck in (True, False):
        startup = pipeline._Startup(IndexOptions(device="cuda"), None)
        startup._context = threading.Thread(target=release.wait if stuck else lambda: None, daemon=True)
        startup._context.start()
        with caplog.at_level(logging.WARNING, logger="pnsfw.indexer.pipeline"):
            started = time.monotonic()
            startup.close()
        assert time.monotonic() - started < 5
        assert discarded == ([] if stuck else [1]) and ("did not finish" in caplog.text) == stuck
        caplog.clear()
    release.set()


def test_the_tower_is_warmed_ahead_only_where_the_fast_tower_runs(caplog: pytest.LogCaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """warm_ahead: for the fast (or eager) tower at fp16/bf16, a step for the context's thread that warms a
    stand-in tower at the first unit's batch; a failure there (here: no GPU) is only logged."""
    import logging
    import threading

    from pnsfw.indexer.gpu import stage, tower
    from pnsfw.indexer.gpu.options import GpuOptions
    from pnsfw.indexer.pipeline import IndexOptions

    monkeypatch.setattr(tower, "_OWN_WARM_UP", threading.Event())  # no run's own warm-up yet in this process

    assert stage.warm_ahead(IndexOptions(gpu=GpuOptions(tower="reference"))) is None
    assert stage.warm_ahead(IndexOptions(precision="fp32")) is None
    ahead = stage.warm_ahead(IndexOptions(precision="auto", batch_size=64))
    assert ahead is not None
    if torch.cuda.is_available():
        ahead(torch.cuda.current_device())
        return
    with caplog.at_level(logging.DEBUG, logger="pnsfw.indexer.gpu.stage"):
        ahead(0)
    assert "no tower warm-up ahead" in caplog.text


def test_no_stand_in_is_warmed_once_the_runs_own_warm_up_began(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in warmed after the run's own tower only competes with the first batches: warm_ahead then
    returns at once, touching neither torch nor the GPU (here GPU 99, which no machine has)."""
    import threading

    from pnsfw.indexer.gpu import tower

    monkeypatch.setattr(tower, "_OWN_WARM_UP", threading.Event())
    tower.own_warm_up_begins()
    assert tower.warm_ahead(99, 8) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_stand_in_tower_runs_on_the_gpu_at_either_half_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from pnsfw.indexer.gpu import tower

    monkeypatch.setattr(tower, "_OWN_WARM_UP", threading.Event())
    for dtype in ("fp16", "bf16"):
        assert tower.warm_ahead(torch.cuda.current_device(), 8, dtype) is True
