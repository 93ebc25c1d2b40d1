"""The fast forward pass ``model(x)`` runs. (Placeholder: delegates to the readable path.)"""


class FastEngine:
    """Weights prepared once from a ``MobileNetV3``; ``forward`` runs the network."""

    def __init__(self, model):
        self.model = model

    def forward(self, x, return_intermediates=False):
        return self.model.forward_reference(x, return_intermediates)
