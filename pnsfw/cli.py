"""The `pnsfw` command line: each command parses options and calls one function of a stage."""

import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import Interrupted, PnsfwError
from .indexer.timeline import mark, since_process_start

IMPORTED_AT = since_process_start()  # the interpreter's start-up and this module's imports, for the timeline

STORE = click.option("--store", required=True, envvar="PNSFW_STORE", type=click.Path(file_okay=False),
                     help="The store folder (env PNSFW_STORE).")
MODEL = click.option("--model", default="ViT-B/32", envvar="PNSFW_MODEL", show_default=True,
                     help="CLIP model name (downloaded once) or a checkpoint file (env PNSFW_MODEL).")
DEVICE = click.option("--device", default="auto", show_default=True,
                      type=click.Choice(["auto", "cpu", "cuda"]), help="auto: CUDA when torch sees a GPU.")


class _Parsed(click.ParamType):
    """An option value parsed by one of pnsfw.store.sizes' parsers ("50k", "16G", "90s"), imported when a value
    is parsed: importing the store (pyarrow, numpy) takes most of a second, too long for start-up and --help."""

    def __init__(self, name: str, parser: str):
        self.name, self.parser = name, parser

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from .store import sizes

        try:
            return getattr(sizes, self.parser)(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE, DURATION = _Parsed("size", "parse_size"), _Parsed("duration", "parse_duration")


LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]


def configure_logging(level: str) -> None:
    """The `pnsfw` logger (and its children) to stderr at `level`; idempotent."""
    logger = logging.getLogger("pnsfw")
    for handler in [h for h in logger.handlers if getattr(h, "pnsfw_cli", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pnsfw %(levelname)s [%(name)s] %(message)s"))
    handler.pnsfw_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


FORCED_EXIT_S = 5.0  # a signalled process that has not unwound by then (stuck in a C call) exits anyway
_process: dict[str, bool] = {"own": False}  # True when main() runs the process (not an in-process CliRunner)


def _force_exit(signum: int) -> None:
    """The last resort of an interrupt: the main thread has not unwound in FORCED_EXIT_S (it is inside one long
    C call); committed rows are durable, so end the process here with the same one line and exit code."""
    if not _interrupted:
        name = signal.Signals(signum).name
        print(f"Interrupted by {name}: stopped (forced after {FORCED_EXIT_S:g} s); committed rows are kept; rerun "
              f"the same command to go on", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def _raise_interrupted(signum: int, frame: Any) -> None:
    if _process["own"]:
        import threading

        timer = threading.Timer(FORCED_EXIT_S, _force_exit, (signum,))
        timer.daemon = True
        timer.start()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum)


def _sigterm_raises() -> AbstractContextManager[None]:
    """SIGTERM unwinds like Ctrl-C (so commands stop cleanly) while a command runs in the main thread."""
    from .concurrency import stop_signals_handled

    return stop_signals_handled(_raise_interrupted)


class _Group(click.Group):
    """Domain errors as one-line `Error: ...` messages with exit code 1 (--debug: with the traceback);
    SIGINT/SIGTERM as one line saying how far the command got, exit 128 + signal."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with _sigterm_raises():
                return super().invoke(ctx)
        except PnsfwError as exc:
            if ctx.params.get("debug"):
                import traceback

                traceback.print_exception(exc, file=sys.stderr)
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            _stopped(Interrupted(signal.SIGINT))
        except Interrupted as exc:
            _stopped(exc)


_interrupted: list[int] = []  # set when a command was stopped by a signal (main() then exits at once)


def _stopped(exc: Interrupted) -> None:
    progress = exc.progress or "stopped; what was committed is kept, rerun the same command to go on"
    click.echo(f"Interrupted by {signal.Signals(exc.signum).name}: {progress}", err=True)
    _interrupted.append(exc.signum)
    raise click.exceptions.Exit(128 + exc.signum)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pnsfw")
@click.option("-v", "--verbose", count=True, help="Diagnostics of the `pnsfw` logger: -v info, -vv debug.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default=None,
              help="Level of the `pnsfw` logger (default warning; overrides -v). debug includes the timeline "
                   "of an index run's start-up.")
@click.option("--debug", is_flag=True, help="Show the traceback of a domain error (and debug logging).")
def cli(verbose: int, log_level: str | None, debug: bool) -> None:
    """Index images into a searchable, NSFW-scored CLIP embedding store.

    \b
    Example:
      pnsfw index photos/ --store store/
      pnsfw train --store store/ --labels folders
      pnsfw score --store store/ --model default
      pnsfw search --store store/ --text "a beach" -k 5
      pnsfw -v --debug index photos/ --store store/
    """
    configure_logging(log_level or ("debug" if debug or verbose > 1 else "info" if verbose else "warning"))


def _gpu_option_list() -> list[Callable[[Any], Any]]:
    from .indexer.gpu.options import COMPILES, DECODERS, FIRST_UNITS, PRIORITIES, RESIZES, STREAMS, TOWERS

    return [
        click.option("--gpu-workers", default=0, type=int,
                     help="Device worker processes, one per GPU (0: one per visible GPU for --device cuda/auto)."),
        click.option("--gpu-cpu-share", default=0, type=click.IntRange(min=-1),
                     help="GPU path: at most this many images of each batch decode on the CPU workers beside the "
                          "GPU, sized by how long the encoder waits for them (-1: up to half a batch; 0: only "
                          "the files the GPU cannot decode, fastest on an H200)."),
        click.option("--gpu-decode-threads", default=0, type=click.IntRange(min=0),
                     help="GPU path: threads feeding the device JPEG decoder (0: four with nvJPEG, large images "
                          "on at most as many as GPU memory allows; with --gpu-decoder engines two for thumbnails; "
                          "one with torchvision)."),
        click.option("--gpu-sm-decoders", default=0, type=click.IntRange(min=0),
                     help="GPU path, experiment: this many more decode threads whose nvJPEG handles decode on the "
                          "SMs (its GPU_HYBRID backend) beside the JPEG engines' threads, with --gpu-decoder engines."),
        click.option("--gpu-tower-sms", default=0, type=click.IntRange(min=0),
                     help="GPU path: run the image tower on this many SMs (a CUDA green context), leaving the "
                          "rest to the JPEG decode's kernels (0: every SM)."),
        # the choice options; the first value of each is its default, as in GpuOptions
        *(click.option(flag, dest, default=values[0], show_default=True, type=click.Choice(values), help=text)
          for flag, dest, values, text in (
            ("--gpu-decoder", "gpu_decoder", DECODERS,
             "GPU path: auto (nvJPEG through handles of our own, four decode threads: thumbnails on its GPU_HYBRID "
             "backend, the SMs, larger images on the hardware JPEG engines; through torchvision.io when nvJPEG "
             "is missing or refuses a file; else the CPU workers), engines (every image on the JPEG engines, two "
             "threads for thumbnails), sm (an experiment: every image on GPU_HYBRID) or torchvision."),
            ("--gpu-resize", "gpu_resize", RESIZES,
             "GPU path, experiment: where the batched resize runs (auto: the decode thread for small images, the "
             "encoding thread for large ones)."),
            ("--gpu-tower", "gpu_tower", TOWERS,
             "GPU path: fast (SDPA attention, fp16 LayerNorm, patch GEMM, full batches from a CUDA graph), eager "
             "(the same launched op by op) or reference (CLIP's own modules at fp16)."),
            ("--gpu-encode-stream", "gpu_encode_stream", STREAMS,
             "GPU path, experiment: the CUDA stream the image tower runs on (own: a stream of its own; default: "
             "CUDA's legacy default stream, as before round 5)."),
            ("--gpu-decode-priority", "gpu_decode_priority", PRIORITIES,
             "GPU path, experiment: the decode threads' CUDA stream priority against the tower's (high: the "
             "decode's and resize's kernels go ahead of the tower's; low: the tower's go ahead)."),
            ("--gpu-first-unit", "gpu_first_unit", FIRST_UNITS,
             "GPU path, experiment: where the first batch's images decode (device; cpu: the worker processes, "
             "while the device's decoders are made)."),
            ("--compile", "gpu_compile", COMPILES,
             "torch.compile the image tower, its kernels cached in ~/.cache/pnsfw/inductor and, with "
             "--gpu-tower fast, replayed from the tower's CUDA graph (auto: for jobs known to hold 50M images or "
             "more, where a cold compile of ~4 min pays back; a listing of unknown size, as here, compiles "
             "nothing; on: always; off: never)."))),
        click.option("--stage-stats", type=click.Path(dir_okay=False),
                     help="GPU path: write each stage's busy seconds as JSON here."),
        click.option("--gpu-profile", type=click.Path(dir_okay=False),
                     help="GPU path, diagnostics: profile 8 batches (from the 21st) with torch.profiler and write "
                          "each CUDA stream's GPU time as JSON here (the Chrome trace beside it)."),
    ]


def _with_gpu_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The --gpu-* options of `pnsfw index` (their choices come from the GPU path, imported without torch)."""
    for option in reversed(_gpu_option_list()):
        command = option(command)
    return command


def gpu_options(gpu_workers: int, gpu_cpu_share: int, gpu_decode_threads: int, gpu_sm_decoders: int,
                gpu_tower_sms: int, gpu_decoder: str, gpu_resize: str,
                gpu_tower: str, gpu_encode_stream: str, gpu_decode_priority: str,
                gpu_first_unit: str, gpu_compile: str, stage_stats: "str | None", gpu_profile: "str | None") -> Any:
    """The GpuOptions of `pnsfw index`'s --gpu-* options."""
    from .indexer.gpu.options import GpuOptions

    return GpuOptions(workers=gpu_workers, cpu_share=gpu_cpu_share, decode_threads=gpu_decode_threads,
                      sm_decoders=gpu_sm_decoders, tower_sms=gpu_tower_sms,
                      decoder=gpu_decoder, resize=gpu_resize, tower=gpu_tower, encode_stream=gpu_encode_stream,
                      decode_priority=gpu_decode_priority, first_unit=gpu_first_unit,
                      compile=gpu_compile, stage_stats=stage_stats, profile=gpu_profile)


RAY_LOCAL = "local"
RAY = click.option("--ray", "ray_address", default=None, is_flag=False, flag_value=RAY_LOCAL, metavar="[ADDRESS]",
                   help="Run on Ray: alone, a new local Ray; with ADDRESS (host:port or ray://host:port), join "
                        "that cluster. Rows and ids equal a local run.")
ACTORS = click.option("--actors", default=0, show_default=True, type=click.IntRange(0),
                      help="With --ray: actors (0: one per GPU of the cluster, else one per 2 CPUs).")


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@STORE
@click.option("--model", default=None, envvar="PNSFW_MODEL",
              help="CLIP model name (downloaded once) or a checkpoint file (env PNSFW_MODEL). Default: the "
                   "store's own encoder, or ViT-B/32 for a new store.")
@DEVICE
@click.option("--batch-size", default=0, type=int, help="Images per forward pass (0: 64 on CPU, 1024 on CUDA).")
@click.option("--workers", default=0, type=int, help="Decode processes (0: one per core; -1: none, decode inline).")
@click.option("--reader", default="auto", show_default=True, type=click.Choice(["auto", "pil", "tensor"]),
              help="pil: PIL decode in the worker processes; tensor: decode/resize on the device (nvJPEG on "
                   "CUDA); auto: tensor on CUDA, pil on CPU.")
@click.option("--shard-size", default="50k", type=SIZE, show_default=True, help="Rows per shard at most.")
@click.option("--commit-every", default="60s", type=DURATION, show_default=True,
              help="Commit a shard at least this often, so a crash loses little.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="auto: fp16 on CUDA, bf16 on CPUs with AMX/AVX512-BF16, else fp32.")
@click.option("--projection", default=None,
              help="random (seeded orthogonal to 256-d; default for a new store), pca (fitted on the first "
                   "--pca-rows), none (the raw CLIP width: 512 for B/32, 768 for L/14), or a .npy file. An "
                   "existing store keeps its own.")
@click.option("--pca-rows", default="10k", type=SIZE, show_default=True, help="Rows the PCA projection is fitted on.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random projection.")
@click.option("--max-pixels", default="89M", type=SIZE, show_default=True,
              help="Larger images are refused as decompression bombs.")
@click.option("--timeout", default="10s", type=DURATION, show_default=True,
              help="Total time per URL (connect, headers and body); slower ones become `timeout` error rows.")
@click.option("--max-download", default="20M", type=SIZE, show_default=True,
              help="Largest body fetched per URL; larger ones become `too_large` error rows.")
@click.option("--uri-column", default=None,
              help="Column of Parquet/CSV sources holding the paths or URLs (default: uri, url or image_path); "
                   "their other columns are kept as metadata.")
@click.option("--retry-errors", is_flag=True, help="Try the uris of earlier error rows again.")
@click.option("--no-faiss", is_flag=True, help="Do not build/update the FAISS index.")
@click.option("--summary-json", type=click.Path(dir_okay=False), help="Also write the summary as JSON here.")
@_with_gpu_options
@RAY
@ACTORS
def index(sources: tuple[str, ...], store: str, model: str | None, device: str, batch_size: int, workers: int,
          reader: str, shard_size: int, commit_every: float, precision: str, projection: str, pca_rows: int,
          seed: int, max_pixels: int, timeout: float, max_download: int, uri_column: str | None,
          retry_errors: bool, no_faiss: bool, summary_json: str, ray_address: str | None, actors: int,
          **gpu: Any) -> None:
    """Embed images from SOURCEs into the store (resumable and incremental).

    SOURCE is a folder (walked recursively), a .txt list of paths or http(s)/file:// URLs, a webdataset
    .tar (.txt/.json/.cls members become caption/json/cls columns), a .parquet or .csv file with a uri
    column (other columns kept), or one image. Files already in the store are skipped; entries that cannot
    be used become rows of STORE/errors/ with a reason. Ctrl-C or SIGTERM stops within seconds, keeping
    what was committed; the same command then continues.

    \b
    Example:
      pnsfw index dataset/ urls.txt --store store/ --model ViT-B/32
      pnsfw index laion.parquet --store store/ --uri-column url --timeout 5s --max-download 10M
    """
    from .indexer.pipeline import IndexOptions, run_index
    from .search.index import update_index

    mark("pnsfw's command line imported", at=IMPORTED_AT)
    mark("pnsfw index started")

    options = IndexOptions(model=model, device=device, precision=precision, batch_size=batch_size,
                           workers=workers, shard_size=max(1, shard_size), commit_interval=commit_every,
                           projection=projection, pca_rows=pca_rows, seed=seed, max_pixels=max_pixels,
                           timeout=timeout, max_download=max_download, progress=sys.stderr.isatty(),
                           reader=reader, uri_column=uri_column, retry_errors=retry_errors, gpu=gpu_options(**gpu))
    finish = None if no_faiss else update_index
    if ray_address is None:
        summary = run_index(list(sources), store, options, finish=finish)
    else:
        from .distributed.index import RayOptions, index_with_ray

        ray_options = RayOptions(address=None if ray_address == RAY_LOCAL else ray_address, actors=actors)
        summary = index_with_ray(list(sources), store, options, ray_options, finish=finish)
    _print_index_summary(summary, store)
    if summary_json:
        with open(summary_json, "w") as f:
            json.dump(summary.as_dict(), f, indent=2)


@cli.command(name="import")
@click.argument("paths", nargs=-1, required=True)
@STORE
@click.option("--layout", default="auto", show_default=True, type=click.Choice(["auto", "clip-retrieval", "parquet"]),
              help="clip-retrieval: img_emb/img_emb_N.npy + metadata/metadata_N.parquet; parquet: files with an "
                   "embedding column (list<float> or fixed-size binary) and a uri column; auto: by what is there.")
@click.option("--model", default=None, help="The CLIP model that made the embeddings, recorded as the store's "
              "space (default: the store's; for a new store ViT-B/32 for 512-d, ViT-L/14 for 768-d).")
@click.option("--projection", default=None, help="none (default for a new store: the raw width), random, pca or a "
              ".npy file. An existing store keeps its own.")
@click.option("--embedding-column", default=None, help="parquet layout: the embedding column (default: embedding).")
@click.option("--uri-column", default=None, help="The uri column (default: uri, image_path or url).")
@click.option("--shard-size", default="50k", type=SIZE, show_default=True,
              help="Rows per shard at most (as `index` writes them).")
@click.option("--no-faiss", is_flag=True, help="Do not build/update the FAISS index.")
def import_command(paths: tuple[str, ...], store: str, layout: str, model: "str | None", projection: "str | None",
                   embedding_column: "str | None", uri_column: "str | None", shard_size: int, no_faiss: bool) -> None:
    """Import embeddings computed elsewhere (clip-retrieval / LAION folders, Parquet) into the store.

    Resumable and idempotent: a rerun continues where the store's commits end and
    adds nothing twice. Rows of another width, non-finite or zero vectors and rows
    without a uri become rows of STORE/errors/ with a reason.

    \b
    Example:
      pnsfw import laion-embeddings/ --store store/ --model ViT-L/14
      pnsfw import vectors.parquet --store store/ --embedding-column emb --uri-column url
    """
    from .indexer.importer import ImportOptions, run_import
    from .search.index import update_index
    from .store import Store

    options = ImportOptions(layout=layout, model=model, projection=projection, embedding_column=embedding_column,
                            uri_column=uri_column, shard_size=max(1, shard_size))
    summary = run_import(list(paths), store, options)
    rate = summary.bytes_read / summary.seconds / 1e9 if summary.seconds else 0.0
    click.echo(f"imported {summary.imported:,} embeddings from {summary.units:,} files in {summary.seconds:.1f} s "
               f"({summary.rows_per_s:,.0f} rows/s, {rate:.2f} GB/s read)")
    click.echo(f"already present: {summary.already_present:,}")
    failed = sum(summary.failed.values())
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in summary.failed.items())
    click.echo(f"failed: {failed:,} ({reasons}); see {store}/errors/" if failed else "failed: 0")
    if summary.imported and not no_faiss:
        index = update_index(Store.open(store))
        click.echo(f"index: {index['kind']}, {index['ntotal']:,} vectors (+{index['added']:,})")


def _print_index_summary(summary: Any, store: str) -> None:
    click.echo(f"indexed {summary.indexed:,} images in {summary.seconds:.1f} s "
               f"({summary.images_per_s:.1f} img/s; steady {summary.steady_images_per_s:.1f} img/s)")
    click.echo(f"already present: {summary.already_present:,}")
    failed = sum(summary.failed.values())
    if failed:
        reasons = ", ".join(f"{reason} {count:,}" for reason, count in summary.failed.items())
        click.echo(f"failed: {failed:,} ({reasons}); see {store}/errors/")
    else:
        click.echo("failed: 0")
    if summary.index:
        click.echo(f"index: {summary.index['kind']}, {summary.index['ntotal']:,} vectors (+{summary.index['added']:,})")


@cli.command()
@STORE
@click.option("--model", "model_name", default=None,
              help="Classifier NAME in STORE/models (default: `default`, or the only one there).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-upload-mb", default=20.0, show_default=True, type=float,
              help="Larger request bodies get 413 before they are read.")
@click.option("--clip-model", default=None, help="CLIP name or checkpoint to encode uploads with "
              "(default: the one the store's manifest records; it must have the same weights).")
@DEVICE
@click.option("--search", "search_backend", default="auto", show_default=True,
              type=click.Choice(["auto", "exact", "index"]),
              help="exact: torch matmul + top-k over every vector on --device (fp16 on CUDA); index: the FAISS "
                   "index; auto: exact when --device resolves to CUDA, else the index.")
@click.option("--batch-window-ms", default=2.0, show_default=True, type=float,
              help="How long a lone request waits for others to share its batch.")
@click.option("--max-batch", default=256, show_default=True, type=click.IntRange(1, 65536))
@click.option("--label-classes", default=None,
              help="Comma-separated labels a reviewer may give, e.g. nsfw,sfw,unsure (the page's buttons; POST "
                   "/v1/labels refuses others with 422); recorded with the labels. Default: the set recorded "
                   "in the store, else the model's classes.")
@click.option("--lazy-encoder", is_flag=True,
              help="Load the CLIP encoder (torch, ~0.7 GB) on the first upload or text query, not in the "
                   "background at start-up: for servers asked by id and embedding only.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(store: str, model_name: "str | None", host: str, port: int, max_upload_mb: float,
          clip_model: "str | None", device: str, search_backend: str, batch_window_ms: float, max_batch: int,
          label_classes: "str | None", lazy_encoder: bool, log_level: str) -> None:
    """Serve scores, neighbours and the audit page over HTTP (OpenAPI at /docs).

    With the environment variable PNSFW_API_TOKEN set, every endpoint but
    /health (and the page's static files) needs `Authorization: Bearer TOKEN`.

    \b
    Example:
      pnsfw serve --store store/ --model default --port 8000
      curl -F image=@photo.jpg http://127.0.0.1:8000/v1/score
    """
    from .api.engine import Settings
    from .api.server import serve as run_server
    from .indexer.encoder import check_model

    if clip_model:  # the encoder loads in the background: a wrong name fails here, with one line
        check_model(clip_model)

    settings = Settings(host=host, port=port, max_upload_mb=max_upload_mb, clip_model=clip_model, device=device,
                        search=search_backend, batch_window_ms=batch_window_ms, max_batch=max_batch,
                        label_classes=_class_list(label_classes), preload=not lazy_encoder)
    run_server(store, model_name, settings, log_level)


@cli.command()
@STORE
@click.option("--kind", default="auto", show_default=True,
              help="auto (by size and --max-memory, as autofaiss does), flat (exact), hnsw, ivfpq, "
                   "or a FAISS factory string such as 'IVF4096,PQ32x8np' (append '|nprobe=64' for search "
                   "parameters).")
@click.option("--max-memory", default=None, type=SIZE, help="Memory budget of the index (default: half the RAM).")
def reindex(store: str, kind: str, max_memory: "int | None") -> None:
    """Rebuild the FAISS index of the store from all its shards.

    The choice (kind, FAISS factory, search parameters) is recorded in
    STORE/index/index.json; later `pnsfw index` runs add new shards to it.
    On a terminal progress bars (rows, rows/s, ETA) run on stderr.

    \b
    Example:
      pnsfw reindex --store store/ --kind auto --max-memory 16G
      pnsfw reindex --store store/ --kind 'IVF1024,PQ32'
    """
    from .search.index import reindex as rebuild

    summary = rebuild(store, kind, max_memory, progress=sys.stderr.isatty())
    click.echo(f"index: {summary['kind']} ({summary['factory']}"
               f"{', ' + summary['search_params'] if summary['search_params'] else ''}), "
               f"{summary['ntotal']:,} vectors in {summary['seconds']:.1f} s")


ITEM_ID = click.IntRange(0, 2**63 - 1)
K_OPTION = click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, 1000),
                        help="Neighbours to return (1..1000).")
CLIP_MODEL = click.option("--clip-model", default=None, help="CLIP name or checkpoint to encode the query with "
                          "(default: the one the store's manifest records; it must have the same weights).")


def _one_query(**given: Any) -> None:
    named = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
    if len(named) != 1:
        raise click.UsageError(f"give exactly one of {', '.join('--' + k.replace('_', '-') for k in given)}")


def _hits_table(hits: list[Any]) -> str:
    lines = [f"{'#':>3}  {'id':>10}  {'sim':>6}  {'p_nsfw':>6}  {'label':<10}  uri"]
    for rank, hit in enumerate(hits, 1):
        p = "" if hit.p_nsfw is None else f"{hit.p_nsfw:.3f}"
        lines.append(f"{rank:>3}  {hit.id:>10}  {hit.similarity:>6.3f}  {p:>6}  {hit.label or '':<10}  {hit.uri}")
    return "\n".join(lines)


@cli.command()
@STORE
@click.option("--id", "item_id", type=ITEM_ID, help="A store id: its stored vector is the query (listed first).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="An image file (encoded + projected).")
@click.option("--text", help="A text (CLIP text encoder + the store's projection).")
@click.option("--vector", "vector_file", type=click.Path(exists=True, dir_okay=False),
              help="A .npy file with one vector in the store's space.")
@K_OPTION
@click.option("--model", "model_name", default=None, help="Classifier NAME: adds p_nsfw and training labels.")
@CLIP_MODEL
@DEVICE
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def search(store: str, item_id: "int | None", image: "str | None", text: "str | None", vector_file: "str | None",
           k: int, model_name: "str | None", clip_model: "str | None", device: str, as_json: bool) -> None:
    """Find the k nearest images to an id, an image, a text or a vector.

    \b
    Example:
      pnsfw search --store store/ --text "a dog on a beach" -k 5
      pnsfw search --store store/ --image photo.jpg --model default --json
    """
    from dataclasses import asdict

    from .search.query import run_search
    from .store import Store
    from .userio import load_vectors

    _one_query(id=item_id, image=image, text=text, vector=vector_file)
    opened = Store.open(store)
    vector = _one_vector(load_vectors(vector_file, opened.dim), vector_file) if vector_file else None
    hits = run_search(store, item_id=item_id, image=image, text=text, vector=vector, k=k,
                      scorer=_scorer(opened, model_name),
                      encoder=_encoder(opened, clip_model, device) if image or text else None)
    click.echo(json.dumps([asdict(h) for h in hits], indent=2) if as_json else _hits_table(hits))


def _scorer(store: Any, model_name: "str | None") -> Any:
    """Classifier NAME as search's Scorer (search never imports the classifier itself)."""
    from .classifier.scorer import StoreScorer

    return StoreScorer.open(store, model_name) if model_name else None


def _encoder(store: Any, clip_model: "str | None", device: str) -> Any:
    """The store's embedding service as search's Encoder."""
    from .indexer.embedding import EmbeddingService

    return EmbeddingService.open(store, clip_model, device)


def _one_vector(vectors: Any, path: str) -> Any:
    if len(vectors) != 1:
        raise click.UsageError(f"--vector {path} holds {len(vectors)} vectors; search takes one")
    return vectors[0]


def _explain_text(result: dict[str, Any]) -> str:
    verdict = result["verdict"]
    classes = ", ".join(f"{c} {p:.3f}" for c, p in verdict["probabilities"].items())
    lines = [f"verdict: {'NSFW' if verdict['nsfw'] else 'safe'}  p_nsfw {verdict['p_nsfw']:.3f} "
             f"(threshold {verdict['threshold']:.3f}; {classes})",
             f"{result['agree']} of {result['k']} nearest training examples agree:",
             f"{'#':>3}  {'id':>10}  {'sim':>6}  {'p_nsfw':>6}  {'label':<10}  agrees  uri"]
    for rank, n in enumerate(result["neighbours"], 1):
        lines.append(f"{rank:>3}  {n['id']:>10}  {n['similarity']:>6.3f}  {n['p_nsfw']:>6.3f}  {n['label']:<10}  "
                     f"{'yes' if n['agrees'] else 'no':<6}  {n['uri']}")
    return "\n".join(lines)


@cli.command()
@STORE
@click.option("--model", "model_name", required=True, help="Classifier NAME in STORE/models.")
@click.option("--id", "item_id", type=ITEM_ID, help="A store id.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="An image file.")
@K_OPTION
@CLIP_MODEL
@DEVICE
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def explain(store: str, model_name: str, item_id: "int | None", image: "str | None", k: int,
            clip_model: "str | None", device: str, as_json: bool) -> None:
    """Show a verdict and the nearest labelled training examples behind it.

    \b
    Example:
      pnsfw explain --store store/ --model default --image photo.jpg -k 10
    """
    from .search.explain import run_explain
    from .store import Store

    _one_query(id=item_id, image=image)
    opened = Store.open(store)
    result = run_explain(store, _scorer(opened, model_name), item_id=item_id, image=image, k=k,
                         encoder=_encoder(opened, clip_model, device) if image else None)
    click.echo(json.dumps(result, indent=2) if as_json else _explain_text(result))


@cli.command()
@STORE
@click.option("--threshold", default=0.95, show_default=True, type=float, help="Cosine similarity of duplicates.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .parquet or .csv file.")
@click.option("--method", default="auto", show_default=True,
              type=click.Choice(["auto", "exact", "exact-gpu", "knn"]),
              help="auto: exact on a GPU (torch) or up to 300k rows; else kNN on the store's FAISS index.")
@click.option("--neighbours", default=32, show_default=True, type=click.IntRange(2, 1000),
              help="Candidates per row for --method knn.")
def dedup(store: str, threshold: float, out: str, method: str, neighbours: int) -> None:
    """Group near-duplicate images (connected components of pairs with cosine >= threshold).

    Writes one row per image in a group: group, id, uri, keep (the suggested
    keeper: the largest image, ties to the lowest id), keeper,
    keeper_similarity, nearest (its closest other member) and similarity.
    On a terminal a progress bar (rows, rows/s, ETA) runs on stderr.

    \b
    Example:
      pnsfw dedup --store store/ --threshold 0.95 --out dups.parquet
    """
    from .search.dedup import dedup as find_duplicates

    summary = find_duplicates(store, out, threshold, method, neighbours, progress=sys.stderr.isatty())
    click.echo(f"{summary['duplicates']:,} of {summary['rows']:,} images in {summary['groups']:,} groups "
               f"(cosine >= {threshold}, {summary['method']}, {summary['seconds']:.1f} s) -> {out}")


CLASSIFIER = click.option("--model", "model_name", default="default", show_default=True,
                          help="Classifier NAME in STORE/models.")


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _metrics_text(m: dict[str, Any], table: bool = False) -> str:
    """A few readable lines of binary NSFW metrics (optionally the threshold table)."""
    c = m["confusion"]
    lines = [f"{m['count']:,} images ({m['positives']:,} NSFW): PR-AUC {_fmt(m['pr_auc'])}  "
             f"ROC-AUC {_fmt(m['roc_auc'])}  precision@recall0.9 {_fmt(m['precision_at_recall_0.9'])}",
             f"at threshold {m['threshold']:.4f}: accuracy {m['accuracy']:.4f}  precision {m['precision']:.4f}  "
             f"recall {m['recall']:.4f}  F1 {m['f1']:.4f}  FPR {m['fpr']:.4f}",
             f"confusion: TP {c['tp']}  FP {c['fp']}  FN {c['fn']}  TN {c['tn']}"]
    if "class_confusion" in m:
        cc = m["class_confusion"]
        lines.append("class confusion (rows true, columns predicted: " + ", ".join(cc["classes"]) + "):")
        lines += ["  " + " ".join(f"{n:>5}" for n in row) + f"  {name}"
                  for name, row in zip(cc["classes"], cc["matrix"])]
    if table:
        lines.append("threshold  precision  recall     FPR")
        lines += [f"{r['threshold']:>9.2f}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  {r['fpr']:>6.4f}"
                  for r in m["threshold_table"]]
    return "\n".join(lines)


def _retrain_text(retrain: dict[str, Any]) -> str:
    """The delta table of a retrain and the verdicts it changed (train's output and `pnsfw info`)."""
    v = retrain["verdicts"]
    lines = [f"beside the model it replaced (both on {retrain.get('delta_basis', 'the same rows')}):",
             "metric                     previous       new     delta"]
    lines += [f"{r['metric']:<24} {_fmt(r['previous']):>10} {_fmt(r['new']):>9} "
              f"{'n/a' if r['delta'] is None else format(r['delta'], '+.4f'):>9}" for r in retrain["delta"]]
    lines.append(f"verdicts changed: {v['changed']:,} of {v['compared']:,} items "
                 f"({v['to_nsfw']:,} to NSFW, {v['to_sfw']:,} to SFW)")
    return "\n".join(lines)


def _skipped_labels(count: int, examples: list[str], ignored: "dict[str, int] | None" = None) -> None:
    if count:
        click.echo(f"skipped {count:,} labels naming images not in the store (e.g. {', '.join(examples[:3])})",
                   err=True)
    if ignored:
        from .classifier.labels import ignored_text

        click.echo(f"ignored {sum(ignored.values()):,} labels that are no class ({ignored_text(ignored)}; "
                   "--ignore-labels)", err=True)


IGNORE_LABELS = click.option("--ignore-labels", default=None,
                             help="Comma-separated labels that are no class, left out (default: unsure,skip, "
                                  "the review page's abstentions; '' keeps every label).")


@cli.command()
@STORE
@click.option("--labels", default=None, help="`folders` (SOURCE/<label>/...), `store` (`pnsfw label`, the review "
                                            "page), a CSV/Parquet file of (uri or id, label), or several joined "
                                            "by + (later wins: folders+store). With --zero-shot: calibrate on them.")
@click.option("--zero-shot", "zero_shot", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A text file of `label: prompt` lines: build the model from CLIP text embeddings, no training.")
@CLIP_MODEL
@DEVICE
@click.option("--name", default="default", show_default=True, help="Model NAME: saved as STORE/models/NAME.keras.")
@click.option("--epochs", default=40, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate.")
@click.option("--units", default=256, show_default=True, type=click.IntRange(1))
@click.option("--layers", default=1, show_default=True, type=click.IntRange(1, 2))
@click.option("--activation", default="tanh", show_default=True, type=click.Choice(["tanh", "gelu"]))
@click.option("--dropout", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--val-ratio", default=0.15, show_default=True, type=float)
@click.option("--test-ratio", default=0.15, show_default=True, type=float)
@click.option("--class-weight/--no-class-weight", default=True, show_default=True, help="Balance the classes' losses.")
@click.option("--tune", is_flag=True, help="KerasTuner random search over units, layers, activation, dropout, lr.")
@click.option("--max-trials", default=30, show_default=True, type=click.IntRange(1))
@click.option("--nsfw-classes", default=None, help="Comma-separated NSFW labels (default: common names such as "
                                                   "nsfw, porn, hentai, sexy).")
@click.option("--threshold-for", default=None, help="Pick the stored threshold on the validation split: "
                                                    "precision=0.95 or recall=0.9 (default 0.5).")
@click.option("--seed", default=0, show_default=True, help="Seed of the split and of the weights.")
@IGNORE_LABELS
@click.option("--json", "as_json", is_flag=True, help="Print the saved metadata as JSON.")
def train(store: str, labels: "str | None", zero_shot: "str | None", clip_model: "str | None", device: str,
          name: str, epochs: int, batch_size: int, lr: float, units: int, layers: int,
          activation: str, dropout: float, val_ratio: float, test_ratio: float, class_weight: bool, tune: bool,
          max_trials: int, nsfw_classes: "str | None", threshold_for: "str | None", seed: int,
          ignore_labels: "str | None", as_json: bool) -> None:
    """Train the NSFW classifier on labelled store vectors (Keras; two labels: sigmoid, more: softmax).

    A seeded stratified split keeps --val-ratio for early stopping and the
    threshold, and --test-ratio for the reported metrics. Saves NAME.keras,
    NAME.json (classes, threshold, metrics), NAME.labels.parquet, NAME.plots/
    and TensorBoard logs in NAME.logs/ under STORE/models/.

    \b
    Example:
      pnsfw train --store store/ --labels folders --threshold-for precision=0.95
      pnsfw train --store store/ --labels labels.csv --nsfw-classes hentai,porn,sexy --tune --max-trials 20
      pnsfw train --store store/ --zero-shot concepts.txt --name zs --labels labels.csv
    """
    nsfw = [c.strip() for c in nsfw_classes.split(",") if c.strip()] if nsfw_classes else None
    if zero_shot:
        _train_zero_shot(store, zero_shot, labels, name, nsfw, threshold_for, clip_model, device, as_json)
        return
    if not labels:
        raise click.UsageError("give --labels (train a classifier) or --zero-shot CONCEPTS")
    from .classifier.labels import parse_ignored
    from .classifier.train import TrainOptions, train_classifier

    options = TrainOptions(name=name, epochs=epochs, batch_size=batch_size, lr=lr, units=units, layers=layers,
                           activation=activation, dropout=dropout, val_ratio=val_ratio, test_ratio=test_ratio,
                           class_weight=class_weight, tune=tune, max_trials=max_trials, seed=seed,
                           nsfw_classes=nsfw, ignore_labels=parse_ignored(ignore_labels),
                           threshold_for=threshold_for,  # Keras' epoch lines go to stdout: none under --json
                           verbose=2 if sys.stderr.isatty() and not as_json else 0)
    meta = train_classifier(store, labels, options)
    _skipped_labels(meta["data"]["unknown"], meta["data"]["unknown_examples"], meta["data"]["ignored"])
    _threshold_warning(meta["threshold_choice"])
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    counts = meta["data"]["counts"]
    class_list, nsfw_list = ", ".join(meta["classes"]), ", ".join(meta["nsfw_classes"])
    click.echo(f"model {name}: {meta['output']} over {class_list} (NSFW: {nsfw_list})")
    click.echo("split: " + "  ".join(f"{s} {sum(c.values()):,}" for s, c in counts.items()) +
               f"; {meta['history']['epochs_run']} epochs, best {meta['history']['best_epoch']}")
    click.echo(f"{meta['evaluated_on']} split: " + _metrics_text(meta["metrics"][meta["evaluated_on"]]))
    click.echo(_threshold_text(meta["threshold_choice"]))
    click.echo(f"saved {store}/models/{name}.keras ({meta['seconds']:.1f} s)")
    if meta.get("retrain"):
        click.echo(_retrain_text(meta["retrain"]))


@cli.command()
@STORE
@click.option("--id", "ids", multiple=True, type=click.IntRange(0), help="A store id to label (repeatable).")
@click.option("--label", default=None, help="The label of the --id items.")
@click.option("--file", "file", default=None, type=click.Path(dir_okay=False, exists=True),
              help="A CSV/Parquet file of (id or uri, label) to import.")
@click.option("--classes", default=None, help="Comma-separated allowed labels, recorded with them (default: the "
                                              "set recorded in the store, else the model's classes).")
@click.option("--model", "model_name", default=None, help="Classifier whose classes are allowed (default: the "
                                                          "store's default model; none: any plain word).")
@click.option("--by", default=None, help="Who gives the labels, kept in the audit trail (default: the user name).")
def label(store: str, ids: tuple[int, ...], label: "str | None", file: "str | None", classes: "str | None",
          model_name: "str | None", by: "str | None") -> None:
    """Save labels in the store (labels/), as the review page does; `train --labels store` uses them.

    \b
    Example:
      pnsfw label --store store/ --id 12 --id 40 --label nsfw
      pnsfw label --store store/ --file corrections.csv
    """
    from .classifier.reviewed import run_label

    result = run_label(store, list(ids), label, file, _class_list(classes), model_name, by)
    _skipped_labels(result["unknown"], result["unknown_examples"])
    click.echo(f"saved {result['saved']:,} labels; the store holds {result['labels']:,} labelled items")


def _class_list(text: "str | None") -> "list[str] | None":
    return [c.strip() for c in text.split(",")] if text else None


def _threshold_warning(choice: "dict[str, Any] | None") -> None:
    if choice is not None and choice["note"]:
        click.echo(f"warning: {choice['note']}", err=True)


def _train_zero_shot(store: str, concepts: str, labels: "str | None", name: str, nsfw: "list[str] | None",
                     threshold_for: "str | None", clip_model: "str | None", device: str, as_json: bool) -> None:
    from .classifier.zeroshot import ZeroShotOptions, train_zero_shot

    options = ZeroShotOptions(name=name, nsfw_classes=nsfw, labels=labels, threshold_for=threshold_for)
    meta = train_zero_shot(store, concepts, lambda s: _encoder(s, clip_model, device), options)
    _threshold_warning(meta["threshold_choice"])
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    click.echo(f"model {name}: zero-shot {meta['output']} over {', '.join(meta['classes'])} "
               f"(NSFW: {', '.join(meta['nsfw_classes'])}), scale {meta['scale']:.1f}, bias {meta['bias']:.2f}, "
               f"threshold {meta['threshold']:.4f}")
    if meta["calibration"]:
        click.echo("calibrated on labels: " + _metrics_text(meta["metrics"]["labels"]))
        click.echo(_threshold_text(meta["threshold_choice"]))
    click.echo(f"saved {store}/models/{name}.weights.npz ({meta['seconds']:.1f} s)")


@cli.command()
@STORE
@CLASSIFIER
@click.option("--labels", required=True, help="`folders`, `store`, a CSV/Parquet file of (uri or id, label), "
                                               "or several joined by + (folders+store).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "all"]),
              help="test: rows the model did not train on (its recorded test split, and rows labelled since); "
                   "all: every labelled row, training rows included (optimistic).")
@click.option("--plots", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Write pr.png, roc.png, confusion.png (and classes.png for softmax) into this folder.")
@IGNORE_LABELS
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def evaluate(store: str, model_name: str, labels: str, split: str, plots: "Path | None", ignore_labels: "str | None",
             as_json: bool) -> None:
    """Metrics of a model at its stored threshold on the held-out labelled rows (the test split train recorded).

    \b
    Example:
      pnsfw evaluate --store store/ --model default --labels folders --plots report/
      pnsfw evaluate --store store/ --model default --labels holdout.csv --split all
    """
    from .classifier.evaluate import evaluate_classifier
    from .classifier.labels import parse_ignored

    result = evaluate_classifier(store, model_name, labels, split, plots, parse_ignored(ignore_labels))
    _skipped_labels(result["unknown"], result["unknown_examples"], result["ignored"])
    for warning in result["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    click.echo(json.dumps(result, indent=2) if as_json else _evaluate_text(result))


def _evaluate_text(result: dict[str, Any]) -> str:
    """Which rows were measured, how their labels map to NSFW/safe, then the metrics and the plots."""
    by_split = ", ".join(f"{s} {n:,}" for s, n in result["rows_by_split"].items()) or "none"
    counts = ", ".join(f"{label} {n:,}" for label, n in result["label_counts"].items()) or "none"
    mapping = ", ".join(f"{label} -> {'NSFW' if m['nsfw'] else 'safe'}{' (by name)' if m['via'] == 'name' else ''}"
                        for label, m in result["label_mapping"].items())
    lines = [f"model {result['model']}, split {result['split']}: {result['count']:,} rows ({by_split})",
             f"labels: {counts}" + (f"; {mapping}" if mapping else "")]
    if result["count"]:
        lines.append(_metrics_text(result, table=True))
    lines += [f"plot: {path}" for path in result.get("plots", [])]
    return "\n".join(lines)


def _threshold_text(choice: dict[str, Any]) -> str:
    """The --threshold-for rule, where it was picked and what it reaches there and on the evaluated split."""
    if choice["rule"] is None:
        return f"threshold {choice['threshold']:.4f} (default; --threshold-for precision=T or recall=T picks one)"
    reached, ev = choice["reached"], choice.get("evaluated")
    text = (f"threshold {choice['threshold']:.4f} for {choice['rule']}={choice['target']:g}, picked on "
            f"{choice['on']} ({choice['rows']:,} rows): precision {reached['precision']:.4f} recall "
            f"{reached['recall']:.4f}")
    if ev:
        text += (f"; on {ev['split']} ({ev['rows']:,} rows): precision {ev['precision']:.4f} recall "
                 f"{ev['recall']:.4f}" + ("" if ev["met"] else f" ({choice['rule']} below the target there)"))
    return text


@cli.command()
@STORE
@CLASSIFIER
@DEVICE
@click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "numpy", "torch"]),
              help="auto: numpy (BatchNorm folded) for fp32 on CPU; torch on CUDA or for bf16/fp16.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]),
              help="fp32: exact (matches predict and the API); bf16: ~2x faster on CPUs with AVX512-BF16/AMX, "
                   "p_nsfw within ~1e-2.")
@click.option("--batch-size", default="64k", type=SIZE, show_default=True, help="Rows per forward pass.")
@click.option("--readers", default=0, show_default=True, type=click.IntRange(0, 256),
              help="Shard reader threads (0: half the cores, 2 to 8).")
@click.option("--writers", default=0, show_default=True, type=click.IntRange(0, 256),
              help="Score-part writer threads (0: one per core, 2 to 16).")
@RAY
@ACTORS
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON (no progress bar).")
def score(store: str, model_name: str, device: str, engine: str, precision: str, batch_size: int, readers: int,
          writers: int, ray_address: str | None, actors: int, as_json: bool) -> None:
    """Score every vector of the store into STORE/scores/NAME/ (resumable; a rerun scores new shards only).

    On a terminal a progress bar (rows, rows/s, ETA) runs on stderr.

    \b
    Example:
      pnsfw score --store store/ --model default
    """
    options: dict[str, Any] = {"device": device, "engine": engine, "batch_rows": max(1, batch_size),
                               "precision": precision, "readers": readers, "writers": writers,
                               "progress": sys.stderr.isatty() and not as_json}
    if ray_address is None:
        from .classifier.scoring import score_store

        summary = score_store(store, model_name, **options)
    else:
        from .distributed.score import score_with_ray

        summary = score_with_ray(store, model_name, None if ray_address == RAY_LOCAL else ray_address, actors,
                                 **options)
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2))
        return
    note = " (model changed: rescored everything)" if summary.rescored_all else ""
    click.echo(f"scored {summary.scored:,} vectors in {summary.shards_scored} shards ({summary.vectors_per_s:,.0f} "
               f"vectors/s, {summary.engine} {summary.precision}); "
               f"{summary.shards_present} shards already scored{note}")


@cli.command(name="filter")
@STORE
@CLASSIFIER
@click.option("--threshold", default=None, type=float, help="Default: the model's stored threshold.")
@click.option("--keep", default="safe", show_default=True, type=click.Choice(["safe", "unsafe"]),
              help="safe: p_nsfw < threshold; unsafe: p_nsfw >= threshold.")
@click.option("--columns", default="", help="Comma-separated extra columns: p_<class> of the model, and stored "
                                             "metadata such as caption, url, width, height, sha256, source.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help=".parquet, .csv or .jsonl (id, uri, p_nsfw + --columns), or .txt (uris).")
def filter_command(store: str, model_name: str, threshold: "float | None", keep: str, columns: str, out: str) -> None:
    """Write the ids and uris kept by the threshold (scoring any unscored shards first).

    \b
    Example:
      pnsfw filter --store store/ --model default --keep safe --out safe.parquet
      pnsfw filter --store store/ --keep unsafe --columns p_porn,p_sexy,caption --out unsafe.jsonl
    """
    from .classifier.filter import filter_store

    extra = [c.strip() for c in columns.split(",") if c.strip()]
    summary = filter_store(store, out, model_name, threshold, keep, extra, progress=sys.stderr.isatty())
    click.echo(f"kept {summary.kept:,} {keep} images, dropped {summary.dropped:,} (threshold {summary.threshold:.4f}) "
               f"-> {out}")


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@STORE
@CLASSIFIER
@CLIP_MODEL
@DEVICE
@click.option("--threshold", default=None, type=float, help="Default: the model's stored threshold.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {path, verdict} or {path, error}.")
@click.option("--json-lines", is_flag=True, help="Print the same records one JSON object per line.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write a flat table instead (path, p_nsfw, nsfw, label, p_<class>, error): .parquet, .csv, .jsonl.")
def predict(inputs: tuple[str, ...], store: str, model_name: str, clip_model: "str | None", device: str,
            threshold: "float | None", as_json: bool, json_lines: bool, out: "str | None") -> None:
    """Score images, folders or .npy embeddings (of the store's space) without adding them to the store.

    \b
    Example:
      pnsfw predict photo.jpg uploads/ --store store/ --model default
      pnsfw predict vectors.npy --store store/ --json
      pnsfw predict uploads/ --store store/ --out verdicts.parquet
    """
    from .classifier.predict import PredictOptions, predict_paths, results_table
    from .indexer.sources import list_files
    from .userio import check_output, write_table

    tables = (".parquet", ".pq", ".csv", ".jsonl")
    if out:
        check_output(out, tables)
    options = PredictOptions(name=model_name, threshold=threshold)
    results = predict_paths(store, list_files(list(inputs)), lambda s: _encoder(s, clip_model, device), options)
    if out:
        write_table(results_table(results), out, tables)
        errors = sum("error" in r for r in results)
        click.echo(f"wrote {len(results):,} results ({errors:,} errors) -> {out}", err=True)
        return
    if as_json or json_lines:
        click.echo(json.dumps(results, indent=2) if as_json else "\n".join(json.dumps(r) for r in results))
        return
    for r in results:
        if "error" in r:
            click.echo(f"{'error':<6} {'':>6}  {r['path']}  ({r['error']})")
        else:
            verdict = r["verdict"]
            click.echo(f"{'nsfw' if verdict['nsfw'] else 'safe':<6} {verdict['p_nsfw']:>6.3f}  {r['path']}")


@cli.command()
@STORE
@CLASSIFIER
@click.option("--format", "fmt", default="onnx", show_default=True, type=click.Choice(["onnx"]))
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Default: STORE/models/NAME.onnx (NAME.raw.onnx with --raw).")
@click.option("--raw", is_flag=True, help="Build the store's projection into the graph: the input is a raw CLIP "
                                         "embedding of the encoder's width (normalised in the graph).")
def export(store: str, model_name: str, fmt: str, out: "str | None", raw: bool) -> None:
    """Export a classifier (inputs `embedding` float32 (N, dim); outputs `probabilities`, `p_nsfw`).

    \b
    Example:
      pnsfw export --store store/ --model default --format onnx --out nsfw.onnx
      pnsfw export --store store/ --model default --raw --out nsfw-raw.onnx
    """
    from .classifier.export import EXPORTERS

    click.echo(f"wrote {EXPORTERS[fmt](store, model_name, out, raw=raw)}")


@cli.command()
@STORE
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(store: str, as_json: bool) -> None:
    """What the store holds: rows, space, shards, errors by reason, index, models, scores.

    \b
    Example:
      pnsfw info --store store/
      pnsfw info --store s3://bucket/store --json
    """
    from .store.maintenance import store_info

    result = store_info(store)
    click.echo(json.dumps(result, indent=2) if as_json else _info_text(result))


def _info_text(r: dict[str, Any]) -> str:
    space = r["space"] or {}
    lines = [f"store {r['store']} (format {r['format']}, version {r['version']})",
             f"rows: {r['rows']:,} in {r['shards']} shards ({r['bytes'] / 1e6:,.1f} MB), next id {r['next_id']}",
             f"space: {space.get('fingerprint')} ({space.get('encoder')}, {space.get('projection')} projection, "
             f"dim {space.get('dim')})" if space else "space: none yet",
             f"errors: {r['errors']['rows']:,}" + "".join(f", {k} {v:,}" for k, v in r["errors"]["by_reason"].items())]
    index = r["index"]
    lines.append("index: none" if index is None else f"index: {index['kind']} ({index['factory']}), "
                 f"{index['ntotal']:,} vectors, {index['coverage']:.0%} of shards covered")
    for name, m in r["models"].items():
        test: dict[str, Any] = next(iter((m.get("metrics") or {}).values()), {}) or {}
        lines.append(f"model {name}: classes {m.get('classes')}, threshold {m.get('threshold')}, "
                     f"PR-AUC {test.get('pr_auc', '?')}")
        if m.get("retrain"):
            lines.append("  " + _retrain_text(m["retrain"]).replace("\n", "\n  "))
    for name, sc in r["scores"].items():
        lines.append(f"scores {name}: {sc['shards_scored']}/{sc['shards']} shards")
    lines.append(f"labels: {r['labels']:,}")
    return "\n".join(lines)


@cli.command()
@STORE
def verify(store: str) -> None:
    """Check every shard (size, sha256, footer, id range, vector norms), the parts, the index and the models.

    Exit 1 and one line per damaged file when something fails.

    \b
    Example:
      pnsfw verify --store store/
    """
    from .store.maintenance import verify_store

    report = verify_store(store)
    for problem in report.problems:
        click.echo(problem, err=True)
    checked = ", ".join(f"{v} {k}" for k, v in report.checked.items())
    if not report.ok:
        raise click.ClickException(f"{len(report.problems)} problems in {store} (checked {checked}); "
                                   f"run `pnsfw repair --store {store}`")
    click.echo(f"ok: {checked}")


@cli.command()
@STORE
def repair(store: str) -> None:
    """Rebuild the manifest from the intact shards, drop damaged parts, rebuild the index; says what it dropped.

    \b
    Example:
      pnsfw repair --store store/
    """
    from .search.index import build_index
    from .store.maintenance import repair_store

    report = repair_store(store, rebuild_index=build_index)
    for line in report.dropped:
        click.echo(f"dropped {line}", err=True)
    click.echo(f"repaired: {report.kept} shards, {report.rows:,} rows kept, {len(report.dropped)} dropped, "
               f"index {report.index}")


@cli.command()
@STORE
def migrate(store: str) -> None:
    """Convert a format-1 store (manifest.json) to the versioned format 2 in place (same ids and rows).

    Any write command does this on its own first; this command only does it now.

    \b
    Example:
      pnsfw migrate --store store/
    """
    from .store.maintenance import migrate_store

    click.echo(f"migrated {store} to format 2" if migrate_store(store) else f"{store} already is format 2")


def main() -> None:
    from .shutdown import leave, leaves_early

    _process["own"] = True
    try:
        cli(prog_name="pnsfw")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else None
        if _interrupted:  # threads may still be inside torch (a model load): finalizing would abort on them
            leave(code if code is not None else 1, orderly=False)
        if code is not None and leaves_early():  # without the interpreter's slow teardown of torch (shutdown.py)
            leave(code, step=mark)
        raise


if __name__ == "__main__":
    main()
