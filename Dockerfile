# nbdbackup with the qemu and NBD tools it drives. Build: docker build -t nbdbackup .
FROM debian:12-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      qemu-utils qemu-system-common qemu-system-x86 nbdkit libnbd-bin nbd-server \
      python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY . /src
RUN python3 -m venv /opt/nbdbackup \
 && /opt/nbdbackup/bin/pip install --no-cache-dir /src \
 && ln -s /opt/nbdbackup/bin/nbdbackup /usr/local/bin/nbdbackup \
 && rm -rf /src
ENV NBDBACKUP_REPO=/repo
VOLUME ["/repo"]
ENTRYPOINT ["nbdbackup"]
CMD ["--help"]
