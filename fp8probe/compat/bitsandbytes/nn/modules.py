"""``bitsandbytes.nn.modules`` of bitsandbytes 0.49.2: where its Linear8bitLt and SwitchBackLinearBnb are defined."""
from __future__ import annotations

from . import Linear8bitLt, SwitchBackLinearBnb

__all__ = ["Linear8bitLt", "SwitchBackLinearBnb"]
