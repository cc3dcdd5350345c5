"""Spec -> CUDA source text. Pure: the same spec always renders the same text.

Templates (`templates/*.jinja`) decide how the code looks; they only set types and constants and
instantiate kernels written in the project headers (`templates/include/flashinfer_jit/*.cuh`).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import jinja2

from .spec import KernelSpec


def templates_dir() -> Path:
    """`templates/` of a source checkout, or its copy shipped inside an installed package."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_templates", here.parent / "templates"):
        if (candidate / "include").is_dir():
            return candidate
    raise FileNotFoundError(
        f"flashinfer-jit templates not found next to {here}: the installation is incomplete; reinstall the package"
    )


def include_dir() -> Path:
    return templates_dir() / "include"


@functools.lru_cache(maxsize=None)
def _environment(root: str) -> jinja2.Environment:
    # cache_size=0: jinja's template cache revalidates by mtime only, so an edit that keeps the
    # mtime (checkout, reinstall, copy -p) would render the old text under the old key.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(root),
        cache_size=0,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def render(spec: KernelSpec) -> dict[str, str]:
    """Render every template of `spec`: {file name: source text}."""
    environment = _environment(str(templates_dir()))
    context = spec.template_context()
    sources = {}
    for name in spec.templates:
        out_name = name.removesuffix(".jinja")
        sources[out_name] = environment.get_template(name).render(**context)
    return sources


def headers_digest() -> str:
    """sha256 over every project header (path and bytes). Any header edit changes every key,
    whatever its mtime."""
    digest = hashlib.sha256()
    root = include_dir()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()
