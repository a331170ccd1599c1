"""Built-in middleware, one per module, by the name used in `[middleware] chain`."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ds2oai.chain import Middleware
from ds2oai.config import Config
from ds2oai.middleware.auth import BearerAuth
from ds2oai.middleware.limits import KeyLimits
from ds2oai.middleware.rate_limit import RateLimitTranslator
from ds2oai.middleware.reframe import Reframe
from ds2oai.middleware.retry import Retry

__all__ = ["BUILTINS", "BearerAuth", "KeyLimits", "RateLimitTranslator", "Reframe", "Retry"]

BUILTINS: Mapping[str, Callable[[Config], Middleware]] = {
    "auth": BearerAuth.from_config,
    "limits": KeyLimits.from_config,
    "rate_limit": RateLimitTranslator.from_config,
    "retry": Retry.from_config,
    "reframe": Reframe.from_config,
}
