"""The fast paths compute what the obvious ones do: fp32 captions equal a plain torchvision +
transformers pipeline's, the lean GPT-2 decoding equals the transformers forward, and bf16 is an
opt-in that only changes precision."""
import subprocess
import sys

import pytest
import torch
from PIL import Image

from mmcap.generation import GenerationConfig, generate
from mmcap.accel.precision import bf16_is_fast, compute_dtype

# The naive reference pipeline is the benchmarks' (benchmarks/reference.py, importable through
# pytest's `pythonpath`), so that the test and bench_caption hold mmcap to the same reference.
from reference import NaivePipeline, TransformersForward

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kw", [{"num_beams": 3, "max_new_tokens": 8},
                                {"num_beams": 3, "min_new_tokens": 6, "max_new_tokens": 6},
                                {"max_new_tokens": 8}], ids=["beam3", "beam3-exact-length", "greedy"])
def test_fp32_captions_equal_the_naive_pipeline(peaky_gpt2, image_files, kw):
    ours = peaky_gpt2.caption([str(p) for p in image_files], precision="fp32", **kw)
    assert ours == NaivePipeline(peaky_gpt2).caption(image_files, **kw)
    assert len(set(ours)) > 1  # the images really steer the captions


@pytest.mark.parametrize("kw", [{}, {"num_beams": 3}, {"num_beams": 4, "length_penalty": 0.5, "early_stopping": True},
                                {"num_beams": 2, "no_repeat_ngram_size": 2, "min_new_tokens": 3}])
def test_gpt2_path_equals_transformers_forward(peaky_gpt2, kw):
    """The lean GPT-2 decoding against the generic one (transformers' forward with its caches),
    which `generate` takes for any decoder that is not a GPT2LMHeadModel itself."""
    torch.manual_seed(1)
    memory = torch.randn(5, 4, 32) * 5
    tok, cfg = peaky_gpt2.tokenizer, GenerationConfig.from_kwargs(max_new_tokens=10, **kw)
    forward_calls = []
    hook = peaky_gpt2.decoder.register_forward_hook(lambda *args: forward_calls.append(1))
    try:
        lean = generate(peaky_gpt2.decoder, memory, tok.bos_id, tok.eos_id, tok.pad_id, cfg)
        assert not forward_calls  # the lean path never runs the transformers forward
        generic = generate(TransformersForward(peaky_gpt2.decoder), memory, tok.bos_id, tok.eos_id, tok.pad_id, cfg)
        assert forward_calls  # ... and the generic path does
    finally:
        hook.remove()
    assert torch.equal(lean.sequences, generic.sequences) and torch.equal(lean.lengths, generic.lengths)
    assert len(set(lean.lengths.tolist())) > 1 or kw.get("min_new_tokens")
    torch.testing.assert_close(lean.scores, generic.scores, atol=1e-5, rtol=1e-5)


def test_bf16_is_opt_in_and_close(peaky_gpt2, image_files):
    paths = [str(p) for p in image_files]
    fp32, s32 = peaky_gpt2.caption(paths, num_beams=3, max_new_tokens=6, return_scores=True)
    bf16, s16 = peaky_gpt2.caption(paths, num_beams=3, max_new_tokens=6, return_scores=True, precision="bf16")
    assert fp32 == peaky_gpt2.caption(paths, num_beams=3, max_new_tokens=6, precision="fp32")  # fp32 is the default
    assert len(bf16) == 4 and all(isinstance(c, str) for c in bf16)
    assert s16.dtype == torch.float32 and torch.isfinite(s16).all()
    assert next(peaky_gpt2.parameters()).dtype == torch.float32  # autocast: the model itself is untouched
    with pytest.raises(ValueError, match="precision"):
        peaky_gpt2.caption(paths, precision="fp16")


def test_precision_auto_follows_the_hardware():
    assert compute_dtype("fp32") == torch.float32 and compute_dtype("bf16") == torch.bfloat16
    assert compute_dtype("auto") == (torch.bfloat16 if bf16_is_fast("cpu") else torch.float32)
    assert not bf16_is_fast("meta")


def test_draft_decoding_changes_only_large_jpegs(peaky_gpt2, image_files, tmp_path):
    small = [str(p) for p in image_files]
    assert torch.equal(peaky_gpt2.preprocess(small)[0], peaky_gpt2.preprocess(small, draft=True)[0])
    torch.manual_seed(0)
    big = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8), size=(480, 640), mode="bilinear")[0]
    path = tmp_path / "big.jpg"
    Image.fromarray((big.permute(1, 2, 0) * 255).byte().numpy()).save(path, quality=95)
    full, drafted = peaky_gpt2.preprocess(str(path))[0], peaky_gpt2.preprocess(str(path), draft=True)[0]
    assert not torch.equal(full, drafted)
    assert (full - drafted).abs().mean() < 0.05  # normalised units: a smooth photo looks the same


@pytest.mark.slow
def test_cli_precision_bf16(peaky_gpt2, image_files, tmp_path):
    peaky_gpt2.save_pretrained(tmp_path / "m")
    cmd = [sys.executable, "-m", "mmcap.cli", "caption", "--model", str(tmp_path / "m"), "--precision", "bf16",
           "--max-new-tokens", "5", "--num-beams", "2", *[str(p) for p in image_files]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == len(image_files)
