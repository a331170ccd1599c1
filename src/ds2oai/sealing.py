"""Sealed reasoning: DeepSeek `reasoning_content` round-tripped through the client, opaquely.

With `store: false` and `include: ["reasoning.encrypted_content"]` the gateway keeps nothing;
the reasoning item it returns carries `encrypted_content`, an AES-256-GCM blob (random 96-bit
nonce, fixed associated data) sealed with the gateway's secret. When the client sends the item
back, `open()` restores the text so later tool-call turns can pass it to DeepSeek again (it
answers 400 without it). A blob that fails authentication opens to None, never to garbage.
Pure computation; the key comes from the config/environment.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["Sealer"]

log = logging.getLogger(__name__)

_PREFIX = "ds2oai.v1."
_AAD = b"ds2oai reasoning v1"


class Sealer:
    def __init__(self, secret: str | bytes | None) -> None:
        if not secret:
            # A per-process key: blobs only open in this process (set DS2OAI_SECRET for more).
            key = os.urandom(32)
            self.ephemeral = True
        else:
            raw = secret.encode() if isinstance(secret, str) else secret
            key = hashlib.sha256(b"ds2oai-seal:" + raw).digest()
            self.ephemeral = False
        self._key = key
        self._cipher: AESGCM | None = None

    def _aead(self) -> AESGCM:
        # Imported on first use: cryptography adds ~6.5 MiB to every worker's RSS, and most
        # deployments never seal anything.
        if self._cipher is None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._cipher = AESGCM(self._key)
        return self._cipher

    def seal(self, text: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead().encrypt(nonce, text.encode("utf-8"), _AAD)
        return _PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def open(self, blob: str) -> str | None:
        if not isinstance(blob, str) or not blob.startswith(_PREFIX):
            return None
        try:
            raw = base64.urlsafe_b64decode(blob[len(_PREFIX) :].encode("ascii"))
            if len(raw) < 12 + 16:
                return None
            aead = self._aead()
        except ValueError:
            return None
        from cryptography.exceptions import InvalidTag

        try:
            return aead.decrypt(raw[:12], raw[12:], _AAD).decode("utf-8")
        except (InvalidTag, ValueError, UnicodeError):
            return None
