"""nvae_tf.graph_optimization: tf.function with a leaner Grappler pipeline, same results."""

import numpy as np
import tensorflow as tf
from support import scaler_module
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context

from nvae_tf import graph_optimization

RC = rewriter_config_pb2.RewriterConfig


def _options_in_effect():
    raw = context.context().function_call_options.config_proto_serialized
    config = config_pb2.ConfigProto()
    config.ParseFromString(raw)
    return config.graph_options.rewrite_options


def test_rewriter_config_keeps_remapper_and_turns_off_the_rest():
    rewrite = graph_optimization.rewriter_config(config_pb2.ConfigProto()).graph_options
    rewrite = rewrite.rewrite_options
    assert rewrite.meta_optimizer_iterations == RC.ONE
    assert rewrite.memory_optimization == RC.NO_MEM_OPT
    assert rewrite.arithmetic_optimization == RC.OFF and rewrite.layout_optimizer == RC.OFF
    assert rewrite.remapping == RC.DEFAULT  # fused conv kernels: these pay
    assert rewrite.constant_folding == RC.DEFAULT
    assert rewrite.disable_tfg_optimizer
    assert not rewrite.disable_meta_optimizer


def test_options_apply_during_the_call_only():
    seen = []

    @graph_optimization.function
    def double(x):
        return 2.0 * x

    def probe(x):
        seen.append(_options_in_effect().memory_optimization)
        return double(x)

    before = _options_in_effect().memory_optimization
    with graph_optimization.lean_grappler():
        probe(tf.constant(1.0))
    assert seen == [RC.NO_MEM_OPT]
    assert _options_in_effect().memory_optimization == before
    np.testing.assert_allclose(double(tf.constant([1.0, 2.0])).numpy(), [2.0, 4.0])


def test_methods_bind_like_tf_function():
    Scaler = scaler_module(reduce_retracing=True)
    a, b = Scaler(2.0), Scaler(3.0)
    assert float(a(tf.constant(1.0))) == 2.0
    assert float(b(tf.constant(1.0))) == 3.0
    # tf.function's API is still there (concrete functions, the Python function).
    assert a.__call__.get_concrete_function(tf.constant(1.0)) is not None
    assert Scaler.__call__.python_function.__name__ == "__call__"


def test_functional_control_flow_keeps_cond_unlowered_inside_only():
    from tensorflow.python.ops import control_flow_util_v2

    def branchy(x):
        return tf.cond(x > 0, lambda: x * 2.0, lambda: x - 1.0)

    def functional(x):
        with graph_optimization.functional_control_flow():
            return branchy(x)

    def lowered(fn):
        graph = tf.function(fn).get_concrete_function(tf.TensorSpec((), tf.float32)).graph
        (op,) = [op for op in graph.get_operations() if op.type in ("If", "StatelessIf")]
        attrs = op.node_def.attr  # absent: not lowered
        return "_lower_using_switch_merge" in attrs and attrs["_lower_using_switch_merge"].b

    assert not lowered(functional)
    f = tf.function(functional)
    assert float(f(tf.constant(3.0))) == 6.0 and float(f(tf.constant(-3.0))) == -4.0
    assert lowered(branchy)  # TensorFlow's default, and the flag is restored
    assert not control_flow_util_v2._DISABLE_LOWER_USING_SWITCH_MERGE
