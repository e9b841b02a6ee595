"""keep=n (only the first n positions computed in the last layer) gives the full forward's values
for those positions, and the same gradients, in every encoder mode and with padded text."""
import pytest
import torch

from tests.conftest import image_batch, randomize_, text_batch
from vlmo_large.model import build_model


def _outputs(model, ids, mask, images, keep):
    bb, T = model.backbone, ids.shape[1]
    image, image_vl = bb.encode_image(images, vl_branch=True, keep=keep and 1)
    text, text_vl = bb.encode_text(ids, mask, vl_branch=True, keep=keep and 1)
    pair = bb.encode_pair(ids, mask, images, keep=keep and T)
    if keep:  # only the kept positions come back
        assert [o.shape[1] for o in (image, image_vl, text, text_vl, pair)] == [1, 1, 1, 1, T]
    return [image[:, :1], image_vl[:, :1], text[:, :1], text_vl[:, :1], pair[:, :T]]


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
@pytest.mark.parametrize("num_vl_layers", [None, 0])
def test_keep_equals_full_forward_and_gradients(backend, num_vl_layers):
    torch.manual_seed(0)
    overrides = {"attention": backend, "drop_path_rate": 0.0}
    model = build_model("tiny", **overrides)
    if num_vl_layers == 0:  # a preset without VL layers: the fused last layer splits by modality
        model = build_model("tiny", vl_start=model.cfg.depth, **overrides)
    model = randomize_(model)
    cfg = model.cfg
    ids, mask = text_batch(cfg, 3, lengths=[cfg.max_text_len, 20, 5])
    images = image_batch(cfg, 3)

    def run(keep):
        model.zero_grad(set_to_none=True)
        outs = _outputs(model, ids, mask, images, keep)
        sum(o.pow(2).sum() for o in outs).backward()
        return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_grads = run(None)
    part, part_grads = run(True)
    for ref, out in zip(full, part):
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert part_grads.keys() == full_grads.keys()
    for name, ref in full_grads.items():
        torch.testing.assert_close(part_grads[name], ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item(), msg=name)
