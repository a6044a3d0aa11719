"""Decoders: eager steps are the model's own; replayed CUDA graphs give the eager logits."""

import pytest
import torch

from meshforge.models.iflame import IFlame, IFlameConfig
from meshforge.sample.decoding import EagerDecoder, GraphDecoder, bf16_weights, make_decoder

CONFIG = IFlameConfig(dim=128, n_heads=4, blocks=(2, 2, 4, 2, 2), max_seq_len=900)


def random_tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(0))


def test_cpu_decoding_is_eager_and_equals_the_model_steps():
    torch.manual_seed(0)
    model = IFlame(CONFIG).eval()
    decoder = make_decoder(model, 2, 90, torch.device("cpu"))
    assert type(decoder) is EagerDecoder
    tokens = random_tokens(2, 30)
    cache = model.init_cache(2, 90)
    with torch.no_grad():
        for t in range(30):
            torch.testing.assert_close(decoder.step(tokens[:, t]), model.step(tokens[:, t], cache), rtol=0, atol=0)
    with pytest.raises(ValueError, match="CUDA"):
        GraphDecoder(model, 2, 90, torch.device("cpu"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_weight_copy_decodes_like_the_float32_model(device):
    """The CUDA decoders' model: matmul and embedding weights in bf16, norms and tables in float32,
    the original untouched. Its steps equal its own forward pass and follow the float32 model up to
    bf16 rounding (here at random init: mean error 2.5% of the largest logit, 1.6% under autocast).
    On CUDA the steps run the fused decoding kernels, the forward pass the training ops."""
    torch.manual_seed(0)
    model = IFlame(CONFIG).to(device).eval()
    tokens = random_tokens(2, 90).to(device)
    with torch.inference_mode():
        decoding = bf16_weights(model)
        cache = decoding.init_cache(2, 90)
        steps = torch.stack([decoding.step(tokens[:, t], cache) for t in range(90)], dim=1).float()
        own_forward, want = decoding(tokens).float(), model(tokens)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert decoding.token_enc[0].attn.qkv.weight.dtype == decoding.embed.weight.dtype == torch.bfloat16
    assert decoding.norm.weight.dtype == decoding.rope.cos.dtype == torch.float32
    assert cache.token_group.dtype == torch.bfloat16
    scale = want.abs().max().item()
    torch.testing.assert_close(steps, own_forward, rtol=0, atol=0.05 * scale)
    assert (steps - want).abs().mean().item() < 0.05 * scale


@pytest.mark.gpu
def test_graph_replays_give_the_eager_logits_at_every_phase():
    """Over 100 faces (every phase many times, coarse levels included) and past the cache's end."""
    torch.manual_seed(0)
    model = IFlame(CONFIG).cuda().eval()
    device = torch.device("cuda")
    tokens = random_tokens(3, 900).cuda()
    with torch.inference_mode():
        eager = make_decoder(model, 3, 900, device, cuda_graphs=False)
        graphs = make_decoder(model, 3, 900, device)
        assert type(graphs) is GraphDecoder
        for t in range(900):
            want = eager.step(tokens[:, t])
            got = graphs.step(tokens[:, t])
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2, msg=f"position {t}")
        assert graphs.cache.position == graphs.cache.device_position.item() == 900
        with pytest.raises(ValueError, match="full"):
            graphs.step(tokens[:, 0])


def test_bf16_weight_copy_prefills_like_its_own_steps():
    """What the CUDA decoders prefill a prompt with, run on CPU: the bf16 copy's one-pass prefill
    continues like stepping it through the prompt. Both round the residual stream to bf16
    (2**-8 relative) in different orders, so they agree to bf16 rounding of the logits, not exactly;
    the bound is the forward-vs-steps one above."""
    torch.manual_seed(0)
    with torch.inference_mode():
        decoding = bf16_weights(IFlame(CONFIG))
        tokens = random_tokens(2, 90)
        stepped = decoding.init_cache(2, 90)
        want = torch.stack([decoding.step(tokens[:, t], stepped) for t in range(90)], dim=1).float()
        scale = want.abs().max().item()
        for length in (4, 27, 73):
            decoder = EagerDecoder(decoding, 2, 90, torch.device("cpu"))
            got = [decoder.prefill(tokens[:, :length])] + [decoder.step(tokens[:, t]) for t in range(length, length + 9)]
            torch.testing.assert_close(
                torch.stack(got, dim=1).float(), want[:, length - 1 : length + 9], rtol=0, atol=0.05 * scale
            )


@pytest.mark.gpu
def test_graph_replays_continue_a_prefilled_prompt_like_eager_steps():
    """A prompt prefilled in one pass, then replayed graphs from its phase (every phase over the
    lengths), gives the logits of eager steps through the prompt and past it, over several faces."""
    torch.manual_seed(0)
    model = IFlame(CONFIG).cuda().eval()
    device = torch.device("cuda")
    tokens = random_tokens(3, 900).cuda()
    with torch.inference_mode():
        eager = make_decoder(model, 3, 900, device, cuda_graphs=False)
        want = torch.stack([eager.step(tokens[:, t]) for t in range(200)], dim=1).float()
        graphs = make_decoder(model, 3, 900, device)
        for length in range(100, 109):  # a prompt ending at every phase of a face
            graphs.cache.reset()
            got = [graphs.prefill(tokens[:, :length]).float()]
            assert graphs.cache.position == graphs.cache.device_position.item() == length
            got += [graphs.step(tokens[:, t]).float().clone() for t in range(length, length + 27)]
            # Eager prefill (fla's chunked kernel, SDPA) and the graphs' fused steps round the bf16
            # stream in different orders: the bf16 bound of the CPU test above.
            scale = want.abs().max().item()
            torch.testing.assert_close(
                torch.stack(got, dim=1), want[:, length - 1 : length + 27], rtol=0, atol=0.05 * scale,
                msg=f"prompt of {length} tokens",
            )
