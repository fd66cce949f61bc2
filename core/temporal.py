"""Temporal client set-up shared by the API, the worker and the CLI."""

import asyncio
import logging

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.service import RPCError

from core.config import Settings
from workflows.contracts import ALL_SEARCH_ATTRIBUTES
from workflows.payloads import data_converter

log = logging.getLogger(__name__)


CONNECT_TIMEOUT = 10.0


async def connect(settings: Settings) -> Client:
    """Connect with a bound: the SDK itself would wait forever on an unreachable server."""
    async with asyncio.timeout(CONNECT_TIMEOUT):
        return await Client.connect(
            settings.temporal_address,
            namespace=settings.temporal_namespace,
            tls=settings.temporal_tls,
            api_key=settings.temporal_api_key or None,
            data_converter=data_converter(),
        )


async def ensure_search_attributes(client: Client) -> None:
    """Register the custom search attributes when missing, so no manual operator step is needed."""
    service = client.operator_service
    existing = await service.list_search_attributes(
        ListSearchAttributesRequest(namespace=client.namespace)
    )
    missing = {
        key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
        for key in ALL_SEARCH_ATTRIBUTES
        if key.name not in existing.custom_attributes
    }
    if not missing:
        return
    try:
        await service.add_search_attributes(
            AddSearchAttributesRequest(namespace=client.namespace, search_attributes=missing)
        )
        log.info("registered search attributes %s", sorted(missing))
    except RPCError as err:
        # Another process registering the same attributes at the same moment is fine.
        if "already exists" not in str(err):
            raise
