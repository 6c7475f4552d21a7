"""The MFU numerator: FLOPs counted from shapes, checked by hand for one layer and against
torch's own FLOP counter running the real encoders."""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel

from langcell.pretrain.flops import StepShapes, cross_kv_flops, layer_forward_flops, step_flops
from langcell.pretrain.model import TextBert

CELL = dict(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128)


def _counted(fn) -> int:
    # The math backend runs attention as plain batched matmuls, which the counter sees; it has no
    # formula for the fused CPU kernel.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_one_layer_by_hand():
    # L=10 tokens, width 4, feed-forward 8: projections 2*10*4*4*4, attention 2*2*10*10*4,
    # feed-forward 2*2*10*4*8.
    assert layer_forward_flops(10, 4, 8) == 1280 + 1600 + 1280
    # Cross-attending to 20 cell states of width 6 adds Q and output (2*10*4*4*2), K and V of the
    # cells (2*20*6*4*2) and the attention itself (2*2*10*20*4).
    assert layer_forward_flops(10, 4, 8, 20, 6) == 4160 + 640 + 1920 + 3200


def test_cell_encoder_matches_torch_flop_counter():
    model = BertModel(BertConfig(**CELL, attn_implementation="sdpa"), add_pooling_layer=False).eval()
    ids = torch.randint(2, 300, (1, 50))
    counted = _counted(lambda: model(input_ids=ids))
    assert counted == layer_forward_flops(50, 32, 64)


def _multimodal_layer(texts: int):
    """One multimodal text layer (width 16) with `texts` texts of 12 tokens and one cell of 40 states of width 32."""
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64)
    config.encoder_width, config.use_token_type_embeddings = 32, False
    text = TextBert(config).eval()
    ids, mask = torch.randint(1, 100, (texts, 12)), torch.ones(texts, 12, dtype=torch.long)
    cells, cell_mask = torch.randn(1, 40, 32), torch.ones(1, 40, dtype=torch.long)
    return text, ids, mask, cells, cell_mask


def test_multimodal_text_layer_matches_torch_flop_counter():
    text, ids, mask, cells, cell_mask = _multimodal_layer(1)
    counted = _counted(lambda: text(ids, mask, cells, cell_mask, mode="multimodal"))
    assert counted == layer_forward_flops(12, 16, 48, 40, 32)


def test_matching_pairs_that_share_a_cell_project_it_once():
    text, ids, mask, cells, cell_mask = _multimodal_layer(3)
    counted = _counted(lambda: text(ids, mask, cells, cell_mask, mode="multimodal",
                                    encoder_index=torch.zeros(3, dtype=torch.long)))
    per_pair = layer_forward_flops(12, 16, 48, 40, 32, kv_projections=False)
    assert counted == 3 * per_pair + cross_kv_flops(40, 32, 16)
    assert counted < 3 * layer_forward_flops(12, 16, 48, 40, 32)


def test_training_step_is_three_forwards_of_the_real_model():
    model = BertModel(BertConfig(**CELL, attn_implementation="sdpa"), add_pooling_layer=False)
    proj = torch.nn.Linear(32, 16)
    ids = torch.randint(2, 300, (2, 30))
    def step():
        out = proj(model(input_ids=ids).last_hidden_state[:, 0])
        out.sum().backward()
    counted = _counted(step)
    expected = step_flops(model.config, None, 16, StepShapes(cell_lengths=[30, 30]))
    assert counted == expected


def test_padding_is_not_work_and_views_count_twice():
    config = BertConfig(**CELL)
    one = step_flops(config, None, 16, StepShapes(cell_lengths=[30]))
    assert step_flops(config, None, 16, StepShapes(cell_lengths=[30, 30])) == 2 * one
    two_views = step_flops(config, None, 16, StepShapes(cell_lengths=[30], cell_views=2))
    assert two_views - one == 3 * layer_forward_flops(30, 32, 64)
    # The masked-gene head scores every vocabulary entry at each masked position.
    with_mlm = step_flops(config, None, 16, StepShapes(cell_lengths=[30], masked_tokens=5))
    assert with_mlm - one == 3 * 5 * 2 * 32 * (32 + 300)
