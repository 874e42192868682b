"""Options of the GPU indexing path (`pnsfw index --gpu-*`); torch-free, so the CLI can build them."""

from dataclasses import dataclass

from ...errors import BadInput

RESIZES = ("auto", "decoder", "encoder", "thread")
TOWERS = ("fast", "eager", "reference")  # each tuple's first value is the default (the CLI's too)
COMPILES = ("auto", "on", "off")
DECODERS = ("auto", "engines", "sm", "torchvision")
STREAMS = ("own", "default")
# --gpu-decode-priority: (the decode threads' streams, the tower's stream); torch: lower is higher, -1 is CUDA's
# highest here
STREAM_PRIORITIES = {"normal": (0, 0), "high": (-1, 0), "low": (0, -1)}
PRIORITIES = tuple(STREAM_PRIORITIES)
FIRST_UNITS = ("device", "cpu")


@dataclass
class GpuOptions:
    """How `--device cuda` (the tensor reader) decodes, resizes and encodes."""

    workers: int = 0  # device worker processes; 0: one per visible GPU for cuda/auto, else one
    cpu_share: int = 0  # at most this many images of each unit decode on the CPU workers beside the device,
    # sized by feedback (route.CpuShare); -1: up to half a unit; 0: only the files the device cannot decode (the
    # default: on an H200 any share slowed the nvJPEG calls 2-4x per image, round 7)
    decoder: str = "auto"  # nvJPEG with our own handles. auto: units of thumbnails (one padded batch) on its
    # GPU_HYBRID backend (the SMs), the others on the hardware engines; engines: every unit on the engines (the
    # default until round 11); sm (an experiment): every unit on GPU_HYBRID; torchvision: torchvision.io
    resize: str = "auto"  # where the batched resize runs: auto (by image size), decoder, encoder, thread
    tower: str = "fast"  # fast: SDPA, fp16 LayerNorm, patch GEMM, full batches replayed from a CUDA graph (the
    # encoder thread's host time per 100k thumbnails 0.8 s instead of 4.1 s on an H200, round 7); eager: the same
    # launched op by op; reference: CLIP's own modules at fp16
    encode_stream: str = "own"  # own: the tower on a stream of its own; default: CUDA's legacy default stream,
    # which every blocking stream waits for (nvJPEG's hardware calls then also wait for the queued tower)
    decode_threads: int = 0  # threads feeding the device decoder; 0: four with nvJPEG (large images on at most
    # as many as the GPU's memory holds, decode.DecoderPool.gate; with decoder "engines" thumbnails on two), else one
    sm_decoders: int = 0  # an experiment, with decoder "engines": this many more decode threads on nvJPEG's
    # GPU_HYBRID backend beside the engines' threads (round 11: slower than all on the SMs)
    decode_priority: str = "normal"  # the decode threads' CUDA streams against the tower's: normal (the same),
    # high (the decode's kernels scheduled ahead of the tower's) or low (the tower's stream high: its kernels ahead
    # of the SM decoders')
    first_unit: str = "device"  # where the first unit (256 images) decodes: device, or cpu (the worker processes,
    # beside the tower's warm-up and the making of nvJPEG's decoders: on an H200 the first batch a median 0.1 s
    # sooner from the end of `import torch`, the steady rate 4-8 % lower; round 10)
    tower_sms: int = 0  # the tower's SMs (a green context), the rest kept for the decode's kernels; 0: all
    compile: str = "auto"  # torch.compile the tower: auto (jobs of tower.COMPILE_MIN_ITEMS or more), on, off
    stage_stats: str | None = None  # write per-stage busy seconds (JSON) to this file
    profile: str | None = None  # write a per-stream GPU time summary of a window of units (JSON) to this file

    def __post_init__(self) -> None:
        if self.cpu_share < -1:
            raise BadInput(f"GPU CPU share must be -1 (auto), 0 or more, not {self.cpu_share}")
        if self.tower_sms < 0:
            raise BadInput(f"GPU tower SMs must be 0 (all) or more, not {self.tower_sms}")
        if self.decode_threads < 0:
            raise BadInput(f"GPU decode threads must be 0 (auto) or more, not {self.decode_threads}")
        if self.sm_decoders < 0:
            raise BadInput(f"GPU SM decoders must be 0 (none) or more, not {self.sm_decoders}")
        if self.sm_decoders and self.decoder != "engines":
            raise BadInput("GPU SM decoders are threads beside the JPEG engines' ones: they need --gpu-decoder "
                           f"engines, not {self.decoder}")
        for name, allowed in (("resize", RESIZES), ("tower", TOWERS), ("compile", COMPILES), ("decoder", DECODERS),
                              ("encode_stream", STREAMS), ("decode_priority", PRIORITIES),
                              ("first_unit", FIRST_UNITS)):
            if getattr(self, name) not in allowed:
                raise BadInput(f"unknown GPU {name} {getattr(self, name)!r} ({', '.join(allowed)})")
