import pytest
import torch

from model.inputs import prepare_inputs
from model.step import TrainStep
from tests.conftest import tiny_batch, tiny_options


def test_generator_input_is_one_hot_plus_edges(opt):
    b = tiny_batch(opt)
    x = prepare_inputs(opt, b["label"], b["image"], b["inst"])
    assert x.label.shape == (2, opt.label_nc + 1, 32, 32)
    torch.testing.assert_close(x.label[:, : opt.label_nc].argmax(1), b["label"].long())
    assert x.label[:, : opt.label_nc].sum(1).eq(1).all()
    # the vertical seam between instance k*1000 and k*1000+1 is an edge
    assert x.label[:, -1, :, 15:17].eq(1).all()


def test_precomputed_edges_are_used_as_given(opt):
    b = tiny_batch(opt)
    edges = torch.zeros(2, 32, 32)
    edges[:, 3, 3] = 1
    x = prepare_inputs(opt, b["label"], b["image"], edges=edges)
    assert x.label[:, -1].sum() == 2


def test_label_nc_zero_feeds_the_label_image_as_is():
    opt = tiny_options(label_nc=0, input_nc=3, no_instance=True)
    label = torch.rand(1, 3, 32, 32)
    x = prepare_inputs(opt, label)
    torch.testing.assert_close(x.label, label)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda b: b.update(label=torch.full((2, 32, 32), 9, dtype=torch.uint8)),
            r"label ids 9 are outside \[0, label_nc=8\)",
        ),
        (lambda b: b["label"].__setitem__((0, 0, 0), 200), r"label ids 200 are outside"),
        (lambda b: b.update(label=b["label"].float()), "integer class ids"),
        (
            lambda b: b.update(image=torch.zeros(2, 4, 32, 32)),
            r"image must be \(B, output_nc=3, H, W\), got \(2, 4, 32, 32\)",
        ),
        (
            lambda b: b.update(image=torch.zeros(2, 3, 32, 64)),
            r"image has shape \(2, 3, 32, 64\) but label is \(2, 32, 32\)",
        ),
        (lambda b: b.update(inst=torch.zeros(2, 16, 32, dtype=torch.long)), r"inst has shape \(2, 16, 32\)"),
        (lambda b: b.update(label=torch.zeros(2, 30, 32, dtype=torch.uint8)), r"30x32 is not a multiple of 4"),
        (lambda b: b.pop("inst"), "needs 'inst' or 'edges'"),
        (lambda b: b.update(label=torch.zeros(2, 2, 32, 32, dtype=torch.uint8)), r"label must have shape \(B, H, W\)"),
    ],
    ids=[
        "id>=label_nc",
        "one-bad-pixel",
        "float-label",
        "channels",
        "image-size",
        "inst-size",
        "multiple",
        "no-inst",
        "label-dims",
    ],
)
def test_bad_input_is_a_value_error_that_names_it(opt, mutate, message):
    b = tiny_batch(opt)
    mutate(b)
    with pytest.raises(ValueError, match=message):
        TrainStep(opt).step(b)


def test_instance_feat_needs_instance_ids():
    opt = tiny_options(instance_feat=True)
    b = tiny_batch(opt)
    with pytest.raises(ValueError, match="instance_feat=true needs instance ids"):
        prepare_inputs(opt, b["label"], b["image"], edges=torch.zeros(2, 32, 32))


def test_unknown_option_values_are_named():
    with pytest.raises(ValueError, match="gan_mode='wgan' is not one of"):
        tiny_options(gan_mode="wgan")
    with pytest.raises(ValueError, match="option ngf=0 must be >= 1"):
        tiny_options(ngf=0)
