"""Blocks compiled by parallelize (regional, fullgraph) equal the eager model: every encoder mode
and route, padded text, the partial last layer, two batch sizes, with activation checkpointing,
outputs and gradients of a stage-3-shaped loss; parameter names unchanged.

The compile backend is aot_eager: dynamo's whole-graph capture (a graph break raises under
fullgraph) and AOT autograd's joint graph, without inductor's C++ codegen (which takes minutes
for every variant on a small CPU machine).
"""
import torch
from torch._dynamo.utils import counters

from tests.conftest import image_batch, randomize_, text_batch
from vlmo_large.model import build_model
from vlmo_large.parallel.parallelize import ExecutionPlan, parallelize


def _stage3_outputs(model, ids, mask, images):
    bb, T = model.backbone, ids.shape[1]
    outs = [*bb.encode_image(images, vl_branch=True, keep=1), *bb.encode_text(ids, mask, vl_branch=True, keep=1),
            bb.encode_pair(ids, mask, images, keep=T),
            bb.encode_pair(ids.repeat(3, 1), mask.repeat(3, 1), images.repeat(3, 1, 1, 1), keep=1),
            bb.encode_text(ids[:, :7], torch.ones_like(mask[:, :7]))]  # unpadded: no key mask
    return outs


def _loss_and_grads(model, ids, mask, images):
    model.zero_grad(set_to_none=True)
    outs = _stage3_outputs(model, ids, mask, images)
    gen = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_equal_eager_for_every_route():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = randomize_(build_model("tiny").train())
    compiled = build_model("tiny").train()
    compiled.load_state_dict(eager.state_dict())
    names = [n for n, _ in compiled.named_parameters()]
    parallelize(compiled, ExecutionPlan(compile=True, checkpoint_every=2, compile_backend="aot_eager"))
    assert [n for n, _ in compiled.named_parameters()] == names  # checkpoints and converters rely on names
    cfg = eager.cfg
    ids, mask = text_batch(cfg, 3, lengths=[cfg.max_text_len, 20, 5])
    images = image_batch(cfg, 3)
    counters.clear()
    ref_outs, ref_grads = _loss_and_grads(eager, ids, mask, images)
    outs, grads = _loss_and_grads(compiled, ids, mask, images)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the blocks did run compiled
    for ref, out in zip(ref_outs, outs):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=name)
    _loss_and_grads(compiled, ids, mask, images)  # a second step reuses the graphs
    assert counters["stats"]["unique_graphs"] == graphs
