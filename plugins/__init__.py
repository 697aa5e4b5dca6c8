"""Built-in backbone plugins: importing this package imports every module beside this file.

The package is declared in the ``cvtasks.plugins`` entry-point group like any third-party plugin,
so a new file dropped here registers its backbones with no other edit.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
