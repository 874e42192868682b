"""`pnsfw index` end to end through the CLI: sources, bad files, idempotence, increments, resume after kill -9."""

import http.server
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import class_image, index_folder, make_labelled_folder
from test_decode import _bad_files, _odd_images

from pnsfw.cli import cli
from pnsfw.store import Store
from pnsfw.store.lock import WriteLock


def run(store: Path, ckpt: Path, *args: str) -> "CliRunner.invoke":
    return CliRunner().invoke(cli, ["index", *args, "--store", str(store), "--model", str(ckpt),
                                    "--device", "cpu", "--workers", "-1"])


def write_images(folder: Path, count: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        paths.append(folder / f"img{i:04d}.jpg")
        class_image("sfw" if i % 2 else "nsfw", i).save(paths[-1])
    return paths


def test_odd_and_bad_files_become_rows_and_errors(tmp_path, tiny_checkpoint):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, data in _odd_images().items():
        (folder / f"{name}.img").write_bytes(data)
    for name, (data, _) in _bad_files().items():
        (folder / f"bad_{name}.img").write_bytes(data)
    os.symlink(tmp_path / "missing.jpg", folder / "dangling.jpg")
    result = run(tmp_path / "store", tiny_checkpoint, str(folder))
    assert result.exit_code == 0, result.output
    store = Store.open(tmp_path / "store")
    assert sorted(Path(u).stem for u in store.table(["uri"]).column("uri").to_pylist()) == sorted(_odd_images())
    errors = {Path(r["uri"]).stem: r["reason"] for r in store.errors().to_pylist()}
    expected = {f"bad_{name}": reason for name, (_, reason) in _bad_files().items()}
    assert errors == dict(expected, dangling="unreadable")
    assert "failed: 7" in result.output and "decompression_bomb 1" in result.output


def test_rerun_adds_nothing_and_new_files_are_added(tmp_path, tiny_checkpoint):
    write_images(tmp_path / "src", 12)
    first = run(tmp_path / "store", tiny_checkpoint, str(tmp_path / "src"))
    assert "indexed 12 images" in first.output and "index: flat, 12 vectors" in first.output
    version = Store.open(tmp_path / "store").version
    again = run(tmp_path / "store", tiny_checkpoint, str(tmp_path / "src"))
    assert "indexed 0 images" in again.output and "already present: 12" in again.output
    assert Store.open(tmp_path / "store").version == version  # nothing committed
    write_images(tmp_path / "src" / "more", 5, start=100)
    more = run(tmp_path / "store", tiny_checkpoint, str(tmp_path / "src"))
    assert "indexed 5 images" in more.output and "index: flat, 17 vectors (+5)" in more.output
    ids = Store.open(tmp_path / "store").table(["id"]).column("id").to_pylist()
    assert sorted(ids) == list(range(17))


def _recorded(calls: list[str], name: str, method):
    """`method`, appending `name` to `calls` before each call."""
    def wrapper(self):
        calls.append(name)
        return method(self)
    return wrapper


def test_a_new_store_imports_torch_beside_the_listing_and_a_rerun_starts_only_for_a_new_item(
        tmp_path, tiny_checkpoint, monkeypatch):
    """Listing a flat folder of 1M files took ~1.2 s before its first entry (the whole folder read and sorted),
    and the encoder's load began only then. For a new store every entry is new, so torch is imported beside
    the listing; a store with rows still starts nothing until an entry is new (a rerun with nothing to do
    imports no torch)."""
    from pnsfw.indexer import pipeline

    calls: list[str] = []
    imported: list[str] = []
    real_listing, real_import = pipeline._listing, pipeline._import_torch
    monkeypatch.setattr(pipeline, "_listing", lambda *args: calls.append("listing") or real_listing(*args))
    monkeypatch.setattr(pipeline, "_import_torch", lambda: imported.append("torch") or real_import())
    for name in ("prepare", "start"):
        monkeypatch.setattr(pipeline._Startup, name, _recorded(calls, name, getattr(pipeline._Startup, name)))
    write_images(tmp_path / "src", 3)
    assert "indexed 3 images" in run(tmp_path / "store", tiny_checkpoint, str(tmp_path / "src")).output
    assert calls == ["prepare", "listing", "start"] and imported == ["torch"]
    calls.clear()
    assert "indexed 0 images" in run(tmp_path / "store", tiny_checkpoint, str(tmp_path / "src")).output
    assert calls == ["listing"]
    write_images(tmp_path / "src" / "more", 1, start=100)
    calls.clear()
    assert "indexed 1 images" in run(tmp_path / "store", tiny_checkpoint, str(tmp_path / "src")).output
    assert calls == ["listing", "start"] and imported == ["torch"]


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/cat.jpg":
            self.send_error(404)
            return
        buf = io.BytesIO()
        class_image("sfw", 1).save(buf, "JPEG")
        self.send_response(200)
        self.end_headers()
        self.wfile.write(buf.getvalue())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_base():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_list_tar_and_parquet_sources(tmp_path, tiny_checkpoint, http_base):
    images = write_images(tmp_path / "files", 4)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\nfiles/{images[0].name}\n{images[1]}\n{http_base}/cat.jpg\n"
                       f"{http_base}/missing.jpg\nhttp://127.0.0.1:9/refused.jpg\n")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        tar.add(images[2], arcname="nsfw/a.jpg")
        tar.add(images[3], arcname="sfw/b.jpg")
    pq.write_table(pa.table({"uri": [str(images[3]), "files/" + images[0].name]}), tmp_path / "uris.parquet")
    (tmp_path / "files" / images[0].name).rename(tmp_path / images[0].name)  # relative to the list's folder
    (tmp_path / "files").joinpath(images[0].name).symlink_to(tmp_path / images[0].name)
    result = run(tmp_path / "store", tiny_checkpoint, str(listing), str(tmp_path / "shard.tar"),
                 str(tmp_path / "uris.parquet"))
    assert result.exit_code == 0, result.output
    store = Store.open(tmp_path / "store")
    uris = store.table(["uri"]).column("uri").to_pylist()
    assert f"{http_base}/cat.jpg" in uris and f"{tmp_path}/shard.tar::nsfw/a.jpg" in uris
    assert len(uris) == 6  # 2 listed files + 1 URL + 2 tar members + 1 new parquet uri (the other repeats)
    reasons = {r["uri"].rsplit("/", 1)[-1]: (r["stage"], r["reason"]) for r in store.errors().to_pylist()}
    assert reasons == {"missing.jpg": ("fetch", "http_error"), "refused.jpg": ("fetch", "unreachable")}


def test_unknown_source_and_offline_model_name_are_one_line_errors(tmp_path, tiny_checkpoint):
    missing = run(tmp_path / "store", tiny_checkpoint, str(tmp_path / "nope"))
    assert missing.exit_code == 1 and missing.output.strip().startswith("Error: source")
    write_images(tmp_path / "src", 1)
    result = CliRunner().invoke(cli, ["index", str(tmp_path / "src"), "--store", str(tmp_path / "s2"),
                                      "--model", "ViT-B/32", "--workers", "-1"])
    assert result.exit_code == 1
    assert "--model /path/to/checkpoint.pt" in result.output and len(result.output.strip().splitlines()) == 1
    bad = CliRunner().invoke(cli, ["index", str(tmp_path / "src"), "--store", str(tmp_path / "s3"),
                                   "--model", "ResNet-9000"])
    assert bad.exit_code == 1 and "unknown CLIP model" in bad.output


def test_second_writer_fails_clearly_and_changes_nothing(tmp_path, tiny_checkpoint):
    write_images(tmp_path / "src", 3)
    (tmp_path / "store").mkdir()
    with WriteLock(tmp_path / "store"):
        result = run(tmp_path / "store", tiny_checkpoint, str(tmp_path / "src"))
    assert result.exit_code == 1 and "being written by another process" in result.output
    assert not Store(tmp_path / "store").exists


def test_pca_projection_and_summary_json(tmp_path, tiny_checkpoint):
    write_images(tmp_path / "src", 20)
    summary = tmp_path / "summary.json"
    result = run(tmp_path / "store", tiny_checkpoint, str(tmp_path / "src"), "--projection", "pca",
                 "--pca-rows", "12", "--shard-size", "8", "--summary-json", str(summary))
    assert result.exit_code == 0, result.output
    store = Store.open(tmp_path / "store")
    assert store.projection_info["kind"] == "pca" and store.rows == 20
    assert [s.rows for s in store.shards] == [8, 8, 4]
    assert json.loads(summary.read_text())["indexed"] == 20
    conflict = run(tmp_path / "store", tiny_checkpoint, str(tmp_path / "src"), "--projection", "random")
    assert conflict.exit_code == 1 and "already uses a pca projection" in conflict.output


def _spawn(source: Path, store: Path, ckpt: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pnsfw.cli", "index", str(source), "--store", str(store), "--model", str(ckpt),
           "--device", "cpu", "--workers", "1", "--batch-size", "4", "--shard-size", "6"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_shards(store: Path, count: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(Store(store).shards) >= count:
                return
        except Exception:
            pass
        time.sleep(0.02)


def _rows(store: Path) -> tuple[list[dict], np.ndarray]:
    s = Store.open(store)
    table = s.table().sort_by("id")
    ids, vectors = s.vectors()
    return table.to_pylist(), vectors[np.argsort(ids)].astype(np.float32)


def test_kill_9_then_resume_gives_the_same_rows(tmp_path, tiny_checkpoint):
    write_images(tmp_path / "src", 50)
    (tmp_path / "src" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    index_folder(tmp_path / "src", tmp_path / "ref", tiny_checkpoint, "--batch-size", "4", "--shard-size", "6")
    for shards_before_kill in (1, 4):
        proc = _spawn(tmp_path / "src", tmp_path / "killed", tiny_checkpoint)
        _wait_for_shards(tmp_path / "killed", shards_before_kill, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert Store.open(tmp_path / "killed").rows < 50
    resumed = _spawn(tmp_path / "src", tmp_path / "killed", tiny_checkpoint)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    (ref_rows, ref_vec), (rows, vec) = _rows(tmp_path / "ref"), _rows(tmp_path / "killed")
    assert rows == ref_rows and len(rows) == 50
    np.testing.assert_allclose(vec, ref_vec, atol=2e-3)
    assert Store.open(tmp_path / "killed").errors().column("reason").to_pylist() == ["truncated"]
    assert not list((tmp_path / "killed" / "shards").glob(".*"))


def test_checkpoint_loads_as_clip_load_does(tmp_path, tiny_checkpoint):
    """The fast loader (no random init) gives clip.load's model exactly, from a state dict or TorchScript."""
    import clip
    import torch

    from pnsfw.errors import ModelNotFound
    from pnsfw.indexer.encoder import _load_clip

    reference = clip.load(str(tiny_checkpoint), device="cpu", jit=False)[0].float().eval()
    traced = tmp_path / "traced.pt"
    images, texts = torch.randn(2, 3, 32, 32), clip.tokenize(["a cat", "a dog"])
    torch.jit.save(torch.jit.trace(reference, (images, texts), check_trace=False), str(traced))
    for path in (tiny_checkpoint, traced):
        model = _load_clip(str(path))
        with torch.no_grad():
            assert torch.equal(model.encode_image(images), reference.encode_image(images))
            assert torch.equal(model.encode_text(texts), reference.encode_text(texts))
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelNotFound, match="cannot load CLIP checkpoint"):
        _load_clip(str(tmp_path / "broken.pt"))


def test_checkpoint_load_runs_no_initialiser(tiny_checkpoint):
    """torch.nn.init's initialisers take the tensor by keyword and fill it through tensor methods the no-init
    mode does not see: no random fill may reach the dispatcher (a ViT-B/32's cost ~0.75 s of a 0.94 s build)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pnsfw.indexer.encoder import _load_clip

    ran: list[str] = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ran.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        _load_clip(str(tiny_checkpoint))
    assert ran and not [op for op in ran if op.split(".")[0] in ("uniform_", "normal_")]


def test_checkpoint_load_imports_no_dynamo_and_needs_every_weight(tmp_path, tiny_checkpoint):
    """The load builds CLIP with no initialisation on the CPU, not on meta tensors (whose elementwise kernels
    import torch._dynamo: seconds of start-up); a checkpoint without some weight is refused."""
    import torch

    from pnsfw.errors import ModelNotFound
    from pnsfw.indexer.encoder import _load_clip

    for load in ("_load_clip(sys.argv[1])", "describe_encoder(sys.argv[1])"):
        code = (f"import sys; from pnsfw.indexer.encoder import _load_clip, describe_encoder; {load}; "
                "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo')")
        done = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint)], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent.parent)
        assert done.stdout.split()[-2:] == ["no", "dynamo"], load
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    del state["visual.proj"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ModelNotFound, match="cannot load CLIP checkpoint"):
        _load_clip(str(tmp_path / "partial.pt"))


def test_an_fp32_encoder_encodes(tiny_checkpoint):
    """fp32 (the CPU default without bf16 instructions) runs with autocast off."""
    from pnsfw.indexer.encoder import load_encoder

    encoder = load_encoder(str(tiny_checkpoint), "cpu", "fp32")
    pixels = np.random.default_rng(0).integers(0, 255, (2, encoder.resolution, encoder.resolution, 3), np.uint8)
    features = encoder.encode_pixels(pixels)
    assert features.shape == (2, encoder.width) and features.dtype == np.float32 and np.isfinite(features).all()


def test_a_described_encoder_is_the_loaded_one_without_weights(tmp_path, tiny_checkpoint):
    """The Ray driver's encoder: the same record for the store, no weight read (its tensors are allocated, never
    given the checkpoint's values)."""
    import torch

    from pnsfw.errors import ModelNotFound
    from pnsfw.indexer.encoder import describe_encoder, load_encoder

    described, loaded = describe_encoder(str(tiny_checkpoint)), load_encoder(str(tiny_checkpoint), "cpu")
    assert described.describe() == loaded.describe()
    assert not torch.equal(described.model.visual.proj.float(), loaded.model.visual.proj.float())
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelNotFound, match="cannot load CLIP checkpoint"):
        describe_encoder(str(tmp_path / "broken.pt"))


def test_tokenize_equals_clips_and_text_encoding_imports_no_torchvision(tiny_checkpoint):
    """Our tokenizer is clip.tokenize(truncate=True) without `import clip` (torchvision, pkg_resources)."""
    import clip

    from pnsfw.indexer.encoder import tokenize

    texts = ["", "a photo of a cat", "Ünïcödé & <html> émojis 🐈‍⬛", "word " * 200, "x" * 500]
    assert (tokenize(texts) == clip.tokenize(texts, truncate=True)).all()
    code = ("import sys; from pnsfw.indexer.encoder import load_encoder; "
            "f = load_encoder(sys.argv[1], 'cpu', 'fp32').encode_text(['a cat', 'a dog']); "
            "print(f.shape, 'torchvision' if 'torchvision' in sys.modules else 'no torchvision')")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint)], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.split()[-2:] == ["no", "torchvision"], done.stdout


def test_cpu_indexing_imports_neither_clip_nor_torchvision(tmp_path, tiny_checkpoint):
    """`index --device cpu` needs torch alone: torchvision (and CLIP's package, which imports it) would add
    ~170 MB to the RSS of every incremental index (docs/benchmarks.md, "Store at scale")."""
    make_labelled_folder(tmp_path / "images", per_class=2)
    code = ("import sys; from pnsfw.cli import cli\n"
            "try:\n    cli(sys.argv[1:])\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print([m for m in ('torchvision', 'clip') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code, "index", str(tmp_path / "images"), "--store",
                           str(tmp_path / "store"), "--model", str(tiny_checkpoint), "--device", "cpu", "--no-faiss"],
                          capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.splitlines()[-1] == "[]", done.stdout + done.stderr
