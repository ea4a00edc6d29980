# One image for the three services; the command chooses which one runs (see docker-compose.yml):
#   python -m services.allocator | python -m services.binding | python -m services.arp_watcher
#   python -m services.allocator migrate && python -m services.binding migrate      (the one-shot migration)
#
# Builder: wheels of the project and of its runtime dependencies, pinned by requirements.lock, installed offline
# into a virtual environment without pip. Final image: the base Python, that environment, a non-root user;
# no compiler, no pip, no sources.
#
# Offline builds (no package index reachable): build the wheels on a machine that has one,
#   pip wheel --wheel-dir WHEELS --constraint requirements.lock .  &&  pip download --dest WHEELS setuptools
# and pass them in: `--build-arg WHEELHOUSE=/wheelhouse` with WHEELS mounted there (podman build --volume
# WHEELS:/wheelhouse:ro). Then pip never asks an index.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG WHEELHOUSE=""
WORKDIR /src
COPY pyproject.toml requirements.lock ./
COPY shared ./shared
COPY services ./services
RUN set -eu; \
    if [ -n "$WHEELHOUSE" ]; then set -- --no-index --find-links "$WHEELHOUSE"; else set --; fi; \
    python3 -m venv /opt/build; \
    /opt/build/bin/pip wheel --no-cache-dir --disable-pip-version-check --quiet "$@" \
        --wheel-dir /wheels --constraint requirements.lock .; \
    python3 -m venv --without-pip /opt/havip; \
    /opt/build/bin/pip --python /opt/havip/bin/python install --no-cache-dir --disable-pip-version-check \
        --quiet --no-index --find-links /wheels havip

FROM ${PYTHON_IMAGE}
# A fixed uid, so that volumes and file permissions do not depend on the order users were created in.
RUN groupadd --gid 10001 havip \
    && useradd --uid 10001 --gid havip --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin havip
COPY --from=builder /opt/havip /opt/havip
ENV PATH=/opt/havip/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HAVIP_HOST=0.0.0.0
USER havip
WORKDIR /
EXPOSE 8080 9102 9103
CMD ["python", "-m", "services.allocator"]
