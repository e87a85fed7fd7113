"""Regional torch.compile of both experts (`BerniniPipeline.compile`): no graph break in the block, one graph per input
layout whatever the branch lengths, outputs equal to eager, off by default."""

import pytest
import torch
from diffusers import FirstBlockCacheConfig
from torch._dynamo.utils import counters

from bernini_diffusers import cli
from bernini_diffusers.testing import tiny_pipeline

# Inductor on a CPU reorders float ops; measured max abs diff on the final latents: 2.1e-6 for this rv2v call at 40
# steps, 1.3e-6 to 2.9e-6 in benchmarks/bench_compile.py (4 to 40 steps). The reference-renderer parity tolerance.
INDUCTOR_ATOL = 2e-5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty compile caches and counters, and leaves none behind."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def _rv2v(pipe, media_dir, steps: int) -> torch.Tensor:
    """A tiny rv2v call: four branches of three packed lengths (none, V, VI); from 2 steps on, both experts run."""
    return pipe(
        "edit",
        task_type="rv2v",
        video=str(media_dir / "source.mp4"),
        images=[str(media_dir / "ref_a.png"), str(media_dir / "ref_b.png")],
        num_frames=5,
        height=32,
        width=48,
        num_inference_steps=steps,
        output_type="latent",
        generator=torch.Generator("cpu").manual_seed(42),
    ).frames


def _blocks(pipe):
    return [block for expert in (pipe.transformer, pipe.transformer_2) for block in expert.blocks]


def _block_inputs(model, conditions):
    """The positional inputs the first block receives in one forward, with or without condition streams."""
    captured = []
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: captured.append(args))
    latent = torch.randn(1, 16, 2, 4, 6)
    ids = [float(i + 1) for i in range(len(conditions))]
    try:
        with torch.no_grad():
            model(latent, torch.tensor([999]), torch.randn(1, 512, 32), condition_latents=conditions or None,
                  condition_source_ids=ids or None)  # fmt: skip
    finally:
        hook.remove()
    return captured[0]


@pytest.mark.parametrize("conditions", ["plain", "packed"])
def test_block_has_no_graph_break(conditions):
    pipe = tiny_pipeline()
    streams = [] if conditions == "plain" else [torch.randn(1, 16, 2, 4, 6), torch.randn(1, 16, 1, 4, 4)]
    args = _block_inputs(pipe.transformer, streams)
    block = pipe.transformer.blocks[0]
    with torch.no_grad():
        explained = torch._dynamo.explain(block)(*args)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        expected = block(*args)
        counters.clear()
        block.compile(fullgraph=True, dynamic=True, backend="eager")  # a graph break would raise here
        assert torch.equal(block(*args), expected)
    assert counters["stats"]["unique_graphs"] == 1


def test_off_by_default(media_dir):
    pipe = tiny_pipeline()
    assert all(block._compiled_call_impl is None for block in _blocks(pipe))
    _rv2v(pipe, media_dir, steps=1)
    assert counters["stats"]["unique_graphs"] == 0  # dynamo never ran: the default call is the eager code


def test_compiled_rv2v_equals_eager_with_one_graph_per_layout(media_dir):
    pipe = tiny_pipeline()
    eager = _rv2v(pipe, media_dir, steps=2)
    pipe.compile(backend="eager")  # dynamo's capture without code generation: same kernels, same order
    assert all(block._compiled_call_impl is not None for block in _blocks(pipe))
    compiled = _rv2v(pipe, media_dir, steps=2)
    assert torch.equal(compiled, eager)
    # 2 steps x 4 branches on 2 experts x 2 blocks, lengths 12 (target), 24 (V + target) and 36 (VI + target): one
    # graph for Wan's own target-only forward, one for the packed sequence, shared by every block of both experts.
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]
    _rv2v(pipe, media_dir, steps=2)
    assert counters["stats"]["unique_graphs"] == 2  # a second call compiles nothing


def test_compile_settings_are_checked_and_a_second_call_is_a_no_op():
    pipe = tiny_pipeline()
    for bad, message in [
        ({"backend": "no_such_backend"}, "`backend`='no_such_backend'"),
        ({"mode": "fastest"}, "`mode`='fastest'"),
        ({"fullgraph": "yes"}, "`fullgraph`='yes'"),
        ({"dynamic": 1}, "`dynamic`=1"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe.compile(**bad)
    assert all(block._compiled_call_impl is None for block in _blocks(pipe))
    pipe.compile(backend="eager")
    wrappers = [block._compiled_call_impl for block in _blocks(pipe)]
    pipe.compile(backend="eager")
    assert [block._compiled_call_impl for block in _blocks(pipe)] == wrappers
    with pytest.raises(ValueError, match="already compiled"):
        pipe.compile(backend="inductor")


def test_fullgraph_with_a_step_cache_is_refused():
    pipe = tiny_pipeline()
    pipe.transformer_2.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    with pytest.raises(ValueError, match="FirstBlockCacheConfig.*fullgraph=False"):
        pipe.compile()
    assert all(block._compiled_call_impl is None for block in _blocks(pipe))
    pipe.compile(fullgraph=False, backend="eager")  # the hooks' decisions run eager between graphs
    assert all(block._compiled_call_impl is not None for block in _blocks(pipe))


def test_compile_without_experts_is_refused():
    pipe = tiny_pipeline(two_experts=False)
    pipe.transformer = None
    with pytest.raises(ValueError, match="no expert"):
        pipe.compile()


def test_compile_flag():
    parse = cli.build_parser().parse_args
    compiled = cli.load_pipeline(parse(["generate", "--model", "tiny", "--compile"]))
    assert all(block._compiled_call_impl is not None for block in _blocks(compiled))
    assert compiled._compile_settings == {"dynamic": True, "fullgraph": True, "mode": None, "backend": "inductor"}
    plain = cli.load_pipeline(parse(["generate", "--model", "tiny"]))
    assert all(block._compiled_call_impl is None for block in _blocks(plain))


def test_compile_flag_with_a_cache_preset_is_refused_before_loading(capsys):
    argv = ["generate", "--model", "tiny", "--prompt", "p", "--compile", "--cache_preset", "fbc-fast"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--compile" in err and "--cache_preset" in err and "random weights" not in err  # before the model loads


@pytest.mark.slow
def test_inductor_rv2v_matches_eager(media_dir):
    pipe = tiny_pipeline()
    eager = _rv2v(pipe, media_dir, steps=4)
    pipe.compile()
    compiled = _rv2v(pipe, media_dir, steps=4)
    diff = (compiled - eager).abs().max().item()
    assert diff <= INDUCTOR_ATOL, diff
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.slow
def test_full_rv2v_call_recompiles_once(media_dir):
    pipe = tiny_pipeline()
    pipe.compile(backend="eager")  # dynamo's graph capture and guards are the backend's input: counts are the same
    _rv2v(pipe, media_dir, steps=40)
    assert counters["stats"]["unique_graphs"] == 2
