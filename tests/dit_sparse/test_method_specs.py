import pytest

from dit_sparse.config import ConfigError
from dit_sparse.methods import build_method, split_method_list, split_method_options


def test_split_method_list_keeps_commas_inside_brackets():
    assert split_method_list("semantic[top_p=0.9,replan_every=5], pooled,window3d[pattern=spatial]") == [
        "semantic[top_p=0.9,replan_every=5]", "pooled", "window3d[pattern=spatial]"]


def test_list_options_keep_their_commas():
    specs = split_method_list('window3d[candidates=["spatial","radial"],sample_rows=128], pooled[top_p=0.8]')
    assert specs == ['window3d[candidates=["spatial","radial"],sample_rows=128]', "pooled[top_p=0.8]"]
    name, opts = split_method_options(specs[0])
    assert name == "window3d" and opts == {"candidates": ["spatial", "radial"], "sample_rows": 128}
    method, _ = build_method(name, 0.9, opts)
    assert method.options.candidates == ("spatial", "radial")


def test_split_method_options_parses_json_values_and_strings():
    assert split_method_options("semantic") == ("semantic", {})
    name, opts = split_method_options("window3d[pattern=spatial,block=128,first_frame_sink=true]")
    assert name == "window3d" and opts == {"pattern": "spatial", "block": 128, "first_frame_sink": True}
    assert split_method_options("full+skip[tol=0.1]") == ("full+skip", {"tol": 0.1})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        split_method_options("semantic[top_p]")
    with pytest.raises(ConfigError, match="brackets"):
        split_method_options("semantic[top_p=1]x")


def test_options_reach_the_right_config_in_a_chain():
    name, opts = split_method_options("pooled+skip[tol=0.1,block_size=32]")
    method, configs = build_method(name, 0.9, opts)
    assert configs[0].block_size == 32 and configs[1].tol == 0.1
    assert method.base is not None and method.base.options.block_size == 32
