"""The ``frozen`` tuner: freezes the whole encoder (the decoder-only baseline)."""

from __future__ import annotations

from deflect.tuners.base import BaseTuner


class FrozenTuner(BaseTuner):
    """No adapter: every encoder parameter is frozen (``modules_to_save`` excepted)."""
