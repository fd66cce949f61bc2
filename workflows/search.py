"""Search attributes every chainloom workflow carries, so the Temporal UI is the console."""

from temporalio.common import SearchAttributeKey

CHAIN_ID = SearchAttributeKey.for_keyword("ChainId")
TENANT_ID = SearchAttributeKey.for_keyword("TenantId")
RUN_KIND = SearchAttributeKey.for_keyword("RunKind")

ALL_KEYS = (CHAIN_ID, TENANT_ID, RUN_KIND)
