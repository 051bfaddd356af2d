"""DIMO privileges: numeric IDs, token-exchange permission strings, telemetry enums, SACD bit masks."""

from __future__ import annotations

from collections.abc import Iterable

from depin_core.errors import PermanentError

# id -> (permission string, telemetry enum or None)
PRIVILEGES: dict[int, tuple[str, str | None]] = {
    1: ("privilege:GetNonLocationHistory", "VEHICLE_NON_LOCATION_DATA"),
    2: ("privilege:ExecuteCommands", "VEHICLE_COMMANDS"),
    3: ("privilege:GetCurrentLocation", "VEHICLE_CURRENT_LOCATION"),
    4: ("privilege:GetLocationHistory", "VEHICLE_ALL_TIME_LOCATION"),
    5: ("privilege:GetVINCredential", "VEHICLE_VIN_CREDENTIAL"),
    6: ("privilege:GetLiveData", None),
    7: ("privilege:GetRawData", "VEHICLE_RAW_DATA"),
    8: ("privilege:GetApproximateLocation", "VEHICLE_APPROXIMATE_LOCATION"),
}
PERMISSION_TO_ID = {perm: pid for pid, (perm, _) in PRIVILEGES.items()}
ENUM_TO_ID = {enum: pid for pid, (_, enum) in PRIVILEGES.items() if enum}
ID_TO_PERMISSION = {pid: perm for pid, (perm, _) in PRIVILEGES.items()}

NON_LOCATION_HISTORY = 1
LOCATION_HISTORY = 4
APPROXIMATE_LOCATION = 8


def encode_sacd_permissions(ids: Iterable[int]) -> str:
    """SACD ``permissions`` hex string: two bits (0b11) at bit ``2*id`` for each granted id."""
    value = 0
    for pid in ids:
        value |= 0b11 << (2 * pid)
    return hex(value)


def decode_sacd_permissions(permissions: str) -> list[int]:
    """Inverse of :func:`encode_sacd_permissions` (same rule as the official SDK's decoder)."""
    try:
        bits = int(permissions.lower().removeprefix("0x") or "0", 16)
    except ValueError:
        raise PermanentError(f"SACD permissions {permissions!r} is not a hex string") from None
    return [i for i in range(128) if (bits >> (2 * i)) & 0b11 == 0b11]
