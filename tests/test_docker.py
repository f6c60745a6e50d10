"""The Docker image, built from the project's Dockerfile and run (``make docker-test``).

Opt-in (``--run-docker``): building the image takes minutes. It is built on a Debian bookworm base made
with debootstrap (deploy/docker-base.sh), since no container registry may be reachable, and every
container uses the host's network and is spoken to on 127.0.0.1 only. Skipped, with the reason, where no
Docker engine answers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from skimage import data as skdata

from tests.servers import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = os.environ.get("OAML_DOCKER_BASE", "oaml-base:bookworm")
IMAGE = os.environ.get("OAML_DOCKER_IMAGE", "oaml:docker-test")
KEY = "docker-test-key-4f9c1e27b8"  # 16 characters at least: the image listens beyond loopback

pytestmark = pytest.mark.docker


def docker_client() -> str | None:
    """Debian's own client first: docker.io's client builds with the engine's BuildKit (secrets, bind mounts)
    without the buildx plugin, which a newer client insists on."""
    if os.environ.get("OAML_DOCKER"):
        return os.environ["OAML_DOCKER"]
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    return shutil.which("docker")


def run(*args: str, check: bool = True, timeout: float = 120, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result


def pip_cert() -> str | None:
    """The CA bundle this machine's pip uses (a TLS-inspecting package index), handed to the build as a secret."""
    if os.environ.get("PIP_CERT") and Path(os.environ["PIP_CERT"]).is_file():
        return os.environ["PIP_CERT"]
    try:
        out = subprocess.run(["pip", "config", "list"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        name, _, value = line.partition("=")
        if name.strip().endswith(".cert"):
            path = value.strip().strip("'\"")
            if Path(path).is_file():
                return path
    return None


@pytest.fixture(scope="module")
def docker() -> str:
    client = docker_client()
    if client is None:
        pytest.skip("no docker client (make docker-test installs Debian's docker.io as root)")
    info = subprocess.run([client, "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"no Docker engine answers ({info.stderr.strip()[:200]}); make docker-test starts one as root")
    return client


@contextmanager
def replacing(docker: str, tag: str) -> Iterator[None]:
    """Around a build of ``tag``: the image it replaces is removed (were it left, untagged, every run of this
    module on a kept machine, a CI runner's or a developer's, would leave another image on the engine's disk: 1.6 GB
    for the service's, 0.9 GB for the side images)."""
    before = run(docker, "image", "inspect", "-f", "{{.Id}}", tag, check=False).stdout.strip()
    yield
    after = run(docker, "image", "inspect", "-f", "{{.Id}}", tag, check=False).stdout.strip()
    if before and after and before != after:
        run(docker, "image", "rm", before, check=False)  # not while a container still uses it


@pytest.fixture(scope="module")
def image(docker: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The base image (cached) and the service image built from the project's Dockerfile on it."""
    base = subprocess.run(
        [str(ROOT / "deploy" / "docker-base.sh"), BASE_IMAGE],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "DOCKER": docker},
    )
    if base.returncode != 0:
        if "debootstrap not found" in base.stderr or os.geteuid() != 0:  # debootstrap needs root and the tool
            pytest.skip(f"cannot make the Debian base image here: {base.stderr.strip()[-200:]}")
        pytest.fail(f"could not make the base image:\n{base.stdout[-2000:]}{base.stderr[-2000:]}")
    build = [docker, "build", "--network", "host", "--build-arg", f"BASE={BASE_IMAGE}", "-t", IMAGE]
    wheels = sorted((ROOT / "deploy" / "wheels").glob("torch-*.whl"))
    if wheels:  # the CPU wheel make docker-test put there (no PyTorch index is reachable here)
        build += ["--build-arg", f"TORCH_WHEEL={wheels[-1].name}"]
    cert = pip_cert()
    if cert:
        build += ["--secret", f"id=pip_cert,src={cert}"]
    log = tmp_path_factory.mktemp("docker") / "build.log"
    started = time.monotonic()
    with replacing(docker, IMAGE), log.open("w") as out:
        done = subprocess.run(
            [*build, str(ROOT)],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=2400,
            env={**os.environ, "DOCKER_BUILDKIT": "1", "BUILDKIT_PROGRESS": "plain"},
        )
        if done.returncode != 0:
            pytest.fail(f"docker build failed:\n{log.read_text()[-4000:]}")
    size = int(run(docker, "image", "inspect", "-f", "{{.Size}}", IMAGE).stdout.strip())
    print(f"image {IMAGE}: built in {time.monotonic() - started:.0f} s, {size / 2**20:.0f} MiB")  # noqa: T201
    return IMAGE


def health(docker: str, name: str) -> str:
    state = json.loads(run(docker, "inspect", "-f", "{{json .State}}", name).stdout)
    if not state.get("Running"):
        logs = run(docker, "logs", "--tail", "40", name, check=False)
        raise AssertionError(f"container {name} stopped (exit {state.get('ExitCode')}):\n{logs.stdout}{logs.stderr}")
    return str(state.get("Health", {}).get("Status", "none"))


def wait_healthy(docker: str, name: str, timeout: float = 300) -> None:
    """Until the image's own HEALTHCHECK says healthy (its command, probed every 2 s here)."""
    deadline = time.monotonic() + timeout
    status = "none"
    while time.monotonic() < deadline:
        status = health(docker, name)
        if status == "healthy":
            return
        time.sleep(1)
    logs = run(docker, "logs", "--tail", "40", name, check=False)
    raise AssertionError(f"container {name} not healthy after {timeout:.0f} s ({status}):\n{logs.stdout}{logs.stderr}")


class Service:
    """One running container of the image, with its gallery on a named volume."""

    def __init__(self, docker: str, image: str) -> None:
        self.docker, self.image = docker, image
        tag = uuid.uuid4().hex[:8]
        self.name, self.volume = f"oaml-test-{tag}", f"oaml-test-data-{tag}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        run(
            self.docker,
            "run",
            "-d",
            "--name",
            self.name,
            "--network",
            "host",
            "-v",
            f"{self.volume}:/data",
            "-e",
            f"OAML_API_KEYS={KEY}:admin",
            "-e",
            f"OAML_PORT={self.port}",
            "-e",
            "OAML_HOST=127.0.0.1",
            "--health-interval",
            "2s",
            "--health-start-period",
            "300s",
            self.image,
        )
        wait_healthy(self.docker, self.name)

    def restart(self) -> None:
        run(self.docker, "restart", self.name, timeout=180)
        time.sleep(3)  # the health status stays "healthy" from before until the next probe fails or passes
        wait_healthy(self.docker, self.name)

    def remove(self) -> None:
        run(self.docker, "rm", "-f", self.name, check=False)
        run(self.docker, "volume", "rm", "-f", self.volume, check=False)


@pytest.fixture(scope="module")
def service(docker: str, image: str) -> Iterator[Service]:
    svc = Service(docker, image)
    try:
        svc.start()
        yield svc
    finally:
        svc.remove()


def png(image: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    astronaut = Image.fromarray(skdata.astronaut())
    buf = io.BytesIO()
    astronaut.save(buf, format="JPEG", quality=90)  # same person, other codec (the model is weak on a stretched copy)
    return {"astronaut": png(astronaut), "astronaut_jpeg": buf.getvalue(), "camera": png(skdata.camera())}


def enrol(url: str, photos: dict[str, bytes], subject: str = "eileen") -> None:
    r = httpx.post(
        f"{url}/gallery",
        headers={"X-API-Key": KEY},
        data={"subject": subject},
        files=[("images", ("a.png", photos["astronaut"], "image/png"))],
        timeout=60,
    )
    assert r.status_code == 201, r.text


def identify(url: str, photos: dict[str, bytes]) -> dict:
    """The astronaut's other photo against the gallery, every candidate returned (threshold -1000)."""
    r = httpx.post(
        f"{url}/identify",
        headers={"X-API-Key": KEY},
        files={"image": ("b.jpg", photos["astronaut_jpeg"], "image/jpeg")},
        data={"threshold": "-1000"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_image_runs_as_the_unprivileged_user(docker: str, image: str) -> None:
    assert run(docker, "image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip() == "oaml"
    uid = run(docker, "run", "--rm", "--network", "host", "--entrypoint", "id", image, "-u").stdout.strip()
    assert uid == "10001"


def test_refuses_to_start_open_to_the_network_without_keys(docker: str, image: str) -> None:
    """The image listens on 0.0.0.0: without OAML_API_KEYS it stops at start-up, saying what to set."""
    name = f"oaml-test-open-{uuid.uuid4().hex[:8]}"
    try:
        result = run(
            docker,
            "run",
            "--name",
            name,
            "--network",
            "host",
            "-e",
            f"OAML_PORT={free_port()}",
            image,
            check=False,
            timeout=180,
        )
    finally:  # were it to start after all, it must not stay up listening on every interface
        run(docker, "rm", "-f", "-v", name, check=False)  # -v: and the anonymous volume of the image's /data
    assert result.returncode != 0
    assert "OAML_API_KEYS" in result.stdout + result.stderr


def test_verifies_a_pair_of_photos(service: Service, photos: dict[str, bytes]) -> None:
    def verify(other: tuple[str, bytes, str]) -> dict:
        r = httpx.post(
            f"{service.url}/verify",
            headers={"X-API-Key": KEY},
            files={"image_a": ("a.png", photos["astronaut"], "image/png"), "image_b": other},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return r.json()

    same = verify(("b.jpg", photos["astronaut_jpeg"], "image/jpeg"))
    other = verify(("c.png", photos["camera"], "image/png"))
    assert same["match"] is True and other["match"] is False
    assert same["score"] > other["score"]
    # without the key: refused
    assert httpx.post(f"{service.url}/verify", files={}, timeout=30).status_code == 401


def test_enrolment_survives_a_container_restart(service: Service, photos: dict[str, bytes]) -> None:
    enrol(service.url, photos)
    service.restart()
    listed = httpx.get(f"{service.url}/gallery/eileen", headers={"X-API-Key": KEY}, timeout=30)
    assert listed.status_code == 200, listed.text
    found = identify(service.url, photos)
    assert found["match"]["subject"] == "eileen" and found["gallery_faces"] == 1


# -- deploy/compose.yaml: PostgreSQL, two replicas and nginx ------------------------------------------

SIDE_IMAGES = {"postgres": "oaml-test-postgres:bookworm", "nginx": "oaml-test-nginx:bookworm"}
NGINX_CONF = """
upstream oaml {{
    least_conn;
    server 127.0.0.1:{a} max_fails=3 fail_timeout=10s;
    server 127.0.0.1:{b} max_fails=3 fail_timeout=10s;
}}
server {{
    listen 127.0.0.1:{lb};
    client_max_body_size 320m;
    location / {{
        proxy_pass http://oaml;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_next_upstream error timeout http_503;
    }}
}}
"""


def compose_command(docker: str) -> list[str] | None:
    """Debian's docker-compose (what make docker-engine installs), else the Compose plugin of the client."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"]
    return None


@pytest.fixture(scope="module")
def side_images(docker: str, image: str) -> dict[str, str]:
    """PostgreSQL and nginx images made from the same Debian base with Debian's packages."""
    for name, tag in SIDE_IMAGES.items():
        with replacing(docker, tag):
            run(
                docker,
                "build",
                "--network",
                "host",
                "--build-arg",
                f"BASE={BASE_IMAGE}",
                "-f",
                str(ROOT / "tests" / "docker" / f"{name}.Dockerfile"),
                "-t",
                tag,
                str(ROOT / "tests" / "docker"),
                timeout=900,
                env={**os.environ, "DOCKER_BUILDKIT": "1"},
            )
    return SIDE_IMAGES


def test_compose_replicas_share_one_gallery_behind_nginx(
    docker: str, image: str, side_images: dict[str, str], photos: dict[str, bytes], tmp_path: Path
) -> None:
    """deploy/compose.yaml with tests/docker/compose.host.yaml: enrol on one replica, the other replica and
    nginx (whichever replica it picks) identify the subject."""
    compose = compose_command(docker)
    if compose is None:
        pytest.skip("no docker-compose and no compose plugin (make docker-engine installs Debian's docker-compose)")
    pg, a, b, lb = (free_port() for _ in range(4))
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(a=a, b=b, lb=lb))
    env = {
        **os.environ,
        "OAML_API_KEYS": f"{KEY}:admin",
        "OAML_TEST_IMAGE": image,
        "OAML_TEST_PG_IMAGE": side_images["postgres"],
        "OAML_TEST_NGINX_IMAGE": side_images["nginx"],
        "OAML_TEST_PG_PORT": str(pg),
        "OAML_TEST_PORT_A": str(a),
        "OAML_TEST_PORT_B": str(b),
        "OAML_TEST_NGINX_CONF": str(conf),
    }
    # deploy/compose.yaml as users run it, less the load balancer's published port: publishing means nothing
    # on the host's network, and Compose refuses the two together
    spec = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    assert spec["services"]["lb"].pop("ports")
    base = tmp_path / "compose.yaml"
    base.write_text(yaml.safe_dump(spec))
    files = ["-f", str(base), "-f", str(ROOT / "tests" / "docker" / "compose.host.yaml")]
    project = ["-p", f"oamltest{uuid.uuid4().hex[:8]}", "--project-directory", str(ROOT / "deploy")]
    cmd = [*compose, *project, *files]
    try:
        run(*cmd, "up", "-d", "--no-build", env=env, timeout=600)
        for port in (a, b, lb):
            wait_ready(None, port, timeout=300)
        enrol(f"http://127.0.0.1:{a}", photos)
        deadline = time.monotonic() + 15  # the other replica follows through the change log (NOTIFY, or a poll)
        while identify(f"http://127.0.0.1:{b}", photos)["match"] is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert identify(f"http://127.0.0.1:{b}", photos)["match"]["subject"] == "eileen"
        for _ in range(4):  # through nginx, whichever replica answers
            assert identify(f"http://127.0.0.1:{lb}", photos)["match"]["subject"] == "eileen"
    finally:
        logs = run(*cmd, "logs", "--tail", "30", env=env, check=False, timeout=120)
        run(*cmd, "down", "-v", env=env, check=False, timeout=300)
        print(logs.stdout[-4000:])  # noqa: T201  (shown by pytest when the test fails)
