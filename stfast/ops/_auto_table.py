"""Measured winners for the ``auto`` backend on CUDA devices: ``{device name: {"op/dtype": backend}}``.

Written by ``python bench/auto_table.py --write`` on a GPU (``bench/gpu_session.sh`` runs it): for
each op and dtype, the backend with the smallest median forward+backward time at the op's benchmark
shapes, timed side by side. ``auto`` uses an entry only on a device whose name
(``torch.cuda.get_device_name``) matches exactly, and ``torch`` everywhere else.

Empty: no GPU session has measured the kernels yet.
"""

WINNERS: dict[str, dict[str, str]] = {}
