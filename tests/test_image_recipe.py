"""The README's image recipe, run as written: prebuild, verify and `chmod -R a-w` as root, then serve
as another, unprivileged user (`nobody`, through os.setuid in the subprocess), who must be able to
read and load every prebuilt kernel, and who gets a CacheWriteError naming read-only when it would
have to build into the image. The commands are read from README.md, so the recipe a user copies is
the one tested. Needs root (to switch users) and a checkout that `nobody` can read (the service
renders the kernel sources from it); skipped, with the reason, otherwise. Fake compiler, no GPU."""
from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import FAKES, REPO

IMAGE = "/opt/flashinfer-jit"  # the path the README uses; replaced by a temporary directory
KERNELS = {"family": "merge", "dtype": "bf16", "head_dim": [64, 128]}
URIS = ["merge_state_hd64_bf16", "merge_state_hd128_bf16"]

# The service: started as root only to get a Python that can read this venv (its interpreter may
# live under /root), it imports everything, then drops to the service user with os.setuid, and only
# then runs the README's run-time block (export lines into the environment, flashinfer-jit lines as
# the CLI) and loads every kernel of the image. Last, with the image as its *writable* cache, it asks
# for a kernel the image lacks.
SERVE = r"""
import json, os, shlex, sys
from flashinfer_jit import cli, loader, spec
from flashinfer_jit.errors import CacheWriteError
uid, gid, block, image = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
assert (os.getuid(), os.geteuid(), os.getgid()) == (uid, uid, gid)
statuses = []
for line in block.splitlines():
    words = shlex.split(line, comments=True)
    if not words:
        continue
    if words[0] == "export":
        name, _, value = words[1].partition("=")
        os.environ[name] = value
    elif words[0] == "flashinfer-jit":
        statuses.append(cli.main(words[1:]))
    else:
        raise SystemExit(f"the test does not know how to run this README line: {line}")
entries = [str(loader.load(spec.MergeStateSpec(d, "bf16")).entry.path) for d in (64, 128)]
builds = loader.build_count
os.environ.pop("FLASHINFER_JIT_PREBUILT_DIRS")
os.environ.pop("FLASHINFER_JIT_DISABLE_BUILD", None)
os.environ["FLASHINFER_JIT_CACHE_DIR"] = image
try:
    loader.load(spec.MergeStateSpec(256, "bf16"))
    error = None
except CacheWriteError as exc:
    error = str(exc)
print(json.dumps({"statuses": statuses, "entries": entries, "builds": builds, "error": error}))
"""


def readme_recipe() -> tuple[str, str]:
    """The deployment section's first two bash blocks: (build the image, run the service)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Deployment", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 2, "the README's deployment section lost its two command blocks"
    return blocks[0], blocks[1]


def _fake_toolkit(root: Path) -> Path:
    """tests/conftest.py's fake CUDA toolkit, in a directory every user can read: the libraries the
    fake compiler links name lib64/libcudart.so by its absolute path, and the service user loads
    them. `nvcc --version` answers from the shell (the service user may not be able to start this
    Python on its own); compiles go to tests/fakes/fake_nvcc.py."""
    home = root / "fake-cuda"
    for sub in ("bin", "include", "lib64"):
        (home / sub).mkdir(parents=True)
    (home / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then\n'
                    '  echo "Cuda compilation tools, release 99.9, V99.9.0"; echo "Build fake_99.9"; exit 0\nfi\n'
                    f'exec "{sys.executable}" "{FAKES / "fake_nvcc.py"}" "$@"\n')
    nvcc.chmod(0o755)
    (home / "lib64" / "empty.c").write_text("int fake_cudart(void) { return 0; }\n")
    cudart = home / "lib64" / "libcudart.so"
    subprocess.run(["cc", "-shared", "-fPIC", f"-Wl,-soname,{cudart}", str(home / "lib64" / "empty.c"), "-o",
                    str(cudart)], check=True)
    return home


@pytest.fixture
def world_readable_dir():
    path = Path(tempfile.mkdtemp(prefix="fij-image-recipe-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["chmod", "-R", "u+w", str(path)], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def service_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("needs root: the test builds as root and serves as another user (os.setuid)")
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("this machine has no user 'nobody' to serve as")
    for path in [REPO, *REPO.parents]:
        if not stat.S_IMODE(path.stat().st_mode) & stat.S_IXOTH:
            pytest.skip(f"{path} is {stat.filemode(path.stat().st_mode)}: user 'nobody' cannot reach this checkout "
                        f"at {REPO}")
    for path in [REPO / "flashinfer_jit", REPO / "templates", *(REPO / "templates").rglob("*")]:
        if not stat.S_IMODE(path.stat().st_mode) & stat.S_IROTH:
            pytest.skip(f"{path} is not readable by other users, so 'nobody' cannot render kernels from it")
    return user


def test_readme_image_recipe_builds_as_root_and_serves_as_nobody(world_readable_dir, service_user):
    base = world_readable_dir
    image = base / "opt" / "flashinfer-jit"
    shim = base / "bin"
    shim.mkdir()
    (shim / "flashinfer-jit").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m flashinfer_jit "$@"\n')
    (shim / "flashinfer-jit").chmod(0o755)
    (base / "kernels.json").write_text(json.dumps(KERNELS))
    service_home = base / "home"
    service_home.mkdir()
    os.chown(service_home, service_user.pw_uid, service_user.pw_gid)
    toolkit = _fake_toolkit(base)
    env = {"PATH": f"{shim}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(base), "LANG": "C.UTF-8",
           "FLASHINFER_JIT_NVCC": str(toolkit / "bin" / "nvcc"), "FLASHINFER_JIT_ARCH": "90a"}

    build, serve = (block.replace(IMAGE, str(image)) for block in readme_recipe())
    assert "chmod -R a-w" in build and "FLASHINFER_JIT_PREBUILT_DIRS" in serve

    built = subprocess.run(["bash", "-euo", "pipefail", "-c", build], env=env, cwd=base, capture_output=True,
                           text=True, timeout=300)  # as root, like an image build
    assert built.returncode == 0, built.stdout + built.stderr
    assert "built 2, cached 0, failed 0 of 2" in built.stdout
    for path in [image.parent, image, *image.rglob("*")]:  # readable by all, writable by none (a-w)
        mode = stat.S_IMODE(path.stat().st_mode)
        want = 0o755 if path == image.parent else 0o555 if path.is_dir() else 0o444
        assert mode == want, f"{path}: {stat.filemode(path.stat().st_mode)}"
        assert path.stat().st_uid == 0

    served = subprocess.run([sys.executable, "-c", SERVE, str(service_user.pw_uid), str(service_user.pw_gid), serve,
                             str(image)], env={**env, "HOME": str(service_home)}, cwd=base, capture_output=True,
                            text=True, timeout=300)
    assert served.returncode == 0, served.stdout + served.stderr
    report = json.loads(served.stdout.strip().splitlines()[-1])
    assert report["statuses"] == [0], served.stdout  # `flashinfer-jit cache verify` as the service user
    assert "verified 2 entries: 2 ok, 0 bad" in served.stdout
    assert report["builds"] == 0
    assert sorted(Path(p).name.rsplit("-", 1)[0] for p in report["entries"]) == sorted(URIS)
    assert all(image in Path(p).parents for p in report["entries"])
    assert not (service_home / ".cache").exists()  # a warm hit in the image creates no user cache

    # The image used as the service's writable cache instead: a kernel missing from it cannot be
    # built there, and the error says so and how to use the image instead.
    error = report["error"]
    assert error and f"cannot add kernel 'merge_state_hd256_bf16' to the cache at {image}" in error
    assert "read-only" in error and f"FLASHINFER_JIT_PREBUILT_DIRS={image}" in error
    assert f"uid {service_user.pw_uid}" in error
