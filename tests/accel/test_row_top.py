"""mmcap's C++ log-softmax top k (`csrc/row_top.cpp`), beam search's row top in the lossy modes,
against torch's log_softmax then topk."""
import pytest
import torch

from mmcap.accel import kernels as compiled

kernels = compiled.kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="no C++ compiler here")


@pytest.mark.parametrize("vocab, k", [(50257, 7), (100, 6), (5, 5), (64, 1)])
def test_the_best_log_probs_of_each_row_and_their_tokens(vocab, k):
    torch.manual_seed(0)
    logits = torch.randn(9, vocab + 3)[:, :vocab] * 4  # rows with a stride of their own
    logits[0, : vocab // 2] = float("-inf")  # banned tokens
    logits[1] = 0.5  # one value everywhere: the first k tokens, all at log(1 / vocab)
    logits[2, -1] = 30  # the last token, past the whole blocks, best
    values, tokens = kernels.log_softmax_top(logits, k)
    want_values, want_tokens = torch.topk(torch.log_softmax(logits, -1), k)
    assert values.shape == tokens.shape == (9, k) and tokens.dtype == torch.long
    assert torch.equal(tokens[1], torch.arange(k))  # among equal values the first tokens come first
    assert torch.equal(tokens[[0, *range(2, 9)]], want_tokens[[0, *range(2, 9)]])
    torch.testing.assert_close(values, want_values, rtol=0, atol=2e-6)


def test_refuses_what_it_cannot_do():
    with pytest.raises(RuntimeError, match="k = 0 outside"):
        kernels.log_softmax_top(torch.randn(2, 10), 0)
    with pytest.raises(RuntimeError, match="fp32 logits"):
        kernels.log_softmax_top(torch.randn(2, 10).double(), 2)
