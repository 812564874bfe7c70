"""nbdbackup: incremental, deduplicated backups of qemu/KVM disks over NBD."""

__version__ = "0.1.0"
