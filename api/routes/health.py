"""Liveness: answers without auth and without touching Temporal."""

from fastapi import APIRouter

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness probe.")
def health() -> dict[str, str]:
    return {"status": "ok"}
