"""Make layers held in Python lists visible to ``tf.train.Checkpoint``.

Keras 3 wraps list attributes in ``TrackedList``, which TensorFlow's object-based checkpoints
do not recognise: their layers' variables are silently left out of checkpoints (keras #18398).
Layers that keep sub-layers in lists inherit this mixin, which names each element as a child.
"""

import tensorflow as tf


class CheckpointListsMixin:
    """Adds ``<attribute>/<index>`` checkpoint children for every list-held trackable."""

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        children = super()._trackable_children(save_type, **kwargs)
        if save_type == "checkpoint":
            for name in getattr(self, "_tracked", ()):
                values = getattr(self, name, None)
                for i, item in enumerate(values if isinstance(values, (list, tuple)) else ()):
                    if isinstance(item, tf.__internal__.tracking.Trackable):
                        children[f"{name}/{i}"] = item
        return children
