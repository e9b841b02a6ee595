"""Pretrained weights into a fine-tuning model of another shape (formats/resize.py, `--init`):
relative tables resampled to the new grid (BEiT's geometric interpolation; checked against scipy at
BEiT's source positions), absolute positions bicubic (checked against timm's resample_abs_pos_embed),
NLVR2's third modality row from row 1, the identity at the same shapes, and a reference VLMo file
loaded by --init with no conversion step."""
import numpy as np
import pytest
import torch
from scipy.interpolate import RegularGridInterpolator
from timm.layers import resample_abs_pos_embed

from tests.conftest import randomize_
from vlmo_large.checkpoint.plain import write_export
from vlmo_large.config import get_preset
from vlmo_large.formats.reference import save_reference_checkpoint
from vlmo_large.formats.resize import POS_EMBED, adapt_to_config
from vlmo_large.model import build_model
from vlmo_large.training.initialization import load_init_weights

TABLE = "backbone.blocks.{}.rel_pos.table"


def beit_source_positions(src: int, dst: int) -> np.ndarray:
    """BEiT's (unilm beit/run_class_finetuning.py) source coordinates on the destination axis: a
    geometric progression whose half-width reaches dst // 2, found by bisection."""
    def span(q):
        return sum(q ** i for i in range(src // 2))
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        lo, hi = (lo, q) if span(q) > dst // 2 else (q, hi)
    steps, cur = [], 1.0
    for i in range(src // 2):
        steps.append(cur)
        cur += q ** (i + 1)
    return np.array([-s for s in reversed(steps)] + [0.0] + steps)


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    return randomize_(build_model("tiny").eval())


def test_same_shapes_pass_unchanged(pretrained):
    state = pretrained.state_dict()
    out, notes = adapt_to_config(state, pretrained.cfg)
    assert notes == [] and all(out[k] is v for k, v in state.items())


def test_relative_tables_resampled_to_the_new_grid(pretrained):
    cfg = pretrained.cfg  # 64 px, grid 4: image block 7 x 7
    new = get_preset("tiny", image_size=96)  # grid 6: 11 x 11
    state = pretrained.state_dict()
    out, notes = adapt_to_config(state, new)
    assert notes == [f"relative tables of {cfg.depth} blocks resampled (grid 4 -> 6)"]
    old_block, new_block = (2 * 4 - 1) ** 2, (2 * 6 - 1) ** 2
    src = beit_source_positions(7, 11)
    # beyond the outermost source distance the table holds the edge value (timm's interpolator clamps)
    dst = np.clip(np.arange(-5, 6, dtype=np.float64), src[0], src[-1])
    for layer in range(cfg.depth):
        old, resampled = state[TABLE.format(layer)], out[TABLE.format(layer)]
        assert resampled.shape == (new_block + 3 + 2 * cfg.max_text_len_of_initckpt + 2, cfg.num_heads)
        # the three image-CLS rows and every text row are kept as they were
        assert torch.equal(resampled[new_block:], old[old_block:])
        for head in range(cfg.num_heads):
            grid = old[:old_block, head].reshape(7, 7).double().numpy()
            expected = RegularGridInterpolator((src, src), grid)(np.stack(np.meshgrid(dst, dst, indexing="ij"), -1))
            torch.testing.assert_close(resampled[:new_block, head].reshape(11, 11).double(),
                                       torch.from_numpy(expected), rtol=1e-5, atol=1e-6)
        # BEiT's progression keeps the nearest distances where they were: |dy|, |dx| <= 1 are unchanged
        near_old = old[:old_block].reshape(7, 7, -1)[2:5, 2:5]
        torch.testing.assert_close(resampled[:new_block].reshape(11, 11, -1)[4:7, 4:7], near_old)


def test_absolute_positions_bicubic_and_the_modality_row():
    torch.manual_seed(1)
    old_cfg = get_preset("tiny", use_abs_pos_emb=True, use_rel_pos_bias=False)
    state = randomize_(build_model(old_cfg)).state_dict()
    new_cfg = old_cfg.replace(image_size=96, num_modality_types=3)
    out, notes = adapt_to_config(state, new_cfg)
    expected = resample_abs_pos_embed(state[POS_EMBED], [6, 6], [4, 4], num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=False)
    torch.testing.assert_close(out[POS_EMBED], expected)
    rows = out["backbone.modality_embed.weight"]
    assert rows.shape == (3, old_cfg.embed_dim) and torch.equal(rows[:2], state["backbone.modality_embed.weight"])
    assert torch.equal(rows[2], rows[1])
    assert len(notes) == 2


def test_init_from_an_export_at_another_size_and_from_a_reference_file(pretrained, tmp_path):
    """--init of a 64 px export into a 96 px NLVR2-shaped model, and of a reference VLMo .pt file
    (its names converted in memory): loaded equal where the shapes agree, adapted where not."""
    write_export(str(tmp_path / "export"), pretrained.state_dict(), pretrained.cfg)
    save_reference_checkpoint(pretrained, str(tmp_path / "vlmo.pt"))
    new_cfg = get_preset("tiny", image_size=96, num_modality_types=3)
    expected, _ = adapt_to_config(pretrained.state_dict(), new_cfg)
    for source in ("export", "vlmo.pt"):
        model = build_model(new_cfg)
        report = load_init_weights(model, str(tmp_path / source))
        assert any("grid 4 -> 6" in note for note in report.converted), source
        assert [n for n in report.missing if not n.startswith("mim_head.") or source == "export"] == []
        for name, tensor in model.state_dict().items():
            if name in expected and not (source == "vlmo.pt" and name.startswith("mim_head.")):
                torch.testing.assert_close(tensor, expected[name], msg=f"{source}: {name}")
        assert model.backbone.encode_image(torch.zeros(1, 3, 96, 96)).shape == (1, 37, new_cfg.embed_dim)
    assert "reference VLMo names converted" in " ".join(load_init_weights(build_model("tiny"),
                                                                          str(tmp_path / "vlmo.pt")).converted)
