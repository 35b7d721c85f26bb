"""GPT-2's lean pass with compiled steps (`mmcap.generation.compiled_pass`): the same captions as
the eager pass, one graph per shape however many steps and batches, and the same buffers batch
after batch (what a CUDA graph replays on). On CPUs torch.compile traces the same function a GPU
would replay as a CUDA graph; only the replay is not tested here."""
import pytest
import torch

from mmcap.generation import GenerationConfig, generate
from mmcap.generation.compiled_pass import (_POOL, CompiledGPT2Decoding, CompiledStaticAttention,
                                            compile_options)
from mmcap.generation.passes import decoding_pass

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def counting():
    """A torch.compile backend that runs the traced graph eagerly and counts the graphs made (and,
    in `graphs.runs`, the steps they ran)."""
    torch._dynamo.reset()
    _POOL.clear()
    graphs = Graphs()

    def backend(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            graphs.runs += 1
            return gm.forward(*args)
        return run

    yield backend, graphs
    torch._dynamo.reset()
    _POOL.clear()


class Graphs(list):
    runs = 0


def _memory(b: int = 5, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(b, 4, 32) * 5


@pytest.mark.parametrize("kw", [{}, {"num_beams": 3}, {"num_beams": 2, "no_repeat_ngram_size": 2, "length_penalty": 0.5}],
                         ids=["greedy", "beam3", "beam2-ngram"])
def test_compiled_steps_decode_as_the_eager_pass(peaky_gpt2, counting, kw):
    backend, graphs = counting
    tok, cfg = peaky_gpt2.tokenizer, GenerationConfig.from_kwargs(max_new_tokens=10, **kw)
    compiled = CompiledStaticAttention({"backend": backend, "fullgraph": True, "dynamic": False})
    apart = False
    for seed in (1, 2, 3):  # three batches of the same shape
        args = (peaky_gpt2.decoder, _memory(seed=seed), tok.bos_id, tok.eos_id, tok.pad_id, cfg)
        eager, fast = generate(*args), generate(*args, attention=compiled)
        assert torch.equal(fast.sequences, eager.sequences) and torch.equal(fast.lengths, eager.lengths)
        torch.testing.assert_close(fast.scores, eager.scores, atol=1e-5, rtol=1e-5)
        apart |= len(set(eager.lengths.tolist())) > 1
    # images finished apart (the eager pass dropped them, the compiled one kept their rows), yet
    # one graph served every step after the first, in all three batches
    assert apart
    assert len(graphs) == 1


def test_compiled_steps_after_a_prompt(peaky_gpt2, counting):
    """BOS and a prompt go through eagerly, position by position; the steps after them compile once."""
    backend, graphs = counting
    tok, cfg = peaky_gpt2.tokenizer, GenerationConfig.from_kwargs(max_new_tokens=6, num_beams=3)
    compiled = CompiledStaticAttention({"backend": backend, "fullgraph": True})
    args = (peaky_gpt2.decoder, _memory(), tok.bos_id, tok.eos_id, tok.pad_id, cfg)
    prompts = [[5, 7]] * 5
    eager, fast = generate(*args, prompts=prompts), generate(*args, prompts=prompts, attention=compiled)
    assert torch.equal(fast.sequences, eager.sequences) and torch.equal(fast.lengths, eager.lengths)
    torch.testing.assert_close(fast.scores, eager.scores, atol=1e-5, rtol=1e-5)
    assert len(graphs) == 1 and graphs.runs == 5  # steps 2-6 (the first new token comes with the prompt)


def test_compiled_pass_reuses_its_buffers(peaky_gpt2, counting):
    """A second pass of the same shape takes the first one's buffers (once it is freed): the
    addresses a CUDA graph was recorded on. Beam reorders happen on the device, inside the step."""
    backend, graphs = counting
    decoder, bos = peaky_gpt2.decoder, peaky_gpt2.tokenizer.bos_id
    # a mapping among the options (torch.compile's own `options=`) is no obstacle
    compiled = CompiledStaticAttention({"backend": backend, "fullgraph": True, "options": {}})
    addresses = []
    for _ in range(2):
        dec = decoding_pass(decoder, _memory(2), max_len=8, attention=compiled)
        assert isinstance(dec, CompiledGPT2Decoding) and dec.static_rows
        seqs = torch.full((2, 1), bos)
        dec(seqs)
        dec.expand(3)
        seqs = seqs.repeat_interleave(3, 0)
        for step in range(4):
            dec.reorder(torch.tensor([2, 0, 1, 5, 5, 3]))
            seqs = torch.cat([seqs, torch.full((6, 1), 4 + step)], 1)
            logits, _ = dec(seqs)
            assert logits.shape == (6, decoder.config.vocab_size)
        att = dec.attention
        assert att.pos.item() == 5 and torch.isinf(att.bias[5:]).all() and (att.bias[:5] == 0).all()
        assert torch.equal(att.pending, torch.arange(6))  # each step applied and cleared its reorder
        addresses.append([t.data_ptr() for t in (*att.kv, att.pos, att.bias, *att.cross[0])])
        with pytest.raises(RuntimeError, match="keeps every image"):
            dec.keep(torch.tensor([0]))
        del dec, att
    assert addresses[0] == addresses[1]
    assert len(graphs) == 1


def test_compile_options():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert compile_options(False, cpu) is None
    assert compile_options(True, cpu) == {"fullgraph": True, "dynamic": False}
    assert compile_options(True, gpu) == {"fullgraph": True, "dynamic": False, "mode": "reduce-overhead"}
    assert compile_options({"mode": "max-autotune"}, gpu)["mode"] == "max-autotune"
    with pytest.raises(ValueError, match="compile_decoder"):
        compile_options("yes", cpu)


def test_caption_and_cli_with_a_compiled_decoder(peaky_gpt2, counting, image_files, tmp_path, monkeypatch, capsys):
    """`InferencePlan.resolve(..., compile_decoder=...)` and `mmcap caption --compile-decoder` give
    the eager captions, through one graph per shape (the last, smaller batch is a second shape)."""
    from mmcap.accel.plan import InferencePlan
    from mmcap.cli import main as mmcap_main
    from mmcap.generation import compiled_pass

    backend, graphs = counting
    monkeypatch.setitem(compiled_pass.DEFAULT_OPTIONS, "backend", backend)  # what `True` means, counted
    kw = {"num_beams": 3, "max_new_tokens": 6}
    plan = InferencePlan.resolve("fp32", "cpu", compile_decoder=True)
    images = [str(p) for p in image_files]
    eager = peaky_gpt2.caption(images, batch_size=3, **kw)
    assert peaky_gpt2.caption(images, batch_size=3, precision=plan, **kw) == eager
    assert len(graphs) == 2 and len(set(eager)) > 1
    peaky_gpt2.save_pretrained(tmp_path / "m")
    args = ["caption", "--model", str(tmp_path / "m"), "--num-beams", "3", "--max-new-tokens", "6",
            "--batch-size", "3", "--num-workers", "0", "--no-refill", *images]
    assert mmcap_main(args) == 0
    plain = capsys.readouterr().out
    runs = graphs.runs
    assert mmcap_main(["caption", "--compile-decoder", *args[1:]]) == 0
    assert capsys.readouterr().out == plain and plain.count("\n") == len(images)
    # the command's model (loaded anew, the same shapes) ran its 5 steps per batch on the same graphs
    assert len(graphs) == 2 and graphs.runs == runs + 2 * 5
    with pytest.raises(ValueError, match="int8"):
        InferencePlan.resolve("int8", "cpu", compile_decoder=True)
    with pytest.raises(SystemExit):
        mmcap_main(["caption", "--compile-decoder", "--engine", "ray", *args[1:]])
    assert "--compile-decoder is for --engine local" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the replay of the recorded graphs")
def test_cuda_graphs_replay_the_steps(peaky_gpt2):
    """On a GPU (inductor, reduce-overhead): the steps run as CUDA graphs, none skipped, recorded
    once for three batches, with only the step's tokens copied in per replay; eager captions."""
    from torch._dynamo.utils import counters

    from mmcap.accel.plan import InferencePlan

    torch._dynamo.reset()
    _POOL.clear()
    model = peaky_gpt2.to("cuda")
    kw = {"num_beams": 3, "max_new_tokens": 8}
    images = [torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    eager = [model.caption(x.cuda(), **kw) for x in images]
    plan = InferencePlan.resolve("fp32", "cuda", compile_decoder=True)
    counters.clear()
    assert [model.caption(x.cuda(), precision=plan, **kw) for x in images] == eager
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] <= 2  # the tokens (warm-up, record)
