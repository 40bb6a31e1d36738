"""Adam with a smaller learning rate for the pretrained backbone than for the head.

Fine-tuning pretrained weights wants small steps in the backbone (large ones undo what
ImageNet taught it) and normal ones in the freshly initialised head. Scaling the
backbone's gradients would not do it: Adam divides each step by the gradient's running
magnitude, so a scaled gradient gives the same step. Here the learning rate itself is
per variable: the backbone's variables step at `backbone_factor` x the rate.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="thyroid_cad")
class TwoRateAdam(keras.optimizers.Adam):
    """Adam whose `slow_variables` use learning_rate x backbone_factor."""

    def __init__(self, learning_rate=1e-3, backbone_factor=1.0, slow_variables=(), **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.backbone_factor = float(backbone_factor)
        self._slow = {id(v) for v in slow_variables}
        self._factors: list[float] = []

    def build(self, var_list):
        super().build(var_list)
        # One factor per variable, in the optimizer's own variable order (a Python
        # list: read while tracing, so the graph holds constants).
        self._factors = [self.backbone_factor if id(v) in self._slow else 1.0 for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        factor = self._factors[self._get_variable_index(variable)]
        lr = learning_rate if factor == 1.0 else ops.multiply(learning_rate, factor)
        super().update_step(gradient, variable, lr)

    def get_config(self):
        return {**super().get_config(), "backbone_factor": self.backbone_factor}
