"""Measure `pnsfw import` throughput of fp16 clip-retrieval embeddings from local disk, one process.

Usage: python scripts/bench_import.py [--rows 1000000] [--parts 4] [--dim 512] [--shard-size 50000]
                                      [--unnormalised] [--folder DIR] [--profile] [--stages] [--warm]
                                      [--stage-threads N] [--map-threads N] [--hash lanes|hashlib]
                                      [--score] [--device cpu|cuda]
                                      [--out bench_import.json]

Writes a clip-retrieval folder (img_emb/img_emb_N.npy float16 + metadata/metadata_N.parquet with url and
caption), imports it into a fresh store (run_import, no FAISS index) and reports GB/s of embedding bytes read
(rows * dim * 2 / wall seconds of run_import, lazy imports included unless --warm: torch only for rows to
rescale) and rows/s. The vectors are unit
length as clip-retrieval writes them, or random normals with --unnormalised (every row rescaled). The embedding
files are in the page cache after writing (the usual case for a rerun; cold reads are bounded by the disk);
the store is written to --folder too, so put it on the disk you mean to measure. Prints a table, writes JSON.
--stages then also times each stage of one shard alone, on this thread (best of 3, us per row): what one core
costs per row whatever the machine's core count.
--score then scores the imported store with `pnsfw score`'s bulk scorer (score_store; a random 256-unit tanh
model written as a weights file, no Keras) and a store of the same rows and width written by the indexer's
writer (StoreWriter.commit_shards, 50k-row shards as `index` writes them, as bench_score.py builds its store),
interleaved (the order alternating), --score-runs each; reports vectors/s of both, their ratio, and whether
their shards are the same bytes (they are at the same shard size: same sha256 in both manifests).
"""

import argparse
import cProfile
import inspect
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_folder(root: Path, rows: int, parts: int, dim: int, normalised: bool) -> int:
    """The clip-retrieval layout; returns the embedding bytes written."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    rng = np.random.default_rng(0)
    per, total = rows // parts, 0
    for n in range(parts):
        x = rng.standard_normal((per, dim), dtype=np.float32)
        x = (x / np.linalg.norm(x, axis=1, keepdims=True) if normalised else x).astype(np.float16)
        np.save(root / "img_emb" / f"img_emb_{n}.npy", x)
        total += x.nbytes
        ids = np.arange(n * per, (n + 1) * per)
        urls = pa.array([f"https://example.com/images/{i:09d}.jpg" for i in ids])
        captions = pa.array([f"a photo number {i}" for i in ids])
        pq.write_table(pa.table({"url": urls, "caption": captions}), root / "metadata" / f"metadata_{n}.parquet")
    return total


def run(folder: Path, store: Path, shard_size: int, profile: bool, stage_threads: int = 0,
        tuning: dict[str, object] | None = None) -> tuple[float, float, object, list[str]]:
    from pnsfw.indexer.importer import ImportOptions, run_import

    options = ImportOptions(shard_size=shard_size, stage_threads=stage_threads, **(tuning or {}))
    profiler = cProfile.Profile() if profile else None
    start, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    summary = run_import([str(folder)], store, options)
    if profiler:
        profiler.disable()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    top: list[str] = []
    if profiler:
        stats = pstats.Stats(profiler).sort_stats("tottime")
        for func, (_, _, tottime, _, _) in list(stats.stats.items()):  # type: ignore[attr-defined]
            top.append((tottime, f"{func[2]} ({os.path.basename(func[0])}:{func[1]})"))
        top = [f"{t:7.2f} s  {name}" for t, name in sorted(top, reverse=True)[:8]]
    return seconds, cpu, summary, top


def best_of(work: object, repeat: int = 5) -> tuple[float, float]:
    """(least wall seconds, least CPU seconds of the process) of `repeat` calls: on a shared machine the CPU
    time is what the stage costs, the wall time what it took beside the others' work."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        work()  # type: ignore[operator]
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def stages(folder: Path, work: Path, shard_size: int, dim: int) -> dict[str, object]:
    """Microseconds per row (wall, CPU) of each stage of one shard (the first part's first rows), one thread."""
    from pnsfw.indexer.import_layouts import open_units
    from pnsfw.indexer.importer import map_chunk
    from pnsfw.indexer.projection import make_projection
    from pnsfw.indexer.unitvec import unit_rows
    from pnsfw.store import shards
    from pnsfw.store.files import fsync, sha256_file

    unit = open_units([str(folder)], "auto", None, None)[0]
    chunks = list(unit.read(0, min(65_536, shard_size)))
    rows = sum(c.metadata.num_rows for c in chunks)
    none = make_projection("none", dim, np.zeros((1, dim), np.float32), 0)
    table = pa.concat_tables([map_chunk(c, unit, dim, none)[0] for c in chunks])
    table = table.add_column(0, "id", pa.array(np.arange(rows, dtype=np.int64)))
    shard = shards.normalize_rows(table, dim)
    path = work / "stage.parquet"
    seconds: dict[str, tuple[float, float]] = {
        "read .npy + metadata": best_of(lambda: list(unit.read(0, min(65_536, shard_size)))),
        "validate + normalise (unit_rows)": best_of(lambda: [unit_rows(c.embeddings) for c in chunks]),
        "map_chunk (unit_rows + columns)": best_of(lambda: [map_chunk(c, unit, dim, none) for c in chunks]),
        "uri_hash": best_of(lambda: shards.uri_hash(table.column("uri"))),
        "normalize_rows (uri_hash + schema)": best_of(lambda: shards.normalize_rows(table, dim)),
        "parquet write (shards.write_table)": best_of(lambda: shards.write_table(shard, path)),
        "sha256 of the shard file": best_of(lambda: sha256_file(path)),
        "parquet write + fsync": best_of(lambda: (shards.write_table(shard, path), fsync(path))),  # type: ignore
    }
    if "lanes" in inspect.signature(shards.uri_hash).parameters:  # this branch: hashlib's cost beside the lanes'
        seconds["uri_hash, hashlib (lanes=False)"] = best_of(lambda: shards.uri_hash(table.column("uri"), lanes=False))
    code = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
    torch_s = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    per_row = {k: {"wall": round(w / rows * 1e6, 3), "cpu": round(c / rows * 1e6, 3)} for k, (w, c) in seconds.items()}
    return {**per_row, "rows": rows, "import torch (s, a fresh process)": round(torch_s, 2)}


def random_model(store_root: Path, name: str = "bench", units: int = 256) -> None:
    """A [BatchNorm -> Dense(tanh) -> Dense(sigmoid)] model with random weights, saved as training saves it."""
    from pnsfw.classifier.model import model_paths
    from pnsfw.classifier.weights import save_weights
    from pnsfw.store import Store
    from pnsfw.store.artifacts import ModelStage

    store = Store.open(store_root)
    rng, dim = np.random.default_rng(7), store.dim
    layers = [{"kind": "batchnorm", "gamma": np.ones(dim), "beta": np.zeros(dim), "mean": np.zeros(dim),
               "var": np.full(dim, 1.0 / dim), "epsilon": 1e-3},
              {"kind": "dense", "kernel": rng.standard_normal((dim, units)) / np.sqrt(dim), "bias": np.zeros(units),
               "activation": "tanh"},
              {"kind": "dense", "kernel": rng.standard_normal((units, 1)) / np.sqrt(units), "bias": np.zeros(1),
               "activation": "sigmoid"}]
    staged = ModelStage(store, name)
    paths = model_paths(staged.folder, name)
    save_weights(paths["weights"], layers)
    meta = {"name": name, "classes": ["nsfw", "sfw"], "nsfw_classes": ["nsfw"], "threshold": 0.5,
            "space": store.space, "dim": dim}
    paths["meta"].write_text(json.dumps(meta))
    staged.commit()


def writer_copy(imported: Path, target: Path, shard_rows: int = 50_000) -> dict[str, object]:
    """The imported store's rows (ids, uris, vectors, metadata) rewritten by StoreWriter in the indexer's shards."""
    from pnsfw.store import Store

    source = Store.open(imported)
    names = pq.read_schema(Path(imported) / "shards" / source.shards[0].name).names
    table = source.table([n for n in names if n != "uri_hash"])  # the writer hashes the uris itself
    with Store(target).writer() as writer:
        writer.set_space(dict(source.encoder), source.projection())
        writer.commit_shards([table.slice(i, shard_rows) for i in range(0, table.num_rows, shard_rows)],
                             threads=os.cpu_count() or 1)
    copy = Store.open(target)
    return {"shards": len(copy.shards), "rows": copy.rows}


def _same_files(imported: Path, copy: Path) -> bool:
    """Whether the two stores' shards are byte for byte the same files (sha256 and size in the manifests)."""
    from pnsfw.store import Store

    def digests(root: Path) -> list[tuple[str, int]]:
        return [(s.sha256, s.bytes) for s in Store.open(root).shards]

    return digests(imported) == digests(copy)


def score_both(imported: Path, work: Path, device: str, runs: int) -> dict[str, object]:
    """score_store vectors/s on the imported store and on its StoreWriter copy, interleaved, best of `runs`."""
    from pnsfw.classifier.scoring import score_store, scores_of
    from pnsfw.store import Store

    copy = work / "writer-store"
    shutil.rmtree(copy, ignore_errors=True)
    layout = {"imported": {"shards": len(Store.open(imported).shards)}, "writer": writer_copy(imported, copy)}
    stores = {"imported": imported, "writer": copy}
    for root in stores.values():
        random_model(root)
    rates: dict[str, list[float]] = {name: [] for name in stores}
    for run in range(runs):  # the order alternates: the first store of a pair ran slower on the VM, both alike
        for name, root in (list(stores.items()) if run % 2 == 0 else list(stores.items())[::-1]):
            store = Store.open(root)
            store.fs.delete(scores_of(store, "bench").folder)
            summary = score_store(root, "bench", device=device, engine="auto")
            rates[name].append(round(summary.vectors_per_s))
    best = {name: max(values) for name, values in rates.items()}
    same = _same_files(imported, copy)
    return {"device": device, "runs": rates, "best_vectors_per_s": best, "layout": layout, "same_shard_bytes": same,
            "imported_over_writer": round(best["imported"] / best["writer"], 3)}


def variants(args: argparse.Namespace) -> None:
    """Swap one round-3 change back for an A/B run in one process (code of this branch only)."""
    if args.numpy_chunks:
        from pnsfw.indexer import import_layouts

        import_layouts.pooled_empty = lambda shape, dtype: np.empty(shape, dtype)  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=50_000)  # `pnsfw import`'s default
    parser.add_argument("--unnormalised", action="store_true", help="Random normal rows, not unit length.")
    parser.add_argument("--folder", default=None, help="Work folder (default: a temporary one, removed).")
    parser.add_argument("--profile", action="store_true", help="Also print the top functions by own time.")
    parser.add_argument("--stages", action="store_true", help="Also time each stage of one shard alone.")
    parser.add_argument("--warm", action="store_true",
                        help="Time a second import in the same process (the first into a scratch store): the "
                             "steady rate of a long import, without torch's start-up and first-touch page faults.")
    parser.add_argument("--stage-threads", type=int, default=0, help="Shard-writing threads (0: the default).")
    parser.add_argument("--score", action="store_true", help="Also score the imported store and a StoreWriter copy.")
    parser.add_argument("--score-runs", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="Scoring device for --score (cpu, cuda).")
    parser.add_argument("--keep-folder", action="store_true", help="Leave the clip-retrieval folder (--folder).")
    parser.add_argument("--numpy-chunks", action="store_true",
                        help="Variant: read chunks into fresh numpy arrays, not Arrow's pool (as before round 3).")
    parser.add_argument("--map-threads", type=int, default=0, help="Mapper threads (0: the default).")
    parser.add_argument("--hash", choices=["default", "lanes", "hashlib"], default="default",
                        help="How the mappers compute uri_hash (default: the importer's choice).")
    parser.add_argument("--lanes", type=int, default=0, help="urihash.LANES for this run (0: as it is).")
    parser.add_argument("--out", default="bench_import.json")
    args = parser.parse_args()
    tuning: dict[str, object] = {"map_threads": args.map_threads} if args.map_threads else {}
    if args.lanes:
        from pnsfw.store import urihash

        urihash.LANES = args.lanes
    if args.hash != "default":
        tuning["hash_lanes"] = args.hash == "lanes"
    variants(args)
    work = Path(args.folder or tempfile.mkdtemp(prefix="bench_import_"))
    try:
        laion = work / "laion"
        if (laion / "img_emb").is_dir() and args.keep_folder:
            total = sum(np.load(f, mmap_mode="r").nbytes for f in (laion / "img_emb").glob("*.npy"))
        else:
            total = write_folder(laion, args.rows, args.parts, args.dim, not args.unnormalised)
        shutil.rmtree(work / "store", ignore_errors=True)
        if args.warm:  # a first import into a scratch store: torch loaded, the process's memory grown
            run(laion, work / "warm-up", args.shard_size, False, args.stage_threads, tuning)
            shutil.rmtree(work / "warm-up")
        seconds, cpu, summary, top = run(laion, work / "store", args.shard_size, args.profile, args.stage_threads,
                                         tuning)
        rows = summary.imported
        result = {"rows": rows, "dim": args.dim, "parts": args.parts, "shard_size": args.shard_size,
                  "embedding_bytes": total, "unit_length": not args.unnormalised, "warm": args.warm,
                  "stage_threads": args.stage_threads, "tuning": tuning, "lanes": args.lanes,
                  "loadavg_1m_after": os.getloadavg()[0],
                  "folder": str(work), "seconds": round(seconds, 3), "gb_per_s": round(total / seconds / 1e9, 3),
                  "rows_per_s": round(rows / seconds),
                  "cpu_seconds": round(cpu, 3), "cpu_us_per_row": round(cpu / rows * 1e6, 3),
                  "failed": summary.failed, "cpus": os.cpu_count(),
                  "machine": platform.processor() or platform.machine(), "python": platform.python_version()}
        print(f"{'rows':>10}  {'dim':>4}  {'GB':>6}  {'seconds':>8}  {'GB/s':>6}  {'rows/s':>10}  {'CPU us/row':>10}")
        print(f"{rows:>10,}  {args.dim:>4}  {total / 1e9:>6.2f}  {seconds:>8.2f}  {result['gb_per_s']:>6.2f}  "
              f"{result['rows_per_s']:>10,}  {result['cpu_us_per_row']:>10}")
        for line in top:
            print(line)
        if args.stages:
            result["stages_us_per_row"] = stages(work / "laion", work, args.shard_size, args.dim)
            print(f"{'wall us':>9}  {'CPU us':>9}  per row, one shard")
            for name, value in result["stages_us_per_row"].items():
                wall, cpu = (value["wall"], value["cpu"]) if isinstance(value, dict) else (value, "")
                print(f"{wall:>9}  {cpu:>9}  {name}")
        if args.score:
            result["score"] = score_both(work / "store", work, args.device, args.score_runs)
            print(json.dumps(result["score"]))
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if not args.folder:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
