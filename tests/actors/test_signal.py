"""The wire format: exact top-k at temperature, compact dtypes, chunking changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.signal import id_dtype, topk_signal


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_topk_signal_is_exact_log_softmax_at_temperature(temperature, chunk):
    torch.manual_seed(0)
    features, head = torch.randn(10, 16), torch.nn.Linear(16, 300, bias=False)
    with torch.no_grad():
        head.weight.mul_(3)
        ref = torch.log_softmax(head(features) / temperature, -1)
    sig = topk_signal(
        features, head, k=8, temperature=temperature, teacher="t", vocab_size=300, chunk=chunk
    )
    top_lp, top_ids = ref.topk(8, dim=-1)
    assert sig.ids.dtype == np.uint16 and sig.logprobs.dtype == np.float16
    assert np.array_equal(sig.ids.astype(np.int64), top_ids.numpy())
    np.testing.assert_allclose(sig.logprobs.astype(np.float32), top_lp.numpy(), atol=2e-3)
    assert sig.nbytes == 10 * 8 * (2 + 2)


def test_id_dtype_widens_past_uint16():
    assert id_dtype(65536) == np.uint16
    assert id_dtype(262144) == np.int32
    logits = torch.zeros(1, 70000)
    logits[0, 69999] = 5.0
    sig = topk_signal(
        logits, lambda x: x, k=1, temperature=1.0, teacher="t", vocab_size=70000, chunk=4
    )
    assert sig.ids.dtype == np.int32 and int(sig.ids[0, 0]) == 69999
