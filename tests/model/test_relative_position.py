"""The relative-position index follows the reference layout slot by slot; a table gathers it."""
import pytest
import torch

from vlmo_large.model.relative_position import (RelativePositionBias, image_relative_index, pair_relative_index,
                                                relative_index, resample_table, table_rows, text_relative_index)


def test_base_table_rows_match_reference():
    assert table_rows(14, 196) == 1126  # [1126, 144] in the released base checkpoint


def test_image_index_is_beit_2d_with_cls_slots():
    g = 3
    index = image_relative_index(g)
    num_2d = (2 * g - 1) ** 2
    # patch (r1,c1) -> patch (r2,c2): ((r1-r2)+g-1)*(2g-1) + (c1-c2)+g-1, hand computed for two pairs
    assert index[1 + 0, 1 + 8] == (0 - 2 + 2) * 5 + (0 - 2 + 2)  # (0,0)->(2,2)
    assert index[1 + 8, 1 + 0] == (2 + 2) * 5 + (2 + 2)          # (2,2)->(0,0)
    assert index[1 + 4, 1 + 4] == 2 * 5 + 2                      # same patch: the centre
    assert (index[0, 1:] == num_2d).all() and (index[1:, 0] == num_2d + 1).all() and index[0, 0] == num_2d + 2


def test_text_index_slots():
    g, span, T = 14, 196, 40
    index = text_relative_index(T, g, span)
    total = table_rows(g, span)
    image_slots = 729 + 3
    # token i -> token j uses distance (j - i) shifted by 194 past the two cross-modal slots
    assert index[1, 1] == image_slots + 2 + 194
    assert index[1, 5] == image_slots + 2 + 194 + 4
    assert index[5, 1] == image_slots + 2 + 194 - 4
    assert (index[0, 1:] == total - 3).all() and (index[1:, 0] == total - 2).all() and index[0, 0] == total - 1
    assert index.max() < total


def test_pair_index_cross_modal_slots():
    g, span, T = 14, 196, 40
    index = pair_relative_index(T, g, span)
    assert index.shape == (T + 197, T + 197)
    assert (index[:T, T:] == 732).all() and (index[T:, :T] == 733).all()
    assert torch.equal(index[T:, T:], image_relative_index(g))
    assert torch.equal(index[:T, :T], text_relative_index(T, g, span))


def test_resample_keeps_special_and_text_rows_and_maps_centre():
    g_old, g_new, span, heads = 14, 24, 196, 4
    table = torch.randn(table_rows(g_old, span), heads)
    out = resample_table(table, g_old, g_new)
    assert out.shape == (table_rows(g_new, span), heads)
    old_img, new_img = (2 * g_old - 1) ** 2, (2 * g_new - 1) ** 2
    assert torch.equal(out[new_img:], table[old_img:])  # CLS, cross-modal and text rows untouched
    # the zero-offset entry (centre of the 2-D block) stays where the geometric grid is exact
    centre_old = (g_old - 1) * (2 * g_old - 1) + (g_old - 1)
    centre_new = (g_new - 1) * (2 * g_new - 1) + (g_new - 1)
    torch.testing.assert_close(out[centre_new], table[centre_old], rtol=1e-4, atol=1e-4)
    assert torch.equal(resample_table(table, g_old, g_old), table)


@pytest.mark.parametrize("gather", ["_gather_columns", "_gather_rows"])  # the CPU's and the GPU's
def test_module_bias_and_gradient_equal_plain_table_indexing(gather):
    """Both gathers == table[index] permuted to [head, L, L], values and table gradient."""
    g, span, heads, T = 3, 8, 2, 5
    module = RelativePositionBias(g, span, heads)
    with torch.no_grad():
        module.table.normal_()
    table = module.table.detach().clone().requires_grad_()
    for mode, index in (("image", image_relative_index(g)), ("text", text_relative_index(T, g, span)),
                        ("pair", pair_relative_index(T, g, span))):
        module.table.grad, table.grad = None, None
        bias = getattr(module, gather)(relative_index(mode, T, g, span, "cpu"))
        expected = table[index].permute(2, 0, 1)  # [head, L, L]
        assert bias.is_contiguous() and torch.equal(bias, expected.detach())
        weights = torch.randn(heads, *index.shape, dtype=torch.float64)
        (bias.double() * weights).sum().backward()
        (expected.double() * weights).sum().backward()
        torch.testing.assert_close(module.table.grad, table.grad, rtol=1e-5, atol=1e-5)
