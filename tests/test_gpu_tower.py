"""The GPU path's fast image tower equals CLIP's own ViT forward (fp32 on CPU here; fp16 on the GPU by
scripts/bench_gpu_stages.py), for any width, patch size, resolution and depth."""

import pytest
import torch

from pnsfw.indexer.gpu.tower import Graphed, fast_supported, fast_visual

SHAPES = [dict(image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8),
          dict(image_resolution=48, vision_layers=3, vision_width=128, vision_patch_size=16),
          dict(image_resolution=28, vision_layers=1, vision_width=192, vision_patch_size=7)]


def _visual(seed: int, **shape: int) -> torch.nn.Module:
    from clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(embed_dim=48, context_length=8, vocab_size=64, transformer_width=32, transformer_heads=2,
                 transformer_layers=1, **shape)
    visual = model.visual.float().eval()
    with torch.no_grad():  # LayerNorms start as identity (1, 0): random ones test that the rewrite applies them
        for module in visual.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return visual


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"w{s['vision_width']}-p{s['vision_patch_size']}")
def test_fast_tower_equals_the_reference_forward(shape: dict[str, int]) -> None:
    visual = _visual(1, **shape)
    assert fast_supported(visual) is None
    images = torch.randn(5, 3, shape["image_resolution"], shape["image_resolution"])
    with torch.inference_mode():
        want, got = visual(images), fast_visual(visual)(images)
    assert got.shape == want.shape and got.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=1)
    assert cosine.min().item() >= 0.9999
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fast_tower_keeps_the_loaded_model_untouched() -> None:
    visual = _visual(2, **SHAPES[0])
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    fast = fast_visual(visual, torch.float64)
    assert all(torch.equal(before[k], v) for k, v in visual.state_dict().items())
    assert all(v.dtype == torch.float32 for v in visual.state_dict().values())
    assert {p.dtype for p in fast.parameters()} == {torch.float64}
    # the blocks' weights are converted copies (one pass each), equal in value (the MLPs' scaled for the SiLU:
    # c_fc's by 1.702, c_proj's weight by 1 / 1.702) and sharing no memory
    ours, theirs = fast.blocks.state_dict(), visual.transformer.resblocks.state_dict()
    assert ours.keys() == theirs.keys() and fast.silu
    scale = {"mlp.c_fc.weight": 1.702, "mlp.c_fc.bias": 1.702, "mlp.c_proj.weight": 1 / 1.702}
    factor = {k: scale.get(k.split(".", 1)[1], 1.0) for k in ours}
    assert sum(f != 1.0 for f in factor.values()) == 3 * len(visual.transformer.resblocks)
    assert all(torch.equal(ours[k], (theirs[k] * factor[k]).double() if factor[k] != 1.0 else theirs[k].double())
               for k in ours)
    assert not {t.data_ptr() for t in ours.values()} & {t.data_ptr() for t in theirs.values()}


def test_the_quick_gelu_mlps_run_as_one_silu_with_the_same_result() -> None:
    """QuickGELU (three elementwise kernels) as one SiLU, its 1.702 folded into c_fc and c_proj: the same
    function. A tower with another activation keeps its MLPs as they are, and still equals the reference."""
    visual = _visual(6, **SHAPES[1])
    images = torch.randn(4, 3, 48, 48)
    folded, unfolded = fast_visual(visual), fast_visual(visual, silu=False)
    assert folded.silu and not unfolded.silu
    with torch.inference_mode():
        want, got, plain = visual(images), folded(images), unfolded(images)
    assert torch.allclose(got, plain, rtol=1e-5, atol=1e-5) and torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    visual.transformer.resblocks[1].mlp.gelu = torch.nn.GELU()
    other = fast_visual(visual)
    assert not other.silu
    with torch.inference_mode():
        want, got = visual(images), other(images)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_unsupported_towers_are_named() -> None:
    from clip.model import ModifiedResNet

    assert "not a CLIP ViT" in str(fast_supported(ModifiedResNet((1, 1, 1, 1), 32, 2, 64, 8)))


def test_graph_wrapper_runs_cpu_batches_eagerly() -> None:
    visual = _visual(3, **SHAPES[0])
    model = Graphed(fast_visual(visual), batch=4, also=(2,))
    for count in (4, 2):
        images = torch.randn(count, 3, 32, 32)
        with torch.inference_mode():
            assert torch.equal(model(images), model.model(images))
    assert not model.graphs


@pytest.mark.parametrize(("device", "tower", "compiled", "graphed"), [
    ("cuda", "fast", "on", True), ("cuda", "fast", "off", True), ("cuda", "eager", "on", False),
    ("cuda", "reference", "on", False), ("cpu", "fast", "on", False)])
def test_the_fast_tower_is_replayed_from_a_graph_on_cuda_compiled_or_not(
        monkeypatch: pytest.MonkeyPatch, device: str, tower: str, compiled: str, graphed: bool) -> None:
    """`--compile on` compiles the model the graph then captures: launched kernel by kernel, the compiled
    tower was bound by its launches (round 12)."""
    from types import SimpleNamespace

    from pnsfw.indexer.gpu import tower as towers
    from pnsfw.indexer.gpu.options import GpuOptions

    wrappers: list = []

    def compile_stand_in(model, batch):  # torch.compile itself takes minutes: what matters is the order
        wrappers.append(lambda images: model(images))
        return wrappers[-1]

    monkeypatch.setattr(towers, "_compiled", compile_stand_in)
    encoder = SimpleNamespace(model=SimpleNamespace(visual=_visual(5, **SHAPES[0])), device=device,
                              precision="fp32")
    model = towers.image_model(encoder, GpuOptions(tower=tower, compile=compiled), 0, 4, 2)  # type: ignore[arg-type]
    assert isinstance(model, Graphed) == graphed and len(wrappers) == (compiled == "on")
    assert not graphed or model.sizes == {4, 2}  # type: ignore[union-attr]  # the full batches' and the first unit's
    inner = model.model if isinstance(model, Graphed) else model
    assert (inner in wrappers) == (compiled == "on")  # the graph holds the compiled model, not the raw one


@pytest.mark.parametrize(("device", "compile_", "items", "expected"), [
    ("cuda", "auto", 50_000_000, True), ("cuda", "auto", 49_999_999, False), ("cpu", "auto", 10**9, False),
    ("cuda", "off", 10**9, False), ("cuda", "on", 1, True)])
def test_auto_compiles_only_jobs_large_enough_to_pay_a_cold_compile_back(
        device: str, compile_: str, items: int, expected: bool) -> None:
    """Round 13: compiled and graphed, 5.2 us an image less than eager, after a cold compile of 229 s."""
    from types import SimpleNamespace

    from pnsfw.indexer.gpu import tower as towers
    from pnsfw.indexer.gpu.options import GpuOptions

    encoder = SimpleNamespace(device=device)
    assert towers.compiles(encoder, GpuOptions(compile=compile_), items) == expected  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_default_graph_tower_equals_the_fp32_reference_on_cuda() -> None:
    """`--gpu-tower fast` (the default): full fp16 batches and the first unit's replayed from CUDA graphs, the
    others eager; each batch within min cosine 0.9999 of CLIP's fp32 forward on the CPU."""
    visual = _visual(4, **SHAPES[1])
    model = Graphed(fast_visual(visual.cuda()), batch=6, also=(3,))
    for count in (3, 6, 6, 2, 3, 6):  # capture 3, capture 6, replay, eager, replays with new inputs
        images = torch.randn(count, 3, 48, 48)
        with torch.inference_mode():
            want = visual.cpu()(images)
            got = model(images.cuda()).float().cpu()
            visual.cuda()
        assert torch.nn.functional.cosine_similarity(got, want, dim=1).min().item() >= 0.9999
    assert set(model.graphs) == {3, 6} and not model.failed


def test_tower_sms_option_checks_its_value_and_green_streams_fail_with_a_reason():
    from pnsfw.errors import BadInput
    from pnsfw.indexer.gpu.green import GreenUnavailable, green_stream
    from pnsfw.indexer.gpu.options import GpuOptions

    with pytest.raises(BadInput, match="tower SMs"):
        GpuOptions(tower_sms=-1)
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark measures the green context")
    with pytest.raises(GreenUnavailable, match="CUDA"):
        green_stream(0, 8)
