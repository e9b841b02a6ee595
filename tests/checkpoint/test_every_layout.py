"""Every ZeRO stage (0-3) with and without TP, and bf16 at ZeRO-0 (tp*-z0 checkpoints store no
param_shapes), converts: `to-plain` gives the model that was trained, `to-portable` its weights
and the Adam moments every other layout computed for the same step, `--init` the same weights,
and `--format reference-pt` a torch file of plain tensors equal to the reference safetensors."""
import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoint.conftest import LAYOUTS, assert_outputs_equal
from tests.checkpoint.test_to_plain import plain_outputs
from tests.formats.test_reference_layout import reference_state_dict_keys
from tools.convert_checkpoint import main as convert
from vlmo_large.checkpoint import PlainCheckpoint
from vlmo_large.checkpoint.deepspeed_reader import load_ds_file
from vlmo_large.config import get_preset
from vlmo_large.training.initialization import read_full_weights

BETA1, BETA2 = 0.9, 0.999  # DeepSpeed's AdamW defaults (ds_train.py sets only lr and weight decay)


def converted(every_layout, tmp_path_factory, layout: str, command: str, *flags) -> str:
    out = tmp_path_factory.getbasetemp() / f"{command}-{layout}{''.join(flags)}"
    if not out.exists():
        assert convert([command, str(every_layout[layout][0]), str(out), *flags]) == 0
    return str(out)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_to_plain_gives_the_trained_model(every_layout, tmp_path_factory, layout):
    plain = converted(every_layout, tmp_path_factory, layout, "to-plain")
    bf16 = layout.endswith("bf16")
    assert_outputs_equal(plain_outputs(plain), every_layout[layout][1], atol=0.05 if bf16 else 1e-6)
    if bf16:  # the fp32 masters were read, not the bf16 weights the run computed with
        module = load_ds_file(str(every_layout[layout][0] / "step1" / "mp_rank_00_model_states.pt"))["module"]
        ours = PlainCheckpoint(plain)
        assert any(not torch.equal(ours.get(n), module["model." + n].float()) for n in ours.names())
        assert all(torch.equal(ours.get(n).bfloat16(), module["model." + n]) for n in ours.names())
    # --init reads a DeepSpeed checkpoint folder through the same reader
    init = read_full_weights(str(every_layout[layout][0]))
    assert all(torch.equal(init[n], PlainCheckpoint(plain).get(n)) for n in init)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_to_portable_holds_weights_and_the_adam_moments(every_layout, tmp_path_factory, layout):
    portable = converted(every_layout, tmp_path_factory, layout, "to-portable")
    plain = PlainCheckpoint(converted(every_layout, tmp_path_factory, layout, "to-plain"))
    parts = {p: PlainCheckpoint(f"{portable}/{p}") for p in ("weights", "exp_avg", "exp_avg_sq")}
    assert all(torch.equal(parts["weights"].get(n), plain.get(n)) for n in plain.names())
    # one step from zero moments: exp_avg = (1-b1) g, exp_avg_sq = (1-b2) g^2, so both come from one gradient
    for name in parts["exp_avg"].names():
        m, v = parts["exp_avg"].get(name), parts["exp_avg_sq"].get(name)
        torch.testing.assert_close(v, (1 - BETA2) / (1 - BETA1) ** 2 * m * m, rtol=1e-4, atol=1e-12, msg=name)
    if layout.endswith("bf16"):
        return
    # ...and the same gradient as the ZeRO-3 layout, which reads them from an unrelated file layout
    other = PlainCheckpoint(f"{converted(every_layout, tmp_path_factory, 'tp1-z3', 'to-portable')}/exp_avg")
    for name in other.names():
        scale = other.get(name).abs().max().item()
        torch.testing.assert_close(parts["exp_avg"].get(name), other.get(name), rtol=0, atol=1e-4 * scale + 1e-12,
                                   msg=name)


def test_reference_pt_is_plain_tensors_equal_to_the_safetensors(every_layout, tmp_path_factory):
    pt = converted(every_layout, tmp_path_factory, "tp2-z0", "to-plain", "--format", "reference-pt")
    ref = converted(every_layout, tmp_path_factory, "tp2-z0", "to-plain", "--format", "reference")
    state = torch.load(f"{pt}/model.pt", weights_only=True)
    assert list(state) == ["state_dict"]
    tiny = get_preset("tiny")
    assert set(state["state_dict"]) == reference_state_dict_keys(tiny.depth, tiny.vl_start)
    theirs = load_file(f"{ref}/model.safetensors")
    assert state["state_dict"].keys() == theirs.keys()
    assert all(torch.equal(state["state_dict"][k], theirs[k]) for k in theirs)
    assert state["state_dict"]["text_embeddings.position_ids"].tolist() == [list(range(tiny.max_text_len))]
