"""The image tower the GPU path runs: CLIP's ViT rewritten for speed, or CLIP's own modules (the reference).

The fast tower holds the same weights as a loaded `clip.model.VisionTransformer`
and computes the same function (tests/test_gpu_tower.py: min cosine >= 0.9999
against the fp32 forward), with what an H200 measured faster
(../shared/notes/gpu-ceilings.md; docs/benchmarks.md): attention through
`F.scaled_dot_product_attention` on batch-first tensors instead of
`nn.MultiheadAttention`; LayerNorm in the compute dtype (CLIP casts to fp32);
the patch embedding (a conv with kernel = stride = patch) as one GEMM over
unfolded patches instead of cuDNN's conv; in the last block only the class
token's query, MLP and output (nothing else is read). By default (`--gpu-tower
fast`) full batches on CUDA replay a CUDA graph: one launch per batch, so the
encoder thread's host time falls from ~40-70 ms a batch to ~8 (equal rates
alone on an H200; `eager` launches op by op); torch.compile (max-autotune, a
persistent kernel cache) for jobs of COMPILE_MIN_ITEMS or more, or when asked
(`--compile on`), its kernels then replayed from the same graph.
"""

import os
import threading
from collections.abc import Callable
from typing import Any

from ..encoder import Encoder
from .fallback import warn_once as _warn_once

# The compiled fast tower replayed from the CUDA graph: 25,159 img/s steady at 1M thumbnails against eager's
# 22,156-22,364 (an H200, round 13 calls 2 and 4: 5.2 us less an image), after a cold max-autotune compile of
# 229 s (~13 s from a warm cache, round 12). Cold, that pays back from ~44M images; auto compiles from 50M
# (a stream of unknown size, as the CLI's listing, counts as 0).
COMPILE_MIN_ITEMS: int | None = 50_000_000
INDUCTOR_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "pnsfw", "inductor")

def reference_model(encoder: Encoder) -> Callable[[Any], Any]:
    """Normalised images -> features. On CUDA at fp16, a copy of the image tower with fp16 weights, as
    OpenAI's CLIP runs on GPUs (autocast would re-cast every weight each batch); else autocast."""
    import copy

    import torch

    if encoder.precision != "fp16" or not encoder.device.startswith("cuda"):
        def autocast(images: Any) -> Any:
            with encoder._autocast():
                return encoder.model.encode_image(images)
        return autocast
    from ..encoder import _clip_model

    visual = copy.deepcopy(encoder.model.visual)
    _clip_model().convert_weights(visual)  # fp16 convs/linears/attention; LayerNorm stays fp32, as in CLIP
    return lambda images: visual(images.to(torch.float16))


def fast_supported(visual: Any) -> str | None:
    """Why `visual` cannot be rewritten (None: it can): only CLIP's ViT towers without attention masks."""
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
    if not all(hasattr(visual, name) for name in needed):
        return f"{type(visual).__name__} is not a CLIP ViT tower"
    conv = visual.conv1
    if conv.kernel_size != conv.stride or conv.bias is not None or conv.padding != (0, 0):
        return "patch embedding is not a plain patch convolution"
    if any(block.attn_mask is not None for block in visual.transformer.resblocks):
        return "attention mask in the image tower"
    return None


def _layer_norm(x: Any, norm: Any) -> Any:
    import torch.nn.functional as F

    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _attention(block: Any, h: Any, last: bool) -> Any:
    """Multi-head self-attention of (n, L, w) tokens, batch-first through SDPA; `last`: the class token's only."""
    import torch.nn.functional as F

    attn = block.attn
    n, length, width = h.shape
    heads = attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if last:
        q = F.linear(h[:, :1], weight[:width], bias[:width]).view(n, 1, heads, -1).transpose(1, 2)
        kv = F.linear(h, weight[width:], bias[width:]).view(n, length, 2, heads, -1).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
    else:
        q, k, v = F.linear(h, weight, bias).view(n, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(n, q.shape[2], width)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


QUICK_GELU = 1.702  # clip.model.QuickGELU: x * sigmoid(1.702 x)


def quick_gelu_mlps(blocks: Any) -> bool:
    """Whether every block's MLP is CLIP's c_fc -> QuickGELU -> c_proj (its activation can then be one SiLU)."""
    return all(all(hasattr(b.mlp, n) for n in ("c_fc", "gelu", "c_proj")) and type(b.mlp.gelu).__name__ ==
               "QuickGELU" for b in blocks)


def silu_scales(blocks: Any) -> dict[int, float]:
    """The factors, by id of the parameter, that turn each block's c_fc -> QuickGELU -> c_proj into c_fc' ->
    SiLU -> c_proj': h * sigmoid(1.702 h) = silu(1.702 h) / 1.702, so c_fc's weight and bias take 1.702 and
    c_proj's weight 1 / 1.702. Eager QuickGELU is three elementwise kernels over the (n, L, 4w) hidden
    activations, seven passes over them; SiLU is one kernel, two passes."""
    scales: dict[int, float] = {}
    for block in blocks:
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        scales.update({id(fc.weight): QUICK_GELU, id(proj.weight): 1 / QUICK_GELU})
        if fc.bias is not None:
            scales[id(fc.bias)] = QUICK_GELU
    return scales


def _mlp(block: Any, x: Any, silu: bool) -> Any:
    import torch.nn.functional as F

    if not silu:
        return block.mlp(x)
    fc, proj = block.mlp.c_fc, block.mlp.c_proj
    return F.linear(F.silu(F.linear(x, fc.weight, fc.bias), inplace=True), proj.weight, proj.bias)


def _block(block: Any, x: Any, last: bool, silu: bool = False) -> Any:
    x = (x[:, :1] if last else x) + _attention(block, _layer_norm(x, block.ln_1), last)
    return x + _mlp(block, _layer_norm(x, block.ln_2), silu)


def _converted(module: Any, dtype: Any, scales: dict[int, float] | None = None) -> Any:
    """A copy of `module` whose parameters are `dtype` copies of its own (times `scales`' factor, by id of the
    parameter, in the source's precision), each made in one pass: deepcopy then `.to` cloned every fp32 weight
    before converting it (0.4-0.5 s of the encoder thread on an H100, at the start-up's critical point)."""
    import copy

    import torch

    scales = scales or {}

    def converted(p: Any) -> Any:
        value = p.detach() * scales[id(p)] if id(p) in scales else p.detach()
        return torch.nn.Parameter(value.to(dtype), requires_grad=False)

    memo = {id(p): converted(p) for p in module.parameters()}
    return copy.deepcopy(module, memo).to(dtype)  # .to: any buffers (the parameters are converted already)


def _fast_class() -> type:
    import torch

    class FastVisual(torch.nn.Module):
        """CLIP's ViT image tower, the same weights in `dtype`, computed the fast way (module docstring)."""

        def __init__(self, visual: Any, dtype: Any, silu: bool = True):
            super().__init__()
            conv = visual.conv1
            self.patch, self.dtype = conv.kernel_size[0], dtype
            self.grid = visual.input_resolution // self.patch
            width = conv.out_channels
            with torch.no_grad():
                pos = visual.positional_embedding.detach().float()
                self.patch_weight = torch.nn.Parameter(conv.weight.detach().reshape(width, -1).to(dtype), False)
                self.class_pos = torch.nn.Parameter((visual.class_embedding.detach().float() + pos[0]).to(dtype)
                                                    .view(1, 1, width), False)
                self.patch_pos = torch.nn.Parameter(pos[1:].to(dtype), False)
                self.proj = torch.nn.Parameter(visual.proj.detach().to(dtype), False)
            self.ln_pre, self.ln_post = _converted(visual.ln_pre, dtype), _converted(visual.ln_post, dtype)
            blocks = visual.transformer.resblocks
            self.silu = silu and quick_gelu_mlps(blocks)
            self.blocks = _converted(blocks, dtype, silu_scales(blocks) if self.silu else None)

        def forward(self, images: Any) -> Any:
            n, p, g = images.shape[0], self.patch, self.grid
            x = images.to(self.dtype).reshape(n, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
            x = torch.nn.functional.linear(x, self.patch_weight) + self.patch_pos
            x = _layer_norm(torch.cat([self.class_pos.expand(n, -1, -1), x], dim=1), self.ln_pre)
            last = len(self.blocks) - 1
            for i, block in enumerate(self.blocks):
                x = _block(block, x, i == last, self.silu)
            return _layer_norm(x[:, 0], self.ln_post) @ self.proj

    return FastVisual


def fast_visual(visual: Any, dtype: Any = None, silu: bool = True) -> Any:
    """The fast rewrite of a loaded CLIP ViT tower (on its device; dtype: fp16 on CUDA, fp32 on CPU); `silu`:
    CLIP's QuickGELU MLPs through one SiLU, their scale folded into the weights (silu_scales)."""
    import torch

    device = visual.conv1.weight.device
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    return _fast_class()(visual, dtype, silu).eval()


# ViT-B/32's tower (the default model): the shapes of warm_ahead's stand-in
AHEAD_TOWER = {"input_resolution": 224, "patch_size": 32, "width": 768, "layers": 12, "heads": 12, "output_dim": 512}


# set once a run's own tower warm-up begins in this process: a stand-in's forward after that only competes
# with the first batches for the GPU and the GIL (it ended 1.2 s after the run's own, beside the first batch,
# when the nvJPEG handles made ahead of it took till then: an H100, round 15)
_OWN_WARM_UP = threading.Event()


def own_warm_up_begins() -> None:
    """Note that a run warms its own tower now: warm_ahead then no longer starts."""
    _OWN_WARM_UP.set()


def warm_ahead(device: int, batch: int, dtype: str = "fp16") -> bool:
    """One forward of the fast tower with ViT-B/32's shapes and uninitialised weights on GPU `device`, on the
    calling thread, once torch is imported (it waits for the import). The kernels' lazy loading (the first
    SDPA calls: 0.6-1 s on a fresh machine), cuBLAS's set-up and the allocator's first blocks then come beside
    the checkpoint's load, not after it. Other towers share most of what it loads. Whether it ran: not once a
    run's own warm-up has begun (own_warm_up_begins)."""
    if _OWN_WARM_UP.is_set():
        return False
    import torch

    from ..encoder import _clip_model, _no_init_mode

    where = torch.device("cuda", device)
    with _no_init_mode(), where:
        visual = _clip_model().VisionTransformer(**AHEAD_TOWER)
    model = fast_visual(visual, getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype]))
    del visual
    if _OWN_WARM_UP.is_set():  # the run's own began while the stand-in was built
        return False
    side = AHEAD_TOWER["input_resolution"]
    stream = torch.cuda.Stream(where)
    with torch.cuda.stream(stream), torch.inference_mode():
        model(torch.zeros((batch, 3, side, side), device=where))
    stream.synchronize()
    return True


class Graphed:
    """`model` replayed from a CUDA graph for CUDA batches of exactly `batch` images, and of each size in
    `also` (others run eagerly). Each size's graph is captured on its first batch (the first unit's at the
    warm-up, on zeros, while the decode threads make that unit: launched op by op beside them, the first batch
    of 256 took 0.37-0.41 s on an H100, round 15); a failed capture is logged once and the model then runs
    eagerly."""

    def __init__(self, model: Callable[[Any], Any], batch: int, also: tuple[int, ...] = ()):
        self.model = model
        self.sizes = {batch, *also}
        self.graphs: dict[int, tuple[Any, Any, Any]] = {}  # size: (graph, static input, static output)
        self.failed = False

    def _capture(self, images: Any) -> tuple[Any, Any, Any]:
        import torch

        static_in = images.clone()
        current = torch.cuda.current_stream(images.device)
        # captured on the stream it replays on (a green context's keeps its kernels on that context's SMs);
        # the legacy default stream cannot capture, so then on a stream of torch's pool
        own = current if current != torch.cuda.default_stream(images.device) else None
        side = own or torch.cuda.Stream(images.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (cuBLAS workspaces, lazy inits)
                self.model(static_in)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=own, capture_error_mode="thread_local"):
            static_out = self.model(static_in)
        return graph, static_in, static_out

    def __call__(self, images: Any) -> Any:
        count = images.shape[0]
        if self.failed or not images.is_cuda or count not in self.sizes:
            return self.model(images)
        if count not in self.graphs:
            try:
                self.graphs[count] = self._capture(images)
            except RuntimeError as exc:
                self.failed = True
                _warn_once(f"CUDA graph capture failed, running eagerly ({str(exc).splitlines()[0]})")
                return self.model(images)
        graph, static_in, static_out = self.graphs[count]
        static_in.copy_(images)
        graph.replay()
        return static_out  # overwritten by the next replay: the caller copies it out on this stream first


def _compiled(model: Callable[[Any], Any], batch: int) -> Callable[[Any], Any]:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", INDUCTOR_CACHE)  # kept across runs: later compiles hit it
    import torch

    compiled = torch.compile(model, dynamic=False, mode="max-autotune-no-cudagraphs")

    def fixed(images: Any) -> Any:  # one shape: the last, short batch is padded, not recompiled
        count = len(images)
        if count < batch:
            images = torch.cat([images, images.new_zeros((batch - count, *images.shape[1:]))])
        return compiled(images)[:count]

    return fixed


def _fast_model(encoder: Encoder) -> Callable[[Any], Any] | None:
    import torch

    reason = fast_supported(encoder.model.visual)
    if reason is not None:
        _warn_once(f"the reference image tower runs: {reason}")
        return None
    cuda = encoder.device.startswith("cuda")
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    return fast_visual(encoder.model.visual, dtypes.get(encoder.precision) if cuda else torch.float32)


def compiles(encoder: Encoder, gpu: Any, items: int) -> bool:
    """Whether image_model compiles the tower: as gpu.compile says (auto: jobs large enough to pay it back)."""
    auto = COMPILE_MIN_ITEMS is not None and items >= COMPILE_MIN_ITEMS and encoder.device.startswith("cuda")
    return gpu.compile == "on" or (gpu.compile == "auto" and auto)


def image_model(encoder: Encoder, gpu: Any, items: int, batch: int,
                first: int | None = None) -> Callable[[Any], Any]:
    """The image tower of gpu.tower (eager; fast: from CUDA graphs, of `batch` images and of the first unit's
    `first`; reference), compiled when `compiles`. A compiled fast tower is replayed from a graph too:
    launched kernel by kernel, the compiled tower's run was bound by its launches (an H200 at 1M, round 12:
    44.6 s of a 75.7 s run in the calls into the compiled tower, 4.6-5.4 s into the graph of the uncompiled
    one)."""
    fast = _fast_model(encoder) if gpu.tower != "reference" else None
    model = fast or reference_model(encoder)
    model = _compiled(model, batch) if compiles(encoder, gpu, items) else model
    graphed = fast is not None and gpu.tower == "fast" and encoder.device.startswith("cuda")
    return Graphed(model, batch, () if first is None else (first,)) if graphed else model
