"""Exceptions and warnings raised by the FlexLoRA core.

Every error derives from :class:`FlexLoRAError` *and* from the builtin that a caller
would naturally catch (``ValueError`` for bad values, ``KeyError`` for a missing module),
so ``except ValueError`` keeps working for code that does not know this package.
Messages name the client, the module and both ranks or shapes involved.
"""

from __future__ import annotations

__all__ = [
    "FlexLoRAError",
    "FlexLoRAWarning",
    "MagnitudeError",
    "MissingModuleError",
    "NonFiniteUpdateError",
    "ProfileError",
    "RankError",
    "ShapeMismatchError",
    "UnsupportedDtypeError",
    "UnsupportedKeyError",
]


class FlexLoRAError(Exception):
    """Base class of every error raised by ``flexlora_plugin``."""


class RankError(FlexLoRAError, ValueError):
    """A LoRA rank is inconsistent (A vs B), too large for its module, or not allowed."""


class ShapeMismatchError(FlexLoRAError, ValueError):
    """Factors of one module disagree in shape between clients, or with the expected shape."""


class MissingModuleError(FlexLoRAError, KeyError):
    """A module (or one of its two factors) is absent where it is required."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnsupportedKeyError(FlexLoRAError, ValueError):
    """A state-dict key is not a LoRA factor (``modules_to_save``, DoRA magnitude, bias...)."""


class UnsupportedDtypeError(FlexLoRAError, ValueError):
    """A factor is not a floating tensor (float16, bfloat16, float32, float64): integers and bools are refused."""


class MagnitudeError(FlexLoRAError, ValueError):
    """A client's update is too large to aggregate in the compute dtype (it would overflow), or above the norm bound."""


class NonFiniteUpdateError(FlexLoRAError, ValueError):
    """No usable update remains after excluding clients whose factors hold NaN or Inf."""


class ProfileError(FlexLoRAError, ValueError):
    """A resource profile, LoRA type or distribution is unknown, duplicated or malformed."""


class FlexLoRAWarning(UserWarning):
    """A user-actionable notice: a client was excluded, a rank was clamped, ..."""
