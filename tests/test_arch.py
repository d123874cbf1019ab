"""Arch: text form, validation, and analytic parameter/FLOP counts against the real module."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from naslung import Arch, ArchError, ConvRes
from naslung.arch import PAPER_28M

stage = st.lists(st.integers(4, 512), min_size=1, max_size=4).map(tuple)
arch_strategy = st.tuples(stage, stage, stage).map(Arch)
small_stage = st.lists(st.sampled_from([4, 8, 12, 16]), min_size=1, max_size=2).map(tuple)
small_arch = st.tuples(small_stage, small_stage, small_stage).map(Arch)


@given(arch_strategy)
def test_text_round_trip(arch):
    assert Arch.parse(str(arch)) == arch
    assert Arch.parse(f" {arch} ") == arch


def test_parse_example():
    arch = Arch.parse("4,8,16/32,32/64,128")
    assert arch.stages == ((4, 8, 16), (32, 32), (64, 128))
    assert arch.depth == 7 and arch.out_channels == 128
    assert arch.widths == (4, 8, 16, 32, 32, 64, 128)


@pytest.mark.parametrize("text, message", [
    ("", "empty arch"),
    ("4,8,16/32", "2 stage(s)"),
    ("4/8/16/32", "4 stage(s)"),
    ("4,8//16", "stage 2 is empty"),
    ("4,,8/8/8", "not a positive integer"),
    ("4,a/8/8", "'a'"),
    ("-4/8/8", "not a positive integer"),
    ("2/8/8", "outside 4..4096"),
    ("4.5/8/8", "not a positive integer"),
])
def test_bad_text_is_rejected_clearly(text, message):
    with pytest.raises(ArchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Arch.parse(text)


def test_paper_28m_parameter_count():
    assert PAPER_28M.params() == 28_456_204
    assert sum(p.numel() for p in ConvRes(PAPER_28M).parameters()) == 28_456_204


@settings(max_examples=25, deadline=None)
@given(small_arch, st.sampled_from(["asoftmax", "linear"]))
def test_params_equal_module_count(arch, head):
    model = ConvRes(arch, head=head)
    assert arch.params(head) == sum(p.numel() for p in model.parameters())
    for layer in arch.layers(head=head):
        module = model.get_submodule(layer.name)
        assert layer.params == sum(p.numel() for p in module.parameters()), layer.name


@pytest.mark.parametrize("text", ["4,8,16/32,32/64,128", "16,32/64,64/128", "4/4/4"])
@pytest.mark.parametrize("crop", [32, 24, 40])
@pytest.mark.parametrize("cbam", ["nas-lung", "woo"])
def test_flops_equal_torch_flop_counter(text, crop, cbam):
    arch = Arch.parse(text)
    model = ConvRes(arch, cbam=cbam).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 1, crop, crop, crop))
    assert arch.flops(crop) == counter.get_total_flops()


def test_layer_shapes_follow_strides():
    layers = {layer.name: layer for layer in Arch.parse("4/8/16").layers(crop=32)}
    assert layers["stem.0"].out_shape == (4, 32, 32, 32)
    assert layers["stages.0.down"].out_shape == (4, 16, 16, 16)
    assert layers["stages.2.blocks.0.conv2"].out_shape == (16, 4, 4, 4)
    assert layers["head"].out_shape == (2,)
