"""RSA signing keys for the emulator's JWTs (RS256) and their JWKS document."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm


@dataclass
class SigningKey:
    """A key pair kept as parsed key objects: re-loading a PEM per token costs ~80 ms (RSA key checks)."""

    kid: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    public_jwk: dict[str, Any]

    @classmethod
    def generate(cls, kid: str) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
        return cls(kid=kid, private_key=key, public_jwk=jwk)

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self.private_key, algorithm="RS256", headers={"kid": self.kid})

    def verify(self, token: str, *, audience: str | None = None) -> dict[str, Any]:
        """Decode and verify signature and ``exp`` (raises ``jwt.PyJWTError``)."""
        return jwt.decode(
            token,
            self.public_key,
            algorithms=["RS256"],
            audience=audience,
            options={"verify_aud": audience is not None},
        )
