"""Adam with a second learning rate for some of the variables: the encoder's, when fine-tuned.

A pretrained encoder is fine-tuned with a learning rate lower than the decoder's (im2txt,
sgrvinod's `fine_tune_encoder`): its weights are already good, and the first gradients that
reach it come from a decoder that is still adapting to the features it changes. The update of
variable k at step t is Adam's with lr_k = ratio * lr for the `scaled` variables, lr otherwise:

    theta_k <- theta_k - lr_k * m_hat_k / (sqrt(v_hat_k) + eps)

The ratio multiplies the learning rate, not the gradient: Adam is invariant to a constant
scaling of a gradient (m and sqrt(v) scale alike), so scaling gradients would change nothing
but the weight of eps. The schedule (decay) applies to both rates alike.

The scaled variables are named by their index in the list the optimizer is built on, the index
Adam itself keeps their moments under: `update_step` sees the same variables under TensorFlow
(with or without XLA, under tf.distribute) and JAX (stateless apply), and the choice is a list of
ints, so a saved model's optimizer comes back with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="caption_pipeline")
class TwoRateAdam(keras.optimizers.Adam):
    """Adam whose learning rate is multiplied by `ratio` for the variables at positions
    `scaled` of the list given to `build` (`model.trainable_variables`)."""

    def __init__(
        self, learning_rate=1e-3, *, ratio: float = 1.0, scaled: Sequence[int] = (), **kwargs
    ):
        super().__init__(learning_rate, **kwargs)
        self.ratio = float(ratio)
        self.scaled = sorted(int(index) for index in scaled)
        self._scaled = frozenset(self.scaled)

    def update_step(self, gradient, variable, learning_rate):
        if self._get_variable_index(variable) in self._scaled:
            learning_rate = ops.multiply(learning_rate, self.ratio)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "ratio": self.ratio, "scaled": list(self.scaled)}


def variable_indices(variables: Sequence, subset: Sequence) -> list[int]:
    """The positions in `variables` of the variables of `subset` (by identity)."""
    wanted = {id(variable) for variable in subset}
    return [index for index, variable in enumerate(variables) if id(variable) in wanted]
