"""Stored images: their record, and their file."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from service.deps import ReaderDep, ServiceDep
from service.forms import StrictRoute
from service.routers.common import ImageId, errors, file_url
from service.schemas import ImageOut

router = APIRouter(prefix="/v1/images", tags=["images"], route_class=StrictRoute)


@router.get("/{image_id}", response_model=ImageOut, responses=errors(401, 403, 404, 422),
            summary="An image's record (individual, sighting, size, content hash)")
async def get_image(image_id: ImageId, service: ServiceDep, caller: ReaderDep) -> ImageOut:
    row = await run_in_threadpool(service.store.get_image, image_id)
    return ImageOut(**{k: v for k, v in row.items() if k not in ("path", "embedding_model")},
                    file_url=file_url(image_id))


@router.get("/{image_id}/file", response_class=FileResponse, responses=errors(401, 403, 404, 422),
            summary="The image file as uploaded")
async def get_image_file(image_id: ImageId, service: ServiceDep, caller: ReaderDep) -> FileResponse:
    row = await run_in_threadpool(service.store.get_image, image_id)
    path = await run_in_threadpool(service.image_path, row)
    return FileResponse(path, media_type=row["media_type"], headers={"ETag": f'"{row["sha256"]}"'})
