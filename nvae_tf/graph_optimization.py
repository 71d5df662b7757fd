"""``tf.function`` with the Grappler passes that pay on NVAE's graphs, and no others.

An NVAE training step is a graph of ~100k nodes (hundreds of convs, each with its weight norm,
batch norm, their gradients and the regularizers). TensorFlow's default Grappler pipeline runs
every pass twice over it; on the MNIST paper config that took ~45 s of a ~110 s start-up while
only the remapper (fused conv + bias + activation kernels) and function inlining change the
step time. ``function`` keeps those, plus pruning, shape optimization and constant folding, and
turns off the rest: one meta-optimizer iteration, no memory optimizer (it only acts on GPU
graphs), no layout, arithmetic, dependency, loop, common-subgraph or TFG (MLIR) passes.
Measured here (MNIST paper config, batch 16, 2 CPU cores): first call 43 s -> 12 s, same s/step.

TensorFlow's public ``tf.config.optimizer.set_experimental_options`` is process-wide and cannot
turn off the memory optimizer, the second iteration or TFG, so the options are passed per call
through the eager context's function-call options (the mechanism ``tf.function`` itself reads).
Where that private hook is missing, ``function`` is plain ``tf.function``.
"""

import contextlib
import functools
import weakref

import tensorflow as tf
from tensorflow.core.protobuf import rewriter_config_pb2

from nvae_tf import graph_cache

try:  # private, see the module docstring
    from tensorflow.python.eager import context as _context
except ImportError:  # pragma: no cover
    _context = None
try:  # private, see functional_control_flow
    from tensorflow.python.ops import control_flow_util_v2 as _cf_util
except ImportError:  # pragma: no cover
    _cf_util = None

_OFF = rewriter_config_pb2.RewriterConfig.OFF
# Passes that cost start-up time without changing NVAE's step time on CPU or GPU.
_PASSES_OFF = (
    "layout_optimizer",
    # (constant folding stays: without it int32 shape arithmetic reaches oneDNN, which logs an
    # error line on every run)
    "arithmetic_optimization",
    "dependency_optimization",
    "loop_optimization",
    "common_subgraph_elimination",
    "implementation_selector",
)


def rewriter_config(base=None):
    """The ``ConfigProto`` NVAE's graphs are optimized with: ``base`` (the context's) + ours."""
    config = base if base is not None else _context.context().config
    rewrite = config.graph_options.rewrite_options
    rewrite.meta_optimizer_iterations = rewriter_config_pb2.RewriterConfig.ONE
    rewrite.memory_optimization = rewriter_config_pb2.RewriterConfig.NO_MEM_OPT
    rewrite.disable_tfg_optimizer = True  # MLIR shape inference + control-flow sinking
    rewrite.experimental_conditional_code_motion = _OFF
    for name in _PASSES_OFF:
        setattr(rewrite, name, _OFF)
    return config


def _has_call_options():
    """Whether the eager context's per-call options (private, see the docstring) exist."""
    return _context is not None and hasattr(_context.context(), "function_call_options")


def _call_config():
    """The serialized ``ConfigProto`` this thread's function calls use, or None."""
    if not _has_call_options():
        return None
    return _context.context().function_call_options.config_proto_serialized


@contextlib.contextmanager
def lean_grappler():
    """Calls of ``tf.function``s inside use ``rewriter_config()`` (this thread only)."""
    if not _has_call_options():
        yield
        return
    ctx = _context.context()
    previous = ctx.function_call_options
    ctx.function_call_options = _context.FunctionCallOptions(
        executor_type=previous.executor_type, config_proto=rewriter_config()
    )
    try:
        yield
    finally:
        ctx.function_call_options = previous


@contextlib.contextmanager
def functional_control_flow():
    """``tf.cond`` and ``tf.while_loop`` built inside stay functional ``If``/``While`` ops.

    By default TensorFlow lowers them into the enclosing graph as ``Switch``/``Merge`` nodes,
    one ``Switch`` and one ``Identity`` per captured tensor. The guarded optimizer's cond
    (Keras' ``LossScaleOptimizer``) captures every gradient and variable, so lowering it added
    ~5,000 nodes to the MNIST step for Grappler to optimize: keeping it functional cut the first
    call by 2-3 s with the same step time and memory. Only for one replica: with several, a
    functional ``If`` taking resources from several devices cannot be placed. There is no public
    switch; where the private flag is missing, control flow is lowered as usual.
    """
    if _cf_util is None or not hasattr(_cf_util, "_DISABLE_LOWER_USING_SWITCH_MERGE"):
        yield
        return
    previous = _cf_util._DISABLE_LOWER_USING_SWITCH_MERGE
    _cf_util._DISABLE_LOWER_USING_SWITCH_MERGE = True
    try:
        yield
    finally:
        _cf_util._DISABLE_LOWER_USING_SWITCH_MERGE = previous


def function(fn=None, cache_graph=False, **kwargs):
    """``tf.function(fn, **kwargs)`` whose every call runs under ``lean_grappler()``.

    Every call, not only the first: TensorFlow keys a function's optimized instantiation by its
    options, so a call with other options would optimize the graph again. Works on functions
    and, like ``tf.function``, on methods. AutoGraph is off unless asked for: NVAE's traced
    code writes its control flow with ``tf.cond``/``tf.while_loop``, and converting it cost
    ~2 s of the MNIST step's tracing.

    ``cache_graph``: the first call's optimized graph comes from, or goes to, the disk cache
    of ``graph_cache`` (for the large graphs a process starts with: the training step, the
    importance-weighted evaluation). Later retraces are optimized as usual.
    """
    if fn is None:
        return functools.partial(function, cache_graph=cache_graph, **kwargs)
    kwargs.setdefault("autograph", False)
    return _LeanFunction(tf.function(fn, **kwargs), cache_graph)


# ``cache_graph`` functions whose first call has been made; a method's bound ``tf.function``
# is one object per instance (TensorFlow caches it), so each model gets its own first call.
_FIRST_CALL_DONE = weakref.WeakSet()


class _LeanFunction:
    """A ``tf.function`` (``.python_function``, ``get_concrete_function``, ...) called under
    ``lean_grappler()``."""

    def __init__(self, compiled, cache_graph=False):
        self._compiled = compiled
        self._cache_graph = cache_graph
        functools.update_wrapper(self, compiled)

    def __call__(self, *args, **kwargs):
        with lean_grappler():
            # Inside another trace the call is only recorded, instantiated with the caller's.
            eager_first = tf.executing_eagerly() and self._compiled not in _FIRST_CALL_DONE
            if not (self._cache_graph and eager_first):
                return self._compiled(*args, **kwargs)
            _FIRST_CALL_DONE.add(self._compiled)
            # Traced here, so that the graph can be fingerprinted before it is instantiated.
            concrete = self._compiled.get_concrete_function(*args, **kwargs)
            with graph_cache.instantiating(concrete, _call_config()):
                return self._compiled(*args, **kwargs)

    def __get__(self, instance, owner):
        if instance is None:
            return self
        return _LeanFunction(self._compiled.__get__(instance, owner), self._cache_graph)

    def __getattr__(self, name):
        return getattr(self._compiled, name)
