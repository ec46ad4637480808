"""arktos-vm-runtime: runs CRI pods as libvirt/QEMU VMs."""

__version__ = "0.1.0"
