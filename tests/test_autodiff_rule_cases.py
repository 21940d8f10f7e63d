"""Every backward rule has a test case: one table, keyed by operator (and by rule set for the
overrides), naming the tests that check each rule against an independent oracle (finite
differences, torch, captum). A rule registered without an entry here fails
:func:`test_every_registered_rule_has_a_case`; an entry naming a test that does not exist, or a
test that never builds the operator, fails too.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsal.autodiff import augment
from onnxsal.autodiff.rules.registry import RULESETS, table

ort = pytest.importorskip("onnxruntime")
HERE = Path(__file__).parent

#: op type -> the tests ("<file without test_ and .py>::<test function>") that check its rule
CASES: dict[str, list[str]] = {
    "Abs": ["autodiff_rules::test_unary"],
    "Acos": ["autodiff_rules::test_unary_on_its_domain"],
    "Acosh": ["autodiff_rules::test_unary_on_its_domain"],
    "Add": ["autodiff_rules::test_binary_broadcast",
            "autodiff_rules::test_self_product_not_fused_when_gate_read_twice_or_asked_for"],
    "Asin": ["autodiff_rules::test_unary_on_its_domain"],
    "Asinh": ["autodiff_rules::test_unary"],
    "Atan": ["autodiff_rules::test_unary"],
    "Atanh": ["autodiff_rules::test_unary_on_its_domain"],
    "AveragePool": ["autodiff_rules::test_average_pool_count_include_pad_0_with_pads",
                    "autodiff_rules::test_average_pool_ceil_mode_windows_past_the_input"],
    "BatchNormalization": ["autodiff_rules::test_batch_norm"],
    "Cast": ["autodiff_rules::test_cast_and_castlike_same_type", "autodiff_rules::test_cast_float32_to_float64"],
    "CastLike": ["autodiff_rules::test_cast_and_castlike_same_type"],
    "Ceil": ["autodiff_rules::test_unary"],
    "Celu": ["autodiff_rules::test_unary"],
    "Clip": ["autodiff_rules::test_clip_min_max_inputs",
             "autodiff_rules::test_self_product_under_guided_rules_keeps_guided_clip"],
    "Concat": ["autodiff_rules::test_concat", "autodiff_rules::test_split"],
    "Conv": ["autodiff_rules::test_conv", "autodiff_rules::test_conv_weight_as_input"],
    "ConvTranspose": ["autodiff_rules::test_conv_transpose",
                      "autodiff_rules::test_conv_transpose_auto_pad_and_output_shape"],
    "Cos": ["autodiff_rules::test_unary"],
    "Cosh": ["autodiff_rules::test_unary"],
    "CumSum": ["autodiff_rules::test_cumsum"],
    "DepthToSpace": ["autodiff_rules::test_depth_space"],
    "DequantizeLinear": ["quantized::test_qdq_gradient_is_torch_fake_quant_straight_through",
                         "quantized::test_onnxruntime_quantized_model_end_to_end"],
    "Div": ["autodiff_rules::test_binary_broadcast", "autodiff_rules::test_tile_with_run_time_repeats"],
    "Dropout": ["autodiff_rules::test_dropout_with_ratio_and_mask_output", "autodiff_rules::test_unary"],
    "Einsum": ["autodiff_rules::test_einsum"],
    "Elu": ["autodiff_rules::test_unary"],
    "Erf": ["autodiff_rules::test_unary"],
    "Exp": ["autodiff_rules::test_unary"],
    "Expand": ["autodiff_rules::test_expand_and_tile", "autodiff_rules::test_partial_cotangents_from_reductions"],
    "Flatten": ["autodiff_rules::test_reshape_zero_and_minus_one",
                "autodiff_rules::test_custom_domain_operator_is_named"],
    "Floor": ["autodiff_rules::test_unary"],
    "Gather": ["autodiff_rules::test_gather", "autodiff_rules::test_placed_slices_join_by_concat"],
    "GatherElements": ["autodiff_rules::test_gather_elements"],
    "GatherND": ["autodiff_rules::test_gather_nd"],
    "Gelu": ["autodiff_rules::test_gelu_opset20"],
    "Gemm": ["autodiff_rules::test_gemm", "autodiff_rules::test_tile_with_run_time_repeats"],
    "GlobalAveragePool": ["autodiff_rules::test_global_pools",
                          "autodiff_rules::test_partial_cotangents_from_reductions"],
    "GlobalMaxPool": ["autodiff_rules::test_global_pools"],
    "GroupNormalization": ["autodiff_rules::test_group_norm"],
    "HardSigmoid": ["autodiff_rules::test_self_product_fused", "autodiff_rules::test_unary"],
    "HardSwish": ["autodiff_rules::test_hardswish_and_mish"],
    "Hardmax": ["autodiff_rules::test_unary"],
    "Identity": ["autodiff_rules::test_self_product_under_guided_rules_keeps_guided_clip",
                 "autodiff_controlflow::test_loop_off_the_path_keeps_working"],
    "If": ["autodiff_controlflow::test_if_reading_outer_tensors_matches_finite_differences",
           "autodiff_controlflow::test_static_if_is_inlined"],
    "InstanceNormalization": ["autodiff_rules::test_instance_norm"],
    "LRN": ["autodiff_rules::test_lrn"],
    "LayerNormalization": ["autodiff_rules::test_layer_norm"],
    "LeakyRelu": ["autodiff_rules::test_local_functions_are_inlined", "autodiff_rules::test_unary"],
    "Log": ["autodiff_rules::test_unary_positive"],
    "LogSoftmax": ["autodiff_rules::test_softmax_axes"],
    "LpNormalization": ["autodiff_rules::test_lp_normalization"],
    "MatMul": ["autodiff_rules::test_matmul_batched_broadcast",
               "autodiff_rules::test_matmul_constant_weight_and_vector"],
    "Max": ["autodiff_rules::test_nary_broadcast", "autodiff_rules::test_binary_broadcast"],
    "MaxPool": ["autodiff_rules::test_maxpool_k3s2_overlap", "autodiff_rules::test_maxpool_keeps_the_opset"],
    "Mean": ["autodiff_rules::test_nary_broadcast"],
    "Min": ["autodiff_rules::test_nary_broadcast", "autodiff_rules::test_binary_broadcast"],
    "Mish": ["autodiff_rules::test_hardswish_and_mish"],
    "Mul": ["autodiff_rules::test_elementwise_region_not_fused_across_broadcast",
            "autodiff_rules::test_binary_broadcast"],
    "Neg": ["autodiff_rules::test_unary"],
    "PRelu": ["autodiff_rules::test_prelu"],
    "Pad": ["autodiff_rules::test_pad", "autodiff_rules::test_placed_slices_join_by_concat"],
    "Pow": ["autodiff_rules::test_binary_broadcast", "autodiff_rules::test_binary_traps"],
    "QuantizeLinear": ["quantized::test_qdq_gradient_is_torch_fake_quant_straight_through",
                       "quantized::test_onnxruntime_quantized_model_end_to_end"],
    "Reciprocal": ["autodiff_rules::test_unary_positive"],
    "ReduceL1": ["autodiff_rules::test_reductions"],
    "ReduceL2": ["autodiff_rules::test_reductions"],
    "ReduceLogSum": ["autodiff_rules::test_reduce_log_sum"],
    "ReduceLogSumExp": ["autodiff_rules::test_reductions"],
    "ReduceMax": ["autodiff_rules::test_reductions"],
    "ReduceMean": ["autodiff_rules::test_reduce_mean_keepdims_0_spatial", "autodiff_rules::test_reductions"],
    "ReduceMin": ["autodiff_rules::test_reductions"],
    "ReduceProd": ["autodiff_rules::test_reductions"],
    "ReduceSum": ["autodiff_rules::test_reductions", "autodiff_rules::test_partial_cotangents_from_reductions"],
    "ReduceSumSquare": ["autodiff_rules::test_reductions"],
    "Relu": ["autodiff_rules::test_maxpool_after_relu_masks_the_pooled_cotangent", "autodiff_rules::test_old_opsets"],
    "Reshape": ["autodiff_rules::test_reshape_zero_and_minus_one",
                "autodiff_controlflow::test_loop_off_the_path_keeps_working"],
    "Resize": ["autodiff_rules::test_resize", "autodiff_rules::test_resize_with_run_time_sizes_from_a_dynamic_batch"],
    "Round": ["autodiff_rules::test_unary"],
    "ScatterND": ["autodiff_rules::test_scatter_nd"],
    "Selu": ["autodiff_rules::test_unary"],
    "Shrink": ["autodiff_rules::test_unary"],
    "Sigmoid": ["autodiff_rules::test_elementwise_region_not_fused_across_broadcast",
                "autodiff_rules::test_self_product_not_fused_when_gate_read_twice_or_asked_for"],
    "Sign": ["autodiff_rules::test_unary"],
    "Sin": ["autodiff_rules::test_unary"],
    "Sinh": ["autodiff_rules::test_unary"],
    "Slice": ["autodiff_rules::test_slice", "autodiff_rules::test_placed_slices_join_by_concat"],
    "Softmax": ["autodiff_rules::test_softmax_axes", "autodiff_rules::test_old_opsets"],
    "Softplus": ["autodiff_rules::test_unary"],
    "Softsign": ["autodiff_rules::test_unary"],
    "SpaceToDepth": ["autodiff_rules::test_depth_space"],
    "Split": ["autodiff_rules::test_split"],
    "Sqrt": ["autodiff_rules::test_unary_positive"],
    "Squeeze": ["autodiff_rules::test_squeeze_unsqueeze_attribute_vs_input", "autodiff_rules::test_old_opsets"],
    "Sub": ["autodiff_rules::test_binary_broadcast", "autodiff_rules::test_binary_traps"],
    "Sum": ["autodiff_rules::test_nary_broadcast", "autodiff_rules::test_elementwise_region_fused"],
    "Tan": ["autodiff_rules::test_unary_on_its_domain"],
    "Tanh": ["autodiff_rules::test_cast_and_castlike_same_type", "autodiff_rules::test_cast_float32_to_float64"],
    "ThresholdedRelu": ["autodiff_rules::test_unary"],
    "Tile": ["autodiff_rules::test_expand_and_tile", "autodiff_rules::test_tile_with_run_time_repeats"],
    "Transpose": ["autodiff_rules::test_transpose", "autodiff_rules::test_transpose_default_perm"],
    "Trilu": ["autodiff_rules::test_trilu"],
    "Unsqueeze": ["autodiff_rules::test_squeeze_unsqueeze_attribute_vs_input",
                  "autodiff_rules::test_partial_cotangents_from_reductions"],
    "Where": ["autodiff_rules::test_where_broadcast"],
}

#: "<rule set>:<op type>" -> the tests of a rule set's override
RULESET_CASES: dict[str, list[str]] = {
    "guided:Relu": ["methods_captum::test_guided_backprop"],
    "guided:Clip": ["engine::test_guided_backprop_treats_relu6_as_a_relu",
                    "autodiff_rules::test_self_product_under_guided_rules_keeps_guided_clip"],
    "lrp:Conv": ["methods_captum::test_lrp_tends_to_gradient_x_input"],
    "lrp:Gemm": ["methods_captum::test_lrp_tends_to_gradient_x_input", "autodiff_rule_cases::test_lrp_linear_layer"],
    "lrp:MatMul": ["autodiff_rule_cases::test_lrp_linear_layer"],
}


@cache
def _tests(module: str) -> dict[str, set[str]]:
    """The test functions of tests/test_<module>.py with the string constants each one uses
    (its own, its decorators', and those of the module-level names it reads)."""
    tree = ast.parse((HERE / f"test_{module}.py").read_text(encoding="utf-8"))

    def strings(node):
        return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}

    consts: dict[str, set[str]] = {}
    for n in tree.body:
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name) and n.value is not None:
                consts[t.id] = strings(n.value)
    out = {}
    for n in tree.body:
        if isinstance(n, ast.FunctionDef) and n.name.startswith("test_"):
            used = strings(n)
            for name in {x.id for x in ast.walk(n) if isinstance(x, ast.Name)}:
                used |= consts.get(name, set())
            out[n.name] = used
    return out


def _registered() -> tuple[set[str], set[str]]:
    overrides = {f"{rs}:{op}" for rs, rules in RULESETS.items() if rs != "default"
                 for op, r in rules.items() if r.fn.__module__.startswith("onnxsal.")}
    return set(table()), overrides


def test_every_registered_rule_has_a_case():
    ops, overrides = _registered()
    assert not sorted(ops - set(CASES)), f"rules without a test case: {sorted(ops - set(CASES))}"
    missing = sorted(overrides - set(RULESET_CASES))
    assert not missing, f"overrides without a case: {missing}"
    assert not sorted(set(CASES) - ops), f"cases of no rule: {sorted(set(CASES) - ops)}"
    assert not sorted(set(RULESET_CASES) - overrides), f"cases of no override: {sorted(set(RULESET_CASES) - overrides)}"


@pytest.mark.parametrize("key", sorted(CASES) + sorted(RULESET_CASES))
def test_each_case_names_existing_tests(key):
    """The named tests exist; for a default rule at least one of them builds the operator."""
    refs = CASES.get(key) or RULESET_CASES[key]
    assert refs
    found = []
    for ref in refs:
        module, name = ref.split("::")
        tests = _tests(module)
        assert name in tests, f"{key}: no test {ref}"
        found.append(tests[name])
    if key in CASES:
        assert any(key in used for used in found), f"{key}: none of {refs} builds a {key} node"


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_lrp_linear_layer(op):
    """epsilon-LRP on one linear layer z = x W (+ b): the cotangent at x is
    W (dz * z / (z + eps * sign(z))), sign(0) = +1, written out here with numpy."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5)).astype(np.float32)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    if op == "Gemm":
        inits.append(numpy_helper.from_array(bias, "B"))
    node = helper.make_node(op, ["x", "W"] + (["B"] if op == "Gemm" else []), ["z"])
    g = helper.make_graph([node], "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    eps = 0.25  # large, so that the scaling is far from 1
    aug = augment(m, wrt=["x"], rules="lrp", logits="z", options={"epsilon": eps})
    meta = {p.key: p.value for p in aug.metadata_props}
    seed = rng.standard_normal((4, 2, 3)).astype(np.float32)
    sess = ort.InferenceSession(aug.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run([meta["onnxsal.grad.x"]], {"x": x, meta["onnxsal.seed"]: seed})
    z = x.astype(np.float64) @ w + (bias if op == "Gemm" else 0)
    stab = z + eps * np.where(z < 0, -1.0, 1.0)
    want = (seed * (z / stab)) @ w.T.astype(np.float64)
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    assert np.abs(got - seed @ w.T).max() > 1e-2  # the rule set changed the gradient


def test_each_family_docstring_lists_its_ops():
    """The ``Ops:`` line of each rule module's docstring is the ops it registers."""
    import importlib
    import re

    families: dict[str, set[str]] = {}
    for op, r in table().items():
        families.setdefault(r.fn.__module__, set()).add(op)
    for module, ops in families.items():
        doc = importlib.import_module(module).__doc__ or ""
        listed = re.search(r"Ops: (.*?)\.\n", doc, re.DOTALL)
        assert listed, f"{module}: no 'Ops:' line"
        assert set(" ".join(listed.group(1).split()).split(", ")) == ops, module


def test_markdown_list_names_every_rule():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "onnxsal.autodiff.rules", "--markdown"], check=True,
                         capture_output=True, text=True).stdout
    named = {op for line in out.splitlines() for op in line.split(": ", 1)[1].rstrip(".").split(", ")}
    assert named == set(table())
