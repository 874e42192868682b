"""nvJPEG's hardware decoder (ctypes, own handles): routing by JPEG header, clean failure without a GPU,
and on a CUDA machine the decoded pixels (close to PIL, as torchvision's nvJPEG decode is)."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pnsfw.indexer.gpu.decode import DecoderPool, _hardware_first, device_decode, padded_decode, padded_fits
from pnsfw.indexer.gpu.nvjpeg import HardwareDecoder, NvjpegError, page_locked
from pnsfw.indexer.gpu.nvjpeg import Image as NvImage
from pnsfw.indexer.gpu.probe import jpeg_header
from pnsfw.indexer.gpu.route import Prepared, Stats, Unit
from pnsfw.indexer.reader import Result
from pnsfw.indexer.sources import Item

CUDA = torch.cuda.is_available()


def _jpeg(width: int, height: int, seed: int, **kw: object) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    if kw.pop("grey", False):
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def test_header_says_what_the_hardware_engines_take() -> None:
    assert jpeg_header(_jpeg(64, 48, 0)) == (64, 48, True)
    assert jpeg_header(_jpeg(64, 48, 0, progressive=True)) == (64, 48, False)
    assert jpeg_header(_jpeg(64, 48, 0, grey=True)) == (64, 48, False)


def _prepared(blobs: list[bytes], hardware: list[bool]) -> Prepared:
    rows = [Result(Item(f"{i}.jpg", "test"), None, str(i), *jpeg_header(b)[:2]) for i, b in enumerate(blobs)]
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    return Prepared(Unit(0, [r.item for r in rows]), rows, data, [], list(hardware))


def test_hardware_rows_go_first_with_their_bytes() -> None:
    blobs = [_jpeg(32 + 8 * i, 24, i) for i in range(4)]
    prepared = _prepared(blobs, [False, True, False, True])
    assert _hardware_first(prepared, True) == 2
    assert [r.sha256 for r in prepared.rows] == ["1", "3", "0", "2"]
    assert [bytes(d.numpy()) for d in prepared.data] == [blobs[1], blobs[3], blobs[0], blobs[2]]
    assert prepared.hardware == [True, True, False, False]


def test_without_a_gpu_the_binding_fails_cleanly() -> None:
    import ctypes

    assert ctypes.sizeof(NvImage) == 64  # nvjpegImage_t: 4 plane pointers + 4 pitches
    pool = DecoderPool("cpu", "auto")
    assert pool.threads == 1 and pool.decoder() is None and pool.stream() is None
    if not CUDA:
        with pytest.raises(NvjpegError):
            HardwareDecoder()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with JPEG engines")
def test_hardware_decode_close_to_pil() -> None:
    blobs = [_jpeg(w, h, i) for i, (w, h) in enumerate([(400, 300), (256, 341), (1632, 1224), (97, 61)])]
    blobs.append(_jpeg(120, 90, 9, progressive=True))  # torchvision's share of the batch
    prepared = _prepared(blobs, [jpeg_header(b)[2] for b in blobs])
    pool = DecoderPool("cuda", "auto")
    decoder = pool.decoder()
    assert decoder is not None, "no hardware decoder on this GPU"
    images = device_decode(prepared, "cuda", decoder)
    pool.close()
    torch.cuda.synchronize()
    for row, data, image in zip(prepared.rows, prepared.data, images):
        ref = torch.from_numpy(np.asarray(Image.open(io.BytesIO(bytes(data.numpy()))).convert("RGB")).copy())
        diff = (image.cpu().int() - ref.permute(2, 0, 1).int()).abs().float()
        print(f"hardware nvJPEG vs PIL {tuple(image.shape)}: max {diff.max():.0f}, mean {diff.mean():.3f}")
        assert image.shape == (3, row.height, row.width) and diff.mean().item() < 8


def test_every_unit_goes_to_our_nvjpeg_decoders() -> None:
    small = _prepared([_jpeg(400, 300, 1)], [True])
    large = _prepared([_jpeg(1632, 1224, 2)], [True])
    for mode in ("auto", "engines", "sm"):
        pool = DecoderPool("cuda", mode)  # nothing touches the GPU before a decoder is asked for
        assert pool.hardware_for(small) and pool.hardware_for(large)
    assert not DecoderPool("cuda", "torchvision").hardware_for(large)
    assert not DecoderPool("cpu", "auto").hardware_for(large)


def test_auto_decodes_thumbnails_on_the_sms_and_large_images_on_the_engines(monkeypatch) -> None:
    """auto: each thread has a GPU_HYBRID decoder for padded units (no engine gate) and an engines' one for the
    rest (gated by memory), made when first needed; four threads; engines and sm keep one decoder a thread."""
    import contextlib
    import types

    from pnsfw.indexer.gpu.nvjpeg import BACKEND_GPU_HYBRID, BACKEND_HARDWARE

    props = types.SimpleNamespace(total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)

    def make(backend: int, **flags: int) -> object:
        return types.SimpleNamespace(backend=backend, usage={}, calls=1, close=lambda: None)

    monkeypatch.setattr("pnsfw.indexer.gpu.nvjpeg.HardwareDecoder", make)
    pool = DecoderPool("cuda", "auto")
    assert pool.threads == 4 and DecoderPool("cuda", "auto", threads=2).threads == 2
    sm, engines = pool.decoder(True), pool.decoder(False)
    assert (sm.backend, engines.backend) == (BACKEND_GPU_HYBRID, BACKEND_HARDWARE)
    assert pool.decoder(True) is sm and pool.decoder(False) is engines and len(pool.made) == 2
    assert isinstance(pool.gate(True, sm), contextlib.nullcontext) and pool.gate(False, engines)._value == 2
    for mode, backend in (("engines", BACKEND_HARDWARE), ("sm", BACKEND_GPU_HYBRID)):
        one = DecoderPool("cuda", mode)
        assert one.decoder(True) is one.decoder(False) and one.decoder(True).backend == backend


def test_padded_path_only_for_batches_that_fit() -> None:
    rows = _prepared([_jpeg(400, 300, 0), _jpeg(256, 341, 1)], [True, True]).rows
    assert padded_fits(rows) and not padded_fits(rows * 1000 + _prepared([_jpeg(1632, 1224, 2)], [True]).rows)
    assert not DecoderPool("cuda", "torchvision").hardware_for(_prepared([_jpeg(64, 48, 0)], [True]))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with JPEG engines")
@pytest.mark.parametrize("pinned", [False, True])
def test_padded_decode_equals_per_image_decode(pinned: bool) -> None:
    blobs = [_jpeg(w, h, i) for i, (w, h) in enumerate([(400, 300), (256, 341), (97, 61), (300, 400)])]
    blobs.append(_jpeg(120, 90, 9, progressive=True))
    hardware = [jpeg_header(b)[2] for b in blobs]
    decoder = HardwareDecoder()
    want = device_decode(_prepared(blobs, hardware), "cuda", decoder)
    for _ in range(3):  # page-locked bytes (nvjpeg.page_locked, as the probe's) decode to the same pixels
        prepared = _prepared(blobs, hardware)
        if pinned:
            prepared.data = [page_locked(t) for t in prepared.data]
        batch, shapes = padded_decode(prepared, "cuda", decoder)
        torch.cuda.synchronize()
        assert [tuple(w.shape[1:]) for w in want] == shapes
        for image, (h, w), ref in zip(batch, shapes, want):
            assert torch.equal(image[:, :h, :w], ref)
    decoder.close()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with JPEG engines")
def test_sm_decoder_decodes_a_padded_batch_as_the_engines_do() -> None:
    """`--gpu-sm-decoders`' GPU_HYBRID handle: a batch of 64 thumbnails (nvJPEG's GPU Huffman decode takes
    batches over 50) into one padded batch, close to the engines' pixels (IDCTs may round differently)."""
    from pnsfw.indexer.gpu.nvjpeg import BACKEND_GPU_HYBRID

    blobs = [_jpeg(200 + 8 * (i % 7), 150 + 8 * (i % 5), i) for i in range(64)]
    hardware = [True] * len(blobs)
    engines, sms = HardwareDecoder(), HardwareDecoder(backend=BACKEND_GPU_HYBRID)
    want, shapes = padded_decode(_prepared(blobs, hardware), "cuda", engines)
    for _ in range(2):
        got, got_shapes = padded_decode(_prepared(blobs, hardware), "cuda", sms)
        torch.cuda.synchronize()
        assert got_shapes == shapes and sms.calls >= 1
        for image, ref, (h, w) in zip(got, want, shapes):
            diff = (image[:, :h, :w].int() - ref[:, :h, :w].int()).abs().float()
            assert diff.mean().item() < 1.0 and diff.max().item() <= 16
    engines.close()
    sms.close()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with JPEG engines")
def test_batch_size_changes_never_reinitialise_a_busy_state() -> None:
    """Round 5 hung when a state was re-initialised for a new batch size: now one state per size (at most
    MAX_STATES, the oldest retired once done), every size still decoded right."""
    from pnsfw.indexer.gpu.nvjpeg import MAX_STATES

    blobs = [_jpeg(64 + 8 * (i % 5), 48 + 8 * (i % 3), i) for i in range(9)]
    decoder = HardwareDecoder()
    want = [decoder.decode([torch.frombuffer(bytearray(b), dtype=torch.uint8)], [jpeg_header(b)[:2]], "cuda")[0]
            for b in blobs]
    for count in (2, 9, 9, 3, 5, 9, 2, 7):
        prepared = _prepared(blobs[:count], [True] * count)
        batch, shapes = padded_decode(prepared, "cuda", decoder)
        assert len(decoder.states) <= MAX_STATES
        torch.cuda.synchronize()
        for image, (h, w), ref in zip(batch, shapes, want):
            assert torch.equal(image[:, :h, :w], ref)
    decoder.close()
    assert not decoder.states


def test_a_hardware_call_that_never_returns_sends_the_rest_to_the_cpu_workers(tmp_path: object) -> None:
    """A wedged decoder (its call past the timeout) is not waited for again, not watched by the stall watchdog,
    and every later unit of the run decodes on the CPU workers, with the same rows."""
    import time
    from functools import partial
    from types import SimpleNamespace

    from pnsfw.indexer.gpu.route import Router, Stats
    from pnsfw.indexer.gpu.stage import STALL_S, _decode_on_stream
    from pnsfw.indexer.reader import process_chunk

    folder = Path(str(tmp_path))
    blobs = [_jpeg(64, 48, i) for i in range(3)]
    for i, blob in enumerate(blobs):
        (folder / f"{i}.jpg").write_bytes(blob)
    prepared = _prepared(blobs, [True] * 3)
    prepared.rows = [r._replace(item=Item(str(folder / f"{i}.jpg"), "test")) for i, r in enumerate(prepared.rows)]
    router = Router(None, partial(process_chunk, size=32, max_pixels=10**8, timeout=10.0), 0, Stats())
    pool = DecoderPool("cuda", "auto")
    pool.made.append(SimpleNamespace(wedged=True, since=time.monotonic() - 2 * STALL_S))
    assert pool.wedged and not pool.hardware_for(prepared) and pool.stalled(STALL_S) == 0.0
    decoded = _decode_on_stream(prepared, pool, router, None, "auto")  # type: ignore[arg-type]
    assert decoded.pixels is None and not decoded.prepared.rows and router.stats.cpu_images == 3
    results = [r for future in decoded.prepared.fallback for r in future.get()]
    assert [Path(r.item.uri).name for r in results] == ["0.jpg", "1.jpg", "2.jpg"]
    assert all(r.pixels is not None and r.pixels.shape == (32, 32, 3) for r in results)


def test_padded_table_points_each_image_at_its_slot() -> None:
    from pnsfw.errors import BadInput
    from pnsfw.indexer.gpu.nvjpeg import padded_table
    from pnsfw.indexer.gpu.options import GpuOptions

    out = torch.zeros((4, 3, 5, 7), dtype=torch.uint8)
    table = padded_table(out, 3)
    base, plane = out.data_ptr(), 5 * 7
    assert table.shape == (3, 8) and list(table[1, :4]) == [base + 3 * plane, base + 4 * plane, base + 5 * plane, 0]
    assert list(table[2, 4:]) == [7, 7, 7, 0]
    assert DecoderPool("cuda", "auto", threads=1).threads == 1 and DecoderPool("cpu", "auto").threads == 1
    with pytest.raises(BadInput, match="decode threads"):
        GpuOptions(decode_threads=-1)


def test_auto_decode_threads_gate_thumbnails_at_two_and_large_images_by_memory(monkeypatch) -> None:
    """With the engines and no --gpu-decode-threads: two padded (thumbnail) units decode at once, and up to four
    units of large images where the GPU's memory holds them (an 80 GiB GPU keeps two; auto too)."""
    import contextlib
    import types

    import torch

    from pnsfw.indexer.gpu.decode import DecoderPool

    for gib, large in ((80, 2), (141, 4), (1000, 4)):
        props = types.SimpleNamespace(total_memory=gib * 2**30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, props=props: props)
        pool = DecoderPool("cuda", "engines")
        assert pool.threads == large
        assert pool.gate(True)._value == 2 and pool.gate(False)._value == large
        assert pool.gate(True) is pool.gate(True)
        assert DecoderPool("cuda", "auto").gate(False)._value == large
    asked = DecoderPool("cuda", "engines", threads=3)
    assert asked.threads == 3 and isinstance(asked.gate(True), contextlib.nullcontext)


def test_sm_decoders_are_the_last_threads_made_and_pass_no_engine_gate(monkeypatch, caplog) -> None:
    """`--gpu-sm-decoders N`: N more decode threads, whose decoders (each thread makes one, in any order, some
    at once) are exactly N GPU_HYBRID ones beside the engines' HARDWARE ones; an SM decoder holds no engine gate,
    and one that cannot be made is replaced by an engines' one, logged once."""
    import contextlib
    import logging
    import threading
    import types

    from pnsfw.errors import BadInput
    from pnsfw.indexer.gpu.nvjpeg import BACKEND_GPU_HYBRID, BACKEND_HARDWARE
    from pnsfw.indexer.gpu.options import GpuOptions

    props = types.SimpleNamespace(total_memory=141 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    pool = DecoderPool("cuda", "engines", sm_decoders=2)
    assert pool.threads == 4 + 2 and DecoderPool("cuda", "engines", threads=3, sm_decoders=1).threads == 4
    assert DecoderPool("cpu", "engines", sm_decoders=2).threads == 1  # no device decoder at all: no SM threads
    start = threading.Barrier(pool.threads)

    def make(backend: int) -> object:
        start.wait(timeout=5)  # every thread plans its backend before any decoder exists
        return types.SimpleNamespace(backend=backend, usage={}, calls=3, close=lambda: None)

    made: list[object] = []
    threads = [threading.Thread(target=lambda: made.append(pool._make(make, NvjpegError)))
               for _ in range(pool.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    backends = sorted(d.backend for d in pool.made)  # type: ignore[attr-defined]
    assert backends == sorted([BACKEND_HARDWARE] * 4 + [BACKEND_GPU_HYBRID] * 2)
    sm = next(d for d in pool.made if d.backend == BACKEND_GPU_HYBRID)  # type: ignore[attr-defined]
    engines = next(d for d in pool.made if d.backend == BACKEND_HARDWARE)  # type: ignore[attr-defined]
    assert isinstance(pool.gate(True, sm), contextlib.nullcontext) and pool.gate(True, engines)._value == 2
    stats = Stats()
    pool.close(stats)
    assert stats.sm_decoder_calls == 2 * 3 and stats.as_dict()["sm_decoder_calls"] == 6

    tries = []

    def refuse_sm(backend: int, **flags: int) -> object:
        tries.append((backend, flags))
        if backend == BACKEND_GPU_HYBRID:
            raise NvjpegError("nvjpegCreateEx(GPU_HYBRID) failed: implementation not supported")
        return types.SimpleNamespace(backend=backend)

    every = DecoderPool("cuda", "sm")  # --gpu-decoder sm: all on the SMs, four threads unless asked
    assert every.threads == 4 and DecoderPool("cuda", "sm", threads=2).threads == 2
    assert [every.next_backend() for _ in range(every.threads)] == [BACKEND_GPU_HYBRID] * 4
    assert every.hardware_for(_prepared([_jpeg(64, 48, 0)], [True])) and GpuOptions(decoder="sm").decoder == "sm"
    one = DecoderPool("cuda", "engines", threads=1, sm_decoders=1)
    with caplog.at_level(logging.WARNING, logger="pnsfw"):
        assert [one._make(refuse_sm, NvjpegError).backend for _ in range(2)] == [BACKEND_HARDWARE] * 2
    assert one.planned == [BACKEND_HARDWARE, BACKEND_GPU_HYBRID]
    assert tries[1:] == [(BACKEND_GPU_HYBRID, {}), (BACKEND_GPU_HYBRID, {"flags": 0}), (BACKEND_HARDWARE, {})]
    assert [r.message for r in caplog.records if "GPU_HYBRID" in r.message] == [
        "GPU path: nvJPEG GPU_HYBRID decoder unavailable (nvjpegCreateEx(GPU_HYBRID) failed: implementation not "
        "supported); its thread uses the JPEG engines"]
    with pytest.raises(BadInput, match="SM decoders"):
        GpuOptions(sm_decoders=-1)
    with pytest.raises(BadInput, match="need --gpu-decoder engines, not auto"):
        GpuOptions(sm_decoders=1)
    assert GpuOptions(decoder="engines", sm_decoders=1).sm_decoders == 1


def test_the_first_unit_goes_whole_to_the_cpu_workers_when_asked(tmp_path: object) -> None:
    """`--gpu-first-unit cpu` with worker processes: unit 0's images decode on them (nothing read for the
    device), later units as before; without workers, or by default, unit 0 is read for the device."""
    from types import SimpleNamespace

    from pnsfw.indexer.gpu.options import GpuOptions
    from pnsfw.indexer.gpu.route import Stats, make_router, prepare

    folder = Path(str(tmp_path))
    items = []
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(_jpeg(64, 48, i))
        items.append(Item(str(folder / f"{i}.jpg"), "test"))
    for first_unit, workers, on_cpu in (("cpu", True, True), ("cpu", False, False), ("device", True, False)):
        options = SimpleNamespace(gpu=GpuOptions(first_unit=first_unit), max_pixels=10**8, timeout=10.0)
        router = make_router(object() if workers else None, 32, options, Stats(), 64)
        router.pool = None  # the workers' tasks inline
        first, second = prepare(Unit(0, items), router, 10**8), prepare(Unit(1, items), router, 10**8)
        assert len(second.rows) == 3 and not [r for future in second.fallback for r in future.get()]
        if on_cpu:
            assert not first.rows and not first.data and router.stats.cpu_images == 3
            results = [r for future in first.fallback for r in future.get()]
            assert [Path(r.item.uri).name for r in results] == ["0.jpg", "1.jpg", "2.jpg"]
            assert all(r.pixels is not None and r.pixels.shape == (32, 32, 3) for r in results)
        else:
            assert len(first.rows) == 3 and router.stats.cpu_images == 0


def test_handles_made_ahead_are_taken_by_backend_and_the_rest_destroyed(monkeypatch) -> None:
    """premake (on the CUDA context's thread, beside torch's import) keeps the handles by device, backend and
    flags; a failed create ends the tries; discard_premade destroys what no decoder took."""
    import ctypes
    import types

    from pnsfw.indexer.gpu import nvjpeg
    from pnsfw.indexer.gpu.decode import premade_decoders
    from pnsfw.indexer.gpu.options import GpuOptions

    made, destroyed = iter(range(1, 100)), []
    failing = {"after": 5}

    def create(backend: int, _dev: object, _pinned: object, flags: int, out: object) -> int:
        if failing["after"] == 0:
            return 7
        failing["after"] -= 1
        ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p))[0] = next(made)
        return 0

    fake = types.SimpleNamespace(nvjpegCreateEx=create, nvjpegDestroy=lambda h: destroyed.append(h.value))
    monkeypatch.setattr(nvjpeg, "library", lambda: fake)
    assert nvjpeg.premake(0, nvjpeg.BACKEND_GPU_HYBRID, 3) == 3
    assert nvjpeg.premake(1, nvjpeg.BACKEND_HARDWARE, 4) == 2  # the 6th create fails: two made
    assert nvjpeg._take_premade(nvjpeg.BACKEND_HARDWARE, nvjpeg.FLAG_MEMORY_POOLS, 0) is None
    assert nvjpeg._take_premade(nvjpeg.BACKEND_GPU_HYBRID, 0, 0) is None  # other flags: not these
    taken = nvjpeg._take_premade(nvjpeg.BACKEND_GPU_HYBRID, nvjpeg.FLAG_MEMORY_POOLS, 0)
    assert taken is not None and taken.handle.value in (1, 2, 3) and not taken.states
    assert nvjpeg.discard_premade() == 4 and sorted(destroyed) == sorted({1, 2, 3, 4, 5} - {taken.handle.value})
    assert nvjpeg.discard_premade() == 0
    assert not nvjpeg.first_decode(fake, ctypes.c_void_p(1))  # type: ignore[arg-type]  # no such calls: quiet
    assert premade_decoders(GpuOptions(decoder="torchvision")) is None
    failing["after"] = 99
    premade_decoders(GpuOptions(decode_threads=2))(0)  # type: ignore[misc]  # auto: the SMs' handles
    assert nvjpeg._premade.untaken((0, nvjpeg.BACKEND_GPU_HYBRID, nvjpeg.FLAG_MEMORY_POOLS)) == 2
    nvjpeg.discard_premade()


def test_a_decoder_waits_for_a_handle_still_being_made_ahead(monkeypatch) -> None:
    """A decoder that comes while the handles are being made waits for the next (oldest first) rather than
    making its own beside them; none once the making ended or failed, or past its wait; the first decode ahead
    runs only while no decoder has come, on a handle lent out and then kept again."""
    import ctypes
    import threading
    import time
    import types

    from pnsfw.indexer.gpu import nvjpeg

    pool, key = nvjpeg.Premade(), (0, nvjpeg.BACKEND_GPU_HYBRID, nvjpeg.FLAG_MEMORY_POOLS)
    got: list[object] = []
    pool.expect(key, 2)
    waiter = threading.Thread(target=lambda: got.append(pool.take(key, 5.0)))
    waiter.start()
    time.sleep(0.05)
    assert waiter.is_alive() and pool.waiting()
    pool.put(key, nvjpeg.Made(ctypes.c_void_p(11)))
    waiter.join(timeout=5)
    assert [m.handle.value for m in got] == [11]  # type: ignore[attr-defined]
    started = time.monotonic()
    assert pool.take(key, 0.2) is None and time.monotonic() - started >= 0.15  # one still coming: waited
    pool.expect(key, -1)  # the second was not made
    started = time.monotonic()
    assert pool.take(key, 5.0) is None and time.monotonic() - started < 1 and not pool.waiting()
    assert pool.take((1, 2, 3), 5.0) is None  # nothing coming for another key: no wait

    lent: list[int] = []
    monkeypatch.setattr(nvjpeg, "_premade", pool)
    monkeypatch.setattr(nvjpeg, "first_decode", lambda lib, handle: lent.append(handle.value) or True)
    made = iter(range(21, 99))

    def create(backend: int, _dev: object, _pinned: object, flags: int, out: object) -> int:
        ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p))[0] = next(made)
        return 0

    states, destroyed = iter(range(71, 99)), []

    def state(handle: object, out: object) -> int:
        ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p))[0] = next(states)
        return 0

    fake = types.SimpleNamespace(nvjpegCreateEx=create, nvjpegJpegStateCreate=state,
                                 nvjpegDecodeBatchedInitialize=lambda handle, state, count, threads, output: 0,
                                 nvjpegJpegStateDestroy=lambda s: destroyed.append(s.value),
                                 nvjpegDestroy=lambda h: destroyed.append(h.value))
    monkeypatch.setattr(nvjpeg, "library", lambda: fake)
    assert nvjpeg.premake(0, nvjpeg.BACKEND_GPU_HYBRID, 2, first_batch=256) == 2
    assert lent == [21] and pool.untaken(key) == 2 and not pool.coming[key]  # lent, then kept again
    first, second = pool.take(key, 0), pool.take(key, 0)
    assert first is not None and second is not None  # the first unit's thread takes the one with its state
    assert (first.handle.value, {n: s.value for n, s in first.states.items()}) == (21, {256: 71})
    assert (second.handle.value, second.states) == (22, {})
    monkeypatch.setattr(pool, "untaken", lambda key: 0)  # a decoder took one already: no first decode ahead
    assert nvjpeg.premake(0, nvjpeg.BACKEND_GPU_HYBRID, 1, first_batch=256) == 1 and lent == [21]
    monkeypatch.undo()
    monkeypatch.setattr(nvjpeg, "_premade", pool)
    monkeypatch.setattr(nvjpeg, "library", lambda: fake)
    assert nvjpeg.discard_premade() == 1 and destroyed == [72, 23]  # the state, then its handle


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with JPEG engines")
def test_a_decoder_takes_a_handle_made_ahead_and_decodes_with_it() -> None:
    import threading

    from pnsfw.indexer.gpu import nvjpeg
    from pnsfw.indexer.gpu.context import start_context

    thread = start_context("cuda", lambda index: nvjpeg.premake(index, nvjpeg.BACKEND_HARDWARE, 1, first_batch=2))
    assert isinstance(thread, threading.Thread)
    thread.join(timeout=30)
    key = (torch.cuda.current_device(), nvjpeg.BACKEND_HARDWARE, nvjpeg.FLAG_MEMORY_POOLS)
    handle = nvjpeg._premade.kept[key][0].handle.value
    decoder = HardwareDecoder()
    assert decoder.handle.value == handle and not nvjpeg._premade.untaken(key)
    assert list(decoder.states) == [2]  # the state made ahead for the first batch (of 2), decoded with below
    blobs = [_jpeg(400, 300, 0), _jpeg(256, 341, 1)]
    reference = HardwareDecoder()  # made now: nothing left to take
    assert reference.handle.value != handle
    torch.cuda.synchronize()  # torch's context current on this thread: the driver-only first decode runs here
    assert nvjpeg.first_decode(nvjpeg.library(), reference.handle)
    want = device_decode(_prepared(blobs, [True, True]), "cuda", reference)
    got = device_decode(_prepared(blobs, [True, True]), "cuda", decoder)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    decoder.close()
    reference.close()
