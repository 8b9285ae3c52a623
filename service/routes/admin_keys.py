"""Admin keys: create, list, revoke (admin key only).

The rule (service/README.md, "Admin keys"): while ``BANDIT_ROUTER_ADMIN_KEY`` is set it is
the only admin key, and the stored keys are refused (the start logs how many); creating a
key is then refused too (409 naming the setting), listing and revoking the stored ones
still work. Unset, the stored keys are the admin keys: the first start generates one, an
admin creates more and revokes old ones; the last one cannot be revoked (409), so the
service never locks its operator out.
"""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.db import models as m
from service.deps import AdminDep, ServiceDep, bearer_key
from service.errors import Problem
from service.security import hash_key, new_key

router = APIRouter(prefix="/v1/admin/keys", tags=["admin"])


class AdminKeyOut(BaseModel):
    id: int | None  # None: the key of BANDIT_ROUTER_ADMIN_KEY (not stored)
    source: str  # "setting" or "stored"
    # The first 12 hex digits of SHA-256(digest): tells keys apart, reveals nothing.
    fingerprint: str
    created_at: str | None
    accepted: bool
    current: bool  # the key of this request


class AdminKeyCreated(BaseModel):
    id: int
    api_key: str
    fingerprint: str
    created_at: str


def _fingerprint(digest: str) -> str:
    return hashlib.sha256(digest.encode()).hexdigest()[:12]


def _configured_refusal(what: str) -> Problem:
    return Problem(409, f"BANDIT_ROUTER_ADMIN_KEY is set, so it is the only admin key: "
                   f"{what}; unset it (and restart) to manage stored admin keys",
                   slug="admin-key-configured")


@router.get("", response_model=list[AdminKeyOut])
def list_admin_keys(request: Request, _admin: AdminDep, service: ServiceDep) -> list[AdminKeyOut]:
    """Every admin key: the configured one (if set) and the stored ones, oldest first."""
    mine = hash_key(bearer_key(request))
    configured = service.settings.admin_key
    out = []
    if configured is not None:
        digest = hash_key(configured.get_secret_value())
        out.append(AdminKeyOut(id=None, source="setting", fingerprint=_fingerprint(digest),
                               created_at=None, accepted=True, current=digest == mine))
    with Session(service.engine) as session:
        rows = session.execute(select(m.AdminKey).order_by(m.AdminKey.id)).scalars().all()
        out += [AdminKeyOut(id=row.id, source="stored", fingerprint=_fingerprint(row.key_hash),
                            created_at=m.as_utc(row.created_at).isoformat(),
                            accepted=configured is None, current=row.key_hash == mine)
                for row in rows]
    return out


@router.post("", status_code=status.HTTP_201_CREATED, response_model=AdminKeyCreated)
def create_admin_key(_admin: AdminDep, service: ServiceDep) -> AdminKeyCreated:
    """A new admin key, shown in this answer only (stored as its SHA-256 digest)."""
    if service.settings.admin_key is not None:
        raise _configured_refusal("a stored key would be refused")
    key = new_key("admin")
    with Session(service.engine) as session, session.begin():
        row = m.AdminKey(key_hash=hash_key(key), created_at=m.utcnow())
        session.add(row)
        session.flush()
        created = AdminKeyCreated(id=row.id, api_key=key, fingerprint=_fingerprint(row.key_hash),
                                  created_at=m.as_utc(row.created_at).isoformat())
    service.reload_admin_keys()
    return created


@router.delete("/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_admin_key(key_id: int, _admin: AdminDep, service: ServiceDep) -> Response:
    """Delete a stored admin key: refused at once on this replica, on the others within
    ``registry_refresh_s``."""
    with Session(service.engine) as session, session.begin():
        ids = list(session.scalars(select(m.AdminKey.id).with_for_update()))
        if key_id not in ids:
            raise Problem(404, f"admin key {key_id} does not exist (stored ids: "
                          f"{', '.join(map(str, ids)) or 'none'})", slug="admin-key-not-found")
        if ids == [key_id] and service.settings.admin_key is None:
            raise Problem(409, f"admin key {key_id} is the last admin key: create another "
                          "first (POST /v1/admin/keys), then revoke this one",
                          slug="last-admin-key")
        session.execute(delete(m.AdminKey).where(m.AdminKey.id == key_id))
    service.reload_admin_keys()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
