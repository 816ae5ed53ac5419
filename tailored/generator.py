"""ATP's pruning-decision generator: a small network that outputs the gate logits of every unit.

Following ATP (built on DISP-LLM; METHOD.md section 4), fixed random per-layer embeddings go through a 2-layer
transformer encoder (d_model 64, 4 heads), so that decisions in different layers are coupled, and a per-layer
linear head maps each layer's encoding to the logits of that layer's units::

    layer embeddings [L, 64] (fixed) ─► TransformerEncoder (2 layers) ─► h [L, 64]
        groups   [L, Hkv] = einsum(h, W_groups [L, 64, Hkv]) + b       (one head per layer)
        channels [L, f]   = einsum(h, W_channels [L, 64, f]) + b
        attn, mlp, layers [L] = h @ w [64] + b
        hidden   [d]      = mean_l(h) @ W_hidden [64, d] + b             (model-wide)

Here the logits are the ``log_alpha`` of the hard-concrete gates, so the rest of the method is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from tailored.structure import ModelStructure, unit_shapes

EMBEDDING_DIM = 64
ENCODER_LAYERS = 2
ENCODER_HEADS = 4


class DecisionGenerator(nn.Module):
    """Gate logits for the pruned unit types of ``structure``, all produced by one network.

    Args:
        structure: the model's prunable structure.
        prune: unit types to produce logits for.
        init_log_alpha: the heads' bias: every unit starts with this logit (all kept).
        init_std: standard deviation of the heads' weights (small: decisions start near the bias).
    """

    def __init__(
        self, structure: ModelStructure, prune: tuple[str, ...], init_log_alpha: float, init_std: float
    ) -> None:
        super().__init__()
        L = structure.num_layers
        self.register_buffer("layer_embeddings", torch.randn(L, EMBEDDING_DIM))
        block = nn.TransformerEncoderLayer(
            EMBEDDING_DIM, ENCODER_HEADS, 4 * EMBEDDING_DIM, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(block, ENCODER_LAYERS, enable_nested_tensor=False)
        shapes = unit_shapes(structure)
        self.weights = nn.ParameterDict()
        self.biases = nn.ParameterDict()
        for name in prune:
            width = shapes[name][-1] if name in ("groups", "channels", "hidden") else 1
            layers = () if name == "hidden" else (L,)
            self.weights[name] = nn.Parameter(torch.randn(*layers, EMBEDDING_DIM, width) * init_std)
            self.biases[name] = nn.Parameter(torch.full(shapes[name], init_log_alpha))

    def forward(self) -> dict[str, torch.Tensor]:
        """Logits per pruned unit type, shaped as :func:`tailored.structure.unit_shapes`."""
        encoded = self.encoder(self.layer_embeddings[None])[0]  # [L, 64]
        logits = {}
        for name, weight in self.weights.items():
            if name == "hidden":
                out = encoded.mean(0) @ weight  # [d]
            else:
                out = torch.einsum("le,lew->lw", encoded, weight)  # [L, width]
                out = out.squeeze(-1) if name in ("attn", "mlp", "layers") else out
            logits[name] = out + self.biases[name]
        return logits
