"""python -m arktos_vm_runtime"""
import sys

from .cli import main

sys.exit(main())
