"""``bitsandbytes.nn.modules`` of bitsandbytes 0.49.2: where its Int8Params, Linear8bitLt and SwitchBackLinearBnb are defined."""
from __future__ import annotations

from . import Int8Params, Linear8bitLt, SwitchBackLinearBnb

__all__ = ["Int8Params", "Linear8bitLt", "SwitchBackLinearBnb"]
