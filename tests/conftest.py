"""Shared fixtures: a tiny random CLIP checkpoint, generated images, small indexed stores. All offline."""

import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY = dict(embed_dim=512, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=2, transformer_layers=2)


def build_checkpoint(path: Path, seed: int = 0, **overrides: int) -> Path:
    """A random-weight CLIP saved as a plain state dict, as `clip.load(path)` accepts."""
    import torch
    from clip.model import CLIP

    torch.manual_seed(seed)
    torch.save(CLIP(**dict(TINY, **overrides)).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("clip") / "tiny-clip.pt")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the user's cache or store settings."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # CLIP checkpoints: $XDG_CACHE_HOME/clip
    for name in ("PNSFW_STORE", "PNSFW_MODEL", "PNSFW_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def class_image(label: str, index: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """Two visually distinct, noisy classes: warm bright blobs ("sfw") vs cold dark stripes ("nsfw")."""
    rng = np.random.default_rng(zlib.crc32(f"{label}-{index}".encode()))
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    if label in ("sfw", "neutral", "drawings"):
        base = np.stack([200 + 0 * xx, 150 + 40 * np.sin(xx / 5), 60 + 0 * yy], -1)
    else:
        base = np.stack([30 + 0 * xx, 40 + 30 * ((yy // 4) % 2), 160 + 0 * yy], -1)
    shift = {"porn": 0, "sexy": 40, "hentai": 80, "drawings": -40, "neutral": 0}.get(label, 0)
    noisy = base + shift + rng.normal(0, 25, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_labelled_folder(root: Path, labels: tuple[str, ...] = ("sfw", "nsfw"), per_class: int = 40) -> Path:
    """root/<label>/[sub/]NNN.jpg, some in a sub-folder (grouped into the label)."""
    for label in labels:
        for i in range(per_class):
            folder = root / label / ("sub" if i % 3 == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            class_image(label, i).save(folder / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def labelled_folder(tmp_path: Path) -> Path:
    return make_labelled_folder(tmp_path / "dataset")


def index_folder(source: Path, store: Path, checkpoint: Path, *extra: str) -> None:
    """Index through the real CLI (in-process CliRunner), asserting success."""
    from click.testing import CliRunner

    from pnsfw.cli import cli

    result = CliRunner().invoke(cli, ["index", str(source), "--store", str(store), "--model", str(checkpoint),
                                      "--device", "cpu", "--workers", "-1", *extra])
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.fixture(scope="session")
def labelled_store(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """A store of 2 x 40 labelled images (sfw/nsfw folders). Treat as read-only: copy it to modify."""
    root = tmp_path_factory.mktemp("labelled")
    source = make_labelled_folder(root / "dataset")
    index_folder(source, root / "store", tiny_checkpoint)
    return root / "store"


@pytest.fixture(scope="session")
def five_class_store(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """drawings/hentai/neutral/porn/sexy, 30 each. Read-only."""
    root = tmp_path_factory.mktemp("five")
    labels = ("drawings", "hentai", "neutral", "porn", "sexy")
    source = make_labelled_folder(root / "dataset", labels, per_class=30)
    index_folder(source, root / "store", tiny_checkpoint)
    return root / "store"


os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def api_server(tmp_path_factory: pytest.TempPathFactory, labelled_store: Path, tiny_checkpoint: Path):
    """A real token-guarded `pnsfw serve` process over a copy of labelled_store with a trained model
    (tests/api_server.py)."""
    from api_server import prepare_store, start_server

    root = tmp_path_factory.mktemp("api")
    yield from start_server(prepare_store(root, labelled_store, tiny_checkpoint), root / "server.log")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory):
    """One SeaweedFS S3 server for the whole run (each start costs seconds), with bucket `pnsfw`; tests keep
    apart by prefix (`_s3_url`)."""
    from s3_server import BUCKET, start_seaweed

    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    endpoint = next(server)
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": endpoint}).mkdir(BUCKET)
    yield endpoint
    next(server, None)
