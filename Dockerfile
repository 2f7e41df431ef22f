# ft's image: Debian's Python 3.11, one hashed lockfile, ft itself, run as a non-root user.
#
#   nox -s build                                        # the real image (flavour cu130, the default)
#   nox -s build -- --flavour cu128                     # for hosts whose NVIDIA driver is older than 580
#   docker build --build-arg FLAVOUR=cu128 -t ft:cu128 .
#
# CUDA's userland (runtime, cuBLAS, cuDNN, NCCL) comes from the nvidia-* wheels pinned in
# lockfiles/<FLAVOUR>.txt, so the host needs only the NVIDIA driver and the NVIDIA Container Toolkit.
# BASE_IMAGE's default is env/base-image.txt (a test keeps the two equal). CI, which reaches no
# registry, passes a debootstrapped bookworm instead. Any other base must be Debian 12 (bookworm) too:
# the locks hold cp311 wheels, and nvidia/cuda's Ubuntu bases ship Python 3.10 or 3.12 (the python
# stage stops there); CUDA comes from the wheels, so such a base would add nothing.
# No `# syntax=` line on purpose: it would pull a frontend image; the engine's built-in BuildKit
# frontend understands the RUN --mount flags used here.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251

# ---- python: the interpreter the locks were resolved for (Debian 12 ships 3.11) -----------------------
FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1
# Debian packages come from the digest-pinned release; Python packages, where the CUDA stack lives, are
# hash-pinned below. hadolint ignore: exact apt versions vanish from the mirrors with each point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && case "$(python3 -V)" in "Python 3.11."*) ;; \
      *) echo "this base has $(python3 -V); the locks need Python 3.11 (a Debian 12 base)" >&2; exit 1 ;; esac

# ---- builder: a venv filled from the lock before any source arrives, so code edits reuse this layer ---
FROM python AS builder
# cmake and g++ build llama-cpp-python (`ft export`: GGUF conversion, quantisation, loading) from its locked
# sdist, for the CPU; GGML_NATIVE=OFF so the image runs on CPUs other than the build machine's.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv python3-dev gcc g++ cmake libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
ARG FLAVOUR=cu130
COPY lockfiles/${FLAVOUR}.txt /opt/ft/requirements.lock
# Optional build secrets, read only during this step and never stored in a layer:
#   ca        an extra CA bundle, for networks that inspect TLS (pip fails certificate checks there)
#   index_url a package index to use instead of pip's default (may carry credentials)
# env/wheels is a --find-links folder; the CPU test image gets torch's CPU build there. When it is empty
# (`docker compose run --rm smoke`), FLAVOUR=cpu takes that build from PyTorch's public CPU index, as PyPI
# has no +cpu build; the lock's hash still decides which file is accepted.
# --no-deps: the lock is complete, so nothing unhashed can sneak in; `pip check` proves it is consistent,
# but for one requirement left out on purpose: cu130 has no xformers (unsloth requires it; the only build
# is for torch 2.10 + CUDA 12.8, so Unsloth uses PyTorch's SDPA attention). Anything else fails the build.
# The pip cache lives in a BuildKit cache mount, never in a layer (hence DL3042 does not apply).
# hadolint ignore=DL3042
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca \
    --mount=type=secret,id=index_url \
    --mount=type=bind,source=env/wheels,target=/tmp/wheels \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -s /run/secrets/index_url ]; then PIP_INDEX_URL="$(cat /run/secrets/index_url)" && export PIP_INDEX_URL; fi \
 && torch_index="" \
 && if [ "$FLAVOUR" = cpu ] && [ -z "$(find /tmp/wheels -name 'torch-*.whl')" ]; then \
      torch_index=https://download.pytorch.org/whl/cpu; fi \
 && pip install --require-hashes --no-deps --find-links /tmp/wheels \
      ${torch_index:+--extra-index-url "$torch_index"} -r /opt/ft/requirements.lock \
 && if ! pip check > /tmp/pip-check.txt; then \
      cat /tmp/pip-check.txt; \
      if grep -v -x 'unsloth [^ ]* requires xformers, which is not installed\.' /tmp/pip-check.txt; then exit 1; fi; \
    fi \
 && rm -f /tmp/pip-check.txt
# ft itself, built with the locked setuptools (no build isolation, so no unhashed download).
COPY pyproject.toml README.md /src/
COPY ft /src/ft
RUN pip install --no-cache-dir --no-deps --no-build-isolation --no-index /src
# llama.cpp's converter is in the llama-cpp-python sdist, not its wheel: fetch the sdist the lock pins (its
# hash checked by pip, then again by ft) and unpack the converter into the venv (ft.export.llamacpp).
# --no-binary names only the sdist: pip prepares its metadata, and its build tools (ninja, …) must come as
# wheels (`:all:` made pip try to compile ninja from source, which needs ninja or make).
# hadolint ignore=DL3042
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca \
    --mount=type=secret,id=index_url \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -s /run/secrets/index_url ]; then PIP_INDEX_URL="$(cat /run/secrets/index_url)" && export PIP_INDEX_URL; fi \
 && sed -n '/^llama-cpp-python==/{N;s/\\\n */ /;p}' /opt/ft/requirements.lock > /tmp/llama.req \
 && pip download --no-deps --no-binary llama-cpp-python --require-hashes -r /tmp/llama.req -d /tmp/llama \
 && python -m ft.export.llamacpp install /tmp/llama/llama_cpp_python-*.tar.gz \
 && rm -rf /tmp/llama /tmp/llama.req

# ---- runtime ------------------------------------------------------------------------------------------
FROM python AS runtime
# Triton (the GPU path) compiles its kernel launchers with the system C compiler at run time.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev python3-dev \
 && rm -rf /var/lib/apt/lists/*
# The default user; compose runs as the invoking user instead (`user: UID:GID`) so files in ./runs are
# theirs. Any uid works: the writable places are world-writable with the sticky bit, like /tmp.
ARG FT_UID=1000
ARG FT_GID=1000
RUN groupadd --gid "${FT_GID}" ft \
 && useradd --uid "${FT_UID}" --gid ft --create-home --shell /usr/sbin/nologin ft \
 && mkdir -p /workspace/data /workspace/runs /workspace/bundles /cache/huggingface /cache/ft \
 && chown -R ft:ft /workspace /cache \
 && chmod 1777 /workspace /workspace/runs /workspace/bundles /cache /cache/huggingface /cache/ft /home/ft
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/ft/requirements.lock /etc/ft/requirements.lock
# /cache is where compose mounts the named cache volume: models downloaded once, kept across runs.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/ft \
    HF_HOME=/cache/huggingface \
    FT_CACHE=/cache/ft \
    XDG_CACHE_HOME=/cache \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    MPLCONFIGDIR=/tmp/matplotlib \
    HF_HUB_DISABLE_TELEMETRY=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Build facts, last so that a new commit or build time re-runs only this small step. The image id cannot
# be known inside its own build: compose and nox pass it at run time as FT_IMAGE_ID.
ARG BASE_IMAGE
ARG FLAVOUR=cu130
ARG GIT_COMMIT=unknown
ARG BUILD_TIME=unknown
ARG FT_VERSION=unknown
ARG LOCK_SHA256=unknown
LABEL org.opencontainers.image.title="ft" \
      org.opencontainers.image.description="Reproducible single-GPU QLoRA fine-tuning" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${FT_VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.created="${BUILD_TIME}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      ft.flavour="${FLAVOUR}" \
      ft.lockfile.sha256="${LOCK_SHA256}" \
      ft.git.commit="${GIT_COMMIT}" \
      ft.build.time="${BUILD_TIME}" \
      ft.base.image="${BASE_IMAGE}"
# /etc/ft/image.json: the same facts for ft's environment manifest (env/image_facts.py, mounted for this
# step only). It hashes the lock actually installed and fails the build if LOCK_SHA256 disagrees.
# The ARGs above reach the script as environment variables.
RUN --mount=type=bind,source=env/image_facts.py,target=/tmp/image_facts.py \
    /opt/venv/bin/python /tmp/image_facts.py /etc/ft/requirements.lock /etc/ft/image.json

WORKDIR /workspace
# Numeric, so runtimes that enforce non-root (e.g. Kubernetes runAsNonRoot) can check it.
USER ${FT_UID}:${FT_GID}
ENTRYPOINT ["ft"]
CMD ["--help"]
