"""The page and the health check."""
from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from ich.labels import LABELS
from pipeline.notice import NOTICE

from ..deps import Server, server
from ..guard import csp
from ..schemas import Health

router = APIRouter()
templates = Jinja2Templates(directory=str(Path(__file__).resolve().parents[1] / "templates"))


def inline_script_hashes(html: bytes) -> list[str]:
    """'sha256-...' of each inline <script> of the page, for its Content-Security-Policy."""
    return ["sha256-" + base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode()
            for m in re.finditer(rb"<script>(.*?)</script>", html, re.S)]


@router.get("/", response_class=HTMLResponse)
async def index(request: Request, srv: Server = Depends(server)):
    page = templates.TemplateResponse(request, "index.html", {
        "notice": NOTICE, "model": srv.engine.model, "max_upload_mb": srv.settings.max_upload_mb,
        "labels": list(LABELS)})
    page.headers["Content-Security-Policy"] = csp(inline_script_hashes(page.body))
    return page


@router.get("/api/health", response_model=Health)
async def health(srv: Server = Depends(server)):
    return {"ok": True, "model": srv.engine.model, "studies_in_memory": len(srv.store), "notice": NOTICE}
