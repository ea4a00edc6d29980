"""FastAPI dependencies: what the composition root put on app.state, handed to the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from services.allocator.database import Database
from services.allocator.domain.eips import EipPool
from services.allocator.schemas import PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX
from services.allocator.settings import AllocatorSettings


async def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


async def get_settings(request: Request) -> AllocatorSettings:
    settings: AllocatorSettings = request.app.state.settings
    return settings


async def get_eip_pool(request: Request) -> EipPool:
    pool: EipPool = request.app.state.eip_pool
    return pool


DbDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[AllocatorSettings, Depends(get_settings)]
EipPoolDep = Annotated[EipPool, Depends(get_eip_pool)]
Limit = Annotated[int, Query(ge=1, le=PAGE_LIMIT_MAX, description="page size")]
PageToken = Annotated[str | None, Query(max_length=256, description="next_page_token of the previous page")]
LIMIT_DEFAULT = PAGE_LIMIT_DEFAULT
