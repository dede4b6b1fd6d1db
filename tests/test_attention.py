"""models.kernels.attention: a prompt's attention, through bf16 matmuls on CPUs without AMX, against fp32 SDPA."""
import pytest
import torch
import torch.nn.functional as F

import models.kernels.attention as attention
from models.kernels.attention import MaskKinds, mask_kind, prompt_attention
from models.kernels.cpu import has_amx_bf16, native_bf16


def heads(length: int, seed: int, batch: int = 2, num_heads: int = 3, head_dim: int = 16):
    """query, key, value (batch, heads, length, head_dim) in bf16: strided views of one QKV projection, as the
    models pass them."""
    mixed = torch.randn(batch, length, 3 * num_heads * head_dim, generator=torch.Generator().manual_seed(seed))
    mixed = mixed.bfloat16()
    return mixed.view(batch, length, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


@pytest.fixture
def matmul_path(monkeypatch):
    """The two-matmul path wherever the test runs (on a CPU without native bf16 its products are emulated,
    the numbers the same), with blocks of 16 queries so that prompts span several."""
    monkeypatch.setattr(attention, "uses_matmul_attention", lambda query: True)
    monkeypatch.setattr(attention, "SCORE_BYTES", 1)
    monkeypatch.setattr(attention, "MIN_QUERY_BLOCK", 16)


def test_the_matmul_path_is_taken_where_it_was_measured_faster():
    query = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert attention.uses_matmul_attention(query) == (native_bf16() and not has_amx_bf16())
        assert not attention.uses_matmul_attention(query.float())
    assert not attention.uses_matmul_attention(query)  # autograd: SDPA


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [5, 16, 43])
def test_matmul_attention_tracks_fp32_sdpa(matmul_path, causal, length):
    """Within bf16's precision of fp32 SDPA over the same bf16 numbers, across block edges."""
    query, key, value = heads(length, seed=length)
    expected = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), is_causal=causal)
    bf16_sdpa = F.scaled_dot_product_attention(query, key, value, is_causal=causal)
    with torch.no_grad():
        ours = prompt_attention(query, key, value, causal=causal)
    assert ours.dtype == torch.bfloat16 and ours.shape == query.shape
    ours_error = (ours.float() - expected).abs().max().item()
    sdpa_error = (bf16_sdpa.float() - expected).abs().max().item()
    # two roundings to bf16 (scores, probabilities) where SDPA has one (probabilities)
    assert ours_error <= max(3 * sdpa_error, 2 ** -7), (ours_error, sdpa_error)


def test_causal_queries_do_not_see_later_keys(matmul_path):
    """Changing the keys and values after position p leaves the outputs of positions 0..p exactly as they were,
    in p's block and in earlier ones."""
    query, key, value = heads(40, seed=1)
    p = 20  # inside the second block of 16
    key2, value2 = key.clone(), value.clone()
    key2[:, :, p + 1:] = 50.0
    value2[:, :, p + 1:] = -7.0
    with torch.no_grad():
        before = prompt_attention(query, key, value, causal=True)
        after = prompt_attention(query, key2, value2, causal=True)
    assert torch.equal(before[:, :, :p + 1], after[:, :, :p + 1])
    assert not torch.equal(before[:, :, p + 1:], after[:, :, p + 1:])


def test_a_mask_or_autograd_goes_to_sdpa():
    query, key, value = heads(9, seed=2)
    mask = torch.rand(9, 9, generator=torch.Generator().manual_seed(0)) > 0.3
    mask.fill_diagonal_(True)
    with torch.no_grad():
        assert torch.equal(prompt_attention(query, key, value, mask=mask),
                           F.scaled_dot_product_attention(query, key, value, attn_mask=mask))
    assert torch.equal(prompt_attention(query, key, value, causal=True),
                       F.scaled_dot_product_attention(query, key, value, is_causal=True))


def test_causal_attention_needs_a_square(matmul_path):
    query, key, value = heads(8, seed=3)
    with torch.no_grad(), pytest.raises(ValueError, match="as many queries as keys"):
        prompt_attention(query[:, :, :3], key, value, causal=True)


def test_the_vit_attends_through_prompt_attention_only_in_inference(monkeypatch):
    """The ViT's full attention goes to `prompt_attention` without dropout or autograd hooks in the way, and
    keeps SAT's path in training (dropout), with the same numbers in inference as SAT's own attention."""
    from conftest import randomize_, tiny_args
    from models import CogVLMModel
    from models.eva_clip_model import PromptAttentionMixin

    vit = randomize_(CogVLMModel(tiny_args()), seed=3).get_mixin("eva").vit_model
    assert isinstance(vit.mixins["prompt-attention"], PromptAttentionMixin)
    calls = []
    monkeypatch.setattr("models.eva_clip_model.prompt_attention",
                        lambda q, k, v: calls.append(q.shape) or prompt_attention(q, k, v))
    images = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = vit.eval()(images)[0]
        assert len(calls) == 1 and calls[0][2] == 10  # one layer, CLS + 9 patches
        vit.del_mixin("prompt-attention")
        sat = vit(images)[0]
        vit.add_mixin("prompt-attention", PromptAttentionMixin())
    torch.testing.assert_close(ours, sat)
    vit.train()(images)
    assert len(calls) == 1


def test_a_mask_is_classified_once_per_tensor_and_again_after_it_changes(monkeypatch):
    decided = []
    monkeypatch.setattr(attention, "mask_kind", lambda mask: decided.append(mask) or mask_kind(mask))
    kinds = MaskKinds()
    causal = torch.ones(1, 1, 5, 5).tril()
    assert kinds(None) == "all"
    assert kinds(torch.ones(1, 1, 5, 5)) == "all"
    assert kinds(causal) == "causal" and kinds(causal) == "causal"
    assert len(decided) == 2  # the second call on the same tensor is remembered
    assert kinds(torch.ones(2, 1, 5, 5).tril()) == "mask"  # one mask per row: padding may differ
    assert kinds(torch.ones(1, 1, 3, 5).tril(2)) == "mask"  # queries after cached keys
    causal[0, 0, 4, 0] = 0  # in place: the same tensor, a new version
    assert kinds(causal) == "mask"
    causal.fill_(1)
    assert kinds(causal) == "all"
    assert MaskKinds()(causal) == "all" and len(decided) == 7  # another owner, its own memory
