#!/usr/bin/env python
"""Indexing benchmark: ``pnsfw index`` against ``clip-retrieval inference``.

What it does (DESIGN.md section 9):

1. generates two corpora in ``--workdir`` (default /tmp/pnsfw-bench), reused
   while their parameters match: ``thumbs`` (N JPEGs, q90, 256-400 px on the long
   side, ~4:3) and ``photos`` (M JPEGs, q90, 1632x1224 = 2 MP), cut, resized,
   colour-jittered and grained from scikit-image's bundled photos (random PIL
   shapes when skimage is missing);
2. builds a full-size ViT-B/32 checkpoint with random weights
   (``make_checkpoint.py vit-b-32``; same FLOPs as OpenAI's weights);
3. runs the anchor, ``clip-retrieval inference``, and ours, ``pnsfw index``, on
   each corpus, and prints/writes the figures (``--out``, JSON).

Timing method:

* end to end: wall clock of the whole subprocess (imports, model load,
  warm-up, file listing, decode, inference, writing), files in the page cache
  for both tools (the corpus was just written or read).
* steady state, anchor: clip-retrieval's Runner hands each batch's stats
  ({start_time, end_time, sample_count, ...}) to ``LoggerWriter.__call__``; the
  anchor is launched through a shim that wraps that method to append each
  batch's stats to a JSONL file, then calls ``clip_retrieval.cli.main`` (the
  console script's entry point; nothing else changes). Steady img/s =
  images in batches 2..n / (end of batch n - end of batch 1). Needs >= 2
  batches. (Its own printed ``sample_per_sec`` is unusable: LoggerWriter sums
  every batch's ``start_time`` and the reader then takes that sum as a time.)
* steady state, ours: ``steady_images_per_s`` from ``pnsfw index
  --summary-json FILE`` ({"indexed", "seconds", "images_per_s",
  "steady_images_per_s"}).
* the tower's own ceiling (``--tower-ceiling``, CPU; DESIGN's target: the
  steady rate >= 85 % of it): before each pnsfw run, ``bench_tower.py`` times
  the image tower alone on the same checkpoint, at the run's batch size and
  precision on every usable core; each run's steady img/s is divided by the
  ceiling measured just before it.

The anchor has no device option: it uses CUDA whenever torch sees a GPU, so
``--device cpu`` runs it with ``CUDA_VISIBLE_DEVICES=""``.

The clip-retrieval venv (Python 3.11, x86_64; pip caps torch at 2.14.1 via
/etc/xdg/pip and takes torch/torchvision from local disk)::

    python3.11 -m venv .bench/cr-venv
    .bench/cr-venv/bin/pip install --upgrade pip
    .bench/cr-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    .bench/cr-venv/bin/pip install clip-retrieval==2.45.0 torch==2.14.1 \\
        torchvision==0.29.1 'setuptools<81'
    .bench/cr-venv/bin/pip install scikit-image 'numpy<2'   # corpus content

(resolves to numpy 1.26.4, clip-anytorch 2.6.0, open-clip-torch 2.32.0,
webdataset 0.2.111, pyarrow 15.0.2, fsspec 2026.9.0; ``pip check`` is clean.
``setuptools<81`` keeps ``pkg_resources``, which clip-anytorch imports.)

Examples::

    .venv/bin/python scripts/bench_index.py                      # both tools
    .venv/bin/python scripts/bench_index.py --thumbs 200 --photos 20 --skip-ours
    .bench/cr-venv/bin/python scripts/bench_index.py --skip-ours  # no project venv
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
CORPUS_VERSION = 2  # bump when the generator changes, to regenerate corpora
THUMB_LONG = (256, 400)
PHOTO_SIZE = (1632, 1224)
SKIMAGE_SOURCES = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
    "hubble_deep_field", "retina", "colorwheel", "camera", "moon", "clock",
    "coins", "grass", "gravel", "brick",
)

# The anchor is started through this shim: it records every batch's stats,
# then runs clip-retrieval's console-script entry point unchanged.
ANCHOR_SHIM = """\
import importlib.util, json, os, sys, types
try:
    import clip_retrieval
except ImportError:  # its __init__ imports the web back-end (flask...), which `inference` never uses:
    _spec = importlib.util.find_spec("clip_retrieval")  # register the bare package, load submodules
    _pkg = types.ModuleType("clip_retrieval")
    _pkg.__path__ = list(_spec.submodule_search_locations)
    sys.modules["clip_retrieval"] = _pkg
try:
    import wandb  # imported at module level by clip-retrieval's logger, used only with enable_wandb
except ImportError:  # not installed on the GPU box: an empty module stands in; wandb stays disabled
    import importlib.machinery  # with a spec: accelerate/transformers probe find_spec("wandb"), then its metadata
    _wandb = types.ModuleType("wandb")
    _wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    sys.modules["wandb"] = _wandb
from clip_retrieval.clip_inference import logger as _lg
_log = open(os.environ["PNSFW_BENCH_BATCH_LOG"], "a")
_orig = _lg.LoggerWriter.__call__
def _call(self, stats):
    _log.write(json.dumps(stats) + "\\n"); _log.flush()
    return _orig(self, stats)
_lg.LoggerWriter.__call__ = _call
try:
    from clip_retrieval.cli import main
except ImportError:  # a GPU box without back/index/end2end deps: the `inference` command's own function
    import fire
    from clip_retrieval.clip_inference.main import main as _inference
    if sys.argv[1:2] == ["inference"]:
        del sys.argv[1]
    main = lambda: fire.Fire(_inference)
sys.argv[0] = "clip-retrieval"
sys.exit(main())
"""


# ----------------------------------------------------------------- corpus ---

def load_sources(rng: np.random.Generator) -> list[np.ndarray] | None:
    """RGB uint8 arrays of skimage's bundled photos, or None without skimage."""
    try:
        import skimage.data as skd
    except ImportError:
        return None
    out = []
    for name in SKIMAGE_SOURCES:
        try:
            a = np.asarray(getattr(skd, name)())
        except Exception:  # some skimage releases fetch a few of these
            continue
        if a.ndim == 2:  # grey: tint it so colour jitter has something to do
            tint = rng.uniform(0.7, 1.0, size=3)
            a = (a[..., None] * tint).astype(np.uint8)
        out.append(np.ascontiguousarray(a[..., :3]))
    return out or None


def random_size(rng: np.random.Generator, kind: str) -> tuple[int, int]:
    """(width, height): thumbs 256-400 px long side ~4:3, photos 1632x1224."""
    if kind == "photos":
        return PHOTO_SIZE
    long = int(rng.integers(THUMB_LONG[0], THUMB_LONG[1] + 1))
    short = int(round(long / rng.uniform(1.25, 1.42)))
    return (long, short) if rng.random() < 0.75 else (short, long)


def crop_resize(src: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Random crop of ``src`` with the aspect of ``size``, resized to ``size``."""
    h, w = src.shape[:2]
    aspect = size[0] / size[1]
    frac = rng.uniform(0.45, 1.0)
    cw = min(w, int(round(np.sqrt(frac * w * h * aspect))))
    ch = min(h, int(round(cw / aspect)))
    cw = min(cw, int(round(ch * aspect)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = Image.fromarray(src[y:y + ch, x:x + cw])
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img.resize(size, Image.Resampling.BICUBIC)


def shapes_image(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Fallback content: random filled shapes on a random background."""
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 30))):
        x0, x1 = sorted(rng.integers(0, size[0], 2).tolist())
        y0, y1 = sorted(rng.integers(0, size[1], 2).tolist())
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.line((x0, y0, x1, y1), fill=fill, width=int(rng.integers(2, 12)))
    return img


_GRAIN: dict[str, np.ndarray] = {}  # per process: one grain field, sliced at random offsets


def grain(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """int16 Gaussian grain (sigma 2-5) of ``shape``: a random window of a per-process field."""
    field = _GRAIN.get("field")
    if field is None or field.shape[0] < shape[0] + 64 or field.shape[1] < shape[1] + 64:
        gen = np.random.default_rng(len(_GRAIN))
        field = (gen.standard_normal((max(shape[0], 1300) + 64, max(shape[1], 1700) + 64, 3)) * 64).astype(np.int16)
        _GRAIN["field"] = field
    y, x = int(rng.integers(0, 64)), int(rng.integers(0, 64))
    return field[y:y + shape[0], x:x + shape[1]] * int(rng.integers(2, 6)) // 64


def jitter(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Colour jitter (gamma, per-channel gain, offset; as lookup tables) plus grain, so every file differs."""
    levels = np.arange(256) / 255.0
    gamma, gain, offset = rng.uniform(0.8, 1.25), rng.uniform(0.8, 1.2, size=3), rng.uniform(-0.08, 0.08)
    luts = [np.clip((levels ** gamma * g + offset) * 255.0, 0, 255).astype(np.uint8) for g in gain]
    a = np.asarray(img.point([int(v) for lut in luts for v in lut]), dtype=np.int16)
    return np.clip(a + grain(rng, a.shape), 0, 255).astype(np.uint8)


_SOURCES: dict[str, Any] = {}


def write_image(job: tuple[str, str, int, int]) -> int:
    """Write image ``i`` of a corpus (its own seeded generator: any worker writes the same bytes)."""
    folder, kind, i, seed = job
    rng = np.random.default_rng([seed, 0 if kind == "thumbs" else 1, i])
    if "sources" not in _SOURCES:
        _SOURCES["sources"] = load_sources(np.random.default_rng(seed))
    sources = _SOURCES["sources"]
    size = random_size(rng, kind)
    img = crop_resize(sources[int(rng.integers(len(sources)))], size, rng) if sources else shapes_image(size, rng)
    path = Path(folder) / f"{kind[0]}{i:06d}.jpg"
    Image.fromarray(jitter(img, rng)).save(path, quality=90)
    return path.stat().st_size


def write_copies(job: tuple[str, str, int, int, int]) -> int:
    """Write files ``start..stop-1`` of a corpus with ``distinct`` rendered images: file i is image
    i % distinct with a JPEG comment (COM segment, 0xFFFE) naming i right after SOI, so every file's bytes
    and sha256 differ while its decode work equals the rendered image's."""
    folder, kind, start, stop, distinct = job
    bases: dict[int, bytes] = {}
    total = 0
    for i in range(start, stop):
        base = bases.get(i % distinct)
        if base is None:
            base = bases[i % distinct] = (Path(folder) / f"{kind[0]}{i % distinct:06d}.jpg").read_bytes()
        note = f"pnsfw-bench copy {i}".encode()
        data = base[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + base[2:]
        (Path(folder) / f"{kind[0]}{i:06d}.jpg").write_bytes(data)
        total += len(data)
    return total


def write_corpus(folder: Path, count: int, kind: str, seed: int, distinct: int = 0) -> dict[str, Any]:
    """Write ``count`` JPEGs of ``kind`` into ``folder`` on every core; return a description. ``distinct``
    (0: all): render only that many, the rest are commented copies of them (write_copies; ~50x faster)."""
    import multiprocessing

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rendered = min(count, distinct) if distinct > 0 else count
    jobs = [(str(folder), kind, i, seed) for i in range(rendered)]
    cores = len(os.sched_getaffinity(0))
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        total = sum(pool.imap_unordered(write_image, jobs, chunksize=64))
        step = max(1, (count - rendered) // (8 * cores) + 1)
        copies = [(str(folder), kind, a, min(count, a + step), rendered) for a in range(rendered, count, step)]
        total += sum(pool.imap_unordered(write_copies, copies))
    content = "skimage.data" if load_sources(np.random.default_rng(seed)) else "PIL shapes"
    return {"kind": kind, "count": count, "seed": seed, "version": CORPUS_VERSION, "content": content,
            "distinct": rendered, "bytes": total, "mean_kib": round(total / max(count, 1) / 1024, 1)}


def ensure_corpus(workdir: Path, kind: str, count: int, seed: int, distinct: int = 0) -> tuple[Path, dict[str, Any]]:
    """Reuse ``workdir/kind`` if its corpus.json matches, else regenerate it."""
    folder = workdir / kind
    meta_path = workdir / f"{kind}.corpus.json"
    want = {"kind": kind, "count": count, "seed": seed, "version": CORPUS_VERSION,
            "distinct": min(count, distinct) if distinct > 0 else count}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        n_files = sum(1 for _ in folder.glob("*.jpg")) if folder.exists() else -1
        if all(meta.get(k) == v for k, v in want.items()) and n_files == count:
            return folder, meta
    t0 = time.perf_counter()
    meta = write_corpus(folder, count, kind, seed, distinct)
    meta["generated_in_s"] = round(time.perf_counter() - t0, 1)
    meta_path.write_text(json.dumps(meta, indent=1))
    return folder, meta


# ------------------------------------------------------------- checkpoint ---

def ensure_checkpoint(workdir: Path, seed: int, cr_python: Path) -> Path:
    """Full-size random ViT-B/32 checkpoint in ``workdir`` (built once)."""
    path = workdir / f"vit-b-32-seed{seed}.pt"
    if path.exists():  # make_checkpoint writes tmp + rename: exists == complete
        return path
    try:
        sys.path.insert(0, str(SCRIPTS))
        import clip  # noqa: F401  (is clip importable here?)
        from make_checkpoint import make_checkpoint
    except ImportError:
        cmd = [str(cr_python), str(SCRIPTS / "make_checkpoint.py"), "vit-b-32", str(path),
               "--seed", str(seed)]
        subprocess.run(cmd, check=True)
        return path
    return make_checkpoint("vit-b-32", path, seed=seed)


# ---------------------------------------------------------------- running ---

LAST_GPU: dict[str, Any] = {}  # GPU utilisation during the last run_timed (cuda runs)
RUN_TIMEOUT_S = [0.0]  # --run-timeout: a run still going then is dumped (py-spy, when there) and killed


def gpu_sampler(samples: list[tuple[float, float, float]]) -> subprocess.Popen | None:
    """nvidia-smi every 100 ms: (time, utilization.gpu %, memory.used MiB) appended by a reader thread."""
    import threading

    if not shutil.which("nvidia-smi"):
        return None
    proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                             "--format=csv,noheader,nounits", "-lms", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def read() -> None:
        for line in proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            samples.append((time.perf_counter(), util, mem))

    threading.Thread(target=read, daemon=True).start()
    return proc


def gpu_summary(samples: list[tuple[float, float, float]], t0: float, t1: float) -> dict[str, Any]:
    """Mean/median utilisation over the run and over its busy part (first to last sample above 5%)."""
    window = [s for s in samples if t0 <= s[0] <= t1]
    if not window:
        return {}
    utils = np.array([s[1] for s in window])
    busy = np.nonzero(utils > 5)[0]
    active = utils[busy[0]:busy[-1] + 1] if len(busy) else utils[:0]
    return {"samples": len(window), "util_mean_pct": round(float(utils.mean()), 1),
            "util_active_mean_pct": round(float(active.mean()), 1) if len(active) else None,
            "active_s": round(window[busy[-1]][0] - window[busy[0]][0], 2) if len(busy) else 0.0,
            "mem_max_mib": max(s[2] for s in window)}


def run_timed(cmd: list[str], env_extra: dict[str, str], log: Path) -> tuple[int, float, float]:
    """Run ``cmd`` with output to ``log``; return (rc, wall seconds, start epoch). Samples the GPU if asked."""
    env = {**os.environ, **env_extra}
    log.parent.mkdir(parents=True, exist_ok=True)
    samples: list[tuple[float, float, float]] = []
    sampler = gpu_sampler(samples) if os.environ.get("BENCH_SAMPLE_GPU") == "1" else None
    with open(log, "w") as out:
        started = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S[0] or None)
        except subprocess.TimeoutExpired:  # a hung run: its threads' stacks into the log, then kill it
            out.write(f"\n[bench] timed out after {RUN_TIMEOUT_S[0]} s\n")
            out.flush()
            if shutil.which("py-spy"):
                subprocess.run(["py-spy", "dump", "--native", "--pid", str(proc.pid)], stdout=out,
                               stderr=subprocess.STDOUT, timeout=60, check=False)
            proc.kill()
            rc = proc.wait()
        wall = time.perf_counter() - t0
    if sampler is not None:
        time.sleep(0.2)
        sampler.terminate()
    LAST_GPU.clear()
    LAST_GPU.update(gpu_summary(samples, t0, t0 + wall))
    return rc, wall, started


def log_tail(log: Path, lines: int = 15) -> str:
    """Last ``lines`` lines of a log (carriage returns turned into newlines)."""
    text = log.read_text(errors="replace").replace("\r", "\n") if log.exists() else ""
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


def anchor_command(cr_bin: Path, corpus: Path, out: Path, ckpt: Path,
                   batch: int, workers: int) -> list[str]:
    """The plain ``clip-retrieval inference`` command line for one corpus."""
    return [str(cr_bin / "clip-retrieval"), "inference",
            "--input_dataset", str(corpus), "--output_folder", str(out),
            "--input_format", "files", "--enable_text", "False",
            "--enable_metadata", "False", "--clip_model", str(ckpt),
            "--use_jit", "False", "--batch_size", str(batch),
            "--num_prepro_workers", str(workers)]


def anchor_env(device: str, batch_log: Path) -> dict[str, str]:
    """Environment for the anchor: offline hubs, no wandb, CPU by hiding GPUs."""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PNSFW_BENCH_BATCH_LOG": str(batch_log)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def steady_from_batches(batches: list[dict[str, Any]]) -> float | None:
    """Images in batches 2..n over the time from the end of batch 1 to batch n."""
    if len(batches) < 2:
        return None
    span = batches[-1]["end_time"] - batches[0]["end_time"]
    images = sum(b["sample_count"] for b in batches[1:])
    return images / span if span > 0 else None


def count_anchor_embeddings(out: Path) -> int:
    """Rows in clip-retrieval's ``img_emb/*.npy`` (memory-mapped, cheap)."""
    return sum(np.load(p, mmap_mode="r").shape[0] for p in (out / "img_emb").glob("*.npy"))


def run_anchor(args: argparse.Namespace, name: str, corpus: Path, ckpt: Path) -> dict[str, Any]:
    """Run clip-retrieval on ``corpus``; return its figures."""
    out = args.workdir / "runs" / f"{name}-anchor"
    batch_log = args.workdir / "runs" / f"{name}-anchor.batches.jsonl"
    shutil.rmtree(out, ignore_errors=True)
    batch_log.unlink(missing_ok=True)
    cmd = anchor_command(args.cr_python, corpus, out, ckpt, args.batch_size, args.workers)
    shim_cmd = [str(args.cr_python / "python"), "-c", ANCHOR_SHIM, *cmd[1:]]
    env = anchor_env(args.device, batch_log)
    log = out.with_suffix(".log")
    rc, wall, started = run_timed(shim_cmd, env, log)
    res: dict[str, Any] = {"tool": "clip-retrieval", "rc": rc, "seconds": wall, "command": cmd, "gpu": dict(LAST_GPU),
                           "launched_as": "python -c ANCHOR_SHIM (see script) + same arguments",
                           "env": {k: v for k, v in env.items() if k != "PNSFW_BENCH_BATCH_LOG"},
                           "log": str(log)}
    if rc != 0:
        return {**res, "error": log_tail(log)}
    batches = [json.loads(ln) for ln in batch_log.read_text().splitlines() if ln.strip()]
    images = count_anchor_embeddings(out)
    res.update(images=images, batches=len(batches), images_per_s=images / wall,
               steady_images_per_s=steady_from_batches(batches),
               first_batch_done_s=(batches[0]["end_time"] - started) if batches else None,
               inference_s=sum(b["inference_duration"] for b in batches),
               read_wait_s=sum(b["read_duration"] for b in batches))
    return res


def ours_command(args: argparse.Namespace, corpus: Path, store: Path, ckpt: Path,
                 summary: Path, pnsfw: Path | None = None) -> list[str]:
    """The ``pnsfw index`` command line for one corpus (through `pnsfw`, else --pnsfw)."""
    trace = ["--log-level", "debug"] if args.trace else []  # the start-up timeline in the run's log
    return [str(pnsfw or args.pnsfw), *trace, "index", str(corpus), "--store", str(store),
            "--model", str(ckpt), "--device", args.device,
            "--batch-size", str(args.batch_size), "--workers", str(args.workers),
            "--summary-json", str(summary)] + (["--no-faiss"] if args.no_faiss else [])


PHASE = re.compile(r"\] +([0-9.]+) s  (.+) \(([^)]*)\)$", re.M)  # a timeline line: seconds, phase, thread


TOWER_VARIANTS = {"bf16": "bf16-autocast", "fp32": "fp32"}  # pnsfw's CPU precision -> bench_tower's variant


def tower_ceiling(args: argparse.Namespace, ckpt: Path, log: Path) -> dict[str, Any]:
    """The image tower alone (bench_tower.py, a process of its own) at the pipeline's batch and precision."""
    from pnsfw.indexer.encoder import resolve_precision

    variant = TOWER_VARIANTS[resolve_precision("auto", "cpu")]
    out = log.with_suffix(".tower.json")
    cmd = [sys.executable, str(REPO / "scripts" / "bench_tower.py"), str(ckpt), "--batch", str(args.batch_size),
           "--threads", str(len(os.sched_getaffinity(0))), "--variants", variant, "--out", str(out)]
    rc, _, _ = run_timed(cmd, {}, log)
    if rc != 0:
        return {"error": log_tail(log)}
    figures = json.loads(out.read_text())["results"][variant]
    return {"variant": variant, "batch": args.batch_size, "images_per_s": figures["images_per_s"]}


def run_ours(args: argparse.Namespace, name: str, corpus: Path, ckpt: Path,
             variant: str = "", repeat: int = 1, baseline: bool = False) -> dict[str, Any]:
    """Run ``pnsfw index`` into a fresh store; return its figures (variant: extra options, 'gpu-tower=reference';
    repeat: the how-manyth run of this variant; baseline: through --baseline instead of --pnsfw)."""
    tag = "base" if baseline else "ours"
    tag += f"{'-' + ''.join(c if c.isalnum() else '-' for c in variant).strip('-') if variant else ''}"
    tag += f"-{repeat}" if repeat > 1 else ""
    store = args.workdir / "runs" / f"{name}-{tag}-store"
    summary = args.workdir / "runs" / f"{name}-{tag}.summary.json"
    stats = args.workdir / "runs" / f"{name}-{tag}.stages.json"
    shutil.rmtree(store, ignore_errors=True)
    summary.unlink(missing_ok=True)
    binary = args.baseline if baseline else args.pnsfw
    cmd = ours_command(args, corpus, store, ckpt, summary, binary)
    log = args.workdir / "runs" / f"{name}-{tag}.log"
    if not Path(binary).exists():
        return {"tool": "pnsfw", "rc": None, "command": cmd, "error": f"{binary} not found"}
    cmd += [word if word.startswith("-") else f"--{word}" for word in variant.split()]  # argparse-safe form
    cmd += ["--stage-stats", str(stats)] if args.device == "cuda" else []
    ceiling = tower_ceiling(args, ckpt, log.with_suffix(".tower.log")) if args.tower_ceiling and not baseline else None
    rc, wall, _ = run_timed(cmd, {}, log)
    tool = f"pnsfw{' (baseline)' if baseline else ''}{' ' + variant if variant else ''}"
    res: dict[str, Any] = {"tool": tool, "rc": rc, "seconds": wall,
                           "command": cmd, "log": str(log), "gpu": dict(LAST_GPU)}
    if ceiling is not None:
        res["tower_ceiling"] = ceiling
    if stats.exists():
        res["stages"] = json.loads(stats.read_text())
    text = log.read_text(errors="replace") if log.exists() else ""
    res["timeline"] = [[float(m.group(1)), m.group(2)] for m in PHASE.finditer(text)]  # with --trace
    marks = {phase: when for when, phase in res["timeline"]}
    if "first batch encoded" in marks:
        res["first_batch_encoded_s"] = marks["first batch encoded"]
    if "last commit" in marks:  # the process's exit after it (the interpreter's teardown: shutdown.py)
        res["exit_after_last_commit_s"] = round(wall - marks["last commit"], 3)
        if "last batch encoded" in marks:  # the final commit, which the run waits for
            res["final_commit_s"] = round(marks["last commit"] - marks["last batch encoded"], 3)
    if rc != 0:
        return {**res, "error": log_tail(log)}
    try:
        data = json.loads(summary.read_text())
    except (OSError, ValueError) as exc:
        return {**res, "error": f"no usable --summary-json: {exc}"}
    images = int(data.get("indexed", 0))
    return {**res, "images": images, "images_per_s": images / wall,
            "steady_images_per_s": data.get("steady_images_per_s"),
            "late_images_per_s": data.get("late_images_per_s"), "summary": data}


# ----------------------------------------------------------- machine info ---

PROBE = """\
import json, platform, sys, importlib.metadata as md
out = {"python": platform.python_version(), "executable": sys.executable, "versions": {}}
for d in sys.argv[1:]:
    try: out["versions"][d] = md.version(d)
    except md.PackageNotFoundError: pass
try:
    import torch
    out["torch_threads"] = torch.get_num_threads()
    out["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
except Exception as e:
    out["torch_error"] = repr(e)
print(json.dumps(out))
"""


def probe_python(python: Path, dists: list[str], env_extra: dict[str, str]) -> dict[str, Any]:
    """Versions of ``dists`` and the GPUs torch sees, as ``python`` reports them."""
    if not python.exists():
        return {"error": f"{python} not found"}
    proc = subprocess.run([str(python), "-c", PROBE, *dists], capture_output=True, text=True,
                          env={**os.environ, **env_extra}, timeout=300)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": proc.stderr[-2000:]}


def cpu_info() -> dict[str, Any]:
    """CPU model, core counts, AMX flags and RAM from /proc (Linux)."""
    info: dict[str, Any] = {"machine": platform.machine(), "logical_cpus": os.cpu_count(),
                            "usable_cpus": len(os.sched_getaffinity(0))}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name":
                info["cpu_model"] = val.strip()
            elif key.strip() == "flags":
                info["amx"] = sorted(f for f in val.split() if f.startswith("amx"))
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["ram_gib"] = round(int(mem[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """Everything about the machine and software the figures depend on."""
    env = {"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}
    info: dict[str, Any] = {"host": platform.node(), "os": platform.platform(), **cpu_info(),
                            "bench_python": platform.python_version()}
    if not args.skip_anchor:
        info["anchor_env"] = probe_python(args.cr_python / "python", [
            "torch", "torchvision", "clip-retrieval", "clip-anytorch", "open-clip-torch",
            "numpy", "pillow"], env)
    if not args.skip_ours:
        info["ours_env"] = probe_python(Path(args.pnsfw).parent / "python", [
            "pnsfw", "torch", "torchvision", "clip-anytorch", "numpy", "pillow", "pyarrow"], {})
    probe = info.get("anchor_env") or info.get("ours_env") or {}
    info["gpus_seen_by_torch"] = probe.get("cuda")
    return info


# ---------------------------------------------------------------- reports ---

def fmt(value: Any, spec: str = ".1f") -> str:
    """Format a number, or '-' for None."""
    return "-" if value is None else format(value, spec)


def ratio(ours: dict[str, Any], anchor: dict[str, Any], key: str) -> float | None:
    """ours[key] / anchor[key], or None when either is missing."""
    a, o = anchor.get(key), ours.get(key)
    return o / a if a and o is not None else None


def table_rows(results: dict[str, dict[str, Any]]) -> Iterator[list[str]]:
    """One row per (corpus, tool) run."""
    for corpus, runs in results.items():
        anchor, _ours = runs.get("anchor", {}), runs.get("ours", {})
        for key, res in runs.items():
            if "error" in res:
                yield [corpus, res["tool"], "FAILED", f"rc={res.get('rc')}", *[""] * 9]
                continue
            is_ours = key.startswith("ours")
            yield [corpus, res["tool"], str(res["images"]), fmt(res["seconds"]),
                   fmt(res["images_per_s"]), fmt(res.get("steady_images_per_s")),
                   fmt(res.get("late_images_per_s")), fmt(res.get("first_batch_encoded_s"), ".2f"),
                   fmt(res.get("final_commit_s"), ".2f"), fmt(res.get("exit_after_last_commit_s"), ".2f"),
                   fmt(ratio(res, anchor, "images_per_s"), ".2f") if is_ours else "",
                   fmt(ratio(res, anchor, "steady_images_per_s"), ".2f") if is_ours else "",
                   fmt(res.get("gpu", {}).get("util_active_mean_pct"))]


def print_table(results: dict[str, dict[str, Any]]) -> None:
    """Print the results table, then the error of every failed run."""
    head = ["corpus", "tool", "images", "e2e s", "img/s e2e", "img/s steady", "img/s 2nd half", "first batch s",
            "final commit s", "exit s", "ours/anchor e2e", "ours/anchor steady", "GPU util %"]
    rows = [head, *table_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in
                        enumerate(zip(r, widths))))
    for corpus, runs in results.items():
        for res in runs.values():
            if "error" in res:
                print(f"\n{corpus} / {res['tool']} failed (rc={res.get('rc')}):\n{res['error']}",
                      file=sys.stderr)


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)


# ------------------------------------------------------------------- main ---

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--thumbs", type=int, default=2000, help="thumbnails in the corpus")
    ap.add_argument("--photos", type=int, default=200, help="2 MP photos in the corpus")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="for both tools (default: 64 on cpu, 256 on cuda)")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                    help="decode workers for both tools (default: usable cores)")
    ap.add_argument("--distinct", type=int, default=0,
                    help="render only this many images per corpus; the other files are copies of them, each "
                         "with a JPEG comment of its own (distinct bytes, equal decode work; 0: render all)")
    ap.add_argument("--run-timeout", type=float, default=0,
                    help="seconds after which a run is taken as hung: its stacks (py-spy dump) go to its log and "
                         "it is killed (0: no limit)")
    ap.add_argument("--skip-anchor", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pnsfw-bench"))
    ap.add_argument("--cr-python", type=Path, default=REPO / ".bench" / "cr-venv" / "bin",
                    help="bin/ folder of the clip-retrieval venv")
    ap.add_argument("--pnsfw", type=Path, default=REPO / ".venv" / "bin" / "pnsfw")
    ap.add_argument("--seed", type=int, default=0, help="corpus and checkpoint seed")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="a CLIP checkpoint for both tools instead of the full-size random ViT-B/32 (a tiny one "
                         "times the stages around the tower: the reads, the writer, the commits, the exit)")
    ap.add_argument("--no-faiss", action="store_true", help="pass --no-faiss to pnsfw (shards only)")
    ap.add_argument("--trace", action="store_true", help="run pnsfw with --log-level debug (start-up timeline)")
    ap.add_argument("--ours-variants", nargs="*", default=[""],
                    help="pnsfw runs per corpus, each with extra `pnsfw index` options without their dashes "
                         "(argparse takes no dashed values), e.g. 'gpu-tower=reference gpu-resize=thread' "
                         "('' = defaults)")
    ap.add_argument("--ours-repeats", type=int, default=1,
                    help="run the list of pnsfw variants this many times over, back to back")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a second pnsfw command (e.g. an older commit's code: scripts/baseline_pnsfw.sh): each "
                         "pnsfw run is paired with the same run through it, the pair's order alternating by "
                         "repeat (use an even --ours-repeats), and the table ends with ours / baseline")
    ap.add_argument("--tower-ceiling", action="store_true",
                    help="CPU: time the image tower alone (bench_tower.py) before each pnsfw run and report each "
                         "run's steady img/s as a share of it")
    ap.add_argument("--out", type=Path, default=Path("bench_index.json"))
    args = ap.parse_args(argv)
    if args.tower_ceiling and args.device != "cpu":
        ap.error("--tower-ceiling is for --device cpu (the GPU's stage ceilings: bench_gpu_stages.py)")
    if args.batch_size is None:
        args.batch_size = 64 if args.device == "cpu" else 1024
    if args.device == "cuda":
        os.environ["BENCH_SAMPLE_GPU"] = "1"
    args.workdir = args.workdir.resolve()
    RUN_TIMEOUT_S[0] = args.run_timeout
    return args


def ours_jobs(variant: str, repeat: int, paired: bool, skip: bool) -> list[tuple[str, Any, bool, tuple]]:
    """The pnsfw run(s) of one variant and repeat: with a baseline, both, ours first on odd repeats."""
    suffix = f"{'-' + variant if variant else ''}{f'#{repeat}' if repeat > 1 else ''}"
    jobs = [(f"ours{suffix}", run_ours, skip, (variant, repeat))]
    if paired:
        jobs.append((f"baseline{suffix}", run_ours, skip, (variant, repeat, True)))
    return jobs if repeat % 2 else jobs[::-1]


def baseline_ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Median ours / baseline over the paired runs of a corpus (e2e and steady img/s)."""
    import statistics

    pairs = [(runs[k], runs["baseline" + k[4:]]) for k in runs if k.startswith("ours") and "baseline" + k[4:] in runs]
    out: dict[str, float | None] = {}
    for key in ("images_per_s", "steady_images_per_s"):
        values = [o[key] / b[key] for o, b in pairs if o.get(key) and b.get(key)]
        out[key] = round(statistics.median(values), 3) if values else None
    return out


def ceiling_shares(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each pnsfw run's steady img/s over the tower's ceiling measured just before it, and their median."""
    import statistics

    shares = [r["steady_images_per_s"] / r["tower_ceiling"]["images_per_s"] for r in runs.values()
              if r.get("steady_images_per_s") and r.get("tower_ceiling", {}).get("images_per_s")]
    return {"runs": [round(x, 3) for x in shares], "median": round(statistics.median(shares), 3) if shares else None}


def run_all(args: argparse.Namespace, corpora: dict[str, Path], ckpt: Path,
            report: dict[str, Any]) -> None:
    """Run the selected tools on each corpus, saving the report after each run."""
    for name, corpus in corpora.items():
        runs = report["results"].setdefault(name, {})
        jobs = [("anchor", run_anchor, args.skip_anchor, ())]
        jobs += [job for r in range(1, args.ours_repeats + 1) for v in args.ours_variants
                 for job in ours_jobs(v, r, args.baseline is not None, args.skip_ours)]
        for key, func, skip, extra in jobs:
            if skip:
                continue
            print(f"[bench] {name}: {key} ...", flush=True)
            runs[key] = func(args, name, corpus, ckpt, *extra)
            r = runs[key]
            print(f"[bench] {name}: {key} rc={r.get('rc')} "
                  f"{fmt(r.get('seconds'))} s, {fmt(r.get('images_per_s'))} img/s, steady "
                  f"{fmt(r.get('steady_images_per_s'))}, first batch {r.get('first_batch_encoded_s')} s, "
                  f"stalls {r.get('stages', {}).get('hardware_stalls')}", flush=True)
            write_json(args.out, report)


def main(argv: list[str] | None = None) -> int:
    """Generate corpora, build the checkpoint, run both tools, report."""
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "argv": sys.argv, "machine": machine_info(args),
                              "settings": {k: str(v) for k, v in vars(args).items()},
                              "corpora": {}, "results": {}}
    corpora: dict[str, Path] = {}
    for kind, count in (("thumbs", args.thumbs), ("photos", args.photos)):
        if count > 0:
            print(f"[bench] corpus {kind}: {count} images in {args.workdir / kind}", flush=True)
            corpora[kind], report["corpora"][kind] = ensure_corpus(args.workdir, kind, count,
                                                                   args.seed, args.distinct)
    print("[bench] checkpoint vit-b-32 ...", flush=True)
    ckpt = args.checkpoint or ensure_checkpoint(args.workdir, args.seed, args.cr_python / "python")
    report["checkpoint"] = {"path": str(ckpt), "preset": "given" if args.checkpoint else "vit-b-32",
                            "seed": args.seed, "bytes": ckpt.stat().st_size}
    run_all(args, corpora, ckpt, report)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if args.baseline is not None:
        report["ours_over_baseline"] = {name: baseline_ratios(runs) for name, runs in report["results"].items()}
    if args.tower_ceiling:
        report["steady_over_tower_ceiling"] = {name: ceiling_shares(runs) for name, runs in report["results"].items()}
    write_json(args.out, report)
    print_table(report["results"])
    for name, ratios in report.get("ours_over_baseline", {}).items():
        print(f"{name}: ours / baseline, median of the pairs: e2e {fmt(ratios['images_per_s'], '.3f')}, "
              f"steady {fmt(ratios['steady_images_per_s'], '.3f')}")
    for name, shares in report.get("steady_over_tower_ceiling", {}).items():
        each = " ".join(fmt(x, ".3f") for x in shares["runs"])
        print(f"{name}: steady / the tower's ceiling before it, per run: {each}; median "
              f"{fmt(shares['median'], '.3f')} (DESIGN: >= 0.85)")
    print(f"\n[bench] wrote {args.out.resolve()}")
    failed = [r for runs in report["results"].values() for r in runs.values() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
