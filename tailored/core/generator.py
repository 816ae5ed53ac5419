"""ATP's pruning-decision generator: a small network that outputs the gate logits of every unit.

Following ATP (built on DISP-LLM; docs/method.md#section-4), fixed random per-layer embeddings go through a 2-layer
transformer encoder (d_model 64, 4 heads), so that decisions in different layers are coupled, and a per-layer
linear head maps each layer's encoding to the logits of that layer's units::

    layer embeddings [L, 64] (fixed) ─► TransformerEncoder (2 layers) ─► h [L, 64]
        groups   [L, Hkv] = einsum(h, W_groups [L, 64, Hkv]) + b       (one head per layer)
        channels [L, f]   = einsum(h, W_channels [L, 64, f]) + b
        attn, mlp, layers [L] = h @ w [64] + b
        hidden   [d]      = mean_l(h) @ W_hidden [64, d] + b             (model-wide)

Here the logits are the ``log_alpha`` of the hard-concrete gates, so the rest of the method is unchanged.

The generator is float32 throughout: built so under any default dtype, kept so by
:meth:`tailored.core.gates.PruningGates._apply`, and run with autocast off (``bf16-mixed`` would run its matmuls
in bf16).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from tailored.core.structure import ModelStructure, unit_shapes

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
        fp32 = torch.float32
        self.register_buffer("layer_embeddings", torch.randn(L, EMBEDDING_DIM, dtype=fp32))
        block = nn.TransformerEncoderLayer(
            EMBEDDING_DIM, ENCODER_HEADS, 4 * EMBEDDING_DIM, dropout=0.0, batch_first=True, dtype=fp32
        )
        self.encoder = nn.TransformerEncoder(block, ENCODER_LAYERS, enable_nested_tensor=False)
        shapes = unit_shapes(structure)
        self.weights = nn.ParameterDict()
        self.biases = nn.ParameterDict()
        for name in prune:
            width = shapes[name][-1] if name in ("groups", "channels", "hidden") else 1
            layers = () if name == "hidden" else (L,)
            self.weights[name] = nn.Parameter(torch.randn(*layers, EMBEDDING_DIM, width, dtype=fp32) * init_std)
            self.biases[name] = nn.Parameter(torch.full(shapes[name], init_log_alpha, dtype=fp32))

    def forward(self) -> dict[str, torch.Tensor]:
        """Logits per pruned unit type, shaped as :func:`tailored.core.structure.unit_shapes`, in float32."""
        with autocast_off(self.layer_embeddings.device):
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


def autocast_off(device: torch.device):
    """A context in which autocast (Lightning's ``*-mixed`` precision) leaves ``device``'s matmuls alone."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()  # meta and other devices without autocast
