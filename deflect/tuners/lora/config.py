"""Configuration of LoRA (Hu et al., ICLR 2022) and its options here."""

from __future__ import annotations

from dataclasses import dataclass, field

from deflect.tuners.config import BandStrategyConfig

#: Every Linear of a ViT block (docs/method.md, section 5): attention qkv and projection, the MLP's two.
DEFAULT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


@dataclass
class LoraConfig(BandStrategyConfig):
    r"""LoRA: ``y = W x + b + (alpha / rank) · B A x`` on the target Linear layers; A starts
    Kaiming-uniform, B at zero (the adapted model starts as the base model).

    Args:
        rank: rank r of A (r x in) and B (out x r), or ``"auto"``: the rank whose trainable count
            is closest to ``rank_target`` (logged), for comparisons at equal parameter counts.
        rank_target: with ``rank: auto``, the count to match: a number, or ``"deflect"`` for
            DEFLECT's count (default ``DeflectConfig``) on the same encoder and bands.
        alpha: the scale numerator; ``None`` means ``alpha = rank`` (a scale of 1 at any rank).
        dropout: dropout on the low-rank branch's input.
        target_modules: Linear layers to adapt: a list of module names or ``.``-separated name
            suffixes (PEFT's rule: ``attn.qkv`` matches ``blocks.3.attn.qkv``), or one regular
            expression that must match a whole module name, either the model's or the name
            inside the ViT (``blocks\.[0-3]\.attn\.qkv`` on an encoder whose ViT is
            ``backbone``). Each entry must match Linear layers only.
        train_norms: also train every LayerNorm's weight and bias (the authors' prototype did).
    """

    method: str = "lora"
    rank: int | str = 16
    rank_target: int | str = "deflect"
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    train_norms: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank != "auto" and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                    or self.rank < 1):  # fmt: skip
            raise ValueError(f"rank={self.rank!r}: use a positive integer or 'auto'")
        if self.rank_target != "deflect" and (
            isinstance(self.rank_target, bool)
            or not isinstance(self.rank_target, int)
            or self.rank_target < 1
        ):
            raise ValueError(
                f"rank_target={self.rank_target!r}: use a positive parameter count or 'deflect'"
            )
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r} must be positive (or null for alpha = rank)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError("target_modules is empty; name the Linear layers to adapt")
        else:
            self.target_modules = [str(t) for t in self.target_modules]
            if not self.target_modules:
                raise ValueError("target_modules is empty; name the Linear layers to adapt")

    def scaling(self, rank: int) -> float:
        """``alpha / rank`` (1 when ``alpha`` is ``None``)."""
        return (self.alpha if self.alpha is not None else rank) / rank
