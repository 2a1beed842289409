# The runtime image: `framework serve` as a non-root user, no project source inside.
# Build with the Python major.minor your deploys use (artifacts record it and a
# different one is refused), and add the third-party packages your deployments import:
#   docker build --build-arg PYTHON_VERSION=3.11 --build-arg EXTRA_PACKAGES="numpy scikit-learn" -t framework .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FRAMEWORK_CACHE_DIR=/var/cache/framework

ARG EXTRA_PACKAGES=""
COPY pyproject.toml README.md /tmp/src/
COPY framework /tmp/src/framework
RUN pip install "/tmp/src[s3]" ${EXTRA_PACKAGES} \
    && rm -rf /tmp/src \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin framework \
    && mkdir -p /var/cache/framework /srv \
    && chown framework:framework /var/cache/framework /srv

USER 10001:10001
WORKDIR /srv
EXPOSE 8000
ENTRYPOINT ["framework"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
