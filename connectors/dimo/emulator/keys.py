"""RSA signing keys for the emulator's JWTs (RS256) and their JWKS document."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm


@dataclass
class SigningKey:
    kid: str
    private_pem: bytes
    public_jwk: dict[str, Any]

    @classmethod
    def generate(cls, kid: str) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
        return cls(kid=kid, private_pem=pem, public_jwk=jwk)

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self.private_pem, algorithm="RS256", headers={"kid": self.kid})

    def verify(self, token: str, *, audience: str | None = None) -> dict[str, Any]:
        """Decode and verify signature and ``exp`` (raises ``jwt.PyJWTError``)."""
        public = RSAAlgorithm.from_jwk(json.dumps(self.public_jwk))
        return jwt.decode(
            token,
            public,  # type: ignore[arg-type]
            algorithms=["RS256"],
            audience=audience,
            options={"verify_aud": audience is not None},
        )
