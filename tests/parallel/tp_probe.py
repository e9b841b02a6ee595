"""A loss touching every parallel part of the model, computed identically at any TP size.

Run as a script under torchrun it builds the tiny model at TP=world, loads the plain weights from
argv[1], and saves outputs and gathered gradients to argv[2] (rank 0).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy  # noqa: E402


def probe_batch(cfg):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, cfg.vocab_size, (2, cfg.max_text_len), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=gen)
    return ids, mask, labels, images


def probe_outputs(model, batch):
    ids, mask, labels, images = batch
    bb = model.backbone
    image, image_vl = bb.encode_image(images, vl_branch=True)
    text, text_vl = bb.encode_text(ids, mask, vl_branch=True)
    pair = bb.encode_pair(ids, mask, images)
    logits = model.mlm_head(pair[:, : ids.shape[1]])
    keep = labels != -100
    if model.mlm_head.tp_size == 1:  # one process (the reference): plain CE, no process group needed
        ce = torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep])
    else:  # vocab-parallel CE wants [tokens, batch, vocab_shard]; labels outside this rank's slice are handled
        ce = vocab_parallel_cross_entropy(logits[keep][:, None].float(), labels[keep][:, None]).mean()
    itc_i, itc_t = model.itc(image[:, 0], text[:, 0])
    from vlmo_large.evaluation.pretraining import _full_vocab_argmax  # held-out MLM accuracy's prediction
    predicted = _full_vocab_argmax(model, logits.detach())  # at TP=2 over the head's vocabulary slices
    loss = ce + sum(t.pow(2).mean() for t in (image, image_vl, text, text_vl, pair)) + (itc_i @ itc_t.T).sum()
    return {"image": image, "image_vl": image_vl, "text": text, "text_vl": text_vl, "pair": pair,
            "ce": ce, "loss": loss, "mlm_argmax": predicted}


def main(weights_path: str, out_path: str) -> None:
    from safetensors.torch import load_file

    from vlmo_large.model import build_model
    from vlmo_large.parallel import state
    from vlmo_large.parallel.sharding import gather_full_grads, local_state_dict

    world = int(os.environ["WORLD_SIZE"])
    state.ensure_initialized(tensor_parallel=world)
    torch.manual_seed(0)
    model = build_model("tiny", tp_group=state.tp_group()).train()
    model.load_state_dict(local_state_dict(model, load_file(weights_path), state.tp_rank(), world))
    outputs = probe_outputs(model, probe_batch(model.cfg))
    outputs["loss"].backward()
    grads = gather_full_grads(model, state.tp_group())
    if state.tp_rank() == 0:
        torch.save({"outputs": {k: v.detach() for k, v in outputs.items()}, "grads": grads}, out_path)
    state.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
